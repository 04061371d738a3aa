"""USDRL: Unified Skeleton-based Dense Representation Learning with multi-grained feature decorrelation.

Paper: W. Weng et al., AAAI 2025. Official code: https://github.com/wengwanjiang/USDRL

What is trained: a Dense Spatio-Temporal Encoder (DSTE: a temporal stream whose tokens are frames and a
spatial stream whose tokens are (body, joint) pairs), three projectors (temporal, spatial, instance) and
the multi-grained feature-decorrelation loss (MSE similarity + VICReg variance/covariance + Barlow-Twins
cross-correlation, in each of the three domains) over four augmented views of each clip. No negatives,
no momentum encoder, no queue.

Commands (--batch_size is the GLOBAL batch):
  1 GPU:     python usdrl.py --dataset ntu60 --split xsub --data_dir data
  N GPUs:    torchrun --nproc_per_node 4 usdrl.py --dataset ntu60 --split xsub --data_dir data
  CPU quick: python usdrl.py --dataset synthetic        (the QUICK config; --quick on any dataset)
  evaluate:  python evaluate.py --ckpt out/usdrl_synthetic_xsub/last.pt --task linear knn
  resume with --resume; other streams with --modality bone|motion; the STTR ablation: --backbone sttr.
Data: prepared without z-alignment, as the official run (python data_prep.py ... --no_z_align).

Deviations from the official code:
  - the losses run in fp32 on fp16-autocast projections (the official AMP runs them in fp16);
  - projector BatchNorm uses global-batch statistics under torchrun (official: per DataParallel replica);
  - the last incomplete batch of an epoch is dropped (a 1-sample batch has no variance);
  - --modality really switches the stream (the official scripts always train joint).
"""
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import arg

METHOD = "usdrl"
PROTOCOL = "usdrl"  # evaluate.py's protocol defaults (a fork keeps it)
Z_ALIGN = False  # the official run reads data prepared without z-alignment


@dataclass
class Args:
    """USDRL pre-training. Defaults = the paper's NTU-60 xsub run (scripts/pretrain.sh)."""
    dataset: str = arg("ntu60", "dataset name", choices=list(common.DATASETS))
    split: str = arg("xsub", "benchmark split: xsub, xview, xsetup (ntu120), xstyle, xtake (bandai: xstyle "
                               "by default)")
    data_dir: str = arg("data", "root folder of the processed datasets")
    out_dir: str = arg("", "output folder; empty: out/usdrl_<dataset>_<split>")
    modality: str = arg("joint", "input stream, computed per view after the crop (the official scripts "
                        "always train joint)", choices=["joint", "bone", "motion"])
    backbone: str = arg("dste", "encoder: dste (the paper's) or sttr (2+2 post-LN transformer layers, "
                        "the ablation)", choices=["dste", "sttr"])
    window: int = arg(64, "frames per clip (T); also the temporal token count of DSA's token-mixing MLP")
    bodies: int = arg(2, "bodies the encoder reads (M, the first M of the clip); M*25 joints is the "
                      "spatial token count")
    hidden: int = arg(1024, "width of the embeddings and encoder layers (C_e = C_r)")
    heads: int = arg(1, "attention heads per layer")
    alpha: float = arg(0.5, "weight of CA in a DSTE layer (DSA gets 1 - alpha), paper Eq. 5")
    gap: int = arg(4, "DenseShift gap: token positions divisible by gap keep the un-mixed input")
    drop_path: float = arg(0.1, "stochastic-depth rate inside the DSTE layers")
    proj_dim: int = arg(2048, "hidden width of all projectors and output width of the t/s projectors")
    proj_inst_dim: int = arg(4096, "output width of the instance projector")
    views: int = arg(4, "augmented views per clip (K)")
    crop_scale: list[float] = arg([0.1, 1.0], "range of the temporal crop ratio (min crop = window frames)")
    w_sim: float = arg(5.0, "weight of the similarity (MSE) term")
    w_vac: float = arg(1.0, "weight of the variance/covariance term")
    w_xcorr: float = arg(0.001, "weight of the cross-correlation term")
    w_domain: float = arg(0.5, "weight of the temporal and spatial domains (tau, paper Eq. 7)")
    w_std: float = arg(5.0, "weight of the hinge on the std inside the variance term (mu, Eq. 12)")
    w_offdiag: float = arg(0.005, "weight of the off-diagonal cross-correlation entries")
    epochs: int = arg(451, "training epochs")
    batch_size: int = arg(356, "global batch size (split evenly over torchrun processes)")
    lr: float = arg(5e-4, "Adam learning rate")
    weight_decay: float = arg(1e-5, "Adam L2 weight decay")
    lr_steps: list[int] = arg([351], "epochs at which the learning rate is multiplied by 0.1")
    seed: int = arg(0, "random seed (weights, shuffling, augmentation)")
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = arg("fp16", "precision: fp16 = autocast + GradScaler on CUDA as the official run (fp32 "
                     "on CPU); bf16 autocast is not yet compared with it", choices=["fp32", "bf16", "fp16"])
    compile: bool = arg(False, "torch.compile the model")
    resume: bool = arg(False, "continue from <out_dir>/last.pt")
    overwrite: bool = arg(False, "start again in an --out_dir that holds a run (its files are removed)")
    quick: bool = arg(False, "apply the QUICK config (automatic on synthetic* datasets)")
    allow_data_mismatch: bool = arg(False, "accept data prepared unlike the official run (z-alignment)")
    num_workers: int = arg(0, "data-loading worker threads")
    log_every: int = arg(50, "log a line every this many steps")
    save_every: int = arg(50, "write <out_dir>/last.pt every this many epochs (and at the end)")
    data_on_device: bool = arg(False, "keep the whole training split on the device")


