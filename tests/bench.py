"""Benchmarks of the four method scripts (a script, not a test module).

    python tests/bench.py --quick                       # all but official_step and learning
    python tests/bench.py --only train --device cuda --paper_batch 0 --resident 40091   # a GPU
    python tests/bench.py --only learning --jobs 2      # bandai xstyle, 3 seeds per method (hours)

usdrl_views    usdrl.make_views (batched, on --device) against the official repos' per-sample numpy
               pipeline written here (crop-resize, joint corruption or shear, collation).
pcm3pp_gru     PCM3++ encoder forward + backward at the paper's width: nn.GRU over the whole sequence
               against the official step-by-step loop, same weights (same_output: values and grads).
train          one iteration of each script's training loop (views, forward, loss, backward, optimizer
               step, momentum update, enqueue): samples/s, time to the end of the first step, peak
               memory. CPU fp32; CUDA fp32, bf16, bf16 + compile. "quick" = QUICK on 150-frame clips,
               "paper" = the defaults on 300-frame clips at --paper_batch; --resident N draws those
               batches from N raw clips kept on the device (40091 = NTU-60 xsub train).
official_step  our step against a port of the official step (scd_net, pcm3pp, mcc), same_loss check.
linear_cache   evaluate.py's linear protocol with cached features against re-encoding every epoch.
learning       per method and seed: pre-train with the script (--quick, LEARNING_BUDGET), evaluate.py
               --task linear knn on the trained encoder and on the one the run started from (linear
               head trained on test-crop features unless --linear_train_crop protocol), and a linear
               head trained to convergence on those cached features; per method the paired difference
               and its standard error; the raw-input reference (linear, 1-NN on flattened clips). One
               result file per run under --out: a rerun resumes.

One JSON line per measurement, a summary line last. Compared implementations run interleaved after
a warm-up; ratios are wall (and CPU-time) ratios of medians, rounded down.
"""
import argparse
import copy
import gc
import io
import json
import math
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import evaluate  # noqa: E402
import mcc  # noqa: E402
import pcm3pp  # noqa: E402
import scd_net  # noqa: E402
import usdrl  # noqa: E402


# ------------------------------------------------------------------------------------- timing
def timed(fns, repeats, sync=None, warmup=True):
    """Median wall and process-CPU seconds of each fn, run interleaved in alternating order (A B,
    B A, ...) so that all see the same machine load. Returns [(wall, cpu, all wall times)]."""
    for fn in fns if warmup else ():
        fn()
    wall, cpu = [[] for _ in fns], [[] for _ in fns]
    for r in range(repeats):
        for k in range(len(fns)) if r % 2 == 0 else reversed(range(len(fns))):
            if sync:
                sync()
            w0, c0 = time.perf_counter(), time.process_time()
            fns[k]()
            if sync:
                sync()
            wall[k].append(time.perf_counter() - w0)
            cpu[k].append(time.process_time() - c0)
    return [(statistics.median(w), statistics.median(c), w) for w, c in zip(wall, cpu)]


def clock(fn, sync):
    """(wall s, result) of one call, synchronised on CUDA."""
    if sync:
        sync()
    w0 = time.perf_counter()
    out = fn()
    if sync:
        sync()
    return time.perf_counter() - w0, out


def ratio(slow, fast, digits=2):
    """slow / fast rounded down: a printed speed-up never overstates the measured one."""
    return math.floor(slow / fast * 10 ** digits) / 10 ** digits


