"""SCD-Net: Spatiotemporal Clues Disentanglement Network for self-supervised skeleton action recognition.

Paper: C. Wu et al., AAAI 2024. Official code: https://github.com/cong-wu/SCD-Net

What is trained: a query branch and its momentum (key) copy, each a dual-path decoupling encoder (two
independent CTR-GCN extractors; a temporal path over the T frame tokens and a spatial path over the
M*25 joint tokens, each a linear embedding + a transformer layer + max pooling: v_t, v_s) with three
projectors (v_t, v_s, [v_t, v_s] -> q_t, q_s, q_i). The loss is the four cross-domain InfoNCE terms of
paper Eq. 7 against three MoCo queues, over two views of each clip (crop-resize, then rotate, flip,
shear, structural spatial mask and cube temporal mask, each with p 0.5).

Commands (--batch_size is the GLOBAL batch):
  1 GPU:     python scd_net.py --dataset ntu60 --split xsub --data_dir data
  N GPUs:    torchrun --nproc_per_node 4 scd_net.py --dataset ntu60 --split xsub --data_dir data
  CPU quick: python scd_net.py --dataset synthetic        (the QUICK config; --quick on any dataset)
  evaluate:  python evaluate.py --ckpt out/scd_net_synthetic_xsub/last.pt --task linear knn
  resume with --resume; other streams with --modality bone|motion.
Data: prepared with z-alignment, as the official run (data_prep.py's default).

Deviations from the official code:
  - the defaults are its README run (lr 0.01, batch 64, queue 8192, temperature 0.2), not its argparse's;
  - BatchNorm uses global-batch statistics under torchrun (the official run: one GPU, no shuffle-BN);
  - token counts follow --window and --bodies (the official encoder hard-codes 64 frames, 50 joints);
  - the structural mask orders equal joint scores at random (official: numpy argsort's order);
  - the queues wrap around their end (the official code asserts queue_size % batch_size == 0).
"""
import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import arg

METHOD = "scd_net"
PROTOCOL = "scd_net"  # evaluate.py's protocol defaults (a fork keeps it)
Z_ALIGN = True  # the official run reads z-aligned data


@dataclass
class Args:
    """SCD-Net pre-training. Defaults = the official README run on NTU-60 xsub."""
    dataset: str = arg("ntu60", "dataset name", choices=list(common.DATASETS))
    split: str = arg("xsub", "benchmark split: xsub, xview, xsetup (ntu120), xstyle, xtake (bandai: xstyle "
                               "by default)")
    data_dir: str = arg("data", "root folder of the processed datasets")
    out_dir: str = arg("", "output folder; empty: out/scd_net_<dataset>_<split>")
    modality: str = arg("joint", "input stream, computed per view after the crop and before the "
                        "spatial augmentations (official order)", choices=["joint", "bone", "motion"])
    window: int = arg(64, "frames per view after the crop-resize (T) = frame tokens of the encoder")
    bodies: int = arg(2, "bodies the encoder reads (M, the first M of the clip); M*25 joint tokens")
    gcn_channels: list[int] = arg([64, 256, 64], "output channels of the CTR-GCN layers")
    hidden: int = arg(2048, "width of the embeddings, transformer layers and projector hidden layer")
    heads: int = arg(8, "attention heads of the transformer layers")
    ffn: int = arg(2048, "feed-forward width of the transformer layers")
    layers: int = arg(1, "transformer layers per path")
    dropout: float = arg(0.1, "dropout of the transformer layers")
    proj_dim: int = arg(128, "output width of the three projectors")
    queue_size: int = arg(8192, "length K of each of the three queues (2048 for PKU-MMD I)")
    key_momentum: float = arg(0.999, "momentum of the key encoder (paper Eq. 1)")
    temperature: float = arg(0.2, "InfoNCE temperature")
    crop_scale: list[float] = arg([0.1, 1.0], "range of the temporal crop ratio (min: window frames)")
    aug_p: float = arg(0.5, "probability of each of rotate, flip, shear, structural and cube mask")
    rotate_deg: float = arg(30.0, "max rotation about the randomly chosen main axis (degrees)")
    shear_amp: float = arg(1.0, "shear off-diagonals drawn from U(-amp, amp)")
    mask_draws: int = arg(5, "joints drawn (with replacement) to score the structural mask")
    mask_joints: int = arg(8, "joints zeroed by the structural mask (the top scores)")
    cubes: int = arg(16, "temporal cubes the window is divided into")
    masked_cubes: int = arg(6, "cubes zeroed by the cube mask")
    epochs: int = arg(451, "training epochs")
    batch_size: int = arg(64, "global batch size (split evenly over torchrun processes)")
    lr: float = arg(0.01, "SGD learning rate")
    momentum: float = arg(0.9, "SGD momentum")
    weight_decay: float = arg(1e-4, "SGD weight decay")
    lr_steps: list[int] = arg([351], "epochs at which the learning rate is multiplied by 0.1")
    seed: int = arg(0, "random seed (weights, shuffling, augmentation)")
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = arg("fp32", "precision: fp32 as the official run (no AMP); bf16 autocast; fp16 = "
                     "autocast + GradScaler on CUDA (fp32 on CPU)", choices=["fp32", "bf16", "fp16"])
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
QUICK = dict(gcn_channels=[8, 16, 8], hidden=128, heads=4, ffn=128, window=16, cubes=8,
             masked_cubes=3, queue_size=128, epochs=10, batch_size=32, lr_steps=[8], log_every=20,
             save_every=5)


