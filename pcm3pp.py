"""PCM3++: prompted contrast with masked motion modeling, plus clip contrast and post-distillation.

Papers: J. Zhang et al., "Prompted Contrast with Masked Motion Modeling" (PCM3, ACM MM 2023) and
"Self-Supervised Skeleton-Based Action Representation Learning: A Benchmark and Beyond" (PCM3++, 2024).
Official PCM3 code: https://github.com/JHang2020/PCM3 (PCM3++'s additions are unreleased).

What is trained: a MoCo v2 query/key pair of PCM3 "BIGRU" encoders (input BatchNorm, a 3-layer GRU whose
two "directions" both run forward in time, last-step 2048-d feature, 128-d MLP head), a 16384-key queue,
InfoNCE + CMD-style distillation for each positive pair (query, mixed, body-part masked, and the view
predicted by the masked-motion decoder), the decoder's masked reconstruction MSE and learnable prompts.
PCM3++ adds the temporal clip contrast (the key view outside a 16..32-frame window zeroed, through the
query branch, --w_clip) and post-distillation (paper Eq. 10: InfoNCE dropped, --post_distill_epochs).

Commands (--batch_size is the GLOBAL batch):
  1 GPU:     python pcm3pp.py --dataset ntu60 --split xsub --data_dir data
  N GPUs:    torchrun --nproc_per_node 4 pcm3pp.py --dataset ntu60 --split xsub --data_dir data
  CPU quick: python pcm3pp.py --dataset synthetic        (the QUICK config; --quick on any dataset)
  evaluate:  python evaluate.py --ckpt out/pcm3pp_synthetic_xsub/last.pt --task linear knn
  plain PCM3: --w_clip 0 --post_distill_epochs 0; bone/motion: --modality bone --no_prompt (PCM3_woprompt)
  post-distillation of a finished stage one: --post_distill_from out/a/stage1.pt --out_dir out/b
Data: z-aligned, as the official run (python data_prep.py ... default).

Deviations from the official code:
  - PCM3++ choices: clip window drawn per sample, base prompt, positive = the full key; post-distillation
    continues the queue and optimizer at stage one's final lr and keeps the reconstruction;
  - BatchNorm uses global-batch statistics under torchrun (the official DDP path's SyncBN);
  - the GRUs run in fp32 under every --dtype (see ForwardBiGRU.forward);
  - --optimizer adam exists for the CPU quick start (the official run is SGD).
"""
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import arg

METHOD = "pcm3pp"
PROTOCOL = "pcm3pp"  # evaluate.py's protocol defaults (a fork keeps it)
Z_ALIGN = True  # the official run reads z-aligned data