def sync_fn(dev):
    return (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None


def free(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def raw_batch(n, T=300, seed=0):
    """Random clips (n, 3, T, 25, 2) float32 and num_frame (n,) in [32, T] (numpy)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, T, 25, 2), dtype=np.float32), rng.integers(32, T + 1, n)


@contextmanager
def patched(obj, name, value):
    """Temporarily replace obj.name (a method of a class)."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# -------------------------------------------------------------------------------- usdrl_views
# The official per-sample pipeline (official feeder/feeder_pretraining.py __getitem__ with
# feeder/augmentations.py crop_subsequence, joint_courruption, pose_augmentation), written here.
def np_crop_resize(x, n, l_ratio=(0.1, 1.0), out_len=64, min_len=64):
    """x (C, T, V, M) numpy -> (C, out_len, V, M): random crop (official length rule), torch resize."""
    C, T, V, M = x.shape
    scale = np.random.rand(1) * (l_ratio[1] - l_ratio[0]) + l_ratio[0]
    length = int(np.minimum(np.maximum(int(np.floor(n * scale[0])), min_len), n))
    start = np.random.randint(0, n - length + 1)
    crop = torch.tensor(x[:, start:start + length], dtype=torch.float)
    crop = crop.permute(0, 2, 3, 1).contiguous().view(C * V * M, length)[None, :, :, None]
    crop = F.interpolate(crop, size=(out_len, 1), mode="bilinear", align_corners=False)
    return crop[0, :, :, 0].view(C, V, M, out_len).permute(0, 3, 1, 2).contiguous().numpy()


def np_joint_corruption(x):
    """p .5: zero 15 random joints, else multiply 15 random joints by a U(-1, 1) 3x3 (row vectors)."""
    out = x.copy()
    joints = np.random.choice(25, 15, replace=False)
    if random.random() < 0.5:
        out[:, :, joints, :] = 0
        return out
    R = np.array([[random.uniform(-1, 1) for _ in range(3)] for _ in range(3)])
    part = out[:, :, joints, :].transpose(1, 2, 3, 0) @ R
    out[:, :, joints, :] = part.transpose(3, 0, 1, 2)
    return out


def np_shear(x):
    """S = [[1,a,b],[c,1,d],[e,f,1]], entries U(-1, 1); p_new = S p."""
    S = np.array([[1, random.uniform(-1, 1), random.uniform(-1, 1)],
                  [random.uniform(-1, 1), 1, random.uniform(-1, 1)],
                  [random.uniform(-1, 1), random.uniform(-1, 1), 1]])
    return np.dot(S, x.reshape(3, -1)).reshape(x.shape).astype(np.float32)


def numpy_usdrl_views(data, num_frame, n_views):
    """__getitem__ for every sample and view, then the DataLoader's collation of each view."""
    per_view = [[] for _ in range(n_views)]
    for i in range(len(data)):
        for k in range(n_views):
            v = np_crop_resize(data[i], int(num_frame[i]))
            per_view[k].append(np_joint_corruption(v) if random.random() < 0.5 else np_shear(v))
    return [torch.from_numpy(np.stack(v)) for v in per_view]


def bench_usdrl_views(opts):
    batch, dev = 256, torch.device(opts.device)
    data, num_frame = raw_batch(batch)
    x, nf = torch.from_numpy(data).to(dev), torch.from_numpy(num_frame).to(dev)
    g = torch.Generator(dev).manual_seed(0)
    args = usdrl.Args()  # 4 views of 64 frames, crop scale [0.1, 1], joint modality
    random.seed(0)
    np.random.seed(0)
    (wb, cb, tb), (wn, cn, tn) = timed(
        [lambda: usdrl.make_views(x, nf, g, args),
         lambda: numpy_usdrl_views(data, num_frame, args.views)], opts.repeats, sync_fn(dev))
    config = {"batch": batch, "clip": [3, 300, 25, 2], "views": args.views, "out_frames": args.window,
              "threads": torch.get_num_threads()}

    def record(impl, device, wall, cpu, times):
        return {"what": "usdrl_views", "config": {**config, "impl": impl}, "device": device,
                "median_s": round(wall, 5), "samples_per_s": round(batch / wall, 1),
                "cpu_median_s": round(cpu, 5), "times_s": [round(t, 5) for t in times]}

    batched = record("batched", str(dev), wb, cb, tb)
    batched["speedup_vs_numpy_per_sample"] = ratio(wn, wb, 1)
    if dev.type == "cpu":
        batched["cpu_time_speedup_vs_numpy_per_sample"] = ratio(cn, cb, 1)
    return [record("numpy_per_sample", "cpu", wn, cn, tn), batched]


# --------------------------------------------------------------------------------- pcm3pp_gru
def official_bigru(self, x):
    """Official moco/GRU.py EncoderRNN loop: the bidirectional `gru` called once per time step on a
    length-1 slice, carrying the (2 * layers, N, H) hidden state. Replaces ForwardBiGRU.forward."""
    h, out = None, []
    for t in range(x.shape[1]):
        o, h = self.gru(x[:, t:t + 1], h)
        out.append(o)
    return torch.cat(out, 1)


def bench_pcm3pp_gru(opts):
    """Encoder.sequence (input BN + 3-layer BIGRU, hidden 1024) forward + backward at batch 8, 64
    frames (16 with --quick); the first call of each side is the warm-up and the equivalence check."""
    dev = torch.device(opts.device)
    batch, frames = 8, 16 if opts.quick else 64
    torch.manual_seed(0)
    enc = pcm3pp.Encoder(pcm3pp.Args()).to(dev).train()
    x = torch.randn(batch, 3, frames, 25, 2, device=dev)

    def ours():
        enc.zero_grad(set_to_none=True)
        y = enc.sequence(x)  # (N, T, 2048)
        y.square().mean().backward()
        return y.detach()

    def official():
        with patched(pcm3pp.ForwardBiGRU, "forward", official_bigru):
            return ours()

    def grads():
        return [q.grad.clone() for q in enc.parameters() if q.grad is not None]

    y_ours, g_ours = ours(), grads()
    y_official, g_official = official(), grads()
    diff = (y_ours - y_official).abs().max().item()
    grad_diff = max((a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)
                    for a, b in zip(g_ours, g_official))
    n_grads = len(g_ours)
    del y_ours, g_ours, y_official, g_official
    repeats = 1 if opts.quick else min(opts.repeats, 5)
    (wo, co, to), (ws, cs, ts) = timed([ours, official], repeats, sync_fn(dev), warmup=False)
    config = {"batch": batch, "frames": frames, "hidden": 1024, "layers": 3, "input": 150,
              "repeats": repeats, "threads": torch.get_num_threads()}

    def record(impl, wall, cpu, times):
        return {"what": "pcm3pp_gru", "config": {**config, "impl": impl}, "device": str(dev),
                "median_s": round(wall, 4), "cpu_median_s": round(cpu, 4),
                "times_s": [round(t, 4) for t in times]}

    rec = record("whole_sequence", wo, co, to)
    rec.update(speedup_vs_step_by_step=ratio(ws, wo), cpu_time_speedup_vs_step_by_step=ratio(cs, co),
               max_abs_diff=diff, max_grad_rel_diff=float(f"{grad_diff:.2e}"),
               same_output=diff < 1e-4 and grad_diff < 1e-3 and n_grads > 0)
    return [record("step_by_step_official", ws, cs, ts), rec]


# -------------------------------------------------------------------------------------- train
# How each script's loop body calls its make_views and train_step (s: the state of build_state;
# ids: the rows' sample indices, which only MCC's queue uses).
def _method(mod, views, step, min_batch, official=None):
    return SimpleNamespace(mod=mod, views=views, step=step, min_batch=min_batch, official=official)


METHODS = {
    "usdrl": _method(usdrl, lambda s, x, nf: usdrl.make_views(x, nf, s.g, s.args),
                     lambda s, v, ids: usdrl.train_step(s.model, s.net, s.opt, s.scaler, v, s.args), 2),
    "scd_net": _method(scd_net, lambda s, x, nf: scd_net.make_views(x, nf, s.g, s.args),
                       lambda s, v, ids: scd_net.train_step(s.model, s.net, s.opt, s.scaler, v, s.args),
                       2),
    "pcm3pp": _method(pcm3pp, lambda s, x, nf: pcm3pp.make_views(x, nf, s.g, s.args, s.g_shared, 0),
                      lambda s, v, ids: pcm3pp.train_step(s.model, s.net, s.opt, s.scaler, v, s.args),
                      3),  # mixing needs a partner other than the sample and its neighbour
    "mcc": _method(mcc, lambda s, x, nf: mcc.make_views(x, nf, s.g, s.args),
                   lambda s, v, ids: mcc.train_step(s.model, s.net, s.opt, s.scaler, v, ids, s.args), 2),
}
RAW_FRAMES = {"quick": 150, "paper": 300}  # stored clip length: the synthetic set / NTU


def loop_step(s, x, nf, ids=None):
    """One iteration of the script's training loop on the raw batch (x, nf): the loss terms."""
    m = METHODS[s.name]
    if ids is None:
        ids = torch.arange(len(x), device=x.device)
    with torch.no_grad():
        views = m.views(s, x, nf)
    return m.step(s, views, ids)


def method_args(name, config, batch=None, dtype="fp32", compile=False, device="cpu"):
    """The script's Args as its parse_args builds them: `quick` = the synthetic quick start (QUICK),
    `paper` = the defaults; batch None keeps the config's own batch."""
    mod = METHODS[name].mod
    argv = ["--dataset", "synthetic" if config == "quick" else "ntu60", "--dtype", dtype,
            "--device", str(device)] + (["--batch_size", str(batch)] if batch else [])
    with redirect_stderr(io.StringIO()):  # parse_args names the QUICK values it applies
        a = common.parse_args(mod.Args, argv + (["--compile"] if compile else []), quick=mod.QUICK)
    mod.check_args(a)
    return a


def build_state(name, a, dev):
    """Model(args) on the device, the script's optimizer, GradScaler, (compiled) net, generators.

    The optimizer runs at lr 0: the benchmarks repeat steps on one random batch, on which a method at
    its real lr can diverge within a few steps; at lr 0 every step still runs the whole update."""
    common.seed_everything(a.seed)
    model = METHODS[name].mod.Model(a).to(dev).train()
    opt = METHODS[name].mod.make_optimizer(model, a)
    common.set_lr(opt, 0.0)
    s = SimpleNamespace(name=name, args=a, dev=dev, model=model, opt=opt,
                        net=torch.compile(model) if a.compile else model,
                        scaler=common.make_scaler(dev, a.dtype),
                        g=torch.Generator(dev), g_shared=torch.Generator(dev))
    reseed(s)
    return s


def reseed(s):
    s.g.manual_seed(s.args.seed)             # views
    s.g_shared.manual_seed(s.args.seed + 1)  # PCM3++'s per-batch draws
    torch.manual_seed(s.args.seed + 2**62)   # dropout / drop path, apart from g (as the scripts)


def device_batch(n, T, dev, seed=0):
    data, num_frame = raw_batch(n, T, seed)
    return torch.from_numpy(data).to(dev), torch.from_numpy(num_frame).to(dev)


class Resident:
    """N raw clips (N, 3, 300, 25, 2) fp32 on the device; each batch gathers random rows, as
    common.BatchLoader does with --data_on_device."""

    def __init__(self, n, dev, seed=0):
        g = torch.Generator(dev).manual_seed(seed)
        self.data = torch.empty(n, 3, RAW_FRAMES["paper"], 25, 2, device=dev)
        for s in range(0, n, 1024):  # in blocks: no second full-size temporary
            self.data[s:s + 1024].normal_(generator=g)
        self.num_frame = torch.randint(32, RAW_FRAMES["paper"] + 1, (n,), generator=g, device=dev)
        self.g = g

    def batch(self, b):
        i = torch.randint(len(self.data), (b,), generator=self.g, device=self.data.device)
        nf = self.num_frame[i]
        return self.data[i, :, :int(nf.max())], nf, i


def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def mem_start(dev):
    """Start a peak-memory window: CUDA allocator peak, or on Linux the peak RSS (VmHWM, reset by
    writing 5 to /proc/self/clear_refs). Returns the baseline, or None where it cannot be read."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        return torch.cuda.memory_allocated(dev)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmRSS")
    except (OSError, KeyError):
        return None


def mem_peak_mb(dev, start):
    if start is None:
        return None
    if dev.type == "cuda":
        return round((torch.cuda.max_memory_allocated(dev) - start) / 2**20, 1)
    return round((_status_kb("VmHWM") - start) / 1024, 1)


def _variants(dev):
    """(dtype, compile): CPU fp32; CUDA fp32, bf16 autocast and bf16 + torch.compile."""
    return [("fp32", False)] if dev.type == "cpu" else [("fp32", False), ("bf16", False), ("bf16", True)]


def _paper_batch(name, opts):
    """--paper_batch (0 = the paper's own batch), at least the method's minimum."""
    return max(opts.paper_batch or method_args(name, "paper").batch_size, METHODS[name].min_batch)


def _step_record(name, config, batch, dev, dtype, compile, repeats, opts, resident=None):
    """Samples/s of the median of `repeats` steps after the first, time from Model(args) to the end
    of the first step, and the peak memory over that whole window."""
    a = method_args(name, config, batch, dtype, compile, dev)
    if resident is None:
        x, nf = device_batch(batch, RAW_FRAMES[config], dev)

        def step():
            return loop_step(s, x, nf)
    else:
        def step():
            return loop_step(s, *resident.batch(batch))
    sync = sync_fn(dev)
    free(dev)
    mem0 = mem_start(dev)
    build_s, s = clock(lambda: build_state(name, a, dev), sync)
    step_s, terms = clock(step, sync)
    (wall, cpu, times), = timed([step], repeats, sync, warmup=False)
    rec = {"what": "train", "config": {"method": name, "config": config, "batch": batch,
                                        "raw_frames": RAW_FRAMES[config], "dtype": dtype,
                                        "compile": compile, "repeats": repeats,
                                        "resident_clips": len(resident.data) if resident else 0,
                                        "threads": torch.get_num_threads()},
           "device": str(dev), "median_s": round(wall, 4), "samples_per_s": round(batch / wall, 2),
           "times_s": [round(t, 4) for t in times], "first_step_s": round(build_s + step_s, 3),
           "peak_mem_mb": mem_peak_mb(dev, mem0),
           "peak_mem": "CUDA max_memory_allocated" if dev.type == "cuda" else "peak RSS (VmHWM)",
           "params": common.count_params(s.model), "first_loss": round(float(terms["loss"]), 5)}
    if dev.type == "cpu":
        rec["cpu_median_s"] = round(cpu, 4)
    s = None  # frees the model before the next record (the closures hold the name, not the value)
    free(dev)
    return rec


def bench_train(opts):
    """Per method and variant: the quick config, and (not with --quick) the paper config."""
    dev = torch.device(opts.device)
    resident = Resident(opts.resident, dev) if opts.resident else None
    for name in opts.methods:
        for dtype, compile in _variants(dev):
            yield _step_record(name, "quick", method_args(name, "quick").batch_size, dev, dtype,
                               compile, opts.repeats, opts)
            if not opts.quick:
                yield _step_record(name, "paper", _paper_batch(name, opts), dev, dtype, compile,
                                   min(opts.repeats, 3), opts, resident)


# ------------------------------------------------------------------------------ official_step
# Ports of the official training step, written here; each uses the same model, weights and views
# and differs only where the official code computes the step differently.
def scd_official(s, x, nf, ids):
    """Official moco/builder.py style: `.data =` momentum update, einsum logits against
    queue.clone().detach(), slice enqueue (the official code asserts K % batch == 0)."""
    m, a = s.model, s.args
    with torch.no_grad():
        xq, xk = scd_net.make_views(x, nf, s.g, a)
        for pq, pk in zip(m.query.parameters(), m.key.parameters()):
            pk.data = pk.data * m.m + pq.data * (1. - m.m)
    qt, qs, qi = (F.normalize(t, dim=1) for t in m.query(xq))
    with torch.no_grad():
        kt, ks, ki = (F.normalize(t, dim=1) for t in m.key(xk))

    def nce(q, k, queue):
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], 1) / m.tau
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
    loss = nce(qt, ki, m.queue_i) + nce(qs, ki, m.queue_i) + nce(qi, kt, m.queue_t) + nce(qi, ks, m.queue_s)
    s.opt.zero_grad(set_to_none=True)
    loss.backward()
    s.opt.step()
    ptr, n = int(m.queue_ptr), len(kt)
    for queue, k in ((m.queue_t, kt), (m.queue_s, ks), (m.queue_i, ki)):
        queue[:, ptr:ptr + n] = k.T
    m.queue_ptr.fill_((ptr + n) % m.queue_t.shape[1])
    return {"loss": loss.detach()}


def pcm3_official(s, x, nf, ids):
    """Every encoder pass (query, masked, predicted, mixed, clip and key views) runs the official
    per-step GRU loop (official_bigru). Both sides build the same batched views."""
    with patched(pcm3pp.ForwardBiGRU, "forward", official_bigru):
        return loop_step(s, x, nf, ids)


def _official_stgcn_block(self, x, a):
    """yysijie/st-gcn net/st_gcn.py st_gcn.forward: the graph aggregation as
    einsum('nkctv,kvw->nctw') (mcc.py: a batched matmul per subset, then the sum over k)."""
    res = 0 if self.residual is None else self.residual(x)
    y = self.gcn(x)
    n, kc, t, v = y.shape
    y = torch.einsum("nkctv,kvw->nctw", y.view(n, self.k, kc // self.k, t, v), a).contiguous()
    return F.relu(self.tcn(y) + res)


def mcc_official(s, x, nf, ids):
    """Every ST-GCN block of the encoders and the decoder aggregates with the official einsum (MCC
    released no code; its backbone is yysijie/st-gcn)."""
    with patched(mcc.STGCNBlock, "forward", _official_stgcn_block):
        return loop_step(s, x, nf, ids)


METHODS["scd_net"].official = scd_official
METHODS["pcm3pp"].official = pcm3_official
METHODS["mcc"].official = mcc_official  # usdrl.Model.forward is the official per-view loop itself


@contextmanager
def dropout_off(model):
    """Dropout, drop path and attention dropout at 0, so that two formulations compute one function."""
    saved = []
    for mod in model.modules():
        attr = "dropout" if isinstance(mod, nn.MultiheadAttention) else "p"
        if isinstance(mod, (nn.Dropout, nn.MultiheadAttention, usdrl.DropPath)):
            saved.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, 0.0)
    try:
        yield
    finally:
        for mod, attr, v in saved:
            setattr(mod, attr, v)


def bench_official_step(opts):
    """Paper config, fp32, --paper_batch: the first step of each side from the same state (weights,
    optimizer, queues, generators; dropout off) is the check and the warm-up; then interleaved steps."""
    dev = torch.device(opts.device)
    repeats = 1 if opts.quick else min(opts.repeats, 3)
    for name in opts.methods:
        m = METHODS[name]
        if m.official is None:
            continue
        batch = _paper_batch(name, opts)
        x, nf = device_batch(batch, RAW_FRAMES["paper"], dev)
        ids = torch.arange(batch, device=dev)
        free(dev)
        s = build_state(name, method_args(name, "paper", batch, "fp32", device=dev), dev)
        snap = {"model": copy.deepcopy(s.model.state_dict()), "opt": copy.deepcopy(s.opt.state_dict())}
        with dropout_off(s.model), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="RNN module weights are not part of single")
            loss_ours = float(loop_step(s, x, nf, ids)["loss"])
            s.model.load_state_dict(snap["model"])
            s.opt.load_state_dict(snap["opt"])
            reseed(s)
            loss_port = float(m.official(s, x, nf, ids)["loss"])
            del snap
            (wo, co, to), (wp, cp, tp) = timed([lambda: loop_step(s, x, nf, ids),
                                                lambda: m.official(s, x, nf, ids)],
                                               repeats, sync_fn(dev), warmup=False)
        config = {"method": name, "config": "paper", "batch": batch, "raw_frames": RAW_FRAMES["paper"],
                  "dtype": "fp32", "repeats": repeats, "threads": torch.get_num_threads()}

        def record(impl, wall, cpu, times, loss):
            rec = {"what": "official_step", "config": {**config, "impl": impl}, "device": str(dev),
                   "median_s": round(wall, 4), "samples_per_s": round(batch / wall, 2),
                   "times_s": [round(t, 4) for t in times], "check_loss": round(loss, 6)}
            if dev.type == "cpu":
                rec["cpu_median_s"] = round(cpu, 4)
            return rec

        port = record("official_port", wp, cp, tp, loss_port)
        port["port"] = " ".join(m.official.__doc__.split())
        ours = record("ours", wo, co, to, loss_ours)
        rel = abs(loss_ours - loss_port) / max(abs(loss_port), 1e-12)
        ours["check_loss_rel_diff"] = float(f"{rel:.2e}")
        ours["same_loss"] = rel < (1e-4 if dev.type == "cpu" else 1e-3)  # CUDA: TF32 convolutions
        ours["speedup_vs_official_port"] = ratio(wp, wo)
        s = None
        free(dev)
        yield port
        yield ours


# ------------------------------------------------------------------------------- linear_cache
def bench_linear_cache(opts):
    """USDRL's linear protocol on a small USDRL checkpoint (usdrl.main, one epoch, hidden 32, on the
    synthetic set: tiny with --quick) with cached features against re-encoding every epoch; both
    run evaluate.linear_eval in-process. Warm-up: a 2-epoch run of each side."""
    import data_prep
    dev = torch.device(opts.device)
    with tempfile.TemporaryDirectory(prefix="bench_linear_") as tmp:
        tmp = Path(tmp)
        data_prep.prepare_synthetic(tmp / "data", "synthetic", size="tiny" if opts.quick else "default",
                                    seed=0, quiet=True)
        log = io.StringIO()
        try:
            with redirect_stdout(log), redirect_stderr(log):
                usdrl.main(["--dataset", "synthetic", "--data_dir", str(tmp / "data"), "--out_dir",
                            str(tmp / "usdrl"), "--epochs", "1", "--hidden", "32", "--device", "cpu"])
        except Exception as e:
            raise RuntimeError("pre-training the benchmark checkpoint failed:\n"
                               + log.getvalue()[-2000:]) from e
        ld = evaluate.load_ckpt(str(tmp / "usdrl" / "last.pt"))
        train = common.load_split(tmp / "data", "synthetic", "xsub", "train")
        test = common.load_split(tmp / "data", "synthetic", "xsub", "val")
        sync = sync_fn(dev)

        def run(cache, epochs=None):
            argv = ["--ckpt", str(tmp / "usdrl" / "last.pt"), "--device", opts.device,
                    "--cache" if cache else "--no_cache", "--dataset", "synthetic"]
            with redirect_stderr(io.StringIO()):  # evaluate.main's synthetic defaults, named on stderr
                args = common.parse_args(evaluate.Args, argv + ["--epochs", str(epochs)] * bool(epochs),
                                         quick=evaluate.QUICK)
            p = evaluate.protocol(args, ld, "linear", "synthetic", "xsub")
            enc = evaluate.build_encoder(ld, False, args.seed, dev)
            common.seed_everything(args.seed)
            if sync:
                sync()
            w0, c0 = time.perf_counter(), time.process_time()
            with redirect_stderr(io.StringIO()):  # evaluate's progress bars
                m, _, _ = evaluate.linear_eval(enc, ld, train, test, p, args, dev)
            if sync:
                sync()
            return time.perf_counter() - w0, time.process_time() - c0, m, p

        for cache in (True, False):
            run(cache, epochs=2)
        repeats = 1 if opts.quick else min(opts.repeats, 3)
        res = {True: [], False: []}
        for _ in range(repeats):
            for cache in (True, False):
                res[cache].append(run(cache))
    p = res[True][0][3]
    config = {"checkpoint": "usdrl --epochs 1 --hidden 32", "n_train": len(train), "n_test": len(test),
              **{k: v for k, v in p.items() if not k.endswith("_parsed")},
              "repeats": repeats, "threads": torch.get_num_threads()}

    def record(cache):
        walls, cpus, m = [r[0] for r in res[cache]], [r[1] for r in res[cache]], res[cache][-1][2]
        return {"what": "linear_cache", "config": {**config, "impl": "cached" if cache else "reencode"},
                "device": str(dev), "median_s": round(statistics.median(walls), 4),
                "cpu_median_s": round(statistics.median(cpus), 4), "times_s": [round(t, 4) for t in walls],
                "top1_final": m["top1_final"], "top5_final": m["top5_final"]}

    cached, reenc = record(True), record(False)
    keys = ("top1_final", "top5_final", "top1_best", "top5_best", "best_epoch")
    ref = res[True][0][2]
    cached["same_accuracy"] = all(r[2][k] == ref[k] for r in res[True] + res[False] for k in keys)
    cached["speedup_cached_vs_reencode"] = ratio(reenc["median_s"], cached["median_s"], 1)
    if dev.type == "cpu":
        cached["cpu_time_speedup_cached_vs_reencode"] = ratio(reenc["cpu_median_s"],
                                                              cached["cpu_median_s"], 1)
    return [reenc, cached]


# ----------------------------------------------------------------------------------- learning
# Pre-training flags on top of each script's --quick config, the lr decay moved with the epochs where
# QUICK has one. On bandai xstyle (2187 training clips) that is 30 x 34 = 1020 steps for usdrl,
# 22 x 68 = 1496 for scd_net, (24 + 1 post-distillation) x 34 = 850 for pcm3pp, 12 x 68 = 816 for mcc.
LEARNING_BUDGET = {"usdrl": {"epochs": 30}, "scd_net": {"epochs": 22, "lr_steps": [18]},
                   "pcm3pp": {"epochs": 24, "lr_steps": [21]}, "mcc": {"epochs": 12, "lr_steps": [10]}}
LEARNING_METRICS = {"linear_top1": ("linear", "top1_final"), "knn_k1_top1": ("knn", "k1_top1"),
                    "linear_converged_top1": ("linear_converged", "top1"),
                    "finetune_top1": ("finetune", "top1_final")}  # finetune: with --tasks ... finetune
# --jobs runs share one process: seed_everything + Model(args) use the process-wide RNG, and
# redirect_stderr swaps the process-wide sys.stderr, so both happen under this lock
_init_lock = threading.Lock()


class LearningError(Exception):
    pass


def _subprocess(cmd, log):
    """Run `python cmd...` from the repository root with one thread, output appended to `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ python {' '.join(map(str, cmd))}\n")
        f.flush()
        p = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=f, text=True)
        f.write(p.stdout)
    if p.returncode:
        tail = "".join(log.read_text().splitlines(True)[-15:])
        raise LearningError(f"`python {' '.join(map(str, cmd))}` failed ({p.returncode}); {log}:\n{tail}")
    return p.stdout


def _data_z_align(opts):
    """The z-alignment data_prep.py recorded for the dataset folder, None when unknown."""
    try:
        folder = common.split_dir(opts.data_dir, opts.dataset, opts.split).parent
        return bool(json.loads((folder / "prep_info.json").read_text())["z_align"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pretrain_argv(name, seed, opts, out_dir):
    """The script's command line of one learning run: --quick, the budget, this seed."""
    argv = ["--dataset", opts.dataset, "--split", opts.split, "--data_dir", str(opts.data_dir), "--quick",
            "--seed", str(seed), "--out_dir", str(out_dir), "--device", "cpu"]
    budget = dict(LEARNING_BUDGET[name])
    if opts.epochs:  # another length: the lr decay moves with it
        scale = opts.epochs / budget["epochs"]
        budget = {**budget, "epochs": opts.epochs,
                  **({"lr_steps": [max(1, round(s * scale)) for s in budget["lr_steps"]]}
                     if "lr_steps" in budget else {})}
    for k, v in budget.items():
        argv += [f"--{k}", *map(str, v if isinstance(v, list) else [v])]
    z = None if opts.dataset.startswith("synthetic") else _data_z_align(opts)  # synthetic: exempt
    if z is not None and z != METHODS[name].mod.Z_ALIGN:
        argv.append("--allow_data_mismatch")  # one data folder serves all four methods
    return argv


def write_init_checkpoint(name, argv, path):
    """The encoder a run starts from: the script's train() seeds with seed_everything(args.seed) and
    then builds Model(args) on the CPU; the same two calls here give the same weights. Saved in the
    checkpoint layout of common.Run.save (epoch 0) so that evaluate.py reads it like any other."""
    mod = METHODS[name].mod
    with _init_lock:
        with redirect_stderr(io.StringIO()):  # parse_args names the QUICK values it applies
            args = common.parse_args(mod.Args, argv, quick=mod.QUICK)
        mod.check_args(args)
        common.seed_everything(args.seed)
        model = mod.Model(args)
    opt = mod.make_optimizer(model, args)
    common.save_checkpoint({
        "method": mod.METHOD, "script": f"{name}.py", "args": common.args_to_dict(args),
        "encoder": model.encoder.state_dict(), "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": common.make_scaler(torch.device("cpu"), args.dtype).state_dict(),
        "epoch": 0, "step": 0, "rng": common.rng_state(), "dataset": args.dataset, "split": args.split,
        "metrics": {}, "version": common.CKPT_VERSION}, path)


def _evaluate(ckpt, seed, opts, results, log, extra=()):
    """evaluate.py --task <--tasks> on one checkpoint: {task: metrics} from its JSON lines."""
    out = _subprocess(["evaluate.py", "--ckpt", ckpt, "--task", *opts.tasks, "--device", "cpu",
                       "--seed", str(seed), "--results", results, *extra], log)
    recs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {r["task"]: r["metrics"] for r in recs}


def _read_result(path, config):
    """A finished result file of this configuration, else None; another configuration's is refused."""
    if not path.exists():
        return None
    rec = json.loads(path.read_text())
    if rec["config"] != config:
        raise common.UserError(f"{path}: written with other settings (command, tasks or window); "
                               f"use another --out or remove it")
    return rec


def learning_eval_args(name, argv, opts):
    """evaluate.py flags of a learning run: the data check as pre-trained, and with
    --linear_train_crop test the linear head trains on features of the protocol's test crop."""
    out = [a for a in argv if a == "--allow_data_mismatch"]
    linear = evaluate.PROTOCOLS[METHODS[name].mod.PROTOCOL]["linear"]
    if opts.linear_train_crop == "test" and linear["train_crop"] != linear["test_crop"]:
        out += ["--train_crop", linear["test_crop"]]  # encoded once, not re-encoded every epoch
    return out


def learning_run(name, seed, opts):
    """Pre-train one (method, seed), then evaluate the trained and the initial encoder. Returns the
    two records; each is read from its result file when a previous invocation finished it."""
    run_dir = opts.out / f"{opts.dataset}_{opts.split}" / f"{name}_seed{seed}"
    argv = pretrain_argv(name, seed, opts, run_dir / "pretrain")
    command = f"python {name}.py {shlex.join(argv)}".replace(str(run_dir), "<run>")
    eval_args = learning_eval_args(name, argv, opts)
    test_crop = evaluate.PROTOCOLS[METHODS[name].mod.PROTOCOL]["linear"]["test_crop"]
    base = {"method": name, "seed": seed, "dataset": opts.dataset, "split": opts.split,
            "pretrain": command, "tasks": list(opts.tasks), "eval_args": eval_args}
    files = {k: run_dir / f"result_{k}.json" for k in ("trained", "random")}
    done = {k: _read_result(f, {**base, "encoder": k}) for k, f in files.items()}
    if all(done.values()):
        return [{**done[k], "resumed": True} for k in files]
    ckpt, marker = run_dir / "pretrain" / "last.pt", run_dir / "pretrain.done"
    if marker.exists() and marker.read_text() != command:
        raise common.UserError(f"{marker}: pre-trained with another command; use another --out or "
                               f"remove {run_dir}")
    pretrain_s = None  # None: finished by an earlier invocation
    if not marker.exists():
        t0 = time.perf_counter()
        resume = ["--resume"] if ckpt.exists() else []  # an interrupted pre-training continues
        _subprocess([f"{name}.py", *argv, *resume], run_dir / "pretrain.log")
        common.atomic_write(marker, lambda f: f.write(command), mode="w")
        pretrain_s = round(time.perf_counter() - t0, 1)
    init = run_dir / "init.pt"
    if not init.exists():
        write_init_checkpoint(name, argv, init)
    out = []
    for kind, path in (("trained", ckpt), ("random", init)):
        if done[kind]:
            out.append({**done[kind], "resumed": True})
            continue
        t0 = time.perf_counter()
        metrics = _evaluate(path, seed, opts, run_dir / f"eval_{kind}.jsonl",
                            run_dir / f"eval_{kind}.log", eval_args)
        metrics["linear_converged"] = converged_linear(path, test_crop, opts)
        rec = {"what": "learning", "config": {**base, "encoder": kind},
               **{k: metrics[task][key] for k, (task, key) in LEARNING_METRICS.items() if task in metrics},
               "metrics": metrics, "eval_wall_s": round(time.perf_counter() - t0, 1)}
        if kind == "trained":
            ck = common.load_checkpoint(ckpt)
            rec.update(pretrain_steps=ck["step"], pretrain_epochs=ck["epoch"],
                       pretrain_final=ck["metrics"], pretrain_wall_s=pretrain_s)
        common.save_json(rec, files[kind])
        out.append({**rec, "resumed": False})
    return out


def _flat_clips(split, window):
    """Each clip's valid frames resized to `window` frames (the centre-crop 1.0 of evaluation),
    flattened: (N, 3 * window * 25 * 2)."""
    out = []
    for s in range(0, len(split), 256):
        x = torch.from_numpy(np.array(split.data[s:s + 256]))  # a copy of the memory map
        nf = torch.from_numpy(split.num_frame[s:s + 256])
        out.append(common.center_crop_resize(x, nf, 1.0, window).flatten(1))
    return torch.cat(out)


def fit_logistic(xtr, ytr, xte, yte, num_classes, l2=1e-4):
    """Multinomial logistic regression trained to convergence (L-BFGS from zero weights, L2 `l2` on
    the weights, features standardised on the training split): (test top-1, train top-1) in %."""
    mean, std = xtr.mean(0), xtr.std(0).clamp(min=1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    head = nn.Linear(xtr.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=500, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(xtr), ytr) + l2 * head.weight.square().sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return (100.0 * (head(xte).argmax(1) == yte).float().mean().item(),
                100.0 * (head(xtr).argmax(1) == ytr).float().mean().item())


def converged_linear(ckpt, crop, opts):
    """The encoder's features of every training and test clip at the protocol's test crop, encoded
    once, and a logistic regression trained on them to convergence (fit_logistic)."""
    t0 = time.perf_counter()
    splits = [common.load_split(opts.data_dir, opts.dataset, opts.split, p) for p in ("train", "val")]
    crop = evaluate.parse_crop(crop, "test_crop")
    ea = SimpleNamespace(eval_batch=256, num_workers=0, dtype="fp32")  # extract's fields
    with _init_lock, redirect_stderr(io.StringIO()):  # evaluate's progress bars
        ld = evaluate.load_ckpt(str(ckpt))
        enc = evaluate.build_encoder(ld, False, 0, torch.device("cpu"))
        (xtr, ytr), (xte, yte) = [evaluate.extract(enc, ld, s, crop, ea, torch.device("cpu"))
                                  for s in splits]
    top1, train_top1 = fit_logistic(xtr, ytr, xte, yte, splits[0].num_classes)
    return {"top1": round(top1, 2), "train_top1": round(train_top1, 2), "crop": crop[0] + f":{crop[1]}",
            "feature_dim": int(xtr.shape[1]), "wall_s": round(time.perf_counter() - t0, 1)}


def raw_reference(opts):
    """Linear classifier (fit_logistic) and cosine 1-NN on the flattened raw clips."""
    path = opts.out / f"{opts.dataset}_{opts.split}" / "raw_reference.json"
    config = {"dataset": opts.dataset, "split": opts.split, "window": opts.raw_window}
    rec = _read_result(path, config)
    if rec:
        return {**rec, "resumed": True}
    train = common.load_split(opts.data_dir, opts.dataset, opts.split, "train")
    test = common.load_split(opts.data_dir, opts.dataset, opts.split, "val")
    xtr, xte = _flat_clips(train, opts.raw_window), _flat_clips(test, opts.raw_window)
    ytr, yte = torch.from_numpy(train.labels), torch.from_numpy(test.labels)
    nn1 = (F.normalize(xte, dim=1) @ F.normalize(xtr, dim=1).T).argmax(1)
    top1, train_top1 = fit_logistic(xtr, ytr, xte, yte, train.num_classes)
    rec = {"what": "learning_raw_reference", "config": config, "features": xtr.shape[1],
           "n_train": len(ytr), "n_test": len(yte), "linear_top1": top1, "linear_train_top1": train_top1,
           "knn_k1_top1": 100.0 * (ytr[nn1] == yte).float().mean().item()}
    common.save_json(rec, path)
    return {**rec, "resumed": False}


def learning_summary(name, records):
    """Per metric over the seeds: trained and random mean and std, and the paired difference
    trained - random with its standard error; `ahead` when it exceeds twice that error."""
    out = {"what": "learning_summary", "method": name}
    by = {k: {r["config"]["seed"]: r for r in records if r["config"]["method"] == name
              and r["config"]["encoder"] == k} for k in ("trained", "random")}
    seeds = sorted(set(by["trained"]) & set(by["random"]))
    out["seeds"] = seeds
    for metric in LEARNING_METRICS:
        if not all(metric in by[k][s] for k in by for s in seeds) or not seeds:
            continue
        t = [by["trained"][s][metric] for s in seeds]
        r = [by["random"][s][metric] for s in seeds]
        d = [a - b for a, b in zip(t, r)]
        se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None
        out[metric] = {"trained_mean": round(statistics.fmean(t), 2),
                       "trained_std": round(statistics.stdev(t), 2) if len(t) > 1 else None,
                       "random_mean": round(statistics.fmean(r), 2),
                       "random_std": round(statistics.stdev(r), 2) if len(r) > 1 else None,
                       "diff_mean": round(statistics.fmean(d), 2),
                       "diff_se": None if se is None else round(se, 2),
                       "ahead": None if se is None else statistics.fmean(d) > 2 * se}
    return out


def bench_learning(opts):
    common.canonical_split(opts.dataset, opts.split)  # one clear line for an unknown dataset/split
    yield raw_reference(opts)
    runs = [(name, seed) for name in opts.methods for seed in opts.seeds]
    records = []
    with ThreadPoolExecutor(max_workers=opts.jobs) as pool:
        for recs in pool.map(lambda ns: learning_run(*ns, opts), runs):
            records += recs
            yield from recs
    for name in opts.methods:
        yield learning_summary(name, records)


# ------------------------------------------------------------------------------------- main
BENCHMARKS = {"usdrl_views": bench_usdrl_views, "pcm3pp_gru": bench_pcm3pp_gru, "train": bench_train,
              "official_step": bench_official_step, "linear_cache": bench_linear_cache,
              "learning": bench_learning}
NOT_BY_DEFAULT = {"learning"}  # hours: name it with --only
NOT_IN_QUICK = {"official_step", "learning"}  # paper-config steps take minutes on a CPU
SPEEDUP_KEYS = ("speedup_vs_numpy_per_sample", "speedup_vs_step_by_step", "speedup_vs_official_port",
                "speedup_cached_vs_reencode")


def summary(records, walls):
    """Every speed-up of the run with its same-result check, training samples/s and first-step time
    per method, the learning summaries, each benchmark's wall time."""
    out = {"what": "summary"}
    for key in SPEEDUP_KEYS:
        for rec in records:
            if key in rec:
                label = rec["what"] + (f':{rec["config"]["method"]}' if "method" in rec["config"] else "")
                entry = {"wall": rec[key], "device": rec["device"]}
                if f"cpu_time_{key}" in rec:
                    entry["cpu_time"] = rec[f"cpu_time_{key}"]
                for check in ("same_accuracy", "same_loss", "same_output"):
                    if check in rec:
                        entry[check] = rec[check]
                out.setdefault(key, {})[label] = entry
    for rec in records:
        if rec["what"] == "train":
            c = rec["config"]
            label = (f'{c["config"]} b{c["batch"]} {rec["device"]} {c["dtype"]}'
                     + ("+compile" if c["compile"] else ""))
            for key, value in (("train_samples_per_s", "samples_per_s"),
                               ("train_first_step_s", "first_step_s")):
                out.setdefault(key, {}).setdefault(c["method"], {})[label] = rec[value]
        elif rec["what"] in ("learning_summary", "learning_raw_reference"):
            out.setdefault("learning", {})[rec.get("method", "raw_input")] = {
                k: v for k, v in rec.items() if k in LEARNING_METRICS}
    out["bench_wall_s"] = {k: round(v, 1) for k, v in walls.items()}
    return out


def parse_opts(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats, smaller inputs, no paper-config steps")
    p.add_argument("--only", default="", help="comma-separated benchmarks: " + ", ".join(BENCHMARKS)
                   + " (default: all but learning; with --quick also without official_step)")
    p.add_argument("--device", default="cpu", help="device of the batched views, training steps and "
                   "linear protocol (learning runs on the CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per measurement (9; 2 with --quick)")
    p.add_argument("--paper_batch", type=int, default=None, help="batch of the paper-config steps "
                   "(8; 2 with --quick; 0 = the paper's; raised to a method's minimum)")
    p.add_argument("--resident", type=int, default=0, help="train, paper config: keep this many raw "
                   "clips on the device and draw each batch from them (40091 = NTU-60 xsub train, 7.2 GB)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods of train, "
                   "official_step and learning")
    g = p.add_argument_group("learning")
    g.add_argument("--dataset", default="bandai", help="dataset of the learning runs")
    g.add_argument("--split", default="xstyle", help="split of the learning runs")
    g.add_argument("--data_dir", default="data", help="root of the processed datasets")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pre-training seeds")
    g.add_argument("--epochs", type=int, default=None, help="pre-training epochs of every method "
                   "instead of LEARNING_BUDGET's (its lr steps scaled alike)")
    g.add_argument("--tasks", nargs="+", default=["linear", "knn"], help="evaluate.py tasks")
    g.add_argument("--linear_train_crop", default="test", choices=["test", "protocol"],
                   help="crop of the linear protocol's training features: test = the protocol's test "
                   "crop, encoded once; protocol = PCM3++'s and MCC's random crops, re-encoded every "
                   "epoch (bandai, one CPU thread: minutes per evaluation instead of seconds)")
    g.add_argument("--raw_window", type=int, default=64, help="frames of the raw-input reference clips")
    g.add_argument("--out", default="bench_out/learning", help="result files (a rerun resumes from them)")
    g.add_argument("--jobs", type=int, default=1, help="runs at a time, one thread each")
    opts = p.parse_args(argv)
    opts.methods = [m for m in opts.methods.split(",") if m]
    if any(m not in METHODS for m in opts.methods):
        p.error(f"--methods {','.join(opts.methods)}: choose from {', '.join(METHODS)}")
    for flag in ("threads", "jobs", "raw_window"):
        if getattr(opts, flag) < 1:
            p.error(f"--{flag} {getattr(opts, flag)}: must be >= 1")
    if (opts.repeats is not None and opts.repeats < 1) or (opts.epochs is not None and opts.epochs < 1):
        p.error("--repeats and --epochs must be >= 1")
    if (opts.paper_batch or 0) < 0 or opts.resident < 0:
        p.error("--paper_batch and --resident must be >= 0")
    opts.paper_batch = (2 if opts.quick else 8) if opts.paper_batch is None else opts.paper_batch
    opts.repeats = opts.repeats or (2 if opts.quick else 9)
    opts.names = ([n for n in opts.only.split(",") if n]
                  or [n for n in BENCHMARKS if n not in (NOT_IN_QUICK if opts.quick else NOT_BY_DEFAULT)])
    unknown = [n for n in opts.names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    opts.out, opts.data_dir = Path(opts.out).resolve(), Path(opts.data_dir).resolve()
    return opts


def main(argv=None):
    opts = parse_opts(argv)
    torch.set_num_threads(opts.threads)
    records, walls = [], {}
    for name in opts.names:
        w0 = time.perf_counter()
        for rec in BENCHMARKS[name](opts):
            records.append(rec)
            print(json.dumps(rec), flush=True)
        walls[name] = time.perf_counter() - w0
    print(json.dumps(summary(records, walls)), flush=True)


if __name__ == "__main__":
    try:
        main()
    except (common.UserError, LearningError) as e:
        sys.exit(f"error: {e}")