# The small config of the CPU quick start (--quick; automatic on synthetic* datasets).
QUICK = dict(hidden=64, proj_dim=256, proj_inst_dim=512, window=32, batch_size=64, epochs=3,
             lr=1e-3, log_every=6, save_every=1)


# ----------------------------------------------------------------------------------------- model
def _init_weights(m):
    # Official `_init_weights`: Linear (incl. attention out_proj) trunc-normal std .02 (cut at +-2
    # absolute), bias 0; LayerNorm 1/0. Attention in_proj, Conv1d and BatchNorm keep PyTorch defaults.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


def _mlp(d):
    return nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))


class DSTLayer(nn.Module):
    """One DSTE layer on (N, L, D) tokens: alpha * CA(x) + (1 - alpha) * DSA(x), no outer residual."""

    def __init__(self, dim, length, heads, alpha, gap, drop_path):
        super().__init__()
        self.alpha = alpha
        # Official code: ONE attention module per layer, shared by CA and by both DSA branches.
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.conv = nn.Conv1d(dim, dim, kernel_size=1)
        self.ca_ln1, self.ca_ln2, self.ca_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), _mlp(dim)
        # DSA token mixing W1, W2 in R^{L x L} (paper Eq. 1): L is the token count, from Args.
        self.w1, self.w2 = nn.Linear(length, length), nn.Linear(length, length)
        self.dsa_ln1, self.dsa_ln2, self.dsa_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), _mlp(dim)
        self.drop = DropPath(drop_path)
        # DenseShift mask as in the CODE (inverse of paper Eq. 2): positions 0, gap, 2*gap... keep the
        # original F1, every other position takes the token-mixed F_h.
        self.register_buffer("keep", torch.arange(length) % gap == 0, persistent=False)

    def _sa(self, z, ln):
        z = ln(z)
        return self.attn(z, z, z, need_weights=False)[0]

    def ca(self, x):  # x (N, L, D)
        # Code form of paper Eq. 4: kernel-1 conv + ReLU, attention residual on x (not on h), NO
        # residual around the MLP.
        h = x + F.relu(self.conv(x.transpose(1, 2)).transpose(1, 2))
        a = x + self.drop(self._sa(h, self.ca_ln1))
        return self.drop(self.ca_mlp(self.ca_ln2(a)))

    def dense_shift(self, x):  # x (N, L, D) -> F_m (N, L, D)
        f1 = x.transpose(1, 2)  # (N, D, L)
        fh = self.w2(F.relu(self.w1(f1))) + f1  # paper Eq. 1: token mixing
        return torch.where(self.keep, f1, fh).transpose(1, 2)

    def _dsa_block(self, z):  # the pre-LN block both DSA branches share
        z = z + self.drop(self._sa(z, self.dsa_ln1))
        return z + self.drop(self.dsa_mlp(self.dsa_ln2(z)))

    def dsa(self, x):  # x (N, L, D)
        # Both branches through the same block; the official code AVERAGES them where Eq. 3 sums.
        return 0.5 * (self._dsa_block(self.dense_shift(x)) + self._dsa_block(x))

    def forward(self, x):
        return self.alpha * self.ca(x) + (1 - self.alpha) * self.dsa(x)


