"""PCM3++: prompted contrast with masked motion modeling, clip contrast and post-distillation.

Papers: J. Zhang et al., "Prompted Contrast with Masked Motion Modeling: Towards Versatile 3D Action
Representation Learning" (PCM3, ACM MM 2023) and the survey that extends it to PCM3++
(seeds/survey_pcm3pp.txt). Official PCM3 code: https://github.com/JHang2020/PCM3 (facts we follow:
specs/methods.md 3A); what PCM3++ adds (3B) is unreleased, our reading is SPEC section 5.

What is trained: a MoCo v2 query/key pair of PCM3 "BIGRU" encoders (input BatchNorm, a 3-layer GRU whose
two "directions" both run forward in time, last-step 2048-d feature, 128-d MLP head), a queue of 16384
keys, InfoNCE (T 0.07) plus CMD-style distillation (teacher 0.05, student 0.1, whole queue) for each
positive pair: query view, inter-sample mixed view (mixed key), body-part masked view, the view
predicted by the masked-motion decoder (whose contrastive gradient reaches the decoder), and PCM3++'s
temporal clip (the key view with frames outside a 16..32-frame window zeroed, through the query branch,
positive = the full key); the decoder's masked reconstruction MSE (weight 40); learnable input and
feature prompts (--prompt, the official joint variant; --no_prompt is the official bone/motion one).
Then an optional post-distillation stage (PCM3++, Eq. 10): --post_distill_epochs more epochs at the
final lr of stage one, every InfoNCE term dropped, distillation and reconstruction kept.

Commands (--batch_size is the GLOBAL batch in every case):
  1 GPU:      python pcm3pp.py --dataset ntu60 --split xsub --data_dir data
  N GPUs:     torchrun --nproc_per_node 4 pcm3pp.py --dataset ntu60 --split xsub --data_dir data
  CPU quick:  python pcm3pp.py --dataset synthetic   (QUICK config below, a few minutes on 2 cores)
  resume:     add --resume (continues from <out_dir>/last.pt, stage one or post-distillation)
  bone/motion stream: --modality bone --no_prompt (the official PCM3_woprompt variant)
  post-distillation only, from a finished stage-one checkpoint (stage1.pt, which a run with
  post-distillation keeps beside last.pt, or last.pt of a --post_distill_epochs 0 run):
              python pcm3pp.py --post_distill_from out/a/stage1.pt --out_dir out/b
              (with stage one's data / stream / model flags: a mismatch is an error)

Decisions (our reading where the survey is silent): the clip window is drawn per sample, the clip gets
the base prompt and weight 1, its distillation target is k; post-distillation continues the queue, the
key momentum and the optimizer state at the constant final lr, keeps all five distillation terms and
the reconstruction; with --no_prompt no distillation term enters stage one (as PCM3_woprompt).
Mixing acts on the modality-converted view. As in the official code, the input prompts (and
mp_prompt) are constant per-channel offsets added before a batch-statistics BatchNorm, which
subtracts them again: their gradients are ~0 (only cl_prompt, added after the GRU, learns); they only
shift the BN running statistics. Under DDP every BatchNorm uses global-batch statistics (SyncBN, the
official DDP path; it equals the official single-GPU run) instead of shuffle-BN.

Official checkpoints: Encoder's state_dict keys are exactly the official `encoder_q.*` keys with the
prefix removed: input_norm.{weight,bias,running_mean,running_var,num_batches_tracked},
encoder.{weight_ih,weight_hh,bias_ih,bias_hh}_l{0,1,2}[_reverse] (one nn.GRU(150, 1024, 3,
bidirectional=True)), fc.0.{weight,bias}, fc.2.{weight,bias}. In Model: encoder_q.*, encoder_k.*,
queue, queue_ptr as the official MoCo builder; prompts base/mask/recons/mix/cl/mp_prompt, linear.*,
decoder.* (GRU) and decoder_out.* (the names of these last three are our reading).
"""
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import arg, cpu_linear, cpu_pack

METHOD = "pcm3pp"


