"""MCC: Self-supervised 3D Skeleton Action Representation Learning with Motion Consistency and Continuity.

Paper: Y. Su, G. Lin, Q. Wu, ICCV 2021. No official code; the backbone is ST-GCN
(https://github.com/yysijie/st-gcn, net/st_gcn.py).

What is trained: an ST-GCN encoder (no class head) with a projector, an interpolation decoder and a
momentum key encoder feeding a key queue. Each sequence gives three 32-frame clips with independent
starts at speeds r in {1, 2, 4, 8} (looping past the end): base S(r_i), positive S(r_j) with
r_j != r_i, negative = a frame-shuffled S(r_i). Loss (paper Eqs. 1-4, weights 1/1/1): triplet
(margin 0.15) + InfoNCE of the base against the positive's key and the queue + the interpolation of
base and positive to twice their frames.

Commands (--batch_size is the GLOBAL batch):
  1 GPU:     python mcc.py --dataset ntu60 --split xsub --data_dir data
  N GPUs:    torchrun --nproc_per_node 4 mcc.py --dataset ntu60 --split xsub --data_dir data
  CPU quick: python mcc.py --dataset synthetic        (the QUICK config; --quick on any dataset)
  evaluate:  python evaluate.py --ckpt out/mcc_synthetic_xsub/last.pt --task finetune (MCC's protocol)
  resume with --resume; other streams with --modality bone|motion.
Data: the shared z-aligned arrays (python data_prep.py ...), not ST-GCN's raw camera coordinates.

Deviations from the paper (where it is silent, our choice):
  - triplet with the standard sign max(0, m + d(b,p) - d(b,n)) (Eq. 1 as printed pushes p away);
  - InfoNCE on cosine similarities of L2-normalised projections (Eq. 2 prints a distance);
  - a momentum key encoder fills the queue; K = 65536 (the paper prints 6536);
  - queued keys of the query's own sequence are left out of its negatives ("from other samples");
  - decoder: 4 ST-GCN blocks with linear temporal upsampling and a 1x1 map to xyz (its details are in
    an unavailable supplement); it trains at lr * --decoder_lr_mult;
  - no dropout in pre-training (not stated; ST-GCN's 0.5 is --finetune_dropout, for evaluate.py);
  - the last incomplete batch of an epoch is dropped.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import arg

METHOD = "mcc"
PROTOCOL = "mcc"  # evaluate.py's protocol defaults (a fork keeps it)
Z_ALIGN = True  # the shared arrays are z-aligned (MCC released no code of its own)


@dataclass
class Args:
    """MCC pre-training. Defaults = the paper's NTU-60 xsub run with ST-GCN's NTU recipe."""
    dataset: str = arg("ntu60", "dataset name", choices=list(common.DATASETS))
    split: str = arg("xsub", "benchmark split: xsub, xview, xsetup (ntu120), xstyle, xtake (bandai: xstyle "
                               "by default)")
    data_dir: str = arg("data", "root folder of the processed datasets")
    out_dir: str = arg("", "output folder; empty: out/mcc_<dataset>_<split>")
    modality: str = arg("joint", "input stream, computed per clip", choices=["joint", "bone", "motion"])
    clip_len: int = arg(32, "frames per pre-training clip (paper: 32)")
    speeds: list[int] = arg([1, 2, 4, 8], "playback speeds (frame strides) of the clips")
    interp_rate: int = arg(2, "interpolation rate l: the decoder outputs l * clip_len frames")
    margin: float = arg(0.15, "triplet margin gamma (paper Eq. 1)")
    temperature: float = arg(0.5, "InfoNCE temperature (paper Eq. 2)")
    queue_size: int = arg(65536, "key queue length K (the paper prints 6536)")
    key_momentum: float = arg(0.999, "momentum of the key encoder (MoCo's)")
    proj_dim: int = arg(128, "width of the L2-normalised projection used by triplet and InfoNCE")
    w_triplet: float = arg(1.0, "weight lambda_1 of the triplet loss")
    w_nce: float = arg(1.0, "weight lambda_2 of the InfoNCE loss")
    w_itep: float = arg(1.0, "weight lambda_3 of the interpolation loss")
    decoder_lr_mult: float = arg(0.1, "lr multiplier of the interpolation decoder (ours: its read-out "
                                 "diverges at lr 0.1 and width 64)")
    base_width: int = arg(64, "ST-GCN width: blocks are w x4, 2w x3, 4w x3 (paper 64)")
    dropout: float = arg(0.0, "dropout of ST-GCN blocks 2-10 in pre-training (the paper states none)")
    finetune_dropout: float = arg(0.5, "encoder dropout when evaluate.py fine-tunes it (ST-GCN NTU)")
    window: int = arg(64, "frames per clip the encoder takes downstream (evaluate.py's crop)")
    epochs: int = arg(80, "training epochs (ST-GCN's NTU recipe, which MCC follows)")
    batch_size: int = arg(64, "global batch size (sequences, 3 clips each; split over torchrun processes)")
    lr: float = arg(0.1, "SGD learning rate")
    momentum: float = arg(0.9, "SGD momentum")
    nesterov: bool = arg(True, "Nesterov momentum (ST-GCN's processor)")
    weight_decay: float = arg(1e-4, "SGD weight decay on every parameter")
    lr_steps: list[int] = arg([10, 50], "epochs at which the learning rate is multiplied by 0.1")
    seed: int = arg(0, "random seed (weights, shuffling, clip sampling)")
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = arg("fp32", "precision: fp32 as the paper's run; bf16 autocast, fp16 = autocast + "
                     "GradScaler on CUDA (fp32 on CPU)", choices=["fp32", "bf16", "fp16"])
    compile: bool = arg(False, "torch.compile the model")
    resume: bool = arg(False, "continue from <out_dir>/last.pt")
    overwrite: bool = arg(False, "start again in an --out_dir that holds a run (its files are removed)")
    quick: bool = arg(False, "apply the QUICK config (automatic on synthetic* datasets)")
    allow_data_mismatch: bool = arg(False, "accept data prepared unlike the official run (z-alignment)")
    num_workers: int = arg(0, "data-loading worker threads")
    log_every: int = arg(50, "log a line every this many steps")
    save_every: int = arg(10, "write <out_dir>/last.pt every this many epochs (and at the end)")
    data_on_device: bool = arg(False, "keep the whole training split on the device")


# The CPU quick start (--quick; automatic on synthetic*); lr 0.02: at 0.1 the triplet stalls at its margin.
QUICK = dict(base_width=8, queue_size=1024, key_momentum=0.99, decoder_lr_mult=1.0, batch_size=32,
             epochs=4, lr=0.02, lr_steps=[3], log_every=10, save_every=1, data_on_device=True)


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
        # sum_k y_k @ A_k (ST-GCN's einsum "nkctv,kvw->nctw") as one batched matmul of the (C*T, V)
        # slices of y by their subset's A_k, then the sum over k: no permuted copy of y
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
    4w x3 stride 2 first), spatial partition (K=3) with learnable edge importance per block.
    dropout: that of blocks 2-10, default args.dropout (pre-training); fine-tuning passes
    args.finetune_dropout."""

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
    """4 ST-GCN blocks 4w -> 2w -> w -> w; the first three upsample time x2 (linear) so the T/4
    encoder map reaches interp_rate * clip_len frames; a 1x1 conv maps to 3 coordinates (paper 3.2:
    4 spatial-temporal blocks and a deconvolution, details in an unavailable supplement)."""

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
        # Sample index of each queued key (-1: an initial random vector): a queue longer than the
        # keys of one epoch holds a sequence's own key of an earlier epoch (K = 65536 on NTU-60)
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
def mcc_losses(z, k, queue, rec, target, margin, temperature, own=None):
    """z (3B, P) unit embeddings of [b; p; n], k (B, P) unit keys of p, queue (K, P), rec/target
    (2B, 3, T', V, M), own (B, K) bool or None: queued keys of the query's own sequence, left out
    of its negatives. Returns the three loss terms in fp32."""
    zb, zp, zn = z.float().chunk(3)
    # Eq. 1 with the standard sign: pull the positive, push the motion-broken clip
    d_pos, d_neg = (zb - zp).norm(dim=1), (zb - zn).norm(dim=1)
    triplet = F.relu(margin + d_pos - d_neg).mean()
    # Eq. 2 with cosine similarity in place of the printed distance
    l_pos = (zb * k.float()).sum(dim=1, keepdim=True)
    l_neg = zb @ queue.float().t()                                              # (B, K)
    if own is not None:
        l_neg = l_neg.masked_fill(own, float("-inf"))
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    nce = F.cross_entropy(logits, torch.zeros(zb.size(0), dtype=torch.long, device=z.device))
    # Eq. 3: squared error summed over xyz, averaged over joints, frames (and bodies, samples)
    itep = (rec.float() - target.float()).pow(2).sum(dim=1).mean()
    return {"triplet": triplet, "nce": nce, "itep": itep}