def _sinusoid(length, dim):
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe[None]  # (1, L, D)


class Stream(nn.Module):
    """Embedding + 2 layers over one token axis (temporal: frames; spatial: body-joint pairs)."""

    def __init__(self, d_in, length, args, learned_pe):
        super().__init__()
        d = args.hidden
        self.embed = nn.Sequential(nn.Linear(d_in, d), nn.LayerNorm(d), nn.ReLU(), nn.Linear(d, d))
        if learned_pe:  # spatial: learnable (1, M*V, D), trunc-normal std .02
            self.pe = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, length, d), std=0.02))
        else:  # temporal: fixed sinusoid (not saved: a function of T and D)
            self.register_buffer("pe", _sinusoid(length, d), persistent=False)
        self.sttr = args.backbone == "sttr"
        if self.sttr:
            self.layers = nn.ModuleList(nn.TransformerEncoderLayer(
                d, args.heads, dim_feedforward=d, dropout=0.0, batch_first=True) for _ in range(2))
        else:
            self.layers = nn.ModuleList(DSTLayer(d, length, args.heads, args.alpha, args.gap,
                                                 args.drop_path) for _ in range(2))

    def forward(self, tokens):  # (N, L, d_in) -> (N, L, D)
        y = self.embed(tokens) + self.pe
        if self.sttr:  # a plain transformer encoder: positions added once
            return self.layers[1](self.layers[0](y))
        # DSTE (code): the positional encoding is added again before layer 2
        return self.layers[1](self.layers[0](y) + self.pe)


class Encoder(nn.Module):
    """DSTE (or STTR). forward: (N, 3, T, V, M) -> concat(max-pooled y_t, y_s) (N, 2*hidden);
    dense: y_t with y_s adaptively average-pooled to T, (N, T, 2*hidden)."""

    def __init__(self, args):
        super().__init__()
        T, V, M = args.window, common.NUM_JOINTS, args.bodies
        self.shape = (3, T, V, M)
        self.t_stream = Stream(M * V * 3, T, args, learned_pe=False)
        self.s_stream = Stream(T * 3, M * V, args, learned_pe=True)
        self.out_dim = self.dense_dim = 2 * args.hidden
        self.apply(_init_weights)

    def streams(self, x):  # x (N, C, T, V, M), modality already applied
        if x.dim() != 5 or tuple(x.shape[1:4]) != self.shape[:3] or x.shape[4] < self.shape[3]:
            raise ValueError(f"usdrl.Encoder expects (N, {', '.join(map(str, self.shape))}) clips, "
                             f"got {tuple(x.shape)}")
        x = x[..., :self.shape[3]]  # the first M bodies (body 0 = the most active one)
        N, C, T, V, M = x.shape
        xt = x.permute(0, 2, 4, 3, 1).reshape(N, T, M * V * C)  # frame tokens, (body, joint, coord)
        xs = x.permute(0, 4, 3, 2, 1).reshape(N, M * V, T * C)  # body-major joint tokens, (frame, coord)
        return self.t_stream(xt), self.s_stream(xs)  # (N, T, D), (N, M*V, D)

    def pooled(self, x):
        yt, ys = self.streams(x)
        return yt.amax(1), ys.amax(1)  # (N, D) each

    def forward(self, x):
        return torch.cat(self.pooled(x), 1)

    def dense(self, x):
        yt, ys = self.streams(x)
        ys = F.adaptive_avg_pool1d(ys.transpose(1, 2), yt.shape[1]).transpose(1, 2)  # (N, T, D)
        return torch.cat([yt, ys], 2)