@dataclass
class Args:
    dataset: str = arg("ntu60", "dataset name (ntu60, ntu120, pku1, pku2, synthetic, synthetic_ext)")
    split: str = arg("xsub", "benchmark split (xsub, xview, xsetup)")
    data_dir: str = arg("data", "root folder of the processed datasets")
    out_dir: str = arg("", "output folder (default out/pcm3pp_<dataset>_<split>)")
    modality: str = arg("joint", "input stream, computed per view after the crop (official --stream)",
                        choices=["joint", "bone", "motion"])
    prompt: bool = arg(True, "learnable input/feature prompts and distillation in the total (official "
                       "PCM3_wprompt, joint); --no_prompt = PCM3_woprompt (bone/motion script)")
    window: int = arg(64, "frames per clip (T) the encoder takes, pre-training and downstream")
    joints: int = arg(25, "joints per body (V)")
    bodies: int = arg(2, "bodies per clip (M); the GRU input is V*C*M = 150 wide")
    hidden: int = arg(1024, "GRU hidden size per direction (the feature is 2*hidden)")
    layers: int = arg(3, "GRU layers")
    feat_dim: int = arg(128, "output width of the MLP projection head")
    prompt_dim: int = arg(256, "feature-prompt width: two halves added at a random offset to the two "
                          "hidden-size halves of the feature")
    dec_dim: int = arg(512, "width of the decoder's per-step MLP and GRU")
    dec_layers: int = arg(2, "decoder GRU layers")
    queue_size: int = arg(16384, "MoCo queue length K")
    momentum: float = arg(0.999, "MoCo key-encoder momentum")
    temperature: float = arg(0.07, "InfoNCE temperature")
    teacher_temp: float = arg(0.05, "distillation temperature of the key (teacher) similarities")
    student_temp: float = arg(0.1, "distillation temperature of the query (student) similarities")
    rec_weight: float = arg(40.0, "weight of the masked reconstruction MSE")
    mask_chunks: int = arg(8, "temporal chunks of the body-part mask (3 of 5 parts masked per chunk)")
    clip_len: list = arg([16, 32], "min and max frames of the PCM3++ temporal clip window (inclusive)")
    crop_scale: list = arg([0.1, 1.0], "range of the temporal crop ratio (min crop = window frames)")
    epochs: int = arg(451, "stage-one epochs")
    post_distill_epochs: int = arg(50, "post-distillation epochs after stage one (0 = none)")
    post_distill_from: str = arg("", "run only post-distillation, starting from this stage-one "
                                 "checkpoint (its weights, queue and schedule; repeat its data and "
                                 "model flags)")
    batch_size: int = arg(128, "global batch size (split evenly over torchrun processes)")
    optimizer: str = arg("sgd", "sgd (the official run) or adam (torch.optim.Adam, the quick start's: "
                         "SGD needs thousands of steps here)", choices=["sgd", "adam"])
    lr: float = arg(0.02, "learning rate")
    sgd_momentum: float = arg(0.9, "SGD momentum (--optimizer sgd)")
    weight_decay: float = arg(1e-4, "L2 weight decay (SGD's, or Adam's added to the gradient)")
    lr_steps: list = arg([351], "epochs at which the learning rate is multiplied by 0.1")
    seed: int = arg(42, "random seed (weights, shuffling, augmentation)")
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = arg("auto", "autocast dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16",
                     choices=["auto", "fp32", "bf16", "fp16"])
    compile: bool = arg(False, "torch.compile the model")
    resume: bool = arg(False, "continue from <out_dir>/last.pt")
    num_workers: int = arg(0, "data-loading worker threads")
    log_every: int = arg(50, "log a line every this many steps")
    save_every: int = arg(100, "write <out_dir>/last.pt every this many epochs (and at the end)")
    data_on_device: bool = arg(False, "keep the whole training split on the device")


# Small config for the CPU quick start on synthetic data (a few minutes on 2 cores). The structure
# (3 forward-in-time GRU layers, all views and losses, post-distillation) is the paper's; widths, queue
# and epochs shrink, the key momentum drops to 0.99 (0.999 barely moves the key encoder in ~150
# steps), and the optimizer is Adam at lr 3e-3 instead of SGD. With SGD (the earlier QUICK: lr 0.05,
# 6 + 1 epochs) the quick start tied random init on linear and lost on kNN, seeds 0 / 1 / 2: 20.1 /
# 17.5, 20.6 / 18.7, 19.8 / 17.4 vs 20.8 / 19.9, 20.5 / 19.0, 19.5 / 18.3 (linear / kNN k=1), and 4x
# the epochs moved them by at most 3.3 points (README, "Longer pre-training"). This QUICK (8 + 1
# epochs, 144 + 18 steps): 25.4 / 23.2, 23.3 / 20.5, 22.8 / 20.1, and 24.9 / 21.8 vs 22.2 / 20.8 on
# the default seed 42 (seeds 3 / 4: 24.8 / 21.8 vs 21.2 / 19.2, 24.5 / 22.2 vs 20.3 / 19.3); linear at
# the full 100-epoch protocol 26.6, 24.7, 23.9 vs 21.0, 21.0, 19.7. Re-run after the oneDNN GRU
# kernel (float rounding only): 25.5 / 23.2, 23.3 / 20.3, 22.8 / 19.5, seed 42 24.7 / 22.0.
# Measured on the way (Adam, 6 + 1 epochs): this Adam with lr 3e-3 24.0 / 21.5, 22.6 / 20.0, 22.2 /
# 19.2 (seed 42: 24.0 / 20.4); without weight decay lr 1e-3 22.8 / 18.8, 23.0 / 18.8, 22.7 / 18.7,
# lr 3e-3 25.7 / 23.3, 23.0 / 20.7, 22.1 / 18.9, lr 1e-2 (seed 2) 21.2 / 17.7. The defaults above
# stay the paper's NTU-60 run.
QUICK = dict(hidden=64, prompt_dim=32, dec_dim=64, queue_size=1024, batch_size=64, epochs=8,
             post_distill_epochs=1, lr_steps=[7], optimizer="adam", lr=3e-3, momentum=0.99,
             log_every=6, save_every=1)