@dataclass
class Args:
    """PCM3++ pre-training. Defaults = the official PCM3 NTU-60 xsub joint run (+ PCM3++'s additions)."""
    dataset: str = arg("ntu60", "dataset name", choices=list(common.DATASETS))
    split: str = arg("xsub", "benchmark split: xsub, xview, xsetup (ntu120), xstyle, xtake (bandai: xstyle "
                               "by default)")
    data_dir: str = arg("data", "root folder of the processed datasets")
    out_dir: str = arg("", "output folder; empty: out/pcm3pp_<dataset>_<split>")
    modality: str = arg("joint", "input stream, computed per view after the crop (official --stream)",
                        choices=["joint", "bone", "motion"])
    prompt: bool = arg(True, "prompts + distillation in the loss (official PCM3_wprompt); --no_prompt: "
                       "PCM3_woprompt (bone/motion)")
    window: int = arg(64, "frames per clip (T) the encoder takes, pre-training and downstream")
    joints: int = arg(25, "joints per body (V)")
    bodies: int = arg(2, "bodies per clip (M); the GRU input is V*C*M = 150 wide")
    hidden: int = arg(1024, "GRU hidden size per direction (the feature is 2*hidden)")
    layers: int = arg(3, "GRU layers")
    feat_dim: int = arg(128, "output width of the MLP projection head")
    prompt_dim: int = arg(256, "feature-prompt width (two halves, one per hidden-size half of the feature)")
    dec_dim: int = arg(512, "width of the decoder's per-step MLP and GRU")
    dec_layers: int = arg(2, "decoder GRU layers")
    queue_size: int = arg(16384, "MoCo queue length K")
    key_momentum: float = arg(0.999, "momentum of the key encoder's moving average")
    temperature: float = arg(0.07, "InfoNCE temperature")
    teacher_temp: float = arg(0.05, "distillation temperature of the key (teacher) similarities")
    student_temp: float = arg(0.1, "distillation temperature of the query (student) similarities")
    w_rec: float = arg(40.0, "weight of the masked reconstruction MSE")
    w_clip: float = arg(1.0, "weight of PCM3++'s clip InfoNCE and distillation terms (0: no clip pass, "
                        "PCM3's loss and BatchNorm statistics)")
    mask_chunks: int = arg(8, "temporal chunks of the body-part mask (3 of 5 parts masked per chunk)")
    clip_len: list[int] = arg([16, 32], "min and max frames of the clip window (inclusive)")
    crop_scale: list[float] = arg([0.1, 1.0], "range of the temporal crop ratio (min crop = window frames)")
    optimizer: str = arg("sgd", "sgd (official) or adam (the CPU quick start's)", choices=["sgd", "adam"])
    momentum: float = arg(0.9, "SGD momentum (--optimizer sgd)")
    post_distill_epochs: int = arg(50, "post-distillation epochs after stage one (0: none, PCM3)")
    post_distill_from: str = arg("", "run only post-distillation from this finished stage-one "
                                 "checkpoint (repeat its data and model flags)")
    epochs: int = arg(451, "stage-one epochs")
    batch_size: int = arg(128, "global batch size (split evenly over torchrun processes)")
    lr: float = arg(0.02, "learning rate")
    weight_decay: float = arg(1e-4, "L2 weight decay (SGD's, or added to Adam's gradient)")
    lr_steps: list[int] = arg([351], "epochs at which the learning rate is multiplied by 0.1")
    seed: int = arg(0, "random seed (weights, shuffling, augmentation)")
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = arg("fp32", "precision: fp32 as the official run; bf16 autocast (not yet compared "
                     "with it) or fp16 autocast + GradScaler on CUDA; the GRUs stay fp32",
                     choices=["fp32", "bf16", "fp16"])
    compile: bool = arg(False, "torch.compile the model")
    resume: bool = arg(False, "continue from <out_dir>/last.pt")
    overwrite: bool = arg(False, "start again in an --out_dir that holds a run (its files are removed)")
    quick: bool = arg(False, "apply the QUICK config (automatic on synthetic* datasets)")
    allow_data_mismatch: bool = arg(False, "accept data prepared unlike the official run (z-alignment)")
    num_workers: int = arg(0, "data-loading worker threads")
    log_every: int = arg(50, "log a line every this many steps")
    save_every: int = arg(100, "write <out_dir>/last.pt every this many epochs (and at the end)")
    data_on_device: bool = arg(False, "keep the whole training split on the device")


# The small config of the CPU quick start (--quick; automatic on synthetic* datasets).
QUICK = dict(hidden=64, prompt_dim=32, dec_dim=64, queue_size=1024, batch_size=64, epochs=8,
             post_distill_epochs=1, lr_steps=[7], optimizer="adam", lr=3e-3, key_momentum=0.99,
             log_every=6, save_every=1)


# ----------------------------------------------------------------------------------------- model
def _fp32_or_wider(t):  # bf16/fp16 -> fp32; fp32/fp64 unchanged
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _no_autocast(x):
    # CUDA autocast runs every cuDNN RNN in fp16 whatever the autocast dtype, with no GradScaler
    # outside --dtype fp16 (aten/src/ATen/cudnn/AutocastRNN.cpp, _cudnn_rnn_cast_reflatten): the
    # GRUs run outside autocast, in fp32
    return torch.autocast(x.device.type, enabled=False)


def _gru_keys_before_v2(module, state_dict, prefix, *_):
    """Checkpoints before version 2 stored the GRU without `gru.` (encoder.weight_ih_l0 ...)."""
    for k in [k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]]:
        state_dict[f"{prefix}gru.{k[len(prefix):]}"] = state_dict.pop(k)


class ForwardBiGRU(nn.Module):
    """The official BIGRU's recurrence (official moco/GRU.py EncoderRNN, same `gru` module and keys).

    The official code calls its bidirectional `gru` once per time step on a length-1 slice, carrying
    the (2L, N, H) state, so each layer's "_reverse" weights also run FORWARD in time. Per layer that
    is two one-layer GRUs over the whole sequence from a zero state, outputs concatenated (forward
    weights first) as the next layer's input: `runs` are those nn.GRUs, sharing `gru`'s parameters
    (a tuple, so they add no state_dict keys). (N, T, I) -> (N, T, 2H), every step."""

    def __init__(self, in_dim, hidden, layers):
        super().__init__()
        self.gru = nn.GRU(in_dim, hidden, layers, batch_first=True, bidirectional=True)
        self.runs = tuple(self._one_layer(layer, sfx) for layer in range(layers)
                          for sfx in ("", "_reverse"))
        self.register_load_state_dict_pre_hook(_gru_keys_before_v2)

    def _one_layer(self, layer, sfx):
        width = self.gru.input_size if layer == 0 else 2 * self.gru.hidden_size
        run = nn.GRU(width, self.gru.hidden_size, batch_first=True, device="meta")
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            setattr(run, f"{name}_l0", getattr(self.gru, f"{name}_l{layer}{sfx}"))
        return run

    def forward(self, x):
        with _no_autocast(x):
            x = _fp32_or_wider(x)
            for fwd, rev in zip(self.runs[0::2], self.runs[1::2]):
                x = torch.cat([fwd(x)[0], rev(x)[0]], 2)
        return x


