"""MCC: self-supervised skeleton representation learning with motion consistency and continuity.

Paper: Su, Lin, Wu, "Self-supervised 3D Skeleton Action Representation Learning with Motion
Consistency and Continuity", ICCV 2021. No official code was released; the backbone follows ST-GCN
(yysijie/st-gcn, net/st_gcn.py), and what the paper leaves open is decided in SPEC section 5.

Pretext (per sequence, all on the device): three 32-frame clips with independent random starts at
playback speeds r in {1, 2, 4, 8} (stride r, looping past the end): base b = S(r_i), positive
p = S(r_j) with r_j != r_i, negative n = frame-shuffled S(r_i) ("motion-broken"). Losses (weights
1/1/1): triplet max(0, 0.15 + d(b,p) - d(b,n)); InfoNCE (tau 0.5) of b against the momentum key
of p and a queue of 65536 keys from earlier batches, leaving out those of b's own sequence (the
paper's negatives come "from other samples", and K exceeds NTU-60's 40k sequences); and
interpolation: a decoder maps the encoder map of b and of p to 2x as many frames, target = stride
r/2 frames (r = 1: the clip twice).

Data: the shared processed arrays (SPEC section 3: 2s-AGCN pre-normalised, centred and aligned),
not ST-GCN's own NTU arrays of raw camera coordinates (methods.md 4.4), so all four methods train
and evaluate on the same clips.

Downstream: `Encoder(args)(x)` -> pooled 256-d ST-GCN feature; `dense(x)` -> the ST-GCN map pooled
over joints and bodies, linearly upsampled to the input length. MCC's own protocol is fine-tuning
(evaluate.py --task finetune; semi and transfer use the same recipe); `window` = 64 frames, the
clip evaluate.py feeds every method.

Commands
  1 GPU:     python mcc.py --dataset ntu60 --split xsub --data_dir data
  N GPUs:    torchrun --nproc_per_node=4 mcc.py --dataset ntu60 --split xsub   (batch is global)
  CPU quick: python mcc.py --dataset synthetic
The quick start (dataset synthetic*) applies QUICK to every flag not given explicitly: an ST-GCN of
width 8 (8-16-32), batch 32, 4 epochs (lr x0.1 after 3), queue 1024, key momentum 0.99 (0.999 barely
moves the key encoder in 148 steps), the decoder at the full lr (--decoder_lr_mult 1: stable at
width 8), the split resident (--data_on_device); the paper run stays the default for every other
dataset.
Measured on the shared 2-core CPU with OMP_NUM_THREADS=1 (148 steps, two runs at a time): 206-220 s
wall; kNN k=1 (evaluate.py --task knn --baseline random --seed s) for seeds 0, 1, 2: 20.4, 16.8,
13.8 vs random init 19.2, 20.2, 14.5; seed 0: linear (30 epochs) 15.3 vs 5.0 (chance: the
random-init ST-GCN's eval-mode features are ~1e-7), semi 10% (subset 0) 8.5 vs 13.7. The build
before the graph aggregation was reordered (float32 rounding only) gave kNN 20.1, 17.8, 16.6 and
seed 0 semi 6.2 vs 9.6 (the random-init fine-tune moved by 4 points too): rounding-level changes
move these runs by several points. With that build, semi 10% over labelled subsets 0, 1, 2
(--seeds 0 1 2), means for seeds 0, 1, 2: 10.3, 10.5, 12.5 vs 9.6, 13.0, 11.2 (all nine runs 11.1 vs
11.3). So neither kNN nor the 10%-label fine-tuning (evaluate.py --task semi, ST-GCN recipe)
reliably beats random init. Nor do 16 epochs (--epochs 16 --lr_steps 12, seeds 0 / 1): kNN
17.9 / 15.1, semi 10% 10.4 / 13.0 against 19.2 / 20.2 and 13.7 / 11.5 (README, "Longer
pre-training"). With the default 2 threads on a machine loaded by other jobs, OpenMP contention
made a step cost ~5x the CPU time (6.8 s vs 1.4 s): set OMP_NUM_THREADS=1 there.
Everything below was measured before the queue's keys of the query's own sequence were masked (38%
of the quick start's queries in epochs 2-4 had their previous-epoch key among the negatives); kNN
k=1 was then 21.3, 17.3, 15.9 and semi 10% 9.2 (seed 0, subset 0). Seed 0, 1 thread: at lr 0.1 the
triplet term stays at its margin (0.15: base, speed-changed and motion-broken clips embed within
0.03 of each other) and the conv weights grow 2-27x in norm (with --dropout 0; block 1 gcn 0.15 ->
4.0), which under BatchNorm divides their effective fine-tuning lr; dropout 0.5 on 8-32 channels
also cripples the random-init fine-tune (9.6 -> 15.7 without it). Variants (semi 10% / kNN k=1,
random init in parentheses): --dropout 0: 11.4 (15.7) / 20.2 (19.2); --dropout 0 --lr 0.02 (triplet
0.15 -> 0.01): 14.8 (15.7) / 21.0 (19.2); same, 8 epochs: 14.7 (15.7) / 17.4 (19.2); same, 4 epochs,
width 16: kNN 20.5 (22.4). --lr 0.02 with dropout 0.5, seeds 0 / 1: 12.5 (9.6) / 15.9 (19.2) and
13.8 (16.0) / 17.5 (20.2) (the seed-1 run's labelled subset is not recorded; its random-init 16.0
equals subset 1's below). None adopted. Seed check (training and evaluate.py --seed s): semi 10%,
labelled subsets 0, 1, 2 (--seeds 0 1 2): seed 0 9.2, 14.8, 11.0 (9.6, 10.0, 9.3), seed 1 9.5, 9.0,
12.0 (10.3, 16.0, 12.7), seed 2 13.0, 12.2, 12.7 (10.5, 12.4, 10.8); means 11.5 vs 11.3.
Adam (what made PCM3++'s quick start pass; optimizer line patched to AdamW without weight decay,
current build), seed 0 kNN k=1: lr 1e-3 16.6, lr 3e-4 15.8 (random init 19.2). Not adopted.
Pretext check on the shipped seed-0 quick start (current build): in eval mode its pooled
features retrieve each val sequence's speed-changed positive among 1,200 at 17.1% / 18.2% (two
clip draws) vs 29.6% / 18.5% for random init, and put the positive closer than the motion-broken
negative for 37-41% of sequences (random init 48-57%); in train mode the projector embeds base,
positive and negative within 0.087 of each other (triplet 0.156 ~ its margin). At lr 0.1 the
quick start does not learn its own pretext; --dropout 0 --lr 0.02 does (above) and still ties
(current build, seeds 0 / 1: kNN k=1 19.2 / 20.4 vs random init 19.2 / 20.2).
"""
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import arg