# ----------------------------------------------------------------------------------------- model
class _ForwardGRU(torch.autograd.Function):
    """One weight set of a BIGRU layer on CPU, forward in time from a zero state: (N, T, I) ->
    (N, T, H). Autograd through aten::gru forms the W_hh gradient as one outer product per step (a
    read + write of the whole matrix T times); here the backward keeps the gate gradients and forms
    every weight gradient with one GEMM over all T*N rows. The two weight sets of a layer run one after
    the other, not batched as one (2, N, H) recurrence: each 12 MB W_hh then stays in the 32 MB L3
    across the steps (with addmm for both: the paper's encoder, forward + backward at batch 8, one
    thread, 2.8-3.1 s vs 3.0-3.6 s batched), and each set's packed weight is used T times. Every
    product goes through common.cpu_linear (oneDNN; W_hh packed once per call by cpu_pack): 2.0 s
    instead of 2.8-3.1 s for that encoder (tests/bench.py pcm3pp_gru, README "Benchmarks")."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(ctx, x, w_ih, w_hh, b_ih, b_hh):
        n, t, _ = x.shape
        hid = w_hh.shape[1]
        gi = cpu_linear(x.reshape(n * t, -1), w_ih, b_ih).view(n, t, 3, hid).permute(1, 2, 0, 3)
        hs = x.new_zeros(t + 1, n, hid)                                  # h_{-1} = 0, then h_0..h_T-1
        gates = x.new_empty(t, 4, n, hid)                                # r, z, n, W_hn h + b_hn
        # At small widths the loop costs its number of ops, not its arithmetic: every gate is written
        # straight into its slot of `gates` / `hs` (out=), and the views are taken with one unbind each.
        w_hh_p, h = cpu_pack(w_hh, n), hs.unbind(0)
        for s in range(t):
            (gi_r, gi_z, gi_n), (r, z, cand, ghn) = gi[s], gates[s]      # (N, H) each; gi (T, 3, N, H)
            gh_r, gh_z, gh_n = cpu_linear(h[s], w_hh_p, b_hh).view(n, 3, hid).unbind(1)
            torch.sigmoid(gi_r + gh_r, out=r)
            torch.sigmoid(gi_z + gh_z, out=z)
            ghn.copy_(gh_n)
            torch.tanh(gi_n + r * ghn, out=cand)
            torch.add(cand, z * (h[s] - cand), out=h[s + 1])             # (1 - z) n + z h
        ctx.save_for_backward(x, w_ih, w_hh, hs, gates)
        return hs[1:].transpose(0, 1)                                    # (N, T, H)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, dy):
        x, w_ih, w_hh, hs, gates = ctx.saved_tensors
        n, t, _ = x.shape
        hid = w_hh.shape[1]
        dy = dy.transpose(0, 1)                                          # (T, N, H)
        # The loop writes the gate gradients in place (out=), dgi only its n gate: its r and z gates
        # equal dgh's and are copied once after the loop. dgi is kept in x's (N, T) row order, so the
        # weight GEMMs read it without another copy.
        dgh = x.new_empty(t, n, 3, hid)                                  # grads of W_hh h + b_hh
        dgi = x.new_empty(n, t, 3, hid)                                  # grads of W_ih x + b_ih
        dh = x.new_zeros(n, hid)
        h, dgi_n = hs.unbind(0), dgi[:, :, 2].unbind(1)
        w_hh_p = cpu_pack(w_hh.t(), n)                                   # dh_{s-1} += dgh_s W_hh
        for s in range(t - 1, -1, -1):
            dh = dh + dy[s]
            r, z, cand, ghn = gates[s]
            dr, dz, dhn = dgh[s].unbind(1)
            one_z = 1 - z
            dn = torch.mul(dh * one_z, 1 - cand * cand, out=dgi_n[s])
            torch.mul(dh * (h[s] - cand) * z, one_z, out=dz)
            torch.mul(dn * ghn * r, 1 - r, out=dr)
            torch.mul(dn, r, out=dhn)
            dh = cpu_linear(dgh[s].view(n, 3 * hid), w_hh_p, add=dh * z)
        dgi[:, :, :2] = dgh[:, :, :2].transpose(0, 1)
        dgh, dgi = dgh.view(t * n, 3 * hid), dgi.view(n * t, 3 * hid)
        xr, hr = x.reshape(n * t, -1), hs[:-1].view(t * n, hid)          # rows as dgi's / dgh's
        return (cpu_linear(dgi, w_ih.t()).view_as(x), cpu_linear(dgi.t(), xr.t()),
                cpu_linear(dgh.t(), hr.t()), dgi.sum(0), dgh.sum(0))


@torch.compiler.disable  # the GRU stays on cuDNN / the CPU kernel above under torch.compile
def forward_in_time_gru(gru: nn.GRU, x: torch.Tensor, native: bool | None = None) -> torch.Tensor:
    """The official BIGRU recurrence, evaluated with whole-sequence calls.

    The official code calls `gru` once per time step on a length-1 slice and carries the (2L, N, H)
    state, so the "_reverse" weights of each layer also run FORWARD in time (methods.md 3A.2). Per layer
    that is two unidirectional GRUs over the whole sequence from a zero state, outputs concatenated
    (forward weights first) as the next layer's input. `native` (default: on CUDA) runs them as
    torch.gru calls (cuDNN); otherwise _ForwardGRU.  x (N, T, I) -> (N, T, 2H), all steps."""
    native = x.is_cuda if native is None else native
    h0 = x.new_zeros(1, x.shape[0], gru.hidden_size)
    for layer in range(gru.num_layers):
        w = [getattr(gru, f"{name}_l{layer}{sfx}") for sfx in ("", "_reverse")
             for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        if native:
            x = torch.cat([torch.gru(x, h0, w[:4], True, 1, 0.0, gru.training, False, True)[0],
                           torch.gru(x, h0, w[4:], True, 1, 0.0, gru.training, False, True)[0]], 2)
        else:
            x = torch.cat([_ForwardGRU.apply(x, *w[:4]), _ForwardGRU.apply(x, *w[4:])], 2)
    return x


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """Autocast outputs (bf16/fp16) to fp32 for the losses; fp32/fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class Encoder(nn.Module):
    """PCM3's BIGRU: input BatchNorm1d(150) -> forward-in-time 3-layer GRU -> fc MLP head.

    forward(x): (N, C, T, V, M) -> (N, 2H) last-step GRU output (the linear-eval / kNN feature);
    dense(x): (N, T, 2H) all steps; project(feat) -> (N, feat_dim) head output (pre-normalisation)."""

    def __init__(self, args: Args):
        super().__init__()
        in_dim = 3 * args.joints * args.bodies
        self.hidden = args.hidden
        # global-batch statistics under DDP (SyncBN, the official DDP path, on any backend)
        self.input_norm = common.GlobalBatchNorm1d(in_dim)
        self.encoder = nn.GRU(in_dim, args.hidden, args.layers, batch_first=True, bidirectional=True)
        for p in self.encoder.parameters():
            if p.dim() == 2:  # official: xavier_uniform on every 2-D GRU weight, biases default
                nn.init.xavier_uniform_(p)
        d = 2 * args.hidden
        # MoCo v2 --mlp head (PyTorch default init; it replaces the xavier-initialised fc).
        self.fc = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, args.feat_dim))
        self.out_dim = self.dense_dim = d

    @staticmethod
    def flatten(x: torch.Tensor) -> torch.Tensor:
        """(N, C, T, V, M) -> (N, T, V*C*M), feature index v*C*M + c*M + m (official permute)."""
        n, c, t, v, m = x.shape
        return x.permute(0, 2, 3, 1, 4).reshape(n, t, v * c * m)

    def sequence(self, x: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C, T, V, M) (+ input prompt (1, 1, V*C*M)) -> (N, T, 2H) GRU outputs."""
        h = self.flatten(x)
        if prompt is not None:
            h = h + prompt
        h = self.input_norm(h.transpose(1, 2)).transpose(1, 2)   # stats over N and T
        return forward_in_time_gru(self.encoder, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sequence(x)[:, -1]

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return self.sequence(x)

    def project(self, feat: torch.Tensor, prompt: torch.Tensor | None = None,
                offset: torch.Tensor | None = None) -> torch.Tensor:
        """Official prompt hook: prompt (1, P) -> first half added to feat[..., s:s+P/2], second half to
        feat[..., H+s:H+s+P/2] (s = offset, a 0-dim long tensor), then the fc head."""
        if prompt is not None:
            feat = feat + feature_prompt(prompt, offset, feat)
        return self.fc(feat)


def feature_prompt(prompt: torch.Tensor, offset: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
    """(1, P) prompt placed in a (2H,) vector: halves at [s, s+P/2) and [H+s, H+s+P/2), s = offset
    (0-dim long tensor, no host sync and no recompilation per value); H = feat.shape[-1] / 2."""
    half, hid = prompt.shape[1] // 2, feat.shape[-1] // 2
    idx = torch.arange(half, device=feat.device) + offset
    idx = torch.cat([idx, idx + hid])
    return feat.new_zeros(2 * hid).index_add(0, idx, prompt[0].to(feat.dtype))


def _prompt(*shape: int) -> nn.Parameter:
    p = torch.empty(*shape)
    nn.init.xavier_uniform_(p)  # (1,1,150): bound sqrt(6/300); (1,256): bound sqrt(6/257), as official
    return nn.Parameter(p)


class Model(nn.Module):
    """The whole pre-training module: query/key encoders, queue, prompts, masked-motion decoder."""

    PROMPTS = ("base_prompt", "mask_prompt", "recons_prompt", "mix_prompt")

    def __init__(self, args: Args):
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
                                    nn.ReLU(),
                                    nn.Linear(args.dec_dim, args.dec_dim))
        self.decoder = nn.GRU(args.dec_dim, args.dec_dim, args.dec_layers, batch_first=True)
        self.decoder_out = nn.Linear(args.dec_dim, in_dim)
        self.register_buffer("queue", F.normalize(torch.randn(args.feat_dim, args.queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @property
    def encoder(self) -> Encoder:
        return self.encoder_q

    def p(self, name: str) -> torch.Tensor | None:
        return getattr(self, name) if self.args.prompt else None

    def decode(self, seq: torch.Tensor, shape) -> torch.Tensor:
        """(N, T, 2H) -> reconstruction (N, C, T, V, M): per-step MLP, GRU decoder, Linear to V*C*M."""
        n, t, d = seq.shape
        h = self.linear(seq.reshape(n * t, d)).view(n, t, -1)        # BN statistics over N*T steps
        out = self.decoder_out(self.decoder(h)[0])                  # (N, T, V*C*M)
        _, c, _, v, m = shape
        return out.view(n, t, v, c, m).permute(0, 3, 1, 2, 4)

    def embed(self, enc: Encoder, feat: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return F.normalize(_fp32(enc.project(feat, self.p("cl_prompt"), offset)), dim=1)

    @torch.no_grad()
    def momentum_update(self):
        m = self.args.momentum
        keys = list(self.encoder_k.parameters())  # multi-tensor kernels: same arithmetic, 2 calls
        torch._foreach_mul_(keys, m)
        torch._foreach_add_(keys, [p.detach() for p in self.encoder_q.parameters()], alpha=1 - m)

    def forward(self, b: dict, post_distill: bool = False) -> dict:
        """b: the local batch of views (make_views + add_batch_params). Returns fp32 loss terms."""
        a, enc, off = self.args, self.encoder_q, b["offsets"]
        mask, v3 = b["mask"], b["v3"]
        v3m = v3 * mask                                                     # (N, C, T, V, M)
        q = self.embed(enc, enc.sequence(b["v1"], self.p("base_prompt"))[:, -1], off[0])
        seq = enc.sequence(v3m, self.p("mask_prompt"))                       # (N, T, 2H)
        if a.prompt:
            seq_mp = seq + feature_prompt(self.mp_prompt, off[1], seq)      # mp_prompt at every step
            recons = self.decode(seq_mp, v3.shape)                          # MSE path: encoder+decoder
            recons_cl = self.decode(seq_mp.detach(), v3.shape)              # contrastive path: decoder
            mask_q = self.embed(enc, seq[:, -1], off[2])
        else:  # PCM3_woprompt: one decoder pass, the predicted view is detached
            recons = self.decode(seq, v3.shape)
            recons_cl = recons.detach()
            mask_q = F.normalize(_fp32(enc.project(seq[:, -1])), dim=1)
        pred = recons_cl * (1 - mask) + v3m * mask                          # predicted view R
        recons_q = self.embed(enc, enc.sequence(pred, self.p("recons_prompt"))[:, -1], off[3])
        mix_q = self.embed(enc, enc.sequence(b["x_mix"], self.p("mix_prompt"))[:, -1], off[4])
        clip_q = self.embed(enc, enc.sequence(b["clip"], self.p("base_prompt"))[:, -1], off[5])
        with torch.no_grad():
            self.momentum_update()
            k = self.embed(self.encoder_k,
                           self.encoder_k.sequence(b["v2"], self.p("base_prompt"))[:, -1], off[6])
            k_all = common.gather_nograd(k)                                  # (N_global, D)
            lam = b["lam"].to(k.dtype)[:, None]
            k_mix = F.normalize((1 - lam) * k + lam * k_all[b["partner"]], dim=1)
        with torch.autocast(v3.device.type, enabled=False):   # losses in fp32
            terms = pcm3_losses({"base": (q, k), "mix": (mix_q, k_mix), "mask": (mask_q, k),
                                 "recons": (recons_q, k), "clip": (clip_q, k)}, self.queue.clone(), a)
            # Official: sum over masked coordinates / their count (body 1; target = the unmasked v3).
            # The mask is one pattern for the whole global batch: the local ratio is the global one.
            terms["rec"] = ((_fp32(recons) - v3) ** 2 * (1 - mask)).sum() / (1 - mask).sum()
            terms["loss"] = total_loss(terms, a, post_distill)
        self.enqueue(k_all)
        return terms

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor):
        k, ptr = self.queue.shape[1], self.queue_ptr
        idx = (ptr + torch.arange(keys.shape[0], device=keys.device)) % k   # wraps if K % B != 0
        self.queue[:, idx] = keys.T.to(self.queue.dtype)
        ptr.copy_((ptr + keys.shape[0]) % k)


# ------------------------------------------------------------------------------------------ loss
PAIRS = ("base", "mix", "mask", "recons", "clip")


def info_nce(s: torch.Tensor, t: torch.Tensor, queue: torch.Tensor, temp: float) -> torch.Tensor:
    """MoCo InfoNCE: logits [s.t | s.queue] / temp, target index 0. s, t (N, D) unit; queue (D, K)."""
    logits = torch.cat([(s * t).sum(1, keepdim=True), s @ queue], dim=1) / temp
    return F.cross_entropy(logits, torch.zeros(len(s), dtype=torch.long, device=s.device))


def distill(s: torch.Tensor, t: torch.Tensor, queue: torch.Tensor, t_temp: float,
            s_temp: float) -> torch.Tensor:
    """CMD-style: KL(softmax(t.queue / t_temp) || softmax(s.queue / s_temp)), batchmean, whole queue."""
    target = F.softmax(t @ queue / t_temp, dim=1)
    return F.kl_div(F.log_softmax(s @ queue / s_temp, dim=1), target, reduction="batchmean")


def pcm3_losses(pairs: dict, queue: torch.Tensor, a: Args) -> dict:
    terms = {}
    for name, (s, t) in pairs.items():
        terms[f"nce_{name}"] = info_nce(s, t, queue, a.temperature)
        terms[f"kd_{name}"] = distill(s, t, queue, a.teacher_temp, a.student_temp)
    return terms


def total_loss(terms: dict, a: Args, post_distill: bool) -> torch.Tensor:
    """Stage one (PCM3 + clip, weight 1 each): base + mix + mask + recons + clip InfoNCE, + the five
    distillation terms (only with prompts: PCM3_woprompt computes them but does not add them),
    + rec_weight * MSE. Post-distillation (PCM3++ Eq. 10, our reading): every InfoNCE term dropped;
    the five distillation terms and the reconstruction kept."""
    kd = sum(terms[f"kd_{n}"] for n in PAIRS)
    rec = a.rec_weight * terms["rec"]
    if post_distill:
        return kd + rec
    nce = sum(terms[f"nce_{n}"] for n in PAIRS)
    return nce + (kd if a.prompt else 0.0) + rec


# ----------------------------------------------------------------------------------------- views
def clip_window(n: int, t: int, lo: int, hi: int, g: torch.Generator, device) -> torch.Tensor:
    """PCM3++ clip as a mask ("we just mask for efficiency"): per sample a window of L ~ U{lo..hi}
    frames starting at s ~ U{0..t-L}; (N, 1, T, 1, 1) float, 1 inside the window."""
    length = torch.randint(lo, hi + 1, (n, 1), generator=g, device=device)
    start = (torch.rand(n, 1, generator=g, device=device) * (t - length + 1)).floor().long()
    frames = torch.arange(t, device=device)[None]
    return ((frames >= start) & (frames < start + length)).float().view(n, 1, t, 1, 1)


def make_views(x: torch.Tensor, num_frame: torch.Tensor, a: Args, g: torch.Generator) -> dict:
    """Per-sample views from raw clips (N, 3, T_raw, 25, 2), all on x's device (methods.md 3A.1):
    v1 (query) and v2 (key): crop-resize then joint corruption or shear (p 0.5); v3 (masked view):
    crop-resize then always shear; clip: v2 outside a random 16..32-frame window zeroed.
    Modality conversion per view after the crop."""
    scale = tuple(a.crop_scale)

    def crop():
        return common.crop_resize(x, num_frame, g, a.window, scale, a.window)

    v1, v2 = common.crop_corrupt_or_shear(x, num_frame, g, a.window, scale, a.window, views=2).chunk(2)
    v3 = common.shear(crop(), g)
    v1, v2, v3 = (common.to_modality(v, a.modality) for v in (v1, v2, v3))
    lo, hi = a.clip_len
    clip = v2 * clip_window(len(x), a.window, lo, hi, g, x.device)
    return {"v1": v1, "v2": v2, "v3": v3, "clip": clip}


def add_batch_params(views: dict, a: Args, g_shared: torch.Generator, rank: int) -> dict:
    """Parameters the official code draws once per batch, from a generator seeded identically on every
    rank so that N processes reproduce one process: the body-part mask, inter-sample mixing of v1 over
    the GLOBAL batch (partner indices are global) and the seven feature-prompt offsets."""
    v1 = views["v1"]
    n = v1.shape[0]
    mask = common.body_part_mask(v1.shape, g_shared, n_chunks=a.mask_chunks, n_parts=3)
    x_mix, lam, partner = common.mix_samples(common.gather_nograd(v1), g_shared)
    local = slice(rank * n, (rank + 1) * n)
    offsets = torch.randint(0, a.hidden - a.prompt_dim // 2, (7,), generator=g_shared,
                            device=v1.device)   # official randint[0, 895] for H 1024, P 256
    return {**views, "mask": mask, "x_mix": x_mix[local], "lam": lam[local],
            "partner": partner[local], "offsets": offsets}


# ------------------------------------------------------------------------------------------ main
def _check(a: Args):
    if a.prompt_dim // 2 >= a.hidden or a.prompt_dim < 2 or a.prompt_dim % 2:
        raise common.UserError(f"--prompt_dim {a.prompt_dim}: must be even and in "
                               f"[2, 2 * --hidden) (two halves, one per GRU direction)")
    if a.mask_chunks < 1 or a.queue_size < a.batch_size:
        raise common.UserError(f"--mask_chunks {a.mask_chunks} must be >= 1 and --queue_size "
                               f"{a.queue_size} >= --batch_size {a.batch_size}")
    lo, hi = a.clip_len if len(a.clip_len) == 2 else (0, 0)
    if not 1 <= lo <= hi <= a.window:
        raise common.UserError(f"--clip_len {a.clip_len}: expected MIN MAX with 1 <= MIN <= MAX <= "
                               f"--window {a.window}")
    if a.window % a.mask_chunks or a.window % 4 or a.window < 44:
        raise common.UserError(f"--window {a.window}: must be >= 44 (mixing swaps up to 11 units of 4 "
                               f"frames), a multiple of 4 and of --mask_chunks {a.mask_chunks}")
    if a.batch_size < 3:
        raise common.UserError("--batch_size must be at least 3 (the mixing partner shift is 1..N-2)")
    if min(a.epochs, a.post_distill_epochs) < 0 or a.epochs + a.post_distill_epochs < 1:
        raise common.UserError(f"--epochs {a.epochs} / --post_distill_epochs {a.post_distill_epochs}: "
                               f"must be >= 0 with at least one epoch in all")
    if a.log_every < 1 or a.save_every < 1:
        raise common.UserError("--log_every and --save_every must be >= 1")


# Args a post-distillation run must share with its stage-one checkpoint (data, stream, model, loss).
_STAGE_ONE_FIELDS = ("dataset", "split", "modality", "prompt", "window", "joints", "bodies",
                     "hidden", "layers", "feat_dim", "prompt_dim", "dec_dim", "dec_layers",
                     "queue_size", "momentum", "temperature", "teacher_temp", "student_temp",
                     "rec_weight", "mask_chunks", "clip_len", "crop_scale", "batch_size",
                     "optimizer")


def _epoch_seed(a: Args, epoch: int, rank: int) -> int:
    return (a.seed * 1_000_003 + epoch) * 1009 + rank


def make_optimizer(model: nn.Module, a: Args) -> torch.optim.Optimizer:
    """SGD (the paper) or Adam (QUICK) over the trainable parameters (the key encoder has none)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if a.optimizer == "sgd":
        return torch.optim.SGD(params, lr=a.lr, momentum=a.sgd_momentum, weight_decay=a.weight_decay)
    return torch.optim.Adam(params, lr=a.lr, weight_decay=a.weight_decay)