# ----------------------------------------------------------------------------------------- model
# BatchNorm over the GLOBAL batch under torchrun, as the official one-process run normalises its
# whole batch (no shuffle-BN); plain BatchNorm with the same state-dict keys otherwise.
BatchNorm1d, BatchNorm2d = common.GlobalBatchNorm1d, common.GlobalBatchNorm2d


def _conv_init(conv):
    nn.init.kaiming_normal_(conv.weight, mode="fan_out")
    nn.init.zeros_(conv.bias)


def _bn_init(bn, scale):
    nn.init.constant_(bn.weight, scale)
    nn.init.zeros_(bn.bias)


class CTRGC(nn.Module):
    """Channel-wise topology refinement graph convolution for one adjacency subset."""

    def __init__(self, cin, cout):
        super().__init__()
        rel = 8 if cin in (3, 9) else cin // 8
        self.conv1, self.conv2 = nn.Conv2d(cin, rel, 1), nn.Conv2d(cin, rel, 1)
        self.conv3, self.conv4 = nn.Conv2d(cin, cout, 1), nn.Conv2d(rel, cout, 1)

    def forward(self, x, A, alpha):  # x (n, cin, T, V)
        x1, x2 = self.conv1(x).mean(-2), self.conv2(x).mean(-2)  # (n, rel, V)
        rel = torch.tanh(x1.unsqueeze(-1) - x2.unsqueeze(-2))      # (n, rel, V, V)
        rel = self.conv4(rel) * alpha + A                           # (n, cout, V, V)
        return torch.einsum("ncuv,nctv->nctu", rel, self.conv3(x))  # (n, cout, T, V)


class UnitGCN(nn.Module):
    """Sum of the three CTRGC branches, BN (gamma 1e-6), + down(x), ReLU; learnable adjacency PA."""

    def __init__(self, cin, cout, A):
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

    def forward(self, x):
        y = sum(conv(x, self.PA[i], self.alpha) for i, conv in enumerate(self.convs))
        return F.relu(self.bn(y) + self.down(x))


class MultiScaleTCN(nn.Module):
    """Four branches of c/4 channels: dilated (5,1) convs (d 1, 2), max-pool, 1x1; concatenated."""

    def __init__(self, c, kernel=5, dilations=(1, 2)):
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

    def forward(self, x):
        return torch.cat([br(x) for br in self.branches], 1)