# ----------------------------------------------------------------------------------------- views
def speed_indices(num_frame, start, speed, length=32):
    """Frame indices of S(r, c): stride `speed` from `start`, looping over the valid frames,
    idx[n, i] = (start[n] + speed[n] * i) mod num_frame[n] (paper 3.1).
    num_frame (N,) int; start, speed (N,) or scalars -> (N, length) int64 on num_frame's device."""
    num_frame = torch.as_tensor(num_frame).long()
    dev = num_frame.device
    start = torch.as_tensor(start, device=dev).long().reshape(-1, 1)
    speed = torch.as_tensor(speed, device=dev).long().reshape(-1, 1)
    return (start + speed * torch.arange(length, device=dev)) % num_frame.clamp(min=1).reshape(-1, 1)


def gather_frames(x, idx):
    """x (N, C, T, V, M), idx (N, L) -> (N, C, L, V, M) with out[n, :, i] = x[n, :, idx[n, i]]."""
    N, C, T = x.shape[:3]
    base = (torch.arange(N, device=x.device)[:, None, None] * C
            + torch.arange(C, device=x.device)[None, :, None]) * T                # (N, C, 1)
    rows = (base + idx.to(x.device)[:, None, :]).reshape(-1)                      # (N*C*L,)
    return x.reshape(N * C * T, -1).index_select(0, rows).view(N, C, idx.shape[1], *x.shape[3:])