METHOD = "mcc"


@dataclass
class Args:
    dataset: str = arg("ntu60", "dataset (ntu60, ntu120, pku1, pku2, synthetic, synthetic_ext)")
    split: str = arg("xsub", "benchmark split (xsub, xview, xsetup)")
    data_dir: str = arg("data", "root folder of the processed datasets")
    out_dir: str = arg("", "output folder (default out/mcc_<dataset>_<split>)")
    modality: str = arg("joint", "input stream: joint, bone or motion (computed per clip)")
    epochs: int = arg(80, "pre-training epochs (ST-GCN's NTU recipe, which MCC follows)")
    lr_steps: list = arg([10, 50], "epochs at which the lr is multiplied by 0.1 (ST-GCN NTU)")
    batch_size: int = arg(64, "global batch size (sequences; each gives 3 clips)")
    lr: float = arg(0.1, "base learning rate of SGD")
    momentum: float = arg(0.9, "SGD momentum")
    nesterov: bool = arg(True, "Nesterov momentum (as ST-GCN's processor)")
    weight_decay: float = arg(1e-4, "SGD weight decay on every parameter")
    clip_len: int = arg(32, "frames per pre-training clip (paper: 32)")
    speeds: list = arg([1, 2, 4, 8], "playback speeds (frame strides) of the clips")
    interp_rate: int = arg(2, "interpolation rate l: the decoder outputs l * clip_len frames")
    margin: float = arg(0.15, "triplet margin gamma")
    tau: float = arg(0.5, "InfoNCE temperature")
    queue_size: int = arg(65536, "MoCo queue length K (paper prints 6536, read as 65536)")
    key_momentum: float = arg(0.999, "momentum of the key encoder (MoCo default)")
    proj_dim: int = arg(128, "dimension of the L2-normalised projection used by triplet and NCE")
    w_triplet: float = arg(1.0, "weight lambda_1 of the triplet loss")
    w_nce: float = arg(1.0, "weight lambda_2 of the InfoNCE loss")
    w_itep: float = arg(1.0, "weight lambda_3 of the interpolation loss")
    decoder_lr_mult: float = arg(0.1, "lr multiplier of the interpolation decoder (ours, not the "
                                 "paper's: our SPEC-5 decoder's read-out diverges within 3 "
                                 "steps at width 64 and lr 0.1, see param_groups)")
    base_width: int = arg(64, "ST-GCN width: blocks are w x4, 2w x3, 4w x3 (paper 64)")
    dropout: float = arg(0.5, "dropout of ST-GCN blocks 2-10 (ST-GCN NTU config)")
    window: int = arg(64, "frames per clip the encoder takes downstream (evaluate.py's crop)")
    seed: int = arg(0, "random seed (weights, data order, clip sampling)")
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = arg("auto", "autocast dtype: auto (bf16 on CUDA, off on CPU), fp32, bf16, fp16")
    compile: bool = arg(False, "torch.compile the model")
    resume: bool = arg(False, "continue from <out_dir>/last.pt")
    num_workers: int = arg(0, "background threads reading batches from the memory map (unused "
                           "with --data_on_device)")
    log_every: int = arg(50, "log one line every this many steps")
    save_every: int = arg(10, "write last.pt every this many epochs (and at the end)")
    data_on_device: bool = arg(False, "keep the whole training split on the device")
    deterministic: bool = arg(False, "deterministic algorithms (for exact CPU reproducibility)")