class TCNGCN(nn.Module):
    """ReLU(tcn(gcn(x)) + residual(x)); no residual in the first layer, 1x1 conv + BN otherwise."""

    def __init__(self, cin, cout, A, residual):
        super().__init__()
        self.gcn, self.tcn = UnitGCN(cin, cout, A), MultiScaleTCN(cout)
        self.residual = None
        if residual and cin == cout:  # CTR-GCN's TCN_GCN_unit: identity at equal widths, stride 1
            self.residual = nn.Identity()
        elif residual:
            self.residual = nn.Sequential(nn.Conv2d(cin, cout, 1), BatchNorm2d(cout))
            _conv_init(self.residual[0])
            _bn_init(self.residual[1], 1.0)

    def forward(self, x):
        y = self.tcn(self.gcn(x))
        return F.relu(y if self.residual is None else y + self.residual(x))


class CTRGCN(nn.Module):
    """data_bn over (M, V, C) channels, then TCN_GCN layers: (N, 3, T, V, M) -> (N*M, c, T, V)."""

    def __init__(self, args):
        super().__init__()
        A = common.ctrgcn_graph()
        self.data_bn = BatchNorm1d(args.bodies * common.NUM_JOINTS * 3)
        _bn_init(self.data_bn, 1.0)
        chans = [3] + list(args.gcn_channels)
        self.layers = nn.ModuleList(TCNGCN(chans[i], chans[i + 1], A, residual=i > 0)
                                    for i in range(len(chans) - 1))

    def forward(self, x):
        n, c, t, v, m = x.shape
        x = self.data_bn(x.permute(0, 4, 3, 1, 2).reshape(n, m * v * c, t))
        x = x.view(n, m, v, c, t).permute(0, 1, 3, 4, 2).reshape(n * m, c, t, v)
        for layer in self.layers:
            x = layer(x)
        return x


def _xavier_2d(module):
    # The official scd/builder.py init: xavier_uniform on every 2-D parameter (Linear weights,
    # attention in_proj), everything else as constructed.
    for p in module.parameters():
        if p.dim() == 2:
            nn.init.xavier_uniform_(p)


def _embedding(cin, d):
    # Paper Eq. 3 has no normalisation; the official scd/scd_encoder.py has a LayerNorm (kept).
    return nn.Sequential(nn.Linear(cin, d), nn.LayerNorm(d), nn.ReLU(), nn.Linear(d, d))


def _projector(cin, hidden, cout):
    return nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(), nn.Linear(hidden, cout))


class Encoder(nn.Module):
    """Dual-path decoupling encoder: (N, 3, window, 25, M) clips -> [v_t, v_s] (N, 2 * hidden);
    dense: (N, window, 2 * hidden)."""

    def __init__(self, args):
        super().__init__()
        self.window, self.bodies = args.window, args.bodies
        c, d = args.gcn_channels[-1], args.hidden
        self.gcn_t, self.gcn_s = CTRGCN(args), CTRGCN(args)  # two non-shared extractors
        self.channel_t = _embedding(args.bodies * common.NUM_JOINTS * c, d)  # frame tokens
        self.channel_s = _embedding(args.window * c, d)                      # joint tokens

        def transformer():  # post-LN, ReLU, no positional encoding
            layer = nn.TransformerEncoderLayer(d, args.heads, args.ffn, args.dropout,
                                               batch_first=True)
            return nn.TransformerEncoder(layer, args.layers, enable_nested_tensor=False)

        self.t_encoder, self.s_encoder = transformer(), transformer()
        self.out_dim = self.dense_dim = 2 * d
        _xavier_2d(self)  # here, not in Model: evaluate.py's random-init baseline starts as training

    def tokens(self, x):
        """(N, 3, T, V, M) -> refined temporal tokens (N, T, d) and spatial tokens (N, M*V, d)."""
        if x.dim() != 5 or x.shape[2] != self.window or x.shape[4] < self.bodies:
            raise ValueError(f"scd_net.Encoder expects (N, 3, {self.window}, 25, >={self.bodies}) "
                             f"clips, got {tuple(x.shape)}")
        x = x[..., :self.bodies]  # the first M bodies (body 0 = the most active one)
        n, _, t, v, m = x.shape
        yt = self.gcn_t(x)  # (N*M, c, T, V)
        yt = yt.view(n, m, -1, t, v).permute(0, 3, 1, 4, 2).reshape(n, t, -1)  # (N, T, M*V*c)
        ys = self.gcn_s(x)
        ys = ys.view(n, m, -1, t, v).permute(0, 1, 4, 3, 2).reshape(n, m * v, -1)  # (N, M*V, T*c)
        return self.t_encoder(self.channel_t(yt)), self.s_encoder(self.channel_s(ys))

    def forward(self, x):
        zt, zs = self.tokens(x)
        return torch.cat([zt.amax(1), zs.amax(1)], 1)  # max pooling (paper Eq. 4) -> (N, 2d)

    def dense(self, x):
        """Per-frame features (N, T, 2d): temporal tokens + the pooled spatial feature per frame."""
        zt, zs = self.tokens(x)
        return torch.cat([zt, zs.amax(1, keepdim=True).expand(-1, zt.shape[1], -1)], 2)