def shuffled_orders(n, length, g, device):
    """(n, length) random frame orders, never the identity (the motion-broken B(r, c)): identity
    draws are redrawn, so each row is uniform over the length! - 1 other orders."""
    if length < 2:
        raise ValueError(f"shuffled_orders: need at least 2 frames, got {length}")
    identity = torch.arange(length, device=device)
    perm = torch.rand(n, length, generator=g, device=device).argsort(dim=1)
    while True:
        is_id = (perm == identity).all(dim=1)
        if not bool(is_id.any()):
            return perm
        redraw = torch.rand(n, length, generator=g, device=device).argsort(dim=1)
        perm = torch.where(is_id[:, None], redraw, perm)


def interp_indices(num_frame, start, speed, length, rate):
    """Ground truth of the rate-l interpolation of S(r): stride r/l from the same start (l*length
    frames); for r = 1 the clip itself repeated l times and concatenated (paper 3.2)."""
    dense = speed_indices(num_frame, start, (speed // rate).clamp(min=1), rate * length)
    tiled = speed_indices(num_frame, start, speed, length).repeat(1, rate)
    return torch.where((speed == 1)[:, None], tiled, dense)


def make_views(x, num_frame, g, args, rank=0, world_size=1):
    """x (b, 3, T_raw, V, M) raw clips on the device -> {"clips": (3b, 3, L, V, M) [base; positive;
    negative], "target": (2b, 3, l*L, V, M) interpolation targets of [base; positive], and the draws
    "start" (b, 3), "r_i", "r_j" (b,), "perm" (b, L)}. The draws are made for the GLOBAL batch
    (b * world_size rows, the same generator state on every rank) and this rank's rows are kept, so a
    sample gets the same clips under any number of processes."""
    b, dev, L, l = x.size(0), x.device, args.clip_len, args.interp_rate
    rows = slice(rank * b, (rank + 1) * b)
    gb, speeds = b * world_size, torch.tensor(args.speeds, device=dev)
    u = torch.rand(gb, 3, generator=g, device=dev)[rows]  # start fractions of c_i, c_j, c_k
    si = torch.randint(len(speeds), (gb,), generator=g, device=dev)[rows]
    sj = (si + torch.randint(1, len(speeds), (gb,), generator=g, device=dev)[rows]) % len(speeds)
    perm = shuffled_orders(gb, L, g, dev)[rows]
    r_i, r_j = speeds[si], speeds[sj]
    start = (u * num_frame[:, None]).long().clamp(max=num_frame[:, None] - 1)  # (b, 3)
    idx_b = speed_indices(num_frame, start[:, 0], r_i, L)
    idx_p = speed_indices(num_frame, start[:, 1], r_j, L)
    idx_n = speed_indices(num_frame, start[:, 2], r_i, L).gather(1, perm)
    tgt = [interp_indices(num_frame, start[:, i], r, L, l) for i, r in [(0, r_i), (1, r_j)]]
    frames = gather_frames(x, torch.cat([idx_b, idx_p, idx_n] + tgt, dim=1))
    clips, target = frames.split([3 * L, 2 * l * L], dim=2)  # (b, 3, 3L, V, M), (b, 3, 2lL, V, M)
    # the modality of each clip, as ST-GCN computes it on its input
    clips = common.to_modality(torch.cat(clips.split(L, dim=2)), args.modality)
    target = common.to_modality(torch.cat(target.split(l * L, dim=2)), args.modality)
    return {"clips": clips, "target": target, "start": start, "r_i": r_i, "r_j": r_j, "perm": perm}


# ----------------------------------------------------------------------------------- optimization
def param_groups(model, args):
    """SGD groups: encoder + projector at the lr, the decoder at lr * decoder_lr_mult (its linear
    read-out regresses coordinates from w ReLU features, whose second moment grows with the width)."""
    dec = [p for p in model.decoder.parameters() if p.requires_grad]
    ids = {id(p) for p in dec}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return [{"params": rest, "lr_mult": 1.0},
            {"params": dec, "lr_mult": args.decoder_lr_mult, "lr": args.lr * args.decoder_lr_mult}]


def make_optimizer(model, args):
    """ST-GCN's optimizer: SGD (Nesterov by default) over param_groups."""
    return torch.optim.SGD(param_groups(model, args), lr=args.lr, momentum=args.momentum,
                           nesterov=args.nesterov, weight_decay=args.weight_decay)


def train_step(model, net, opt, scaler, views, ids, args):
    """One optimizer step on this rank's views and sample indices ids (b,): momentum update,
    forward, the three losses (queued keys of the same sequences left out of the negatives), SGD
    step, then the GLOBAL batch's keys and indices enqueued."""
    model.momentum_update(args.key_momentum)
    clips = views["clips"]
    with common.autocast(clips.device, args.dtype):
        z, rec, k = net(clips, clips[len(ids):2 * len(ids)])  # keys of the positives
    own = model.queue_ids[None] == ids[:, None]                                  # (b, K)
    terms = mcc_losses(z, k, model.queue, rec, views["target"], args.margin, args.temperature, own)
    loss = args.w_triplet * terms["triplet"] + args.w_nce * terms["nce"] + args.w_itep * terms["itep"]
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    model.enqueue(common.gather_nograd(k.detach().float()), common.gather_nograd(ids))
    return {"loss": loss.detach(), **{n: v.detach() for n, v in terms.items()}}


# ------------------------------------------------------------------------------------------ main
def check_args(args):
    if len(set(args.speeds)) < len(args.speeds) or len(args.speeds) < 2 or min(args.speeds) < 1:
        raise common.UserError(f"--speeds {args.speeds}: need at least two distinct positive "
                               f"speeds (the positive's speed differs from the base's)")
    if args.interp_rate < 1 or any(r != 1 and r % args.interp_rate for r in args.speeds):
        raise common.UserError(f"--speeds {args.speeds}: each must be 1 or a multiple of "
                               f"--interp_rate {args.interp_rate} (target stride r / l)")
    if args.clip_len < 2:
        raise common.UserError(f"--clip_len {args.clip_len}: a shuffled clip needs at least 2 frames")
    common.check_positive(args, ("window", "base_width", "proj_dim", "epochs", "batch_size",
                                 "log_every", "save_every"))
    if args.temperature <= 0 or args.margin < 0:
        raise common.UserError(f"--temperature {args.temperature} must be > 0 and --margin "
                               f"{args.margin} >= 0")
    if args.queue_size < args.batch_size:
        raise common.UserError(f"--queue_size {args.queue_size} must be >= --batch_size "
                               f"{args.batch_size}")
    if not 0 <= args.key_momentum <= 1:
        raise common.UserError(f"--key_momentum {args.key_momentum}: must be in [0, 1]")
    for name in ("dropout", "finetune_dropout"):
        if not 0 <= getattr(args, name) < 1:
            raise common.UserError(f"--{name} {getattr(args, name)}: must be in [0, 1)")
    if args.lr <= 0 or args.weight_decay < 0 or args.decoder_lr_mult < 0:
        raise common.UserError(f"--lr {args.lr} must be > 0, --weight_decay {args.weight_decay} and "
                               f"--decoder_lr_mult {args.decoder_lr_mult} >= 0")


def main(argv=None):
    args = common.parse_args(Args, argv, quick=QUICK)
    check_args(args)
    d = common.setup_distributed(args.device)
    try:
        train(args, d)
    finally:
        common.cleanup_distributed()


def train(args, d):
    device = d.device
    split = common.load_train_split(args, d, Z_ALIGN, METHOD)
    loader = common.BatchLoader(split, args.batch_size, shuffle=True, drop_last=True, seed=args.seed,
                                rank=d.rank, world_size=d.world_size, device=device,
                                on_device=args.data_on_device, with_labels=False, with_index=True,
                                num_workers=args.num_workers)
    run = common.Run(args, METHOD, __file__, d, QUICK)  # after the inputs were checked
    common.seed_everything(args.seed)  # same seed on every rank -> identical initial weights
    model = Model(args).to(device)
    opt = make_optimizer(model, args)
    scaler = common.make_scaler(device, args.dtype)
    g = torch.Generator(device)
    start_epoch, step, metrics = 0, 0, {}
    if args.resume:
        ck = run.resume(model, opt, scaler, g)
        start_epoch, step, metrics = ck["epoch"], ck["step"], ck["metrics"]
    common.broadcast_module(model)
    net = common.wrap(model, d, args.compile)
    run.info(f"{METHOD}: {common.count_params(model):,} parameters (encoder "
             f"{common.count_params(model.encoder):,}), {len(split)} clips, {len(loader)} "
             f"steps/epoch, {d.world_size} process(es) on {device}")

    run.start(args.epochs * len(loader), step)
    for epoch in range(start_epoch, args.epochs):
        lr = common.step_lr(args.lr, epoch, args.lr_steps)
        common.set_lr(opt, lr)
        loader.set_epoch(epoch)
        g.manual_seed(common.epoch_seed(args.seed, epoch, -1))  # clip draws: global, every rank alike
        torch.manual_seed(common.epoch_seed(args.seed, epoch, d.rank) + 2**62)  # dropout, apart from g
        net.train()
        sums, n = {}, 0
        for x, num_frame, ids in loader:
            with torch.no_grad():
                views = make_views(x, num_frame, g, args, d.rank, d.world_size)
            terms = train_step(model, net, opt, scaler, views, ids, args)
            step, n = step + 1, n + 1
            sums = {k: sums.get(k, 0) + v for k, v in terms.items()}
            run.step(step, epoch + n / len(loader), terms, lr)
        metrics = run.end_epoch(step, epoch, sums, n, lr)
        if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
            run.save(model, opt, scaler, epoch + 1, step, metrics, (g,))
    run.done()


if __name__ == "__main__":
    common.run_main(main)