def _fp32_or_wider(t):  # bf16/fp16 -> fp32; fp32/fp64 unchanged
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _projector(d_in, d_hid, d_out):
    # BatchNorm over the GLOBAL batch under torchrun (SyncBN on any backend), so N processes match one
    return nn.Sequential(nn.Linear(d_in, d_hid), common.GlobalBatchNorm1d(d_hid), nn.ReLU(),
                         nn.Linear(d_hid, d_hid), common.GlobalBatchNorm1d(d_hid), nn.ReLU(),
                         nn.Linear(d_hid, d_out))


class Model(nn.Module):
    """Encoder + temporal, spatial and instance projectors. forward(x) with x (K*b, 3, T, V, M), the K
    views stacked view-major, returns {"t","s","i"} -> (K, b, D_domain) projections."""

    def __init__(self, args):
        super().__init__()
        self.views = args.views
        self.encoder = Encoder(args)
        d, p = args.hidden, args.proj_dim
        self.t_proj = _projector(d, p, p)
        self.s_proj = _projector(d, p, p)
        self.i_proj = _projector(2 * d, p, args.proj_inst_dim)
        for proj in (self.t_proj, self.s_proj, self.i_proj):
            proj.apply(_init_weights)

    def forward(self, x):
        # One view at a time, as the official loop calls the model: BatchNorm statistics are per view.
        z = {"t": [], "s": [], "i": []}
        for v in x.chunk(self.views):
            yt, ys = self.encoder.pooled(v)  # (b, D) each
            z["t"].append(self.t_proj(yt))
            z["s"].append(self.s_proj(ys))
            z["i"].append(self.i_proj(torch.cat([yt, ys], 1)))
        return {k: torch.stack(v) for k, v in z.items()}


# ------------------------------------------------------------------------------------------ loss
def _off_diagonal(m):  # (D, D) -> (D*(D-1),)
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def similarity_term(z):
    """z (K, B, D). Code form (paper Eq. 8 differs): MSE of views 0..K-2 to the last view and to the
    (non-detached) mean of views 0..K-2; MSE = mean over all B*D elements."""
    anchor, center = z[-1], z[:-1].mean(0)
    return sum(F.mse_loss(za, anchor) + F.mse_loss(za, center) for za in z[:-1])


def variance_covariance_term(z, std_weight):
    """z (K, B, D). Sum over views of std_weight * mean_j ReLU(1 - sqrt(Var_j + 1e-4)) + sum of the
    squared off-diagonal covariances / D (VICReg; unbiased over the batch)."""
    K, B, D = z.shape
    zc = z - z.mean(1, keepdim=True)
    total = z.new_zeros(())
    for v in zc:
        std = torch.sqrt(v.var(0) + 1e-4)
        cov = v.T @ v / (B - 1)
        total = total + std_weight * F.relu(1 - std).mean() + _off_diagonal(cov).pow(2).sum() / D
    return total


def cross_correlation_term(z, offdiag_weight):
    """z (K, B, D). Barlow Twins over all view pairs: sum_i (C_ii - 1)^2 + w * sum_{i!=j} C_ij^2 with
    C = za_n^T zb_n / B, z_n standardised over the batch (unbiased std)."""
    K, B, D = z.shape
    zn = (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True)
    total = z.new_zeros(())
    for a, b in itertools.combinations(range(K), 2):
        c = zn[a].T @ zn[b] / B
        total = total + (c.diagonal() - 1).pow(2).sum() + offdiag_weight * _off_diagonal(c).pow(2).sum()
    return total