def main(argv=None):
    args = common.parse_args(Args, argv, quick=QUICK)
    _check(args)
    d = common.setup_distributed(args.device)
    try:
        train(args, d)
    finally:
        common.cleanup_distributed()


def train(args: Args, d):
    device = d.device
    warnings.filterwarnings("ignore", message="RNN module weights are not part of single")
    args.split = common.canonical_split(args.dataset, args.split)  # xset -> xsetup (out folder)
    out_dir = Path(args.out_dir or f"out/{METHOD}_{args.dataset}_{args.split}")
    log = common.RunLogger(out_dir, d.is_main)
    if d.ddp and not d.is_main:
        dist.barrier()  # rank 0 generates the synthetic data first if it is missing
    split = common.load_split(args.data_dir, args.dataset, args.split, "train")
    if d.ddp and d.is_main:
        dist.barrier()
    loader = common.BatchLoader(split, args.batch_size, shuffle=True, drop_last=True, seed=args.seed,
                                rank=d.rank, world_size=d.world_size, device=device,
                                on_device=args.data_on_device, with_labels=False,
                                num_workers=args.num_workers)

    common.seed_everything(args.seed)  # same seed on every rank -> identical initial weights
    model = Model(args).to(device)
    opt = make_optimizer(model, args)
    scaler = common.make_scaler(device, args.dtype)
    g, g_shared = torch.Generator(device), torch.Generator(device)
    start_epoch, step, metrics = 0, 0, {}
    final_lr = common.step_lr(args.lr, args.epochs - 1, args.lr_steps)
    ckpt_path = out_dir / "last.pt"
    if args.post_distill_from:
        # Only post-distillation: the stage-one checkpoint fixes where it starts and its lr.
        src = common.load_checkpoint(args.post_distill_from, METHOD)
        if src["epoch"] != src["args"]["epochs"]:  # its lr schedule would not have ended
            raise common.UserError(
                f"--post_distill_from {args.post_distill_from}: saved at epoch {src['epoch']}, not "
                f"at the end of its stage one ({src['args']['epochs']} epochs); use a finished "
                f"stage-one checkpoint (stage1.pt, or last.pt of a --post_distill_epochs 0 run)")
        def norm(v):
            return list(v) if isinstance(v, (list, tuple)) else v
        src_args = {"optimizer": "sgd", **src["args"]}  # checkpoints before --optimizer: SGD
        diff = [k for k in _STAGE_ONE_FIELDS
                if k in src_args and norm(src_args[k]) != norm(getattr(args, k))]
        if diff:  # the same data, stream and model as stage one (flags are not read from it)
            raise common.UserError(
                f"--post_distill_from {args.post_distill_from}: stage one ran with "
                + ", ".join(f"--{k} {src_args[k]}" for k in diff) + "; repeat these flags")
        args.epochs = src["epoch"]
        final_lr = common.step_lr(src["args"]["lr"], src["epoch"] - 1, src["args"]["lr_steps"])
        if not args.resume:  # continue stage one's model, queue and optimizer state (momenta)
            common.load_state(model, src["model"], args.post_distill_from)
            opt.load_state_dict(src["optimizer"])
            common.load_scaler(scaler, src["scaler"])
            start_epoch, step = src["epoch"], src["step"]
            log.info(f"post-distillation from {args.post_distill_from} (epoch {src['epoch']}, "
                     f"lr {final_lr:.4g})")
    if args.resume:
        ck = common.load_checkpoint(ckpt_path, METHOD)
        was = ck["args"].get("optimizer", "sgd")
        if was != args.optimizer:  # one optimizer's state cannot continue as the other's
            raise common.UserError(f"--resume: {ckpt_path} was trained with --optimizer {was}; "
                                   f"resume with --optimizer {was}")
        common.load_state(model, ck["model"], ckpt_path)
        opt.load_state_dict(ck["optimizer"])
        common.load_scaler(scaler, ck["scaler"])
        start_epoch, step, metrics = ck["epoch"], ck["step"], ck["metrics"]
        common.set_rng_state(ck["rng"], g, g_shared)
        log.info(f"resumed from {ckpt_path} at epoch {start_epoch}")
    common.broadcast_module(model)
    net = model
    if d.ddp:  # queue and BN statistics are identical on every rank: no buffer broadcast needed
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)
    if args.compile:
        net = torch.compile(net)
    total = args.epochs + args.post_distill_epochs
    if d.is_main:
        common.save_json(common.args_to_dict(args), out_dir / "args.json")
        log.info(f"pcm3pp: {common.count_params(model):,} parameters (encoder "
                 f"{common.count_params(model.encoder):,}, GRU "
                 f"{common.count_params(model.encoder.encoder):,}), {len(split)} clips, "
                 f"{len(loader)} steps/epoch, {d.world_size} process(es) on {device}")

    steps_left = (total - start_epoch) * len(loader)
    t_start, done = time.time(), 0
    bar = tqdm(range(start_epoch, total), initial=start_epoch, total=total, desc=METHOD,
               disable=not d.is_main)
    names = ["loss", "rec"] + [f"nce_{n}" for n in PAIRS] + [f"kd_{n}" for n in PAIRS]
    for epoch in bar:
        post = epoch >= args.epochs
        lr = final_lr if post else common.step_lr(args.lr, epoch, args.lr_steps)
        common.set_lr(opt, lr)
        loader.set_epoch(epoch)
        g.manual_seed(_epoch_seed(args, epoch, d.rank))      # per-rank augmentation
        g_shared.manual_seed(_epoch_seed(args, epoch, 0))     # per-batch draws shared by all ranks
        net.train()
        sums, n, t_log = torch.zeros(len(names), device=device), 0, time.time()
        for x, num_frame, _ in loader:
            with torch.no_grad():
                b = add_batch_params(make_views(x, num_frame, args, g), args, g_shared, d.rank)
            with common.autocast(device, args.dtype):
                terms = net(b, post)
            loss = terms["loss"]
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step, n, done = step + 1, n + 1, done + 1
            sums += torch.stack([terms[k].detach() for k in names])
            if step % args.log_every == 0:
                if not torch.isfinite(loss):
                    raise common.UserError(f"loss is {loss.item()} at step {step}: lower --lr or "
                                           f"use --dtype fp32")
                now = time.time()
                rate = args.batch_size * args.log_every / max(now - t_log, 1e-9)
                eta = (now - t_start) / done * (steps_left - done)
                log.log(step, round(epoch + n / len(loader), 3),
                        **{k: terms[k].item() for k in names}, lr=lr, stage=2 if post else 1,
                        samples_per_s=round(rate, 1), eta=common.format_eta(eta))
                t_log = now
        metrics = dict(zip(names, (sums / max(n, 1)).tolist()), lr=lr)
        log.log(step, epoch + 1, **{f"epoch_{k}": v for k, v in metrics.items()})
        bar.set_postfix(loss=f"{metrics['loss']:.4g}")
        last = epoch + 1 in (args.epochs, total)
        if d.is_main and ((epoch + 1) % args.save_every == 0 or last):
            ckpt = {
                "method": METHOD, "args": common.args_to_dict(args),
                "encoder": model.encoder.state_dict(), "model": model.state_dict(),
                "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch + 1,
                "step": step, "rng": common.rng_state(g, g_shared), "dataset": args.dataset,
                "split": args.split, "metrics": metrics, "version": common.CKPT_VERSION}
            common.save_checkpoint(ckpt, ckpt_path)
            if epoch + 1 == args.epochs < total:  # post-distillation overwrites last.pt: keep the
                common.save_checkpoint(ckpt, out_dir / "stage1.pt")  # "w/o post-distill" model
    bar.close()
    log.info(f"done: {ckpt_path}")


if __name__ == "__main__":
    common.run_main(main)