class Encoder(nn.Module):
    """PCM3's BIGRU: input BatchNorm1d(150) -> ForwardBiGRU -> fc MLP head.

    forward(x): (N, C, T, V, M) -> (N, 2H) last-step GRU output (the linear-eval / kNN feature);
    dense(x): (N, T, 2H) all steps; project(feat) -> (N, feat_dim) head output (pre-normalisation).
    state_dict keys = the official encoder_q.* keys without the prefix: input_norm.*,
    encoder.gru.{weight_ih,weight_hh,bias_ih,bias_hh}_l{0,1,2}[_reverse], fc.0.*, fc.2.*."""

    def __init__(self, args):
        super().__init__()
        in_dim = 3 * args.joints * args.bodies
        # global-batch statistics under DDP (SyncBN, the official DDP path, on any backend)
        self.input_norm = common.GlobalBatchNorm1d(in_dim)
        self.encoder = ForwardBiGRU(in_dim, args.hidden, args.layers)
        d = 2 * args.hidden
        self.fc = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, args.feat_dim))
        # official weights_init_gru (moco/builder_mask_recons.py): xavier-uniform on the BIGRU's 2-D
        # weights, the GRU's and its fc's, which MoCo's --mlp then wraps as fc.2; the rest PyTorch's
        for p in [*self.encoder.parameters(), self.fc[2].weight]:
            if p.dim() == 2:
                nn.init.xavier_uniform_(p)
        self.out_dim = self.dense_dim = d

    @staticmethod
    def flatten(x):  # (N, C, T, V, M) -> (N, T, V*C*M), index v*C*M + c*M + m (official permute)
        n, c, t, v, m = x.shape
        return x.permute(0, 2, 3, 1, 4).reshape(n, t, v * c * m)

    def sequence(self, x, prompt=None):
        """(N, C, T, V, M) (+ input prompt (1, 1, V*C*M)) -> (N, T, 2H) GRU outputs."""
        h = self.flatten(x)
        if prompt is not None:
            h = h + prompt
        h = self.input_norm(h.transpose(1, 2)).transpose(1, 2)  # statistics over N and T
        return self.encoder(h)

    def forward(self, x):
        return self.sequence(x)[:, -1]

    dense = sequence

    def project(self, feat, prompt=None, offset=None):
        """Official prompt hook: prompt (1, P) -> first half added to feat[..., s:s+P/2], second half to
        feat[..., H+s:H+s+P/2] (s = offset, a 0-dim long tensor), then the fc head."""
        if prompt is not None:
            feat = feat + feature_prompt(prompt, offset, feat)
        return self.fc(feat)


def feature_prompt(prompt, offset, feat):
    """(1, P) prompt placed in a (2H,) vector: halves at [s, s+P/2) and [H+s, H+s+P/2), s = offset
    (0-dim long tensor, no host sync and no recompilation per value); H = feat.shape[-1] / 2."""
    half, hid = prompt.shape[1] // 2, feat.shape[-1] // 2
    idx = torch.arange(half, device=feat.device) + offset
    idx = torch.cat([idx, idx + hid])
    return feat.new_zeros(2 * hid).index_add(0, idx, prompt[0].to(feat.dtype))


def _prompt(*shape):
    p = torch.empty(*shape)
    nn.init.xavier_uniform_(p)  # (1,1,150): bound sqrt(6/300); (1,256): bound sqrt(6/257), as official
    return nn.Parameter(p)