class Branch(nn.Module):
    """One encoder branch: the encoder and the projectors F_t, F_s, F_g (paper Eqs. 5, 6)."""

    def __init__(self, args):
        super().__init__()
        d = args.hidden
        self.encoder = Encoder(args)
        self.t_proj = _projector(d, d, args.proj_dim)
        self.s_proj = _projector(d, d, args.proj_dim)
        self.i_proj = _projector(2 * d, d, args.proj_dim)
        for proj in (self.t_proj, self.s_proj, self.i_proj):
            _xavier_2d(proj)

    def forward(self, x):
        v = self.encoder(x)  # (N, 2d) = [v_t, v_s]
        vt, vs = v.chunk(2, 1)
        return self.t_proj(vt), self.s_proj(vs), self.i_proj(v)  # 3 x (N, proj_dim)


class Model(nn.Module):
    """Query branch (trained), momentum key branch and the three queues (t, s, i) of (D, K) keys.
    forward(xq, xk) -> (loss terms, the L2-normalised keys (kt, ks, ki) to enqueue after the step)."""

    def __init__(self, args):
        super().__init__()
        self.tau, self.m = args.temperature, args.key_momentum
        self.query = Branch(args)
        self.key = copy.deepcopy(self.query)
        self.key.requires_grad_(False)
        for name in ("queue_t", "queue_s", "queue_i"):
            queue = F.normalize(torch.randn(args.proj_dim, args.queue_size), dim=0)  # (D, K)
            self.register_buffer(name, queue)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def encoder(self):
        return self.query.encoder

    @torch.no_grad()
    def momentum_update(self):
        """xi <- m * xi + (1 - m) * theta (paper Eq. 1) for every parameter of the key branch."""
        keys, queries = list(self.key.parameters()), [p.detach() for p in self.query.parameters()]
        torch._foreach_mul_(keys, self.m)
        torch._foreach_add_(keys, queries, alpha=1 - self.m)

    @torch.no_grad()
    def enqueue(self, kt, ks, ki):
        """FIFO: write the (global) batch of keys (B, D) at the pointer, wrapping around the end."""
        K = self.queue_t.shape[1]
        idx = (self.queue_ptr + torch.arange(len(kt), device=kt.device)) % K
        for queue, k in ((self.queue_t, kt), (self.queue_s, ks), (self.queue_i, ki)):
            queue[:, idx] = k.T.to(queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + len(kt)) % K)

    def forward(self, xq, xk):
        q = self.query(xq)
        with torch.no_grad():
            k = self.key(xk)  # train mode as the official code: dropout and batch statistics active
        with torch.autocast(xq.device.type, enabled=False):
            q = [F.normalize(t.float(), dim=1) for t in q]
            k = [F.normalize(t.float(), dim=1) for t in k]
            queues = [b.clone().detach() for b in (self.queue_t, self.queue_s, self.queue_i)]
            return scd_loss(q, k, queues, self.tau), tuple(k)


# ------------------------------------------------------------------------------------------ loss
def info_nce(q, k, queue, tau):
    """Paper Eq. 8 on L2-normalised q, k (N, D), queue (D, K): cross-entropy, positive first."""
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], 1) / tau  # (N, 1+K)
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def scd_loss(q, k, queues, tau):
    """q, k: (t, s, i) normalised projections (N, D); queues: (t, s, i) (D, K). The four
    cross-domain terms of paper Eq. 7, every lambda = 1 (official scd/builder.py)."""
    (qt, qs, qi), (kt, ks, ki), (Qt, Qs, Qi) = q, k, queues
    return {"l_ti": info_nce(qt, ki, Qi, tau), "l_si": info_nce(qs, ki, Qi, tau),
            "l_it": info_nce(qi, kt, Qt, tau), "l_is": info_nce(qi, ks, Qs, tau)}