def usdrl_loss(z, args):
    """z: {"t","s","i"} -> (K, B, D) fp32 projections of the GLOBAL batch. Returns (loss, terms).
    Per term: instance + w_domain * (temporal + spatial) (paper Eq. 7, tau = 0.5); then
    loss = w_sim * sim + w_vac * vac + w_xcorr * xcorr (the official 5 / 1 / 0.001)."""
    def combine(fn, *extra):
        return fn(z["i"], *extra) + args.w_domain * (fn(z["t"], *extra) + fn(z["s"], *extra))
    sim = combine(similarity_term)
    vac = combine(variance_covariance_term, args.w_std)
    xc = combine(cross_correlation_term, args.w_offdiag)
    loss = args.w_sim * sim + args.w_vac * vac + args.w_xcorr * xc
    return loss, {"sim": sim.detach(), "vac": vac.detach(), "xcorr": xc.detach()}


# ----------------------------------------------------------------------------------------- views
def make_views(x, num_frame, g, args):
    """x (b, 3, T_raw, V, M) raw clips on the device -> (K*b, 3, window, V, M), view-major. Each view:
    crop-resize, then joint corruption or shear with p 0.5 (official feeder/augmentations.py), then
    the modality of the cropped view (official `modality_generation`)."""
    views = common.crop_corrupt_or_shear(x, num_frame, g, args.window, tuple(args.crop_scale),
                                         args.window, views=args.views)
    return common.to_modality(views, args.modality)


# ----------------------------------------------------------------------------------- optimization
def make_optimizer(model, args):
    """The official optimizer: Adam, weight decay as L2 on the gradient."""
    return torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


def train_step(model, net, opt, scaler, views, args):
    """One optimizer step. Projections under autocast; the loss in fp32 on the projections of the
    GLOBAL batch (gathered with gradient, so every batch statistic matches one process)."""
    with common.autocast(views.device, args.dtype):
        z = net(views)  # {"t","s","i"} -> (K, b, D)
    z = {k: common.gather_with_grad(_fp32_or_wider(v).transpose(0, 1).contiguous()).transpose(0, 1)
         for k, v in z.items()}  # (K, B, D)
    loss, terms = usdrl_loss(z, args)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return {"loss": loss.detach(), **terms}


# ------------------------------------------------------------------------------------------ main
def check_args(args):
    common.check_crop_scale(args)
    common.check_positive(args, ("window", "hidden", "heads", "gap", "proj_dim", "proj_inst_dim",
                                 "epochs", "batch_size", "log_every", "save_every"))
    if args.batch_size < 2:
        raise common.UserError(f"--batch_size {args.batch_size}: batch statistics need at least 2")
    if args.bodies not in (1, 2):
        raise common.UserError(f"--bodies {args.bodies}: the data holds 2 bodies; use 1 or 2")
    if args.views < 2:
        raise common.UserError(f"--views {args.views}: the loss needs at least 2 views")
    if args.hidden % args.heads or args.hidden % 2:
        raise common.UserError(f"--hidden {args.hidden} must be even (sin/cos position pairs) and "
                               f"divisible by --heads {args.heads}")
    if not 0 <= args.drop_path < 1 or args.lr <= 0 or args.weight_decay < 0:
        raise common.UserError(f"--drop_path {args.drop_path} must be in [0, 1), --lr {args.lr} > 0 "
                               f"and --weight_decay {args.weight_decay} >= 0")


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
                                on_device=args.data_on_device, with_labels=False,
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
        g.manual_seed(common.epoch_seed(args.seed, epoch, d.rank))  # augmentation
        torch.manual_seed(common.epoch_seed(args.seed, epoch, d.rank) + 2**62)  # dropout, apart from g
        net.train()
        sums, n = {}, 0
        for x, num_frame, _ in loader:
            with torch.no_grad():
                views = make_views(x, num_frame, g, args)
            terms = train_step(model, net, opt, scaler, views, args)
            step, n = step + 1, n + 1
            sums = {k: sums.get(k, 0) + v for k, v in terms.items()}
            run.step(step, epoch + n / len(loader), terms, lr)
        metrics = run.end_epoch(step, epoch, sums, n, lr)
        if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
            run.save(model, opt, scaler, epoch + 1, step, metrics, (g,))
    run.done()


if __name__ == "__main__":
    common.run_main(main)