# Quick-start config for the synthetic datasets (applied to flags not given on the command line).
QUICK = dict(epochs=4, lr_steps=[3], batch_size=32, base_width=8, queue_size=1024,
             key_momentum=0.99, decoder_lr_mult=1.0, log_every=10, save_every=1,
             data_on_device=True)


# ----------------------------------------------------------------------------------------- model
class STGCNBlock(nn.Module):
    """st_gcn block: 1x1 conv to K*out channels, graph aggregation over the K subsets, then
    BN-ReLU-Conv(9x1, stride s)-BN-Dropout, residual, ReLU (yysijie/st-gcn net/st_gcn.py)."""

    def __init__(self, c_in, c_out, num_subsets, stride=1, dropout=0.0, residual=True):
        super().__init__()
        self.k = num_subsets
        self.gcn = nn.Conv2d(c_in, c_out * num_subsets, 1)
        self.tcn = nn.Sequential(common.GlobalBatchNorm2d(c_out), nn.ReLU(inplace=True),
                                 nn.Conv2d(c_out, c_out, (9, 1), (stride, 1), (4, 0)),
                                 common.GlobalBatchNorm2d(c_out), nn.Dropout(dropout, inplace=True))
        if not residual:
            self.residual = None
        elif c_in == c_out and stride == 1:
            self.residual = nn.Identity()
        else:
            self.residual = nn.Sequential(nn.Conv2d(c_in, c_out, 1, (stride, 1)),
                                          common.GlobalBatchNorm2d(c_out))

    def forward(self, x, a):  # x (NM, C, T, V); a (K, V, V) = A * edge importance
        res = 0 if self.residual is None else self.residual(x)
        y = self.gcn(x)
        n, kc, t, v = y.shape
        # sum_k y_k @ A_k (ST-GCN's einsum "nkctv,kvw->nctw") as one batched matmul of the
        # (C*T, V) slices of y by their subset's A_k, then the sum over k: no permuted copy of y
        # (the einsum's bmm and a single (k, v)-contraction both need one); forward + backward of
        # the aggregation ~25% faster on CPU at widths 64-256, equal at the quick width 8.
        y = torch.matmul(y.view(n, self.k, kc // self.k * t, v), a.to(y.dtype)[None]).sum(1)
        return F.relu(self.tcn(y.view(n, kc // self.k, t, v)) + res)


def stgcn_init(module):
    """ST-GCN processor init: conv weights N(0, 0.02), bias 0; BN weights N(1, 0.02), bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Encoder(nn.Module):
    """ST-GCN backbone without head: per-body data BN, 10 blocks (w x4, 2w x3 stride 2 first,
    4w x3 stride 2 first), spatial partition (K=3) with learnable edge importance per block."""

    def __init__(self, args, dropout=None):
        super().__init__()
        dropout = args.dropout if dropout is None else dropout
        a = torch.tensor(common.stgcn_spatial_graph(), dtype=torch.float32)  # (3, V, V)
        self.register_buffer("A", a)
        k, v, w = a.size(0), a.size(1), args.base_width
        self.data_bn = common.GlobalBatchNorm1d(3 * v)
        plan = [(3, w, 1), (w, w, 1), (w, w, 1), (w, w, 1), (w, 2 * w, 2), (2 * w, 2 * w, 1),
                (2 * w, 2 * w, 1), (2 * w, 4 * w, 2), (4 * w, 4 * w, 1), (4 * w, 4 * w, 1)]
        # block 1: no residual and no dropout (ST-GCN passes dropout only to blocks 2..10)
        self.blocks = nn.ModuleList(
            STGCNBlock(ci, co, k, s, 0.0 if i == 0 else dropout, residual=i > 0)
            for i, (ci, co, s) in enumerate(plan))
        self.edge_importance = nn.ParameterList(nn.Parameter(torch.ones_like(a)) for _ in plan)
        self.out_dim = self.dense_dim = 4 * w
        stgcn_init(self)

    def feature_map(self, x):  # x (N, C, T, V, M) -> (N*M, 4w, T/4, V), row n*M + m
        n, c, t, v, m = x.shape
        x = x.permute(0, 4, 3, 1, 2).reshape(n * m, v * c, t)  # data BN channel = v*C + c
        x = self.data_bn(x).view(n, m, v, c, t).permute(0, 1, 3, 4, 2).reshape(n * m, c, t, v)
        for block, importance in zip(self.blocks, self.edge_importance):
            x = block(x, self.A * importance)
        return x

    @staticmethod
    def pool(fmap, m):  # (N*M, D, T', V) -> (N, D): mean over time and joints, then bodies
        return fmap.mean(dim=(2, 3)).view(-1, m, fmap.size(1)).mean(dim=1)

    def forward(self, x):  # (N, C, T, V, M) -> (N, 4w)
        return self.pool(self.feature_map(x), x.size(-1))

    def dense(self, x):  # (N, C, T, V, M) -> (N, T, 4w): map pooled over V and M, upsampled to T
        n, _, t, _, m = x.shape
        f = self.feature_map(x).mean(dim=3)
        f = f.view(n, m, f.size(1), f.size(2)).mean(dim=1)  # (N, D, T')
        return F.interpolate(f, size=t, mode="linear", align_corners=False).transpose(1, 2)


class Decoder(nn.Module):
    """SPEC 5: 4 ST-GCN blocks 4w -> 2w -> w -> w; the first three upsample time x2 (linear) so
    the T/4 encoder map reaches interp_rate * clip_len frames; a 1x1 conv maps to 3 coordinates.
    (The paper's decoder details are in an unavailable supplement.)"""

    def __init__(self, args, a):
        super().__init__()
        w, k = args.base_width, a.size(0)
        self.register_buffer("A", a.clone())
        self.out_len = args.interp_rate * args.clip_len
        self.blocks = nn.ModuleList(STGCNBlock(ci, co, k) for ci, co in
                                    [(4 * w, 2 * w), (2 * w, w), (w, w), (w, w)])
        self.edge_importance = nn.ParameterList(nn.Parameter(torch.ones_like(a)) for _ in range(4))
        self.head = nn.Conv2d(w, 3, 1)
        stgcn_init(self)

    def forward(self, fmap, m):  # (N*M, 4w, T', V) -> (N, 3, out_len, V, M)
        sizes = [self.out_len // 4, self.out_len // 2, self.out_len, self.out_len]
        x = fmap
        for size, block, importance in zip(sizes, self.blocks, self.edge_importance):
            if x.size(2) != size:
                x = F.interpolate(x, size=(size, x.size(3)), mode="bilinear", align_corners=False)
            x = block(x, self.A * importance)
        x = self.head(x)  # (N*M, 3, T_out, V)
        return x.view(-1, m, *x.shape[1:]).permute(0, 2, 3, 4, 1)


def projector(args):
    """MoCo v2-style MLP to the 128-d embedding of triplet and NCE (the paper does not say)."""
    d = 4 * args.base_width
    return nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, args.proj_dim))


class Model(nn.Module):
    """Query encoder + projector + decoder, momentum key encoder + projector, key queue."""

    def __init__(self, args):
        super().__init__()
        self.encoder = Encoder(args)
        self.projector = projector(args)
        self.decoder = Decoder(args, self.encoder.A)
        # keys come from a dropout-free copy: a stable target, as MoCo's key network has no dropout
        self.key_encoder = Encoder(args, dropout=0.0)
        self.key_projector = projector(args)
        self.key_encoder.load_state_dict(self.encoder.state_dict())
        self.key_projector.load_state_dict(self.projector.state_dict())
        for p in list(self.key_encoder.parameters()) + list(self.key_projector.parameters()):
            p.requires_grad_(False)
        # MoCo initialises the queue with random unit vectors; they are flushed after K keys
        queue = F.normalize(torch.randn(args.queue_size, args.proj_dim), dim=1)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # Sample index of each queued key (-1: an initial random vector). The paper draws the
        # negatives "from other samples", but a queue holds a sample's key of the previous epoch
        # whenever fewer than K keys were enqueued since: always for K = 65536 on NTU-60 xsub
        # (40k clips) or PKU-MMD II (5k), often for the quick start (1024 of 1,184 per epoch).
        self.register_buffer("queue_ids", torch.full((args.queue_size,), -1, dtype=torch.long))

    def forward(self, clips, keys):
        """clips (3B, C, L, V, M) = [base; positive; negative], keys (B, C, L, V, M) = positive.
        Returns z (3B, P) unit query embeddings, rec (2B, C, l*L, V, M) interpolations of base and
        positive, k (B, P) unit keys."""
        m, b2 = clips.size(-1), 2 * keys.size(0)
        fmap = self.encoder.feature_map(clips)  # (3B*M, 4w, L/4, V)
        z = F.normalize(self.projector(self.encoder.pool(fmap, m)), dim=1)
        rec = self.decoder(fmap[:b2 * m], m)  # never the motion-broken clips (paper 3.2)
        with torch.no_grad():
            k = F.normalize(self.key_projector(self.key_encoder(keys)), dim=1)
        return z, rec, k

    @torch.no_grad()
    def momentum_update(self, mom):
        keys = [*self.key_encoder.parameters(), *self.key_projector.parameters()]
        queries = [p.detach() for p in (*self.encoder.parameters(), *self.projector.parameters())]
        torch._foreach_mul_(keys, mom)  # multi-tensor kernels: same arithmetic as per-parameter ops
        torch._foreach_add_(keys, queries, alpha=1 - mom)

    @torch.no_grad()
    def enqueue(self, keys, ids):  # keys (B_global, P), ids (B_global,) sample indices, rank order
        idx = (self.queue_ptr + torch.arange(keys.size(0), device=keys.device)) % self.queue.size(0)
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ids[idx] = ids.to(self.queue_ids.device)
        self.queue_ptr.copy_((self.queue_ptr + keys.size(0)) % self.queue.size(0))


# ------------------------------------------------------------------------------------------ loss
def mcc_losses(z, k, queue, rec, target, margin, tau, own=None):
    """z (3B, P) unit embeddings of [b; p; n], k (B, P) unit keys of p, queue (K, P), rec/target
    (2B, 3, T', V, M), own (B, K) bool or None: queued keys of the query's own sequence, left out
    of its negatives. Returns the three loss terms in fp32."""
    zb, zp, zn = z.float().chunk(3)
    # Eq. 1 with the standard sign (SPEC 5): pull the positive, push the motion-broken clip
    d_pos, d_neg = (zb - zp).norm(dim=1), (zb - zn).norm(dim=1)
    triplet = F.relu(margin + d_pos - d_neg).mean()
    # Eq. 2 with cosine similarity in place of the printed distance (sign fix, SPEC 5)
    l_pos = (zb * k.float()).sum(dim=1, keepdim=True)
    l_neg = zb @ queue.float().t()                                              # (B, K)
    if own is not None:
        l_neg = l_neg.masked_fill(own, float("-inf"))
    logits = torch.cat([l_pos, l_neg], dim=1) / tau
    nce = F.cross_entropy(logits, torch.zeros(zb.size(0), dtype=torch.long, device=z.device))
    # Eq. 3: squared error summed over xyz, averaged over joints, frames (and bodies, samples)
    itep = (rec.float() - target.float()).pow(2).sum(dim=1).mean()
    return {"triplet": triplet, "nce": nce, "itep": itep}


# ----------------------------------------------------------------------------------------- views
def make_views(x, num_frame, g, args, rank=0, world_size=1):
    """Builds the MCC clips of a batch on x's device (no per-sample Python loop).

    x (B, C, T, V, M) raw sequences, num_frame (B,). Random draws are made for the GLOBAL batch
    (B * world_size, same generator state on every rank) and this rank's rows are kept, so every
    sample gets the same clips whatever the number of processes. Returns base, pos, neg
    (B, C, L, V, M), target (2B, C, l*L, V, M) for [base; pos] and the drawn parameters."""
    b, dev, L, l = x.size(0), x.device, args.clip_len, args.interp_rate
    rows = slice(rank * b, (rank + 1) * b)
    gb, speeds = b * world_size, torch.tensor(args.speeds, device=dev)
    u = torch.rand(gb, 3, generator=g, device=dev)[rows]  # start fractions of c_i, c_j, c_k
    si = torch.randint(len(speeds), (gb,), generator=g, device=dev)[rows]
    sj = (si + torch.randint(1, len(speeds), (gb,), generator=g, device=dev)[rows]) % len(speeds)
    # B(.): common.shuffle_frames (uniform over the non-identity orders) applied to the frame
    # positions 0..L-1 of the global batch gives the permutations; shuffling indices, not clips
    positions = torch.arange(L, device=dev, dtype=torch.float).view(1, 1, L, 1, 1)
    perm = common.shuffle_frames(positions.expand(gb, 1, L, 1, 1), g)[rows].reshape(b, L).long()
    r_i, r_j = speeds[si], speeds[sj]
    start = (u * num_frame[:, None]).long().clamp(max=num_frame[:, None] - 1)  # (B, 3)
    idx_b = common.speed_indices(num_frame, start[:, 0], r_i, L)
    idx_p = common.speed_indices(num_frame, start[:, 1], r_j, L)
    idx_n = common.speed_indices(num_frame, start[:, 2], r_i, L).gather(1, perm)
    tgt = [interp_indices(num_frame, start[:, i], r, L, l) for i, r in [(0, r_i), (1, r_j)]]
    frames = common.gather_frames(x, torch.cat([idx_b, idx_p, idx_n] + tgt, dim=1))
    base, pos, neg, t_b, t_p = frames.split([L, L, L, l * L, l * L], dim=2)
    base, pos, neg, t_b, t_p = (common.to_modality(c.contiguous(), args.modality)
                                for c in (base, pos, neg, t_b, t_p))
    info = {"start": start, "r_i": r_i, "r_j": r_j, "perm": perm}
    return base, pos, neg, torch.cat([t_b, t_p]), info


def interp_indices(num_frame, start, speed, length, rate):
    """Ground truth of the rate-l interpolation of S(r): stride r/l from the same start (l*length
    frames); for r = 1 the clip itself repeated l times and concatenated (paper 3.2)."""
    dense = common.speed_indices(num_frame, start, (speed // rate).clamp(min=1), rate * length)
    tiled = common.speed_indices(num_frame, start, speed, length).repeat(1, rate)
    return torch.where((speed == 1)[:, None], tiled, dense)


# ------------------------------------------------------------------------------------------ main
def param_groups(model, args):
    """SGD groups: encoder + projector at the lr, the decoder at lr * decoder_lr_mult. Its linear
    read-out regresses coordinates from w ReLU features, whose second moment grows with the width:
    at the paper width (64), lr 0.1 and Nesterov 0.9 the interpolation loss measured 0.36 -> 31 ->
    1e4 -> 1e9 -> 1e25 -> NaN in 6 steps on the synthetic data (batch 8); with 0.1 it fell to 0.14
    in 20 steps. Width 8 (the quick start) is stable at 1.0."""
    dec = [p for p in model.decoder.parameters() if p.requires_grad]
    ids = {id(p) for p in dec}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return [{"params": rest, "lr_mult": 1.0},
            {"params": dec, "lr_mult": args.decoder_lr_mult, "lr": args.lr * args.decoder_lr_mult}]


def make_optimizer(model, args):
    """SGD (Nesterov by default) over param_groups (tests/bench.py uses it too)."""
    return torch.optim.SGD(param_groups(model, args), lr=args.lr, momentum=args.momentum,
                           nesterov=args.nesterov, weight_decay=args.weight_decay)


def train_step(model, net, opt, scaler, base, pos, neg, target, ids, args):
    """One step on this rank's clips (B, C, L, V, M) and sample indices ids (B,): momentum update,
    forward, the three losses (queued keys of the same sequences left out of the negatives), SGD
    step, then the global batch's keys and indices enqueued. Returns the detached (loss, triplet,
    nce, itep). `net` is `model`, possibly wrapped by DDP / torch.compile."""
    model.momentum_update(args.key_momentum)
    with common.autocast(base.device, args.dtype):
        z, rec, k = net(torch.cat([base, pos, neg]), pos)
    own = model.queue_ids[None] == ids[:, None]                                  # (B, K)
    terms = mcc_losses(z, k, model.queue, rec, target, args.margin, args.tau, own)
    loss = (args.w_triplet * terms["triplet"] + args.w_nce * terms["nce"]
            + args.w_itep * terms["itep"])
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    model.enqueue(common.gather_nograd(k.detach().float()), common.gather_nograd(ids))
    return torch.stack([loss.detach(), *(v.detach() for v in terms.values())])


def check_args(args):
    if args.modality not in ("joint", "bone", "motion"):
        raise common.UserError(f"--modality {args.modality!r}: expected joint, bone or motion")
    if len(set(args.speeds)) < len(args.speeds) or len(args.speeds) < 2 or min(args.speeds) < 1:
        raise common.UserError(f"--speeds {args.speeds}: need at least two distinct positive "
                               f"speeds (the positive's speed differs from the base's)")
    if args.interp_rate < 1 or any(r != 1 and r % args.interp_rate for r in args.speeds):
        raise common.UserError(f"--speeds {args.speeds}: each must be 1 or a multiple of "
                               f"--interp_rate {args.interp_rate} (target stride r / l)")
    if args.clip_len < 2 or args.window < 1 or args.base_width < 1:
        raise common.UserError("--clip_len must be >= 2, --window and --base_width >= 1")
    if args.tau <= 0 or args.margin < 0:
        raise common.UserError(f"--tau {args.tau} must be > 0 and --margin {args.margin} >= 0")
    if args.decoder_lr_mult < 0:
        raise common.UserError(f"--decoder_lr_mult {args.decoder_lr_mult}: must be >= 0")
    if args.queue_size < args.batch_size:
        raise common.UserError(f"--queue_size {args.queue_size} must be >= --batch_size "
                               f"{args.batch_size}")
    if args.epochs < 1 or args.log_every < 1 or args.save_every < 1:
        raise common.UserError("--epochs, --log_every and --save_every must be >= 1")


def main(argv=None):
    args = common.parse_args(Args, argv, quick=QUICK)
    check_args(args)
    args.split = common.canonical_split(args.dataset, args.split)
    env = common.setup_distributed(args.device)
    dev, rank, world = env.device, env.rank, env.world_size
    out = Path(args.out_dir or f"out/{METHOD}_{args.dataset}_{args.split}")
    log = common.RunLogger(out, env.is_main)

    split = common.load_split(args.data_dir, args.dataset, args.split, "train")
    loader = common.BatchLoader(split, args.batch_size, shuffle=True, drop_last=True,
                                seed=args.seed, rank=rank, world_size=world, device=dev,
                                on_device=args.data_on_device, with_labels=False,
                                with_index=True, num_workers=args.num_workers)
    common.seed_everything(args.seed, args.deterministic)  # identical initial weights on all ranks
    model = Model(args).to(dev)
    opt = make_optimizer(model, args)
    scaler = common.make_scaler(dev, args.dtype)
    g = torch.Generator(device=dev)
    start_epoch, step, metrics = 0, 0, {}
    ckpt_path = out / "last.pt"
    if args.resume:  # a missing last.pt is an error (as in the other scripts), not a fresh start
        ckpt = common.load_checkpoint(ckpt_path, METHOD)  # on CPU: RNG states must stay there
        common.load_state(model, ckpt["model"], ckpt_path)
        opt.load_state_dict(ckpt["optimizer"])
        common.load_scaler(scaler, ckpt["scaler"])
        start_epoch, step, metrics = ckpt["epoch"], ckpt["step"], ckpt["metrics"]
        common.set_rng_state(ckpt["rng"], g)
        log.info(f"resumed from {ckpt_path} at epoch {start_epoch}")
    if env.is_main:  # after the resume check: a failed --resume leaves the folder as it was
        common.save_json(common.args_to_dict(args), out / "args.json")
    net = model
    if env.ddp:
        # the queue/BN buffers stay equal on every rank by construction: no broadcasts
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False)
    if args.compile:
        net = torch.compile(net)
    log.info(f"mcc: ST-GCN encoder {common.count_params(model.encoder):,} params, "
             f"{len(split)} sequences, {len(loader)} steps/epoch, world size {world}")

    def save(epoch):
        if env.is_main:
            common.save_checkpoint({
                "method": METHOD, "args": common.args_to_dict(args),
                "encoder": model.encoder.state_dict(), "model": model.state_dict(),
                "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                "step": step, "rng": common.rng_state(g), "dataset": args.dataset,
                "split": args.split, "metrics": metrics, "version": common.CKPT_VERSION}, ckpt_path)

    total_steps, t_run, steps_run = args.epochs * len(loader), time.time(), 0
    bar = tqdm(range(start_epoch, args.epochs), initial=start_epoch, total=args.epochs,
               desc="mcc", disable=not env.is_main)
    for epoch in bar:
        # Every epoch's randomness is a function of (seed, epoch[, rank]): a run resumed at an epoch
        # boundary replays it exactly under any world size. g (clip sampling) is shared by all
        # ranks (global draws, see make_views); the torch RNG (dropout) is per rank.
        g.manual_seed(args.seed * 100_003 + epoch)
        torch.manual_seed((args.seed * 100_003 + epoch) * 64 + 1 + rank)
        loader.set_epoch(epoch)
        lr = common.step_lr(args.lr, epoch, args.lr_steps)
        common.set_lr(opt, lr)
        model.train()
        sums = torch.zeros(4, device=dev)
        for x, num_frame, ids in loader:
            base, pos, neg, target, _ = make_views(x, num_frame, g, args, rank, world)
            now = train_step(model, net, opt, scaler, base, pos, neg, target, ids, args)
            step, steps_run = step + 1, steps_run + 1
            sums += now
            if step % args.log_every == 0:
                vals = common.all_reduce_mean(now).tolist()
                # checked on log steps only (the .tolist() syncs anyway; every rank sees the same)
                if not all(math.isfinite(v) for v in vals):
                    raise common.UserError(f"non-finite loss at step {step} (triplet, nce, itep = "
                                           f"{vals[1:]}): lower --lr or use --dtype fp32")
                elapsed = time.time() - t_run
                log.log(step, epoch + 1, loss=vals[0], triplet=vals[1], nce=vals[2],
                        itep=vals[3], lr=lr, samples_per_s=steps_run * args.batch_size / elapsed,
                        eta=common.format_eta(elapsed / steps_run * (total_steps - step)))
        means = (common.all_reduce_mean(sums) / len(loader)).tolist()
        metrics = dict(zip(["loss", "triplet", "nce", "itep"], means))
        bar.set_postfix(loss=f"{means[0]:.4f}")
        log.log(step, epoch + 1, **{f"epoch_{n}": v for n, v in metrics.items()})
        if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
            save(epoch + 1)
    if env.is_main:
        log.info(f"done: {out / 'last.pt'}")
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main)