# ----------------------------------------------------------------------------------------- views
def _chosen(g, n, p, device):  # (n,) bool: augment this clip (official `random.random() < p`)
    return torch.rand(n, generator=g, device=device) < p


def _axis_rotation(axis, a):  # (N,) radians -> (N, 3, 3), the official Rotate's R_x, R_y, R_z
    c, s, one, zero = a.cos(), a.sin(), torch.ones_like(a), torch.zeros_like(a)
    rows = {0: [[one, zero, zero], [zero, c, s], [zero, -s, c]],
            1: [[c, zero, -s], [zero, one, zero], [s, zero, c]],
            2: [[c, s, zero], [-s, c, zero], [zero, zero, one]]}[axis]
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


def rotate(x, g, max_deg, p):
    """Official feeder/augmentations.py Rotate: a main axis uniform in {x, y, z} turns U(0, max_deg)
    degrees, the other two U(0, 1); p -> R_z R_y R_x p. x (N, 3, T, V, M) -> same."""
    N, dev = x.shape[0], x.device
    main = torch.randint(0, 3, (N,), generator=g, device=dev)
    u = torch.rand(N, 3, generator=g, device=dev, dtype=torch.float64)
    rad = torch.deg2rad(torch.where(main[:, None] == torch.arange(3, device=dev), u * max_deg, u))
    R = _axis_rotation(2, rad[:, 2]) @ _axis_rotation(1, rad[:, 1]) @ _axis_rotation(0, rad[:, 0])
    R = torch.where(_chosen(g, N, p, dev)[:, None, None], R, torch.eye(3, dtype=R.dtype, device=dev))
    return torch.bmm(R.to(x.dtype), x.flatten(2)).view(x.shape)


def flip(x, g, p):
    """Official Flip: joints re-indexed by common.FLIP_ORDER, a left/right label swap that negates
    no coordinate. x (N, C, T, V, M) -> same."""
    flipped = x[:, :, :, torch.tensor(common.FLIP_ORDER, device=x.device)]
    return torch.where(_chosen(g, x.shape[0], p, x.device).view(-1, 1, 1, 1, 1), flipped, x)


def structural_mask(x, g, n_draw, k, p):
    """Official spatial_masking: n_draw joints drawn uniformly with replacement score every joint
    by the sum of their rows of D = (I + adjacency)^2; the k top-scoring joints are zeroed on every
    frame and body. Equal (integer) scores are ordered at random by a U[0, 0.5) key (official: numpy
    argsort order). x (N, C, T, V, M) -> same."""
    N, V, dev = x.shape[0], x.shape[3], x.device
    A = torch.eye(V, device=dev) + torch.from_numpy(common.adjacency()).to(dev)  # (V, V)
    draws = torch.randint(0, V, (N, n_draw), generator=g, device=dev)
    key = (A @ A)[draws].sum(1) + 0.5 * torch.rand(N, V, generator=g, device=dev)  # (N, V)
    hide = torch.zeros(N, V, dtype=torch.bool, device=dev).scatter_(1, key.topk(k, 1).indices, True)
    hide &= _chosen(g, N, p, dev)[:, None]
    return x.masked_fill(hide[:, None, None, :, None], 0.0)