class Model(nn.Module):
    """Query/key encoders, queue, prompts and the masked-motion decoder (official MoCo in
    moco/builder_mask_recons.py). forward(views, post_distill) -> fp32 loss terms, "loss" first."""

    PROMPTS = ("base_prompt", "mask_prompt", "recons_prompt", "mix_prompt")

    def __init__(self, args):
        super().__init__()
        self.args = args
        in_dim = 3 * args.joints * args.bodies
        self.encoder_q = Encoder(args)
        self.encoder_k = Encoder(args)
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        self.encoder_k.requires_grad_(False)
        if args.prompt:
            for name in self.PROMPTS:
                setattr(self, name, _prompt(1, 1, in_dim))
            self.cl_prompt = _prompt(1, args.prompt_dim)
            self.mp_prompt = _prompt(1, args.prompt_dim)
        d = 2 * args.hidden
        self.linear = nn.Sequential(nn.Linear(d, args.dec_dim), common.GlobalBatchNorm1d(args.dec_dim),
                                    nn.ReLU(), nn.Linear(args.dec_dim, args.dec_dim))
        self.decoder = nn.GRU(args.dec_dim, args.dec_dim, args.dec_layers, batch_first=True)
        self.decoder_out = nn.Linear(args.dec_dim, in_dim)
        self.register_buffer("queue", F.normalize(torch.randn(args.feat_dim, args.queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @property
    def encoder(self):
        return self.encoder_q

    def p(self, name):
        return getattr(self, name) if self.args.prompt else None

    def decode(self, seq, shape):
        """(N, T, 2H) -> reconstruction (N, C, T, V, M): per-step MLP, GRU decoder, Linear to V*C*M."""
        n, t, d = seq.shape
        h = self.linear(seq.reshape(n * t, d)).view(n, t, -1)  # BN statistics over N*T steps
        with _no_autocast(h):
            h = self.decoder(_fp32_or_wider(h))[0]
        out = self.decoder_out(h)  # (N, T, V*C*M)
        _, c, _, v, m = shape
        return out.view(n, t, v, c, m).permute(0, 3, 1, 2, 4)

    def embed(self, enc, feat, offset):
        return F.normalize(_fp32_or_wider(enc.project(feat, self.p("cl_prompt"), offset)), dim=1)

    @torch.no_grad()
    def momentum_update(self):
        m = self.args.key_momentum
        keys = list(self.encoder_k.parameters())  # multi-tensor kernels: same arithmetic, 2 calls
        torch._foreach_mul_(keys, m)
        torch._foreach_add_(keys, [p.detach() for p in self.encoder_q.parameters()], alpha=1 - m)

    def forward(self, b, post_distill=False):
        """b: the local batch of views (make_views). Stage one, or post-distillation."""
        a, enc, off = self.args, self.encoder_q, b["offsets"]
        mask, v3 = b["mask"], b["v3"]
        v3m = v3 * mask  # (N, C, T, V, M)
        q = self.embed(enc, enc.sequence(b["v1"], self.p("base_prompt"))[:, -1], off[0])
        seq = enc.sequence(v3m, self.p("mask_prompt"))  # (N, T, 2H)
        if a.prompt:
            seq_mp = seq + feature_prompt(self.mp_prompt, off[1], seq)  # mp_prompt at every step
            recons = self.decode(seq_mp, v3.shape)  # MSE path: encoder + decoder
            recons_cl = self.decode(seq_mp.detach(), v3.shape)  # contrastive path: decoder only
            mask_q = self.embed(enc, seq[:, -1], off[2])
        else:  # PCM3_woprompt: one decoder pass, the predicted view is detached
            recons = self.decode(seq, v3.shape)
            recons_cl = recons.detach()
            mask_q = F.normalize(_fp32_or_wider(enc.project(seq[:, -1])), dim=1)
        pred = recons_cl * (1 - mask) + v3m * mask  # predicted view R
        recons_q = self.embed(enc, enc.sequence(pred, self.p("recons_prompt"))[:, -1], off[3])
        mix_q = self.embed(enc, enc.sequence(b["x_mix"], self.p("mix_prompt"))[:, -1], off[4])
        queries = {"base": q, "mix": mix_q, "mask": mask_q, "recons": recons_q}
        if a.w_clip:  # PCM3++'s clip: one more query-encoder pass
            queries["clip"] = self.embed(enc, enc.sequence(b["clip"], self.p("base_prompt"))[:, -1],
                                         off[5])
        with torch.no_grad():
            self.momentum_update()
            k = self.embed(self.encoder_k,
                           self.encoder_k.sequence(b["v2"], self.p("base_prompt"))[:, -1], off[6])
            k_all = common.gather_nograd(k)  # (N_global, D)
            lam = b["lam"].to(k.dtype)[:, None]
            k_mix = F.normalize((1 - lam) * k + lam * k_all[b["partner"]], dim=1)
        with torch.autocast(v3.device.type, enabled=False):  # losses in fp32
            terms = pcm3_losses({n: (s, k_mix if n == "mix" else k) for n, s in queries.items()},
                                self.queue.clone(), a)
            # Official: sum over masked coordinates / their count (body 1; target = the unmasked v3).
            # The mask is one pattern for the whole global batch: the local ratio is the global one.
            terms["rec"] = ((_fp32_or_wider(recons) - v3) ** 2 * (1 - mask)).sum() / (1 - mask).sum()
            terms = {"loss": total_loss(terms, a, post_distill), **terms}
        self.enqueue(k_all)
        return terms

    @torch.no_grad()
    def enqueue(self, keys):
        k, ptr = self.queue.shape[1], self.queue_ptr
        idx = (ptr + torch.arange(keys.shape[0], device=keys.device)) % k  # wraps if K % B != 0
        self.queue[:, idx] = keys.T.to(self.queue.dtype)
        ptr.copy_((ptr + keys.shape[0]) % k)


# ------------------------------------------------------------------------------------------ loss
PAIRS = ("base", "mix", "mask", "recons", "clip")


def info_nce(s, t, queue, temp):
    """MoCo InfoNCE: logits [s.t | s.queue] / temp, target index 0. s, t (N, D) unit; queue (D, K)."""
    logits = torch.cat([(s * t).sum(1, keepdim=True), s @ queue], dim=1) / temp
    return F.cross_entropy(logits, torch.zeros(len(s), dtype=torch.long, device=s.device))


def distill(s, t, queue, t_temp, s_temp):
    """CMD-style: KL(softmax(t.queue / t_temp) || softmax(s.queue / s_temp)), batchmean, whole queue."""
    target = F.softmax(t @ queue / t_temp, dim=1)
    return F.kl_div(F.log_softmax(s @ queue / s_temp, dim=1), target, reduction="batchmean")


def pcm3_losses(pairs, queue, args):
    """pairs: name -> (query s, key t), (N, D) each. Returns nce_<name> and kd_<name> per pair."""
    terms = {}
    for name, (s, t) in pairs.items():
        terms[f"nce_{name}"] = info_nce(s, t, queue, args.temperature)
        terms[f"kd_{name}"] = distill(s, t, queue, args.teacher_temp, args.student_temp)
    return terms


def total_loss(terms, args, post_distill):
    """Stage one (official forward_pcm3_wprompt): every InfoNCE term + every distillation term (with
    prompts only: PCM3_woprompt computes them, does not add them) + w_rec * MSE; the clip pair's
    terms weighted by w_clip. Post-distillation (PCM3++ Eq. 10): the InfoNCE terms dropped."""
    w = {n: args.w_clip if n == "clip" else 1.0 for n in PAIRS if f"nce_{n}" in terms}
    kd = sum(w[n] * terms[f"kd_{n}"] for n in w)
    rec = args.w_rec * terms["rec"]
    if post_distill:
        return kd + rec
    nce = sum(w[n] * terms[f"nce_{n}"] for n in w)
    return nce + (kd if args.prompt else 0.0) + rec


# ----------------------------------------------------------------------------------------- views
def _part_of_joint(device):  # (V,) index of the BODY_PARTS entry that holds each joint
    idx = torch.zeros(common.NUM_JOINTS, dtype=torch.long)
    for k, joints in enumerate(common.BODY_PARTS.values()):
        idx[joints] = k
    return idx.to(device)


def body_part_mask(x_shape, g, n_chunks=8, n_parts=3, device=None):
    """PCM3's mask (official utils.py Jointmask3, mask_ratio 0.6), ONE pattern for the batch as official:
    in each of n_chunks chunks of T // n_chunks frames, n_parts of the 5 BODY_PARTS are masked. Body 2 is
    never masked (official quirk); frames past the last chunk stay visible. x_shape (N, C, T, V, M) ->
    float32 mask (1 = visible) on `device` (default g's), an expand of one (T, V, M) pattern.
    Draws: rand(n_chunks, 5)."""
    N, C, T, V, M = x_shape
    device = g.device if device is None else torch.device(device)
    order = torch.rand(n_chunks, len(common.BODY_PARTS), generator=g, device=device).argsort(dim=1)
    parts = torch.zeros(n_chunks, len(common.BODY_PARTS), dtype=torch.bool, device=device)
    parts.scatter_(1, order[:, :n_parts], True)  # (n_chunks, 5), n_parts True per row
    joints = parts[:, _part_of_joint(device)]  # (n_chunks, V)
    frames = joints.repeat_interleave(T // n_chunks, dim=0)  # (n_chunks*chunk_len, V)
    frames = F.pad(frames, (0, 0, 0, T - frames.shape[0]), value=False)  # (T, V)
    visible = torch.ones(T, V, M, device=device)
    visible[:, :, 0] = (~frames).float()
    return visible.view(1, 1, T, V, M).expand(N, C, T, V, M)


def mix_samples(x, g):
    """PCM3's mixing (official builder_mask_recons.py MoCo.ske_swap(x, 2, 3, 7, 11)), drawn ONCE per
    batch as official. partner[i] = (i + n) mod N, n ~ randint[1, N-2] (N < 3: n = N - 1). Region:
    Cs ~ randint[2, 3] BODY_PARTS x Ct ~ randint[7, 11] units of 4 frames from unit u ~ randint[0,
    T/4 - Ct], both bodies. b ~ U(0, 1): b > .5 copies the partner's region; .25 < b <= .5 pastes the
    partner's first min(8Ct, T) frames resized to 4Ct (F.interpolate's nearest); else Mixup with
    lam ~ U(0, 1). lam = the swapped fraction of (T/4 x V) units for the swaps. No host sync.
    x (N, C, T, V, M) -> (x_mix, lam (N,) one value repeated, partner (N,) int64). Draws: randint(1,
    N-1) (N >= 3), randint(2, 4), rand(1, 5), randint(7, 12), rand(1) f64 (u), rand(1) f64 (b), rand(1)."""
    N, C, T, V, M = x.shape
    dev = x.device
    unit = 4
    n_units = T // unit
    if n_units < 11:
        raise ValueError(f"mix_samples: needs at least 44 frames (up to 11 units of 4), got T={T}")
    shift = (torch.randint(1, N - 1, (1,), generator=g, device=dev) if N >= 3
             else torch.full((1,), N - 1, dtype=torch.long, device=dev))
    partner = (torch.arange(N, device=dev) + shift) % N  # (N,)
    # Spatial: Cs parts as random.sample(body_parts, Cs): the parts ranked first by a random order.
    n_parts = torch.randint(2, 4, (1,), generator=g, device=dev)
    rank = torch.rand(1, len(common.BODY_PARTS), generator=g, device=dev).argsort(dim=1).argsort(dim=1)[0]
    joint_mask = (rank < n_parts)[_part_of_joint(dev)]  # (V,)
    # Temporal: Ct units from unit u, random.randint inclusive bounds.
    n_t = torch.randint(7, 12, (1,), generator=g, device=dev)  # Ct
    room = n_units - n_t + 1
    u0 = torch.minimum((torch.rand(1, generator=g, device=dev, dtype=torch.float64) * room).floor().long(),
                       room - 1)
    t = torch.arange(T, device=dev)
    unit_of_t = t // unit
    frame_mask = (unit_of_t >= u0) & (unit_of_t < u0 + n_t) & (t < n_units * unit)  # (T,)
    region = (frame_mask[:, None] & joint_mask[None, :])[None, None, :, :, None]  # (1, 1, T, V, 1)
    b = torch.rand(1, generator=g, device=dev, dtype=torch.float64)
    lam_mix = torch.rand(1, generator=g, device=dev).to(x.dtype)
    other = x.index_select(0, partner)  # (N, C, T, V, M)
    swapped = torch.where(region, other, x)
    # Resized swap: region frame 4u + j (0 <= j < rt) takes partner frame floor(j * (Ls / rt)) with
    # Ls = min(2 rt, T): PyTorch's nearest index (float32 scale, capped at Ls - 1).
    rt = n_t * unit
    src_len = torch.clamp(2 * rt, max=T)
    j = (t - u0 * unit).clamp(min=0)
    near = torch.minimum((j.float() * (src_len.float() / rt.float())).floor().long(), src_len - 1)
    resized = torch.where(region, other.index_select(2, near), x)
    mixup = x * (1 - lam_mix) + other * lam_mix
    lam_region = (n_t * joint_mask.sum()).to(x.dtype) / (n_units * V)  # mean of the unit mask
    x_mix = torch.where(b > 0.5, swapped, torch.where(b > 0.25, resized, mixup))
    lam = torch.where(b > 0.25, lam_region, lam_mix).to(x.dtype).expand(N)
    return x_mix, lam, partner


def clip_window(n, t, lo, hi, g, device):
    """PCM3++ clip as a mask ("we just mask for efficiency"): per sample a window of L ~ U{lo..hi}
    frames starting at s ~ U{0..t-L}; (N, 1, T, 1, 1) float, 1 inside the window."""
    length = torch.randint(lo, hi + 1, (n, 1), generator=g, device=device)
    start = (torch.rand(n, 1, generator=g, device=device) * (t - length + 1)).floor().long()
    frames = torch.arange(t, device=device)[None]
    return ((frames >= start) & (frames < start + length)).float().view(n, 1, t, 1, 1)


def sample_views(x, num_frame, g, args):
    """Per-sample views from raw clips (b, 3, T_raw, V, M) on the device (official
    feeder/feeder_pretraining_base.py): v1 (query) and v2 (key) crop-resize then joint corruption or
    shear (p 0.5); v3 (masked view) crop-resize then always shear; modality per view after the crop;
    with --w_clip, clip = v2 outside a random clip_len window zeroed."""
    scale = tuple(args.crop_scale)
    v1, v2 = common.crop_corrupt_or_shear(x, num_frame, g, args.window, scale, args.window,
                                          views=2).chunk(2)
    v3 = common.shear(common.crop_resize(x, num_frame, g, args.window, scale, args.window), g)
    views = {k: common.to_modality(v, args.modality) for k, v in (("v1", v1), ("v2", v2), ("v3", v3))}
    if args.w_clip:
        views["clip"] = views["v2"] * clip_window(len(x), args.window, *args.clip_len, g, x.device)
    return views


def add_batch_params(views, args, g_shared, rank):
    """The draws the official code makes once per batch, from a generator seeded alike on every rank
    so that N processes reproduce one: the body-part mask, mixing of v1 over the GLOBAL batch (global
    partner indices) and the seven feature-prompt offsets."""
    v1 = views["v1"]
    n = v1.shape[0]
    mask = body_part_mask(v1.shape, g_shared, n_chunks=args.mask_chunks, n_parts=3)
    x_mix, lam, partner = mix_samples(common.gather_nograd(v1), g_shared)
    local = slice(rank * n, (rank + 1) * n)
    offsets = torch.randint(0, args.hidden - args.prompt_dim // 2, (7,), generator=g_shared,
                            device=v1.device)  # official randint[0, 895] for H 1024, P 256
    return {**views, "mask": mask, "x_mix": x_mix[local], "lam": lam[local],
            "partner": partner[local], "offsets": offsets}


def make_views(x, num_frame, g, args, g_shared, rank):
    """x (b, 3, T_raw, V, M) raw clips -> the dict of views and batch draws Model.forward takes."""
    return add_batch_params(sample_views(x, num_frame, g, args), args, g_shared, rank)


# ----------------------------------------------------------------------------------- optimization
def make_optimizer(model, args):
    """SGD (the official run) or Adam (QUICK) over the trainable parameters (the key encoder has none)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)


def train_step(model, net, opt, scaler, views, args, post_distill=False):
    """One optimizer step (the momentum update and the enqueue are in Model.forward)."""
    with common.autocast(views["v1"].device, args.dtype):
        terms = net(views, post_distill)
    opt.zero_grad(set_to_none=True)
    scaler.scale(terms["loss"]).backward()
    scaler.step(opt)
    scaler.update()
    return {k: v.detach() for k, v in terms.items()}


# ------------------------------------------------------------------------------------------ main
def check_args(args):
    common.check_crop_scale(args)
    common.check_positive(args, ("window", "hidden", "layers", "feat_dim", "dec_dim", "dec_layers",
                                 "mask_chunks", "batch_size", "log_every", "save_every"))
    if args.prompt_dim // 2 >= args.hidden or args.prompt_dim < 2 or args.prompt_dim % 2:
        raise common.UserError(f"--prompt_dim {args.prompt_dim}: must be even and in "
                               f"[2, 2 * --hidden) (two halves, one per GRU direction)")
    if args.queue_size < args.batch_size:
        raise common.UserError(f"--queue_size {args.queue_size}: must be >= --batch_size {args.batch_size}")
    lo, hi = args.clip_len if len(args.clip_len) == 2 else (0, 0)
    if not 1 <= lo <= hi <= args.window:
        raise common.UserError(f"--clip_len {args.clip_len}: expected MIN MAX with 1 <= MIN <= MAX "
                               f"<= --window {args.window}")
    if args.window % args.mask_chunks or args.window % 4 or args.window < 44:
        raise common.UserError(f"--window {args.window}: must be >= 44 (mixing swaps up to 11 units "
                               f"of 4 frames), a multiple of 4 and of --mask_chunks {args.mask_chunks}")
    if args.batch_size < 3:
        raise common.UserError(f"--batch_size {args.batch_size}: the mixing partner shift 1..N-2 "
                               f"needs at least 3")
    if min(args.epochs, args.post_distill_epochs) < 0 or args.epochs + args.post_distill_epochs < 1:
        raise common.UserError(f"--epochs {args.epochs} / --post_distill_epochs "
                               f"{args.post_distill_epochs}: must be >= 0 with at least one epoch")
    if args.w_clip < 0 or args.w_rec < 0 or args.lr <= 0 or args.weight_decay < 0:
        raise common.UserError(f"--w_clip {args.w_clip} and --w_rec {args.w_rec} must be >= 0, --lr "
                               f"{args.lr} > 0 and --weight_decay {args.weight_decay} >= 0")


# Args a post-distillation run must share with its stage-one checkpoint (data, stream, model, loss).
STAGE_ONE_FIELDS = ("dataset", "split", "modality", "prompt", "window", "joints", "bodies", "hidden",
                    "layers", "feat_dim", "prompt_dim", "dec_dim", "dec_layers", "queue_size",
                    "key_momentum", "temperature", "teacher_temp", "student_temp", "w_rec", "w_clip",
                    "mask_chunks", "clip_len", "crop_scale", "batch_size", "optimizer")


def stage_one(args):
    """The --post_distill_from checkpoint, checked against these flags; sets args.epochs to its
    stage-one length. Returns (checkpoint, stage one's final lr)."""
    src = common.load_checkpoint(args.post_distill_from, METHOD)
    was = {"optimizer": "sgd", **common.checkpoint_args(src)}  # before --optimizer: SGD
    if src["epoch"] != was["epochs"]:  # its lr schedule would not have ended
        raise common.UserError(
            f"--post_distill_from {args.post_distill_from}: saved at epoch {src['epoch']}, not at the "
            f"end of its stage one ({was['epochs']} epochs); use a finished stage-one checkpoint "
            f"(stage1.pt, or last.pt of a --post_distill_epochs 0 run)")

    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v
    diff = [k for k in STAGE_ONE_FIELDS if k in was and norm(was[k]) != norm(getattr(args, k))]
    if diff:
        raise common.UserError(f"--post_distill_from {args.post_distill_from}: stage one ran with "
                               + ", ".join(f"--{k} {was[k]}" for k in diff) + "; repeat these flags")
    args.epochs = src["epoch"]
    return src, common.step_lr(was["lr"], src["epoch"] - 1, was["lr_steps"])


def check_resume(args):
    """One optimizer's state cannot continue as the other's: refuse before anything is loaded."""
    path = Path(args.out_dir or f"out/{METHOD}_{args.dataset}_{args.split}") / "last.pt"
    if args.resume and path.is_file():
        was = common.checkpoint_args(common.load_checkpoint(path, METHOD)).get("optimizer", "sgd")
        if was != args.optimizer:
            raise common.UserError(f"--resume: {path} was trained with --optimizer {was}; resume "
                                   f"with --optimizer {was}")


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
    src, final_lr = stage_one(args) if args.post_distill_from else (None, None)
    check_resume(args)
    run = common.Run(args, METHOD, __file__, d, QUICK)  # after the inputs were checked
    common.seed_everything(args.seed)  # same seed on every rank -> identical initial weights
    model = Model(args).to(device)
    opt = make_optimizer(model, args)
    scaler = common.make_scaler(device, args.dtype)
    g, g_shared = torch.Generator(device), torch.Generator(device)
    start_epoch, step, metrics = 0, 0, {}
    if src is None:
        final_lr = common.step_lr(args.lr, args.epochs - 1, args.lr_steps)
    elif not args.resume:  # continue stage one's model, queue and optimizer state (momenta)
        common.load_state(model, src["model"], args.post_distill_from)
        opt.load_state_dict(src["optimizer"])
        common.load_scaler(scaler, src["scaler"])
        start_epoch, step = src["epoch"], src["step"]
        run.info(f"post-distillation from {args.post_distill_from} (epoch {start_epoch}, lr "
                 f"{final_lr:.4g})")
    if args.resume:
        ck = run.resume(model, opt, scaler, g, g_shared)
        start_epoch, step, metrics = ck["epoch"], ck["step"], ck["metrics"]
    common.broadcast_module(model)
    net = common.wrap(model, d, args.compile)
    total = args.epochs + args.post_distill_epochs
    run.info(f"{METHOD}: {common.count_params(model):,} parameters (encoder "
             f"{common.count_params(model.encoder):,}), {len(split)} clips, {len(loader)} "
             f"steps/epoch, {d.world_size} process(es) on {device}")

    run.start(total * len(loader), step)
    for epoch in range(start_epoch, total):
        post = epoch >= args.epochs  # post-distillation at stage one's final lr
        lr = final_lr if post else common.step_lr(args.lr, epoch, args.lr_steps)
        common.set_lr(opt, lr)
        loader.set_epoch(epoch)
        g.manual_seed(common.epoch_seed(args.seed, epoch, d.rank))  # augmentation
        g_shared.manual_seed(common.epoch_seed(args.seed, epoch, -1))  # per-batch draws, all ranks
        net.train()
        sums, n = {}, 0
        for x, num_frame, _ in loader:
            with torch.no_grad():
                views = make_views(x, num_frame, g, args, g_shared, d.rank)
            terms = train_step(model, net, opt, scaler, views, args, post)
            step, n = step + 1, n + 1
            sums = {k: sums.get(k, 0) + v for k, v in terms.items()}
            run.step(step, epoch + n / len(loader), terms, lr)
        metrics = run.end_epoch(step, epoch, sums, n, lr)
        if (epoch + 1) % args.save_every == 0 or epoch + 1 in (args.epochs, total):
            run.save(model, opt, scaler, epoch + 1, step, metrics, (g, g_shared))
        if epoch + 1 == args.epochs < total:  # post-distillation overwrites last.pt: keep stage one
            run.save(model, opt, scaler, epoch + 1, step, metrics, (g, g_shared), name="stage1.pt")
    run.done()


if __name__ == "__main__":
    common.run_main(main)
