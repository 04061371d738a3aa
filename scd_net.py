"""SCD-Net: Spatiotemporal Clues Disentanglement Network (Wu et al., AAAI 2024), one file.

Paper: "SCD-Net: Spatiotemporal Clues Disentanglement Network for Self-Supervised Skeleton-Based
Action Recognition" (seeds/scd_net_aaai2024.txt). Official code: github.com/cong-wu/SCD-Net; the
defaults below are its README run (not its argparse defaults, see specs/methods.md section 2).

What it does: two augmented views of a clip go through a query encoder and a momentum (key) encoder.
Each encoder is a dual-path decoupling encoder: two independent CTR-GCN extractors, one feeding a
temporal path (T frame tokens) and one a spatial path (M*V joint tokens), each path a linear
embedding + one transformer layer + max pooling, giving v_t and v_s (2048 each). Projectors map v_t,
v_s and [v_t, v_s] to 128-d q_t, q_s, q_i. The loss is the four cross-domain InfoNCE terms of Eq. 7
against three MoCo queues. Views: crop-resize, (bone/motion), rotate, flip, shear, structural
spatial mask and cube temporal mask, each with p = 0.5, built batched on the device.

Commands:
  1 GPU:     python scd_net.py --dataset ntu60 --split xsub --data_dir data
  N GPUs:    torchrun --nproc_per_node=4 scd_net.py --dataset ntu60 --split xsub --data_dir data
             (--batch_size is global; the official run is 1 GPU with batch 64)
  CPU quick: python scd_net.py --dataset synthetic      (small config of QUICK, a few minutes)
  evaluate:  python evaluate.py --ckpt out/scd_net_ntu60_xsub/last.pt --task linear

Quick start (`--dataset synthetic*`, for every flag not given explicitly): QUICK below shrinks the
model (CTR-GCN 8-16-8, width 128, 4 heads, 16-frame window with 8 cubes of 2 frames, 3 masked:
the paper's 6/16 ratio), the queue (128 = 4 batches) and the schedule (10 epochs, batch 32, lr 0.01
x0.1 at epoch 8); key momentum 0.999 and temperature 0.2 stay at the paper values. Why this queue
and momentum: with K 1024 and m 0.99 the common-mode signal of the first steps pulled every q onto
the mean key while the queue still held random vectors, then the fast key encoder made current keys
differ from the stale queue keys and the net lowered the loss by tracking that drift (cross-clip
cosine 1.000: collapse). A 4-batch queue of slow keys leaves no drift to exploit.

The quick run does NOT reliably beat a random-init encoder on the synthetic data (README table).
Shipped QUICK, seeds 0 / 1 / 2 (train and evaluate.py --seed s), linear / kNN k=1 top-1, trained
(random init): 28.2 / 23.3 (30.7 / 21.5), 24.8 / 23.2 (30.9 / 27.9), 29.2 / 20.7 (27.4 / 22.5). The
same checkpoints against a linear head trained to convergence (README, "Longer linear probes"):
32.2 (38.7), 29.8 (41.1), 31.3 (36.8), so the quick run degrades the random features. The
random init is the official builder's (xavier on every 2-D parameter), done in Encoder so that
evaluate.py's baseline starts where pre-training starts; before that fix the baseline had PyTorch's
default Linear init (about half the std); the runs below marked [d] were measured against it, and
their trained models come from that earlier code too (its init drew the weights in another order).
What was measured: the cross-domain terms pair differently initialised projectors, so at init a
positive scores like a negative (cos(q_t, k_i) -0.001 for the same clip and for others) and the loss
sits at 4 x log(K+1) until the query learns to predict the random key projections, which needs the
two views of a clip to stay closer than two clips. With the paper's view chain they barely do at
this scale: among 64 clips, random-init features of one view rank the other view of the same clip
21.6th on average (chance 31.5; crop only 1.4th; each augmentation alone at p = 1: shear U(-1, 1)
21.0, structural mask 10.3, rotation 6.8, cube mask 4.1; shear U(-0.5, 0.5) 13.2). Variants [d],
trained vs random init of the same seed: halving the shear and training 20 epochs lets the loss
leave chance after ~150 steps instead of ~250, but the result depends on the seed: seed 0 34.6 /
25.9 vs 31.3 / 24.4, seed 1 30.2 / 17.8 vs 33.4 / 29.1, seed 2 31.7 / 20.3 vs 22.3 / 23.6. 30 epochs
(lr x0.1 at 24; evaluate.py seed 0, random 31.3 / 24.4 [d], 30.7 / 21.5 xavier): seed 0 32.2 / 25.0,
seed 1 (loss at chance for 10 epochs) 21.9 / 21.8. lr 0.05 kept the loss at chance for 300 steps
(21.3 / 25.0, seed 0). Key momentum 0.99 (with 0.999 the key keeps 0.999^370 = 69% of its initial
weights): seed 0 left chance at step ~200, 23.8 / 22.3; seed 1 sat at chance for the whole run and
still ended at 20.8 / 19.5, so the plateau's drift alone degrades the random features (in the
weights: recomputing its BatchNorm statistics on clean clips lifts kNN k=1 only to 21.2). Window 32
(crops of >= 32 frames, closer to the paper's >= 64 of ~100): seeds 0 / 1 26.5 / 21.7 and 24.4 /
21.3 vs random init 36.4 / 26.3 at that window.
More steps is what works (README, "Longer pre-training"): with this QUICK config and `--epochs 40
--lr_steps 32` (1,480 steps, 12-17 min on one CPU thread) seeds 0 and 2 beat random init on linear,
kNN and the converged probe (38.0 / 25.9 / 41.4 vs 30.7 / 21.5 / 38.7; 34.3 / 23.7 / 37.7 vs 27.4 /
22.5 / 36.8) and seed 1 still loses (28.8 / 22.7 / 39.7 vs 30.9 / 27.9 / 41.1); seed 0 at 60 epochs
reaches 42.2 / 27.5. Not shipped as QUICK: four times the quick start's time and still not every seed.
Adam, which made PCM3++'s quick start pass, does not help here (optimizer line patched to AdamW
without weight decay; linear / kNN k=1, random init seed 0 30.7 / 21.5): seed 0, 10 epochs, lr 1e-3
13.9 / 16.8, 3e-4 26.6 / 21.2, 2e-4 29.4 / 20.8, 1e-4 31.5 / 21.2; 20 epochs (lr x0.1 at 16) 2e-4
32.3 / 20.0, 1e-4 31.2 / 22.5, and at 1e-4 seeds 1 / 2 23.2 / 19.2 (30.9 / 27.9) and 27.9 / 20.2
(27.4 / 22.5). Its loss leaves chance from the first epochs (no plateau), the features do not improve.
Temperature (seed 0, shipped QUICK otherwise): 0.5 28.1 / 22.8 (loss 19.04 at the end, chance 19.44),
0.1 21.4 / 20.7; the paper's 0.2 stays. Crop-resize views only (`--aug_p 0`): seeds 0 / 1 / 2
35.0 / 23.6, 26.8 / 18.7, 25.3 / 16.4 (random init as above): the spatial chain is not the
whole story. Random-init encoders alone spread widely with the seed (evaluate.py --seed 3 / 4:
linear 35.4 / 37.0, kNN k=1 31.8 / 33.3, against 27.4-30.9 and 21.5-27.9 for seeds 0-2).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import arg

METHOD = "scd_net"


@dataclass
class Args:
    """SCD-Net pre-training (defaults: the official README run on NTU-60 xsub, joint stream)."""
    # data
    dataset: str = arg("ntu60", "dataset name", choices=list(common.DATASETS))
    split: str = arg("xsub", "evaluation split (xsub, xview, xsetup/xset)")
    data_dir: str = arg("data", "folder holding the processed dataset folders")
    out_dir: str = arg("", "output folder (default out/scd_net_<dataset>_<split>)")
    modality: str = arg("joint", "input stream", choices=["joint", "bone", "motion"])
    window: int = arg(64, "frames of each view after crop-resize = frames the encoder takes")
    num_person: int = arg(2, "bodies per clip (M); the spatial path has M*25 joint tokens")
    crop_scale: list[float] = arg((0.1, 1.0), "crop length ratio range of the temporal crop-resize")
    aug_p: float = arg(0.5, "probability of each of rotate, flip, shear, spatial and cube mask")
    rotate_deg: float = arg(30.0, "max rotation about the randomly chosen main axis (degrees)")
    shear_amp: float = arg(1.0, "shear off-diagonals drawn from U(-amp, amp)")
    mask_draws: int = arg(5, "joints drawn (with replacement) to score the structural mask")
    mask_joints: int = arg(8, "joints zeroed by the structural spatial mask (top A^2 scores)")
    cubes: int = arg(16, "temporal cubes the window is divided into")
    masked_cubes: int = arg(6, "cubes zeroed by the cube temporal mask")
    # encoder
    gcn_channels: list[int] = arg((64, 256, 64), "output channels of the CTR-GCN layers")
    hidden: int = arg(2048, "width of the embeddings, transformer layers and projector hidden")
    heads: int = arg(8, "attention heads of the transformer layers")
    ffn: int = arg(2048, "feed-forward width of the transformer layers")
    layers: int = arg(1, "transformer layers per domain")
    dropout: float = arg(0.1, "dropout of the transformer layers")
    proj_dim: int = arg(128, "output dimension of the three projectors")
    # MoCo
    queue_size: int = arg(8192, "length K of each of the three queues (2048 for PKU-MMD I)")
    moco_m: float = arg(0.999, "momentum of the key encoder")
    temperature: float = arg(0.2, "InfoNCE temperature")
    # optimisation
    epochs: int = arg(451, "training epochs")
    batch_size: int = arg(64, "global batch size (split over processes)")
    lr: float = arg(0.01, "SGD learning rate")
    momentum: float = arg(0.9, "SGD momentum")
    weight_decay: float = arg(1e-4, "SGD weight decay")
    lr_steps: list[int] = arg((351,), "epochs at which the lr is multiplied by 0.1")
    # run
    seed: int = arg(0, "seed of weights, data order and augmentations")
    device: str = arg("auto", "auto, cpu, cuda, cuda:1 ...")
    dtype: str = arg("auto", "autocast dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16",
                     choices=["auto", "fp32", "bf16", "fp16"])
    compile: bool = arg(False, "torch.compile the model")
    resume: bool = arg(False, "continue from <out_dir>/last.pt")
    num_workers: int = arg(0, "background threads reading batches from the memory map")
    data_on_device: bool = arg(False, "keep the whole training split on the device")
    log_every: int = arg(50, "steps between log lines")
    save_every: int = arg(50, "epochs between checkpoints (also saved at the end)")


# Small CPU config for `--dataset synthetic` (see the module docstring).
QUICK = dict(gcn_channels=(8, 16, 8), hidden=128, heads=4, ffn=128, window=16, cubes=8,
             masked_cubes=3, queue_size=128, epochs=10, batch_size=32, lr_steps=(8,),
             log_every=20, save_every=5)


# ----------------------------------------------------------------------------------------------
# Model: CTR-GCN feature extractor
# ----------------------------------------------------------------------------------------------
# BatchNorm whose training statistics cover the GLOBAL batch under torchrun (common.py's SyncBN
# for any backend). Why SyncBN and not shuffle-BN: the official run is one process whose query and
# key encoders normalise over the whole batch of 64 (no shuffle-BN); global statistics reproduce
# exactly that, so N processes train like one process with the global batch, and the key branch
# gets the within-batch statistics of the official run and nothing more (shuffle-BN would change
# them with the number of processes). Outside torchrun it is plain BatchNorm, same state-dict keys.
BatchNorm1d, BatchNorm2d = common.GlobalBatchNorm1d, common.GlobalBatchNorm2d


def _conv_init(conv: nn.Conv2d) -> None:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out")
    nn.init.zeros_(conv.bias)


def _bn_init(bn: nn.Module, scale: float) -> None:
    nn.init.constant_(bn.weight, scale)
    nn.init.zeros_(bn.bias)


class CTRGC(nn.Module):
    """Channel-wise topology refinement graph convolution for one adjacency subset."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        rel = 8 if cin in (3, 9) else cin // 8
        self.conv1, self.conv2 = nn.Conv2d(cin, rel, 1), nn.Conv2d(cin, rel, 1)
        self.conv3, self.conv4 = nn.Conv2d(cin, cout, 1), nn.Conv2d(rel, cout, 1)

    def forward(self, x: torch.Tensor, A: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.conv1(x).mean(-2), self.conv2(x).mean(-2)  # (n, rel, V)
        rel = torch.tanh(x1.unsqueeze(-1) - x2.unsqueeze(-2))      # (n, rel, V, V)
        rel = self.conv4(rel) * alpha + A                           # (n, cout, V, V)
        return torch.einsum("ncuv,nctv->nctu", rel, self.conv3(x))  # (n, cout, T, V)


class UnitGCN(nn.Module):
    """Sum of the three CTRGC branches, BN (gamma 1e-6), + down(x), ReLU; learnable adjacency PA."""

    def __init__(self, cin: int, cout: int, A: np.ndarray):
        super().__init__()
        self.convs = nn.ModuleList(CTRGC(cin, cout) for _ in range(A.shape[0]))
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1), BatchNorm2d(cout)) if cin != cout
                     else nn.Identity())
        self.PA = nn.Parameter(torch.from_numpy(A.astype(np.float32)))
        self.alpha = nn.Parameter(torch.zeros(1))
        self.bn = BatchNorm2d(cout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _conv_init(m)
            elif isinstance(m, nn.BatchNorm2d):
                _bn_init(m, 1.0)
        _bn_init(self.bn, 1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = sum(conv(x, self.PA[i], self.alpha) for i, conv in enumerate(self.convs))
        return F.relu(self.bn(y) + self.down(x))


class MultiScaleTCN(nn.Module):
    """Four branches of c/4 channels: dilated (5,1) convs (d 1, 2), max-pool, 1x1; concatenated."""

    def __init__(self, c: int, kernel: int = 5, dilations: tuple = (1, 2)):
        super().__init__()
        b = c // (len(dilations) + 2)
        branches = [nn.Sequential(nn.Conv2d(c, b, 1), BatchNorm2d(b), nn.ReLU(),
                                  nn.Conv2d(b, b, (kernel, 1), padding=((kernel - 1) * d // 2, 0),
                                            dilation=(d, 1)), BatchNorm2d(b)) for d in dilations]
        branches.append(nn.Sequential(nn.Conv2d(c, b, 1), BatchNorm2d(b), nn.ReLU(),
                                      nn.MaxPool2d((3, 1), (1, 1), (1, 0)), BatchNorm2d(b)))
        branches.append(nn.Sequential(nn.Conv2d(c, b, 1), BatchNorm2d(b)))
        self.branches = nn.ModuleList(branches)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _conv_init(m)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([br(x) for br in self.branches], 1)


class TCNGCN(nn.Module):
    """ReLU(tcn(gcn(x)) + residual(x)); no residual in the first layer, 1x1 conv + BN otherwise."""

    def __init__(self, cin: int, cout: int, A: np.ndarray, residual: bool):
        super().__init__()
        if cout % 4 or cin not in (3, 9) and cin < 8:
            raise common.UserError(f"--gcn_channels: {cout} must be a multiple of 4, inputs >= 8")
        self.gcn, self.tcn = UnitGCN(cin, cout, A), MultiScaleTCN(cout)
        self.residual = None
        if residual and cin == cout:  # CTR-GCN's TCN_GCN_unit: identity at equal widths, stride 1
            self.residual = nn.Identity()
        elif residual:
            self.residual = nn.Sequential(nn.Conv2d(cin, cout, 1), BatchNorm2d(cout))
            _conv_init(self.residual[0])
            _bn_init(self.residual[1], 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tcn(self.gcn(x))
        return F.relu(y if self.residual is None else y + self.residual(x))


class CTRGCN(nn.Module):
    """data_bn over (M, V, C) channels, then TCN_GCN layers: (N, 3, T, V, M) -> (N*M, c, T, V)."""

    def __init__(self, args: Args):
        super().__init__()
        A = common.ctrgcn_graph()
        self.data_bn = BatchNorm1d(args.num_person * common.NUM_JOINTS * 3)
        _bn_init(self.data_bn, 1.0)
        chans = [3] + list(args.gcn_channels)
        self.layers = nn.ModuleList(TCNGCN(chans[i], chans[i + 1], A, residual=i > 0)
                                    for i in range(len(chans) - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, t, v, m = x.shape
        x = self.data_bn(x.permute(0, 4, 3, 1, 2).reshape(n, m * v * c, t))
        x = x.view(n, m, v, c, t).permute(0, 1, 3, 4, 2).reshape(n * m, c, t, v)
        for layer in self.layers:
            x = layer(x)
        return x


# ----------------------------------------------------------------------------------------------
# Model: dual-path decoupling encoder, projectors, MoCo
# ----------------------------------------------------------------------------------------------
def _xavier_2d(module: nn.Module) -> None:
    """The official builder's init: xavier_uniform on every 2-D parameter of the query branch
    (Linear weights, attention in_proj), everything else as constructed."""
    for p in module.parameters():
        if p.dim() == 2:
            nn.init.xavier_uniform_(p)


def _embedding(cin: int, d: int) -> nn.Sequential:
    # Eq. 3 has no normalisation; the official code has a LayerNorm after the first Linear (kept).
    return nn.Sequential(nn.Linear(cin, d), nn.LayerNorm(d), nn.ReLU(), nn.Linear(d, d))


def _projector(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(), nn.Linear(hidden, cout))


class Encoder(nn.Module):
    """Dual-path decoupling encoder: (N, 3, window, 25, M) clips -> [v_t, v_s] (N, 2 * hidden)."""

    def __init__(self, args: Args):
        super().__init__()
        self.window, self.num_person = args.window, args.num_person
        c, d = args.gcn_channels[-1], args.hidden
        self.gcn_t, self.gcn_s = CTRGCN(args), CTRGCN(args)  # two non-shared extractors
        # Token sizes follow from window and M*V (official code hard-codes 64 frames and 50 joints).
        self.channel_t = _embedding(args.num_person * common.NUM_JOINTS * c, d)  # frame tokens
        self.channel_s = _embedding(args.window * c, d)                          # joint tokens

        def transformer() -> nn.TransformerEncoder:  # post-LN, ReLU, no positional encoding
            layer = nn.TransformerEncoderLayer(d, args.heads, args.ffn, args.dropout,
                                               batch_first=True)
            return nn.TransformerEncoder(layer, args.layers, enable_nested_tensor=False)

        self.t_encoder, self.s_encoder = transformer(), transformer()
        self.out_dim = self.dense_dim = 2 * d
        _xavier_2d(self)  # here, not in Model: a random-init Encoder (evaluate.py's baseline)
        # then starts from the distribution pre-training starts from

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, T, V, M) -> refined temporal tokens (N, T, d) and spatial tokens (N, M*V, d)."""
        n, _, t, v, m = x.shape
        if t != self.window or m != self.num_person:
            raise ValueError(f"SCD-Net encoder expects (N, 3, {self.window}, 25, "
                             f"{self.num_person}) clips, got {tuple(x.shape)}")
        yt = self.gcn_t(x)  # (N*M, c, T, V)
        yt = yt.view(n, m, -1, t, v).permute(0, 3, 1, 4, 2).reshape(n, t, -1)  # (N, T, M*V*c)
        ys = self.gcn_s(x)
        ys = ys.view(n, m, -1, t, v).permute(0, 1, 4, 3, 2).reshape(n, m * v, -1)  # (N, M*V, T*c)
        return self.t_encoder(self.channel_t(yt)), self.s_encoder(self.channel_s(ys))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zt, zs = self.tokens(x)
        return torch.cat([zt.amax(1), zs.amax(1)], 1)  # max pooling (Eq. 4) -> (N, 2d)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """Per-frame features (N, T, 2d): temporal tokens + the pooled spatial feature per frame."""
        zt, zs = self.tokens(x)
        return torch.cat([zt, zs.amax(1, keepdim=True).expand(-1, zt.shape[1], -1)], 2)


class Branch(nn.Module):
    """One encoder branch: the encoder and the projectors F_t, F_s, F_g (Eqs. 5, 6)."""

    def __init__(self, args: Args):
        super().__init__()
        d = args.hidden
        self.encoder = Encoder(args)
        self.t_proj = _projector(d, d, args.proj_dim)
        self.s_proj = _projector(d, d, args.proj_dim)
        self.i_proj = _projector(2 * d, d, args.proj_dim)
        for proj in (self.t_proj, self.s_proj, self.i_proj):
            _xavier_2d(proj)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        v = self.encoder(x)  # (N, 2d) = [v_t, v_s]
        vt, vs = v.chunk(2, 1)
        return self.t_proj(vt), self.s_proj(vs), self.i_proj(v)  # 3 x (N, proj_dim)


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 8 on L2-normalised q, k (N, D), queue (D, K): cross-entropy with the positive first."""
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], 1) / tau  # (N, 1+K)
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


class Model(nn.Module):
    """Query branch (trained), momentum key branch and the three queues (t, s, i)."""

    def __init__(self, args: Args):
        super().__init__()
        self.tau, self.m = args.temperature, args.moco_m
        self.query = Branch(args)  # xavier-initialised 2-D parameters (Encoder, Branch)
        self.key = copy.deepcopy(self.query)
        self.key.requires_grad_(False)
        for name in ("queue_t", "queue_s", "queue_i"):
            queue = F.normalize(torch.randn(args.proj_dim, args.queue_size), dim=0)  # (D, K)
            self.register_buffer(name, queue)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def encoder(self) -> Encoder:
        return self.query.encoder

    @torch.no_grad()
    def momentum_update(self) -> None:
        """xi <- m * xi + (1 - m) * theta (Eq. 1) for every parameter of the key branch."""
        # two multi-tensor kernels instead of 2 dispatches per parameter (same arithmetic)
        keys, queries = list(self.key.parameters()), [p.detach() for p in self.query.parameters()]
        torch._foreach_mul_(keys, self.m)
        torch._foreach_add_(keys, queries, alpha=1 - self.m)

    @torch.no_grad()
    def enqueue(self, kt: torch.Tensor, ks: torch.Tensor, ki: torch.Tensor) -> None:
        """FIFO: write the (global) batch of keys at the pointer, wrapping around the end."""
        K = self.queue_t.shape[1]
        idx = (self.queue_ptr + torch.arange(len(kt), device=kt.device)) % K
        for queue, k in ((self.queue_t, kt), (self.queue_s, ks), (self.queue_i, ki)):
            queue[:, idx] = k.T.to(queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + len(kt)) % K)

    def forward(self, xq: torch.Tensor, xk: torch.Tensor) -> tuple[dict, tuple]:
        """Loss terms (fp32) and the normalised keys (kt, ks, ki) to enqueue after the step."""
        q = self.query(xq)
        with torch.no_grad():
            k = self.key(xk)  # train mode as the official code: dropout and batch statistics active
        with torch.autocast(xq.device.type, enabled=False):
            qt, qs, qi = (F.normalize(t.float(), dim=1) for t in q)
            kt, ks, ki = (F.normalize(t.float(), dim=1) for t in k)
            Qt, Qs, Qi = (b.clone().detach() for b in (self.queue_t, self.queue_s, self.queue_i))
            losses = {"l_ti": info_nce(qt, ki, Qi, self.tau),   # L(q_t, k_g)
                      "l_si": info_nce(qs, ki, Qi, self.tau),   # L(q_s, k_g)
                      "l_it": info_nce(qi, kt, Qt, self.tau),   # L(q_g, k_t)
                      "l_is": info_nce(qi, ks, Qs, self.tau)}   # L(q_g, k_s); all lambda = 1
        return losses, (kt, ks, ki)


# ----------------------------------------------------------------------------------------------
# Views (batched on the device, per-sample randomness from `g`)
# ----------------------------------------------------------------------------------------------
def make_view(x: torch.Tensor, num_frame: torch.Tensor, g: torch.Generator,
              args: Args) -> torch.Tensor:
    """Raw clips (b, 3, T_raw, 25, M) -> one augmented view (b, 3, window, 25, M) (section 3.4)."""
    v = common.crop_resize(x, num_frame, g, out_len=args.window, scale=tuple(args.crop_scale),
                           min_len=args.window)
    v = common.to_modality(v, args.modality)  # bone/motion before the spatial chain, as the code
    v = common.rotate(v, g, max_deg=args.rotate_deg, p=args.aug_p)
    v = common.flip(v, g, p=args.aug_p)  # joint re-indexing without mirroring, as the code
    v = common.shear(v, g, amp=args.shear_amp, p=args.aug_p)
    v = common.structural_mask(v, g, n_draw=args.mask_draws, k=args.mask_joints, p=args.aug_p)
    return common.cube_mask(v, g, n_cubes=args.cubes, n_masked=args.masked_cubes, p=args.aug_p)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train_step(model: Model, net: nn.Module, opt: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, xq: torch.Tensor, xk: torch.Tensor,
               args: Args) -> dict:
    """One MoCo step on this rank's part of the global batch; returns the detached loss terms.

    `net` is `model` possibly wrapped by DDP / torch.compile. Under DDP the loss is a per-sample
    mean, so DDP's gradient averaging over equal local batches equals the global-batch gradient, and
    the keys of all ranks are gathered (in rank order = global batch order) before the enqueue."""
    model.momentum_update()  # official: at the start of the forward, before the keys
    with common.autocast(xq.device, args.dtype):
        losses, keys = net(xq, xk)
    loss = sum(losses.values())
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    model.enqueue(*(common.gather_nograd(k) for k in keys))
    return {"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}}


def _check_args(args: Args) -> None:
    positive = {"--window": args.window, "--cubes": args.cubes, "--heads": args.heads,
                "--hidden": args.hidden, "--ffn": args.ffn, "--proj_dim": args.proj_dim}
    for flag, value in positive.items():
        if value < 1:
            raise common.UserError(f"{flag} {value}: must be >= 1")
    checks = [
        (args.mask_draws >= 1, f"--mask_draws {args.mask_draws}: must be >= 1"),
        (args.window % args.cubes == 0, f"--window {args.window} must be divisible by --cubes "
                                        f"{args.cubes}"),
        (0 <= args.masked_cubes <= args.cubes, "--masked_cubes must lie in [0, --cubes]"),
        (0 <= args.mask_joints <= common.NUM_JOINTS, "--mask_joints must lie in [0, 25]"),
        (args.hidden % args.heads == 0, f"--hidden {args.hidden} must be divisible by --heads"),
        (args.batch_size <= args.queue_size, f"--batch_size {args.batch_size} must not exceed "
                                             f"--queue_size {args.queue_size}"),
        (args.epochs >= 1 and args.batch_size >= 1, "--epochs and --batch_size must be >= 1"),
        (args.log_every >= 1 and args.save_every >= 1, "--log_every/--save_every must be >= 1"),
        (len(args.crop_scale) == 2 and 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1,
         "--crop_scale expects two ratios 0 < lo <= hi <= 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise common.UserError(msg)


def _seed_epoch(args: Args, epoch: int, rank: int, g: torch.Generator) -> None:
    # Augmentations (g) and dropout (torch's RNG) restart from (seed, epoch, rank) every epoch, so a
    # resumed run continues exactly and every rank draws different views.
    s = ((args.seed * 100_003 + epoch) * 1024 + rank) % 2**62
    g.manual_seed(s)
    torch.manual_seed(s + 1)


def make_optimizer(model: Model, args: Args) -> torch.optim.Optimizer:
    """SGD over the query branch; the key encoder follows by momentum (tests/bench.py uses it)."""
    return torch.optim.SGD(model.query.parameters(), lr=args.lr, momentum=args.momentum,
                           weight_decay=args.weight_decay)


def main(argv: list[str] | None = None) -> None:
    args = common.parse_args(Args, argv, quick=QUICK)
    _check_args(args)
    split_name = common.canonical_split(args.dataset, args.split)
    d = common.setup_distributed(args.device)
    try:
        _train(args, split_name, d)
    finally:
        common.cleanup_distributed()


def _train(args: Args, split_name: str, d: common.Dist) -> None:
    from tqdm import tqdm
    dev = d.device
    out = Path(args.out_dir or f"out/{METHOD}_{args.dataset}_{split_name}")
    logger = common.RunLogger(out, d.is_main)
    common.seed_everything(args.seed)  # same seed on every rank: identical initial weights
    data = common.load_split(args.data_dir, args.dataset, split_name, "train")
    if data.data.shape[4] != args.num_person:
        raise common.UserError(f"--num_person {args.num_person}: {data.path} stores "
                               f"{data.data.shape[4]} bodies")
    loader = common.BatchLoader(data, args.batch_size, shuffle=True, drop_last=True, seed=args.seed,
                                rank=d.rank, world_size=d.world_size, device=dev,
                                on_device=args.data_on_device, with_labels=False,
                                num_workers=args.num_workers)
    model = Model(args).to(dev)  # on the device first: NCCL broadcasts CUDA tensors only
    common.broadcast_module(model)
    opt = make_optimizer(model, args)
    scaler = common.make_scaler(dev, args.dtype)
    g = torch.Generator(device=dev)
    start_epoch, step, metrics = 0, 0, {}
    ckpt_path = out / "last.pt"
    if args.resume:
        ck = common.load_checkpoint(ckpt_path, METHOD)
        common.load_state(model, ck["model"], ckpt_path)
        opt.load_state_dict(ck["optimizer"])
        common.load_scaler(scaler, ck["scaler"])
        start_epoch, step, metrics = ck["epoch"], ck["step"], ck["metrics"]
        common.set_rng_state(ck["rng"], g)
        logger.info(f"resumed from {ckpt_path} at epoch {start_epoch} (step {step})")
    if d.is_main:
        common.save_json(common.args_to_dict(args), out / "args.json")
    logger.info(f"SCD-Net: query branch {common.count_params(model.query):,} parameters "
                f"(encoder {common.count_params(model.encoder):,}), {len(data)} clips, "
                f"{len(loader)} steps/epoch, {d.world_size} process(es) on {dev}")

    net: nn.Module = model
    if d.ddp:
        # Buffers (queues, BN statistics over the global batch) stay identical on every rank.
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False)
    if args.compile:
        net = torch.compile(net)

    total = args.epochs * len(loader)
    t_log, n_log = time.time(), 0
    bar = tqdm(range(start_epoch, args.epochs), total=args.epochs, initial=start_epoch,
               disable=not d.is_main, desc="epochs", dynamic_ncols=True)
    for epoch in bar:
        model.train()
        loader.set_epoch(epoch)
        _seed_epoch(args, epoch, d.rank, g)
        lr = common.step_lr(args.lr, epoch, args.lr_steps)
        common.set_lr(opt, lr)
        sums: dict = {}
        for x, num_frame, _ in loader:
            with torch.no_grad():
                xq, xk = make_view(x, num_frame, g, args), make_view(x, num_frame, g, args)
            terms = train_step(model, net, opt, scaler, xq, xk, args)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            step += 1
            n_log += 1
            if step % args.log_every == 0:
                vals = {k: common.all_reduce_mean(v).item() for k, v in terms.items()}
                if not math.isfinite(vals["loss"]):
                    raise common.UserError(f"loss is {vals['loss']} at step {step}: lower --lr "
                                           f"or use --dtype fp32")
                dt = time.time() - t_log
                logger.log(step, epoch + 1, **vals, lr=lr, samples_s=n_log * args.batch_size / dt,
                           eta=common.format_eta(dt / n_log * (total - step)))
                t_log, n_log = time.time(), 0
        metrics = {k: common.all_reduce_mean(v / len(loader)).item() for k, v in sums.items()}
        logger.log(step, epoch + 1, **{f"epoch_{k}": v for k, v in metrics.items()})
        if d.is_main:
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
                common.save_checkpoint({
                    "method": METHOD, "args": common.args_to_dict(args),
                    "encoder": model.encoder.state_dict(), "model": model.state_dict(),
                    "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                    "epoch": epoch + 1, "step": step, "rng": common.rng_state(g),
                    "dataset": args.dataset, "split": split_name, "metrics": metrics,
                    "version": common.CKPT_VERSION}, ckpt_path)
    bar.close()
    logger.info(f"done: {ckpt_path}")


if __name__ == "__main__":
    common.run_main(main)