def cube_mask(x, g, n_cubes, n_masked, p):
    """Official temporal_masking: the T frames form n_cubes cubes of T // n_cubes consecutive
    frames (T divisible by n_cubes); n_masked distinct random cubes are zeroed.
    x (N, C, T, V, M) -> same."""
    N, T, dev = x.shape[0], x.shape[2], x.device
    order = torch.rand(N, n_cubes, generator=g, device=dev).argsort(1)  # a random subset per clip
    hide = torch.zeros(N, n_cubes, dtype=torch.bool, device=dev).scatter_(1, order[:, :n_masked], True)
    hide &= _chosen(g, N, p, dev)[:, None]
    frames = hide.repeat_interleave(T // n_cubes, 1)  # (N, T)
    return x.masked_fill(frames[:, None, :, None, None], 0.0)


def make_views(x, num_frame, g, args):
    """x (b, 3, T_raw, V, M) raw clips on the device -> (query, key) views, each (b, 3, window, V, M).
    Each view (official feeder/feeder_pretraining.py): crop-resize, the modality, then rotate, flip,
    shear, structural mask and cube mask, each with probability aug_p per clip."""
    scale = tuple(args.crop_scale)
    v = torch.cat([common.crop_resize(x, num_frame, g, args.window, scale, args.window)
                   for _ in range(2)])  # (2b, ...): the query views, then the key views
    v = common.to_modality(v, args.modality)  # before the spatial chain, as the official feeder
    v = rotate(v, g, args.rotate_deg, args.aug_p)
    v = flip(v, g, args.aug_p)
    v = common.shear(v, g, args.shear_amp, args.aug_p)
    v = structural_mask(v, g, args.mask_draws, args.mask_joints, args.aug_p)
    return cube_mask(v, g, args.cubes, args.masked_cubes, args.aug_p).chunk(2)


# ----------------------------------------------------------------------------------- optimization
def make_optimizer(model, args):
    """The official optimizer: SGD over the query branch; the key branch follows by momentum."""
    return torch.optim.SGD(model.query.parameters(), lr=args.lr, momentum=args.momentum,
                           weight_decay=args.weight_decay)


def train_step(model, net, opt, scaler, views, args):
    """One MoCo step in the official order: momentum update, keys and loss against the queues as
    they were, SGD step, enqueue. The loss is a per-sample mean over equal local batches, so DDP's
    averaged gradient is the global-batch one; all ranks' keys are enqueued in global batch order."""
    xq, xk = views
    model.momentum_update()
    with common.autocast(xq.device, args.dtype):
        terms, keys = net(xq, xk)
    loss = sum(terms.values())
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    model.enqueue(*(common.gather_nograd(k) for k in keys))
    return {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}


# ------------------------------------------------------------------------------------------ main
def check_args(args):
    common.check_crop_scale(args)
    common.check_positive(args, ("window", "hidden", "heads", "ffn", "layers", "proj_dim", "queue_size",
                                 "cubes", "mask_draws", "epochs", "batch_size", "log_every",
                                 "save_every"))
    if not args.gcn_channels or any(c < 8 or c % 4 for c in args.gcn_channels):
        raise common.UserError(f"--gcn_channels {args.gcn_channels}: each must be a multiple of 4, >= 8")
    if args.bodies not in (1, 2):
        raise common.UserError(f"--bodies {args.bodies}: the data holds 2 bodies; use 1 or 2")
    if args.hidden % args.heads:
        raise common.UserError(f"--hidden {args.hidden} must be divisible by --heads {args.heads}")
    if args.window % args.cubes or not 0 <= args.masked_cubes <= args.cubes:
        raise common.UserError(f"--window {args.window} must be divisible by --cubes {args.cubes} "
                               f"and 0 <= --masked_cubes {args.masked_cubes} <= --cubes")
    if not 0 <= args.mask_joints <= common.NUM_JOINTS:
        raise common.UserError(f"--mask_joints {args.mask_joints}: must lie in [0, 25]")
    if args.batch_size > args.queue_size:
        raise common.UserError(f"--batch_size {args.batch_size} must not exceed --queue_size "
                               f"{args.queue_size}")
    if not (0 <= args.dropout < 1 and 0 <= args.aug_p <= 1 and 0 <= args.key_momentum <= 1
            and args.lr > 0 and args.weight_decay >= 0 and args.temperature > 0):
        raise common.UserError(f"--dropout {args.dropout} must be in [0, 1), --aug_p {args.aug_p} "
                               f"and --key_momentum {args.key_momentum} in [0, 1], --lr {args.lr} "
                               f"and --temperature {args.temperature} > 0, --weight_decay "
                               f"{args.weight_decay} >= 0")


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
    run.info(f"{METHOD}: {common.count_params(model.query):,} query parameters (encoder "
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
