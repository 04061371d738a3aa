"""Throughput benchmarks (not a test module: pytest collects no test_ functions here).

    python tests/bench.py [--quick] [--only NAME[,NAME]] [--device cpu|cuda] [--threads 1]
                          [--allocator glibc_default|glibc_tuned|both] [--paper_batch 8]
                          [--methods usdrl,scd_net,pcm3pp,mcc]

Prints one JSON line per measurement: {"what", "config", "device", "median_s", "samples_per_s", ...},
the median over --repeats timed runs (9; 2 with --quick) after one warm-up (implementations compared
in one measurement are timed interleaved). Add a benchmark by writing a function
`fn(opts) -> iterable of dicts` and registering it in BENCHMARKS.

usdrl_views: USDRL-style pre-training views (methods.md 1.4: crop-resize to 64 frames, then joint
corruption or shear, 4 views per clip) from one batch of raw (3, 300, 25, 2) clips, built
  * "batched": usdrl.make_views, the script's own view builder (one common.crop_corrupt_or_shear
    call for all views, on blocks of clips, each view written into its rows of one (views * batch)
    tensor, which the model then reads view by view; as in the training loop, that tensor is the
    previous call's);
  * "numpy_per_sample": the official repos' way, written here from the description in methods.md
    0.4 / 1.4: a Python loop over samples and views, numpy crop, torch F.interpolate of each crop,
    `random.random()` to pick numpy joint corruption or numpy shear, then the DataLoader's collation
    (np.stack + torch.from_numpy) of each view.
The batched line carries `speedup_vs_numpy_per_sample` (wall) and, on CPU, the same ratio of process
CPU times (target >= 10 on CPU, same threads). Every benchmark runs twice by default: with glibc's
default allocator, then after tune_glibc_malloc() (see there), each line naming its "allocator";
those in ONCE (and, with --quick, linear_cache) run under the first setting only. No script tunes
malloc: the glibc_default lines are what a training run gets; the glibc_tuned lines only show how
much of the time is page faulting on fresh output buffers. Speed-ups are rounded DOWN (ratio()).

linear_cache: evaluate.py's `linear` protocol (issue 8) with the training features extracted once
(`--cache`, the default) against re-encoding the training clips every epoch (`--no_cache`, the
official loop), same settings, same checkpoint, same seed. A small USDRL checkpoint is pre-trained
once per process in a temp folder (usdrl.main in-process with `--epochs 1 --hidden 32` on the
synthetic data: the "tiny" size, 120/120 clips, with --quick; the default size otherwise); both
sides then run evaluate.linear_eval in-process, so the time is the protocol itself (feature
extraction, head training, test passes), not interpreter start-up or checkpoint loading. Both use
USDRL's full protocol (160 epochs, lr 0.006, batch 512, steps 120/140, centre crop 1.0; the
synthetic quick protocol's eval every 10 epochs). The warm-up is a 2-epoch run of each side (a full
re-encoding warm-up would double the cost); then 1 (--quick) or min(--repeats, 3) interleaved timed
runs. On this shared 2-core CPU that is about 15 s with --quick (run once, under the first allocator
setting: the re-encoding side alone takes ~12 s, the tiny data and the pre-training ~2 s) and about
10 min per allocator without it (1200/1200 clips; `--allocator glibc_default` halves it). The cached
line carries both top-1/top-5 (they must be equal: `same_accuracy`) and `speedup_cached_vs_reencode`
(target >= 20 on CPU; the summary counts it as met only with equal accuracy).

pcm3pp_gru: the PCM3++ encoder (input BN + 3-layer BIGRU, hidden 1024; issue 6) forward + backward
at the paper's model size, batch 8 (the paper trains at 128), 64 frames (16 with --quick) in
pcm3pp's whole-sequence form (its CPU kernel, cuDNN on CUDA) against the official step-by-step loop
(_official_bigru: one nn.GRU call per time step carrying the hidden state), same module and input.
The first call of each side is the warm-up and the equivalence check (`same_output`: output
`max_abs_diff` below 1e-4 and every parameter gradient within 1e-3 of the official one relative to
its largest entry, `max_grad_rel_diff`); then 1 (--quick) or min(--repeats, 5) interleaved timed
runs. Target: `speedup_vs_step_by_step` >= 5 on CPU. A third line (CPU only), "recurrent_floor",
times only what neither form can batch over time: the 2 * layers * frames sequential hidden products
(forward W_hh h and backward dh W_hh of both weight sets, batch 8: each reads all of W_hh), made the
way the CPU kernel makes them (common.cpu_pack / cpu_linear: oneDNN, weights packed once per layer,
one weight set at a time); `max_speedup_vs_step_by_step` = official / floor is what a form making
these products the same way could reach if everything else were free, `ours_over_floor` how far ours
is from it. A fourth line, "exact_floor", adds the GEMMs over all T*N rows (per layer and weight
set: input projection, input gradient, W_ih and W_hh gradients; ~100 of the ~138 GFLOP of a forward
+ backward at this config), made as the kernel makes them: all the matrix products of an exact
forward + backward (only the gates' elementwise ops left out), so its max_speedup is what these
kernels allow at this thread count if nothing else cost anything. The summary repeats both as
"pcm3pp_gru_floors".

train: per method (--methods), one optimizer step exactly as its script's loop does it (views built
from raw clips + forward + loss + backward + optimizer step + momentum update / enqueue: the *_step
functions below; the optimizers run at lr 0, see build_state), in two configs: "quick" =
Args(dataset="synthetic", **QUICK) at its own batch on 150-frame raw clips (the synthetic data),
and "paper" = the Args defaults on 300-frame raw clips (stored NTU) at --paper_batch (8, at least a
method's minimum: 3 for PCM3++), since a CPU cannot run the paper batches in reasonable time. With
--quick only the quick config's steps run: the paper config's first steps alone (batch 2-3, PCM3++
~20 s of them) took ~40 s of the ~105 s a --quick run took with them. Lines with "measure": "step":
samples/s of the median of --repeats steps after the first (paper config: min(--repeats, 3)),
"first_step_s" = wall time from Model(args) (+ .to(device), optimizer) to the end of the first
step, and "peak_mem_mb" over that whole window: on CUDA torch.cuda.max_memory_allocated minus the
allocation at the start, on CPU the peak RSS (VmHWM, reset through /proc/self/clear_refs after
malloc_trim) minus the RSS at the start. Variants: CPU fp32 (the scripts' CPU default); CUDA fp32,
bf16 autocast (--dtype bf16, common.autocast) and bf16 + torch.compile (--compile). Lines with
"measure": "views": the data pipeline alone, the method's training views from one raw batch of the
config's own batch size, no model.

official_step: per method, at the paper config on --device (fp32, --paper_batch), our training
step against a "straightforward port of the official forward pass" written here (the *_official
functions, each labelled PORT with what it changes; same model, same views, same optimizer). The
first step of each side is an equivalence check (same start state and seeds, dropout off: the
losses must agree, "same_loss"; it is also the warm-up); then min(--repeats, 3) interleaved timed
steps, 1 with --quick. The "ours" line carries `speedup_vs_official_port` (target >= 1: no slower
than the port). Both train and official_step run once per process (under the first allocator
setting: the scripts never tune malloc). A plain --quick run leaves official_step out (NOT_IN_QUICK;
name it with --only): even at the smallest batches it takes minutes on CPU.

Wall times measured on the shared 2-core CPU (one thread): a plain --quick run 44-49 s (three runs
at load average 2.6-2.9; "bench_wall_s": train 17-19 s, linear_cache 14-16 s, pcm3pp_gru 6-7 s,
usdrl_views ~2 s, plus ~4 s of start-up and exit), 54 s at load ~1 with the exact_floor line
(total of bench_wall_s 38.7 s in the next run, pcm3pp_gru 7.5 s of it); official_step with --quick
~3.3 min (load average 3-4; ~2 of them PCM3's port at ~50 s a step); without --quick,
official_step at batch 8 took ~3 min for USDRL, ~1 min each for SCD-Net and MCC and ~3 min for
PCM3++ (its port's steps ~40 s each), ~10 min for all four.

The last line ({"what": "summary", ...}) repeats every speedup of the run, per benchmark (and
method) and allocator, next to its target, so the result of the comparison reads off one line; it
also lists the training samples/s and time to first step per method and each benchmark's wall time.
"""
import argparse
import atexit
import copy
import ctypes
import gc
import io
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
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
import mcc  # noqa: E402
import pcm3pp  # noqa: E402
import scd_net  # noqa: E402
import usdrl  # noqa: E402


def timed(fns, repeats, sync=None, warmup=True):
    """Time several implementations, interleaved so that both see the same load on a shared machine,
    in alternating order (A B, B A, A B, ...): the first of a pair can pay for what the other left
    behind (USDRL's paper-config step, identical computation on both sides: 0.92x when always timed
    first, 1.00x when second). One warm-up call each (unless warmup=False: the caller warmed them
    up). Returns per fn (median wall s, median process-CPU s, all wall times).

    CPU time is reported too because this machine is shared: wall time includes the time other
    processes hold the cores, which is noise for both sides of a comparison."""
    for fn in fns if warmup else ():
        fn()
    wall = [[] for _ in fns]
    cpu = [[] for _ in fns]
    for r in range(repeats):
        for k in range(len(fns)) if r % 2 == 0 else reversed(range(len(fns))):
            fn = fns[k]
            if sync:
                sync()
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            if sync:
                sync()
            wall[k].append(time.perf_counter() - w0)
            cpu[k].append(time.process_time() - c0)
    return [(statistics.median(w), statistics.median(c), w) for w, c in zip(wall, cpu)]


def clock(fn, sync):
    """(wall s, process-CPU s, result) of one call, synchronised on CUDA."""
    if sync:
        sync()
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if sync:
        sync()
    return time.perf_counter() - w0, time.process_time() - c0, out


def ratio(slow, fast, digits=2):
    """slow / fast rounded DOWN to `digits` decimals: a printed speed-up never overstates the
    measured one, so comparing it with a target (summary's meets_target) is exact (0.996 -> 0.99)."""
    return math.floor(slow / fast * 10 ** digits) / 10 ** digits


def tune_glibc_malloc():
    """Keep freed large blocks in the process (glibc mallopt: mmap threshold 32 MiB, no trimming).

    By default glibc hands every freed multi-MB block back to the OS, so each fresh 10 MB batch
    tensor page-faults again; on this shared VM that costs as much as the augmentation itself.
    Applies to both sides of a comparison. Returns False where glibc's mallopt is unavailable."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def raw_batch(n, T=300, seed=0):
    """Random clips (n, 3, T, 25, 2) float32 and num_frame (n,) in [32, T] (numpy)."""
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((n, 3, T, 25, 2), dtype=np.float32)
    num_frame = rng.integers(32, T + 1, n)
    return data, num_frame


# ----------------------------------------------------------------------------------------------
# The official per-sample pipeline (methods.md 0.4, 1.4), written from the spec description
# ----------------------------------------------------------------------------------------------
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
    """p=.5 zero 15 random joints, else multiply 15 random joints by a U(-1, 1) 3x3 (row vectors)."""
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
    """The feeder's __getitem__ for every sample, then default collation of each view."""
    per_view = [[] for _ in range(n_views)]
    for i in range(len(data)):
        clip = data[i]
        for k in range(n_views):
            v = np_crop_resize(clip, int(num_frame[i]))
            v = np_joint_corruption(v) if random.random() < 0.5 else np_shear(v)
            per_view[k].append(v)
    return [torch.from_numpy(np.stack(v)) for v in per_view]


# ----------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------
def bench_usdrl_views(opts):
    batch, n_views = 256, 4
    data, num_frame = raw_batch(batch)
    dev = torch.device(opts.device)
    x = torch.from_numpy(data).to(dev)
    nf = torch.from_numpy(num_frame).to(dev)
    g = torch.Generator(dev).manual_seed(0)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None

    args = usdrl.Args(views=n_views, window=64, crop_scale=[0.1, 1.0], modality="joint")

    buf = [None]

    def batched():  # exactly what usdrl.py's training loop calls: (n_views * batch, 3, 64, 25, 2),
        buf[0] = usdrl.make_views(x, nf, g, args, out=buf[0])  # into the previous call's buffer
        return buf[0]

    config = {"batch": batch, "clip": [3, 300, 25, 2], "views": n_views, "out_frames": 64,
              "threads": torch.get_num_threads(), "allocator": opts.allocator}
    random.seed(0)
    np.random.seed(0)
    (med_b, cpu_b, times_b), (med_n, cpu_n, times_n) = timed(
        [batched, lambda: numpy_usdrl_views(data, num_frame, n_views)], opts.repeats, sync)

    def record(impl, device, med, cpu, times):
        return {"what": "usdrl_views", "config": {**config, "impl": impl}, "device": device,
                "median_s": round(med, 5), "samples_per_s": round(batch / med, 1),
                "cpu_median_s": round(cpu, 5), "times_s": [round(t, 5) for t in times]}

    numpy_rec = record("numpy_per_sample", "cpu", med_n, cpu_n, times_n)
    batched_rec = record("batched", str(dev), med_b, cpu_b, times_b)
    batched_rec["speedup_vs_numpy_per_sample"] = ratio(med_n, med_b, 1)
    if dev.type == "cpu":
        batched_rec["cpu_time_speedup_vs_numpy_per_sample"] = ratio(cpu_n, cpu_b, 1)
    return [numpy_rec, batched_rec]


_LINEAR_CKPT = {}  # quick (bool) -> (data_dir, checkpoint path), built once per process


def _linear_checkpoint(quick):
    """Pre-train a small USDRL checkpoint on the synthetic data once (temp folder, removed at exit)."""
    if quick not in _LINEAR_CKPT:
        import data_prep
        tmp = Path(tempfile.mkdtemp(prefix="bench_linear_"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        data_prep.prepare_synthetic(tmp / "data", "synthetic", size="tiny" if quick else "default",
                                    seed=0, quiet=True)
        argv = ["--dataset", "synthetic", "--data_dir", str(tmp / "data"), "--out_dir",
                str(tmp / "usdrl"), "--epochs", "1", "--hidden", "32", "--device", "cpu", "--seed", "0"]
        # In-process (a `python usdrl.py` subprocess spent ~3.5 of its ~4.5 s importing torch); its
        # log and progress bar are kept off the JSON lines and shown only if it fails.
        out = io.StringIO()
        try:
            with redirect_stdout(out), redirect_stderr(out):
                usdrl.main(argv)
        except Exception as e:
            raise RuntimeError("pre-training the benchmark checkpoint failed:\n"
                               + out.getvalue()[-2000:]) from e
        _LINEAR_CKPT[quick] = (tmp / "data", tmp / "usdrl" / "last.pt")
    return _LINEAR_CKPT[quick]


def bench_linear_cache(opts):
    import evaluate
    data_dir, ckpt = _linear_checkpoint(opts.quick)
    dev = torch.device(opts.device)
    ld = evaluate.load_ckpt(str(ckpt))
    train = common.load_split(data_dir, "synthetic", "xsub", "train")
    test = common.load_split(data_dir, "synthetic", "xsub", "val")
    sync = torch.cuda.synchronize if dev.type == "cuda" else None

    def run(cache, epochs=None):
        argv = ["--ckpt", str(ckpt), "--device", opts.device, "--cache" if cache else "--no_cache"]
        argv += ["--epochs", str(epochs)] if epochs else []
        # evaluate.main applies its synthetic QUICK values to every flag not given: do the same.
        args = common.parse_args(evaluate.Args, argv + ["--dataset", "synthetic"], quick=evaluate.QUICK)
        p = evaluate.protocol(args, ld, "linear", "synthetic", "xsub")
        enc = evaluate.build_encoder(ld, False, args.seed, dev)
        common.seed_everything(args.seed)
        if sync:
            sync()
        w0, c0 = time.perf_counter(), time.process_time()
        m, _, _ = evaluate.linear_eval(enc, ld, train, test, p, args, dev)
        if sync:
            sync()
        return time.perf_counter() - w0, time.process_time() - c0, m, p

    for cache in (True, False):  # warm-up: a 2-epoch run of each side
        run(cache, epochs=2)
    repeats = 1 if opts.quick else min(opts.repeats, 3)
    res = {True: [], False: []}
    for _ in range(repeats):  # interleaved: both sides see the same machine load
        for cache in (True, False):
            res[cache].append(run(cache))
    p = res[True][0][3]
    config = {"checkpoint": "usdrl --epochs 1 --hidden 32", "data": "synthetic xsub " +
              ("tiny" if opts.quick else "default"), "n_train": len(train), "n_test": len(test),
              "feature_dim": res[True][0][2]["feature_dim"],
              **{k: v for k, v in p.items() if not k.endswith("_parsed")},
              "eval_batch": 256, "repeats": repeats, "threads": torch.get_num_threads(),
              "allocator": opts.allocator}

    def record(cache):
        runs = res[cache]
        walls, cpus = [r[0] for r in runs], [r[1] for r in runs]
        m = runs[-1][2]
        return {"what": "linear_cache", "config": {**config, "impl": "cached" if cache else "reencode"},
                "device": str(dev), "median_s": round(statistics.median(walls), 4),
                "cpu_median_s": round(statistics.median(cpus), 4), "times_s": [round(t, 4) for t in walls],
                "top1_final": m["top1_final"], "top5_final": m["top5_final"],
                "top1_best": m["top1_best"], "features_cached": m["features_cached"]}

    cached, reenc = record(True), record(False)
    keys = ("top1_final", "top5_final", "top1_best", "top5_best", "best_epoch")
    cached["same_accuracy"] = all(r[2][k] == res[True][0][2][k] for r in res[True] + res[False] for k in keys)
    cached["speedup_cached_vs_reencode"] = ratio(reenc["median_s"], cached["median_s"], 1)
    if dev.type == "cpu":
        cached["cpu_time_speedup_cached_vs_reencode"] = ratio(reenc["cpu_median_s"], cached["cpu_median_s"], 1)
    return [reenc, cached]


# ----------------------------------------------------------------------------------------------
# One training step of each method, as its script's loop does it
# ----------------------------------------------------------------------------------------------
# Each `*_train_views` builds the training views from raw clips exactly as the script's loop does;
# each `*_step` is ONE optimizer step of the loop: views + forward + loss + backward + optimizer
# step + the method's momentum update / enqueue. They return the detached loss.
def _backward_step(s, loss):
    """zero_grad, (scaled) backward, optimizer step, scaler update: the same lines in every script."""
    s.opt.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    s.scaler.step(s.opt)
    s.scaler.update()
    return loss.detach()


def usdrl_train_views(s, x, nf):  # into the previous step's views, as usdrl.py's loop
    s.views = usdrl.make_views(x, nf, s.g, s.args, out=getattr(s, "views", None))
    return s.views


def usdrl_step(s, x, nf):
    loss, _ = usdrl.forward_loss(s.net, usdrl_train_views(s, x, nf), s.args, s.dev)
    return _backward_step(s, loss)


def scd_train_views(s, x, nf):
    with torch.no_grad():
        return scd_net.make_view(x, nf, s.g, s.args), scd_net.make_view(x, nf, s.g, s.args)


def scd_step(s, x, nf):  # scd_net.train_step: momentum update, forward, step, enqueue
    return scd_net.train_step(s.model, s.net, s.opt, s.scaler, *scd_train_views(s, x, nf), s.args)["loss"]


def pcm3_train_views(s, x, nf):
    with torch.no_grad():
        return pcm3pp.add_batch_params(pcm3pp.make_views(x, nf, s.args, s.g), s.args, s.g2, 0)


def pcm3_step(s, x, nf):  # stage one (post_distill=False); momentum update and enqueue are in forward
    b = pcm3_train_views(s, x, nf)
    with common.autocast(s.dev, s.args.dtype):
        terms = s.net(b, False)
    return _backward_step(s, terms["loss"])


def mcc_train_views(s, x, nf):
    return mcc.make_views(x, nf, s.g, s.args)


def mcc_step(s, x, nf):  # mcc.train_step: momentum update, forward, losses, step, enqueue
    ids = torch.arange(len(x), device=x.device) + getattr(s, "seen", 0)  # as the loader's indices
    s.seen = getattr(s, "seen", 0) + len(x)
    return mcc.train_step(s.model, s.net, s.opt, s.scaler, *mcc_train_views(s, x, nf)[:4], ids,
                          s.args)[0]


# ----------------------------------------------------------------------------------------------
# "Straightforward ports of the official forward pass" (official_step), written here from
# specs/methods.md. Each runs the same views and the same model weights as the step above and
# differs only where the official code computes the step differently.
# ----------------------------------------------------------------------------------------------
@contextmanager
def patched(obj, name, value):
    """Temporarily replace obj.name (a method of a class or a function of a module)."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def usdrl_official(s, x, nf):
    """PORT (methods.md 1.2-1.5): the official loop calls the whole model (encoder + projectors) once
    per view, DSA's two branches as two calls. usdrl.py now does both the same way (batching the
    views, then the DSA branches, measured 5-10% slower on one CPU thread), so the port computes
    what usdrl.py computes and the ratio reads as parity within timing noise; it stays as the
    reference of the official loop. (nn.DataParallel: not on CPU.)"""
    a, m = s.args, s.model
    z = {"t": [], "s": [], "i": []}
    for v in usdrl_train_views(s, x, nf).chunk(a.views):
        yt, ys = m.encoder.pooled(v)
        z["t"].append(m.t_proj(yt))
        z["s"].append(m.s_proj(ys))
        z["i"].append(m.i_proj(torch.cat([yt, ys], 1)))
    loss, _ = usdrl.usdrl_loss({k: torch.stack(v) for k, v in z.items()}, a)
    return _backward_step(s, loss)


def scd_official(s, x, nf):
    """PORT of the official SCD-Net MoCo forward (methods.md 2.3, moco/builder.py style): `.data =`
    out-of-place momentum update, einsum logits against queue.clone().detach(), slice enqueue. The
    encoder (CTR-GCN with its per-subset loop and einsum, transformers, projectors) is already the
    official formulation in scd_net.py, so the port reuses it: no structural difference."""
    m = s.model
    xq, xk = scd_train_views(s, x, nf)
    with torch.no_grad():
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
    loss = (nce(qt, ki, m.queue_i) + nce(qs, ki, m.queue_i)
            + nce(qi, kt, m.queue_t) + nce(qi, ks, m.queue_s))
    out = _backward_step(s, loss)
    ptr, n = int(m.queue_ptr), len(kt)  # the official code asserts K % batch == 0
    for queue, k in ((m.queue_t, kt), (m.queue_s, ks), (m.queue_i, ki)):
        queue[:, ptr:ptr + n] = k.T
    m.queue_ptr.fill_((ptr + n) % m.queue_t.shape[1])
    return out


def _official_bigru(gru, x, native=None):
    """PCM3 official BIGRU loop: one nn.GRU call per time step on a length-1 slice, carrying the
    (2 * layers, N, H) hidden state (methods.md 3A.2)."""
    h, out = None, []
    for t in range(x.shape[1]):
        o, h = gru(x[:, t:t + 1], h)
        out.append(o)
    return torch.cat(out, 1)


def bench_pcm3pp_gru(opts):
    """PCM3++ encoder (input BN + 3-layer BIGRU, hidden 1024) forward + backward at batch 8 (the
    paper's 128 is out of reach on a CPU), 64 frames (16 with --quick): pcm3pp's whole-sequence
    form against the official step-by-step loop (_official_bigru), same module and input; one
    equivalence check first (outputs and gradients)."""
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
        enc.zero_grad(set_to_none=True)
        with patched(pcm3pp, "forward_in_time_gru", _official_bigru):
            y = enc.sequence(x)
        y.square().mean().backward()
        return y.detach()

    # The part no exact fp32 implementation can batch over time: per layer, weight set and step, the
    # hidden product forward (W_hh h) and backward (dh W_hh), 2 * layers * frames of each, made the way
    # pcm3pp's CPU kernel makes them (weights packed once per layer, one weight set at a time).
    # The official loop does these too, plus the rest.
    hid, layers = enc.encoder.hidden_size, enc.encoder.num_layers
    w_hh, b_hh = torch.randn(3 * hid, hid, device=dev), torch.randn(3 * hid, device=dev)
    h, dg = torch.randn(batch, hid, device=dev), torch.randn(batch, 3 * hid, device=dev)

    def recurrent_floor():
        for _ in range(2 * layers):
            fwd, bwd = common.cpu_pack(w_hh, batch), common.cpu_pack(w_hh.t(), batch)
            for _ in range(frames):
                common.cpu_linear(h, fwd, b_hh)
            for _ in range(frames):
                common.cpu_linear(dg, bwd, add=h)

    # Plus the GEMMs over all T*N rows, per layer and weight set: input projection, input gradient,
    # W_ih and W_hh gradients (the kernel's calls). The two together are all the matrix products of
    # an exact forward + backward, made with these kernels.
    rows = batch * frames
    xs = [torch.randn(rows, w, device=dev) for w in (enc.encoder.input_size, 2 * hid)]
    w_ih = [torch.randn(3 * hid, x.shape[1], device=dev) for x in xs]
    dg_rows, h_rows = torch.randn(rows, 3 * hid, device=dev), torch.randn(rows, hid, device=dev)

    def exact_floor():
        recurrent_floor()
        for layer in range(layers):
            x, w = xs[min(layer, 1)], w_ih[min(layer, 1)]
            for _ in range(2):
                common.cpu_linear(x, w, b_hh)
                common.cpu_linear(dg_rows, w.t())
                common.cpu_linear(dg_rows.t(), x.t())
                common.cpu_linear(dg_rows.t(), h_rows.t())

    def grads():
        return [q.grad.clone() for q in enc.parameters() if q.grad is not None]

    # The check doubles as both warm-ups: outputs and every parameter gradient (the hand-written
    # CPU backward is half of the timed work).
    y_ours, g_ours = ours(), grads()
    y_official, g_official = official(), grads()
    diff = (y_ours - y_official).abs().max().item()
    grad_diff = max((a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)
                    for a, b in zip(g_ours, g_official))
    del y_ours, g_ours, y_official, g_official
    # On CUDA ours is cuDNN, not the CPU kernel these calls stand for: no floor there.
    fns = [ours, official]
    if dev.type == "cpu":
        exact_floor()  # the floors' warm-up (the other two were warmed up by the check above)
        fns += [recurrent_floor, exact_floor]
    repeats = 1 if opts.quick else min(opts.repeats, 5)
    (med_o, cpu_o, t_o), (med_s, cpu_s, t_s), *floor_time = timed(fns, repeats, _sync_fn(dev),
                                                                  warmup=False)
    config = {"batch": batch, "frames": frames, "hidden": 1024, "layers": 3, "input": 150,
              "repeats": repeats, "threads": torch.get_num_threads(), "allocator": opts.allocator}

    def record(impl, med, cpu, times):
        return {"what": "pcm3pp_gru", "config": {**config, "impl": impl}, "device": str(dev),
                "median_s": round(med, 4), "cpu_median_s": round(cpu, 4),
                "times_s": [round(t, 4) for t in times]}

    rec = record("whole_sequence", med_o, cpu_o, t_o)
    rec.update(speedup_vs_step_by_step=ratio(med_s, med_o),
               cpu_time_speedup_vs_step_by_step=ratio(cpu_s, cpu_o),
               max_abs_diff=diff, max_grad_rel_diff=float(f"{grad_diff:.2e}"),
               same_output=diff < 1e-4 and grad_diff < 1e-3 and len(grads()) > 0)
    yield record("step_by_step_official", med_s, cpu_s, t_s)
    yield rec
    # If everything but the floor's products were free, max_speedup would be the speed-up.
    for impl, (med_f, cpu_f, t_f) in zip(("recurrent_floor", "exact_floor"), floor_time):
        floor = record(impl, med_f, cpu_f, t_f)
        floor.update(max_speedup_vs_step_by_step=ratio(med_s, med_f),
                     ours_over_floor=round(med_o / med_f, 2))
        yield floor


def pcm3_official(s, x, nf):
    """PORT (methods.md 3A.2): every encoder pass (query, masked, predicted, mixed, clip and key views)
    runs the official per-step GRU loop; pcm3pp.py runs each layer's two weight sets as whole-sequence
    recurrences (its CPU kernel / cuDNN). The official views are per-sample numpy: not ported, both
    sides build the same batched views."""
    with patched(pcm3pp, "forward_in_time_gru", _official_bigru):
        return pcm3_step(s, x, nf)


def _official_stgcn_block(self, x, a):
    """st-gcn's st_gcn.forward with ConvTemporalGraphical: the graph aggregation as
    einsum('nkctv,kvw->nctw') (mcc.py: a batched matmul per subset, then the sum over k)."""
    res = 0 if self.residual is None else self.residual(x)
    y = self.gcn(x)
    n, kc, t, v = y.shape
    y = torch.einsum("nkctv,kvw->nctw", y.view(n, self.k, kc // self.k, t, v), a).contiguous()
    return F.relu(self.tcn(y) + res)


def mcc_official(s, x, nf):
    """PORT (methods.md 4.4; MCC released no code, its backbone is yysijie/st-gcn): every ST-GCN block
    of the encoders and the decoder aggregates over the graph with the official einsum."""
    with patched(mcc.STGCNBlock, "forward", _official_stgcn_block):
        return mcc_step(s, x, nf)


# name -> module, views, step, official port, smallest batch the method accepts (USDRL: batch
# statistics; PCM3: mixing partner shift 1..N-2; MCC, SCD-Net: BatchNorm over >1 value)
def _method(mod, views, step, official, min_batch):
    return SimpleNamespace(mod=mod, views=views, step=step, official=official, min_batch=min_batch)


METHODS = {"usdrl": _method(usdrl, usdrl_train_views, usdrl_step, usdrl_official, 2),
           "scd_net": _method(scd_net, scd_train_views, scd_step, scd_official, 2),
           "pcm3pp": _method(pcm3pp, pcm3_train_views, pcm3_step, pcm3_official, 3),
           "mcc": _method(mcc, mcc_train_views, mcc_step, mcc_official, 2)}
RAW_FRAMES = {"quick": 150, "paper": 300}  # stored clip length: synthetic data / NTU (AGCN arrays)


def method_args(name, config, batch=None, dtype="auto", compile=False, device="cpu"):
    """The script's Args: `quick` = Args(dataset="synthetic", **QUICK) (the quick start), `paper` =
    the defaults (the paper's NTU-60 run); batch None keeps the config's own batch."""
    mod = METHODS[name].mod
    a = mod.Args(**(dict(dataset="synthetic", **mod.QUICK) if config == "quick" else {}))
    a.batch_size = batch or a.batch_size
    a.dtype, a.compile, a.device = dtype, compile, str(device)
    return a


def build_state(name, a, dev):
    """Model(args) on the device, its optimizer, GradScaler, (compiled) net and seeded generators.

    The optimizer runs at lr 0: the benchmarks repeat steps on one random batch, and at the paper lr
    MCC diverges within five such steps (its interpolation loss 0.4 -> 9 -> 3e3 -> 2e7 -> 8e19 ->
    NaN at batch 8, which its per-step check turns into an error). With lr 0 every step still runs
    the whole update (momentum, weight decay, Adam moments) and the weights stay at their init."""
    common.seed_everything(a.seed)
    model = METHODS[name].mod.Model(a).to(dev)
    model.train()
    opt = METHODS[name].mod.make_optimizer(model, a)  # the optimizer the script builds
    common.set_lr(opt, 0.0)
    net = torch.compile(model) if a.compile else model
    s = SimpleNamespace(name=name, args=a, dev=dev, model=model, net=net, opt=opt,
                        scaler=common.make_scaler(dev, a.dtype),
                        g=torch.Generator(dev), g2=torch.Generator(dev))
    reseed(s)
    return s


def reseed(s):
    s.g.manual_seed(s.args.seed)            # views
    s.g2.manual_seed(s.args.seed + 1)       # PCM3's per-batch draws
    torch.manual_seed(s.args.seed)          # dropout / drop path


def device_batch(n, T, dev, seed=0):
    data, num_frame = raw_batch(n, T, seed)
    return torch.from_numpy(data).to(dev), torch.from_numpy(num_frame).to(dev)


def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _malloc_trim():
    """Hand glibc's free heap pages back to the OS, so that RSS counts live memory only (freed memory
    of an earlier measurement would otherwise be reused without raising RSS)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def mem_start(dev):
    """Start a peak-memory window; returns (baseline, how the peak is read)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        return (torch.cuda.memory_allocated(dev),
                "torch.cuda.max_memory_allocated - memory_allocated at start")
    _malloc_trim()
    try:  # Linux: writing 5 to clear_refs resets VmHWM (peak RSS) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmRSS"), ("VmHWM - VmRSS at start (/proc/self/status; malloc_trim, then VmHWM "
                                     "reset via clear_refs)")
    except OSError:
        import resource
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "ru_maxrss increase (process peak RSS; 0 when the peak predates the window)")


def mem_peak_mb(dev, start):
    if dev.type == "cuda":
        return round((torch.cuda.max_memory_allocated(dev) - start[0]) / 2**20, 1)
    if start[1].startswith("VmHWM"):
        return round((_status_kb("VmHWM") - start[0]) / 1024, 1)
    import resource
    return round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start[0]) / 1024, 1)


def _free(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def dropout_off(model):
    """Dropout, drop path and attention dropout set to 0 (so two formulations compute one function)."""
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


def _sync_fn(dev):
    return (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None


def _paper_batch(name, opts):
    """--paper_batch (0 = the paper's own batch), at least the method's minimum."""
    return max(opts.paper_batch or method_args(name, "paper").batch_size, METHODS[name].min_batch)


def _variants(dev):
    """(dtype, compile) per device: CPU runs the scripts' default (fp32); CUDA fp32, bf16 autocast
    (common.autocast, --dtype bf16) and bf16 + torch.compile (--compile)."""
    return [("fp32", False)] if dev.type == "cpu" else [("fp32", False), ("bf16", False), ("bf16", True)]


# ----------------------------------------------------------------------------------------------
# Benchmarks: training
# ----------------------------------------------------------------------------------------------
def _views_record(name, config, batch, dev, opts):
    """Data pipeline only: the method's training views from one raw batch, no model."""
    a = method_args(name, config, batch, device=dev)
    x, nf = device_batch(batch, RAW_FRAMES[config], dev)
    s = SimpleNamespace(args=a, dev=dev, g=torch.Generator(dev), g2=torch.Generator(dev))
    reseed(s)
    fn = METHODS[name].views
    with torch.no_grad():
        (med, cpu, times), = timed([lambda: fn(s, x, nf)], opts.repeats, _sync_fn(dev))
    rec = {"what": "train", "config": {"method": name, "measure": "views", "config": config,
                                        "batch": batch, "raw_frames": RAW_FRAMES[config],
                                        "window": a.window, "threads": torch.get_num_threads(),
                                        "allocator": opts.allocator},
           "device": str(dev), "median_s": round(med, 5), "samples_per_s": round(batch / med, 1),
           "times_s": [round(t, 5) for t in times]}
    if dev.type == "cpu":
        rec["cpu_median_s"] = round(cpu, 5)
    return rec


def _step_record(name, config, batch, dev, dtype, compile, repeats, opts):
    """Training samples/s (median of `repeats` steps after the first), time to first step (wall from
    Model(args) to the end of the first optimizer step) and peak memory over the whole window."""
    x, nf = device_batch(batch, RAW_FRAMES[config], dev)
    a = method_args(name, config, batch, dtype, compile, dev)
    step, sync = METHODS[name].step, _sync_fn(dev)
    _free(dev)
    mem0 = mem_start(dev)
    build_s, _, s = clock(lambda: build_state(name, a, dev), sync)
    step_s, _, loss = clock(lambda: step(s, x, nf), sync)
    (med, cpu, times), = timed([lambda: step(s, x, nf)], repeats, sync, warmup=False)
    peak = mem_peak_mb(dev, mem0)
    rec = {"what": "train", "config": {"method": name, "measure": "step", "config": config,
                                        "batch": batch, "raw_frames": RAW_FRAMES[config],
                                        "dtype": dtype, "compile": compile, "repeats": repeats,
                                        "threads": torch.get_num_threads(), "allocator": opts.allocator},
           "device": str(dev), "median_s": round(med, 4), "samples_per_s": round(batch / med, 2),
           "times_s": [round(t, 4) for t in times], "first_step_s": round(build_s + step_s, 3),
           "build_s": round(build_s, 3), "peak_mem_mb": peak, "peak_mem": mem0[1],
           "params": common.count_params(s.model), "first_loss": round(float(loss), 5)}
    if dev.type == "cpu":
        rec["cpu_median_s"] = round(cpu, 4)
    s = None  # frees the model (`del` would trip pyflakes: lambdas capture s)
    _free(dev)
    return rec


def bench_train(opts):
    """Per method: the data pipeline (views only) at both configs, and full training steps at the
    quick-start config (its own batch, 150-frame raw clips) and, without --quick (see the module
    docstring), at the paper config (--paper_batch, 300-frame clips)."""
    dev = torch.device(opts.device)
    for name in opts.methods:
        for config in ("quick", "paper"):
            batch = method_args(name, config).batch_size  # views: the config's own batch
            yield _views_record(name, config, batch, dev, opts)
        for dtype, compile in _variants(dev):
            yield _step_record(name, "quick", method_args(name, "quick").batch_size, dev, dtype,
                               compile, opts.repeats, opts)
            if not opts.quick:
                yield _step_record(name, "paper", _paper_batch(name, opts), dev, dtype, compile,
                                   min(opts.repeats, 3), opts)


def _snapshot(s):
    return {"model": {k: v.detach().clone() for k, v in s.model.state_dict().items()},
            "opt": copy.deepcopy(s.opt.state_dict())}


def _restore(s, snap):
    s.model.load_state_dict(snap["model"])
    s.opt.load_state_dict(snap["opt"])


def bench_official_step(opts):
    """Per method at the paper config (--paper_batch, fp32): our training step vs the port of the
    official forward pass, same model, same views (see the *_official functions).

    The first step of each side is the equivalence check: both start from the same weights,
    optimizer state and generator seeds with dropout off, so they must give the same loss. It is
    also the warm-up (not timed: a side's first step after the restore is not representative, e.g.
    USDRL's port measured 1.2-1.4x slower in its check step and 1.0x in the timed steps); then
    min(--repeats, 3) interleaved timed steps of each side, 1 with --quick."""
    dev = torch.device(opts.device)
    sync = _sync_fn(dev)
    repeats = 1 if opts.quick else min(opts.repeats, 3)
    for name in opts.methods:
        m, batch = METHODS[name], _paper_batch(name, opts)
        x, nf = device_batch(batch, RAW_FRAMES["paper"], dev)
        _free(dev)
        s = build_state(name, method_args(name, "paper", batch, "fp32", device=dev), dev)
        snap = _snapshot(s)
        with dropout_off(s.model), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="RNN module weights are not part of single")
            loss_ours = float(m.step(s, x, nf))
            _restore(s, snap)
            reseed(s)
            loss_port = float(m.official(s, x, nf))
        del snap
        (wo, co, to), (wp, cp, tp) = timed([lambda: m.step(s, x, nf), lambda: m.official(s, x, nf)],
                                           repeats, sync, warmup=False)
        config = {"method": name, "config": "paper", "batch": batch, "raw_frames": RAW_FRAMES["paper"],
                  "dtype": "fp32", "repeats": repeats, "threads": torch.get_num_threads(),
                  "allocator": opts.allocator}

        def record(impl, med, cpu, times, loss):
            rec = {"what": "official_step", "config": {**config, "impl": impl}, "device": str(dev),
                   "median_s": round(med, 4), "samples_per_s": round(batch / med, 2),
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
        if dev.type == "cpu":
            ours["cpu_time_speedup_vs_official_port"] = ratio(cp, co)
        s = None  # frees the model (`del` would trip pyflakes: lambdas capture s)
        _free(dev)
        yield port
        yield ours


BENCHMARKS = {"usdrl_views": bench_usdrl_views, "linear_cache": bench_linear_cache,
              "pcm3pp_gru": bench_pcm3pp_gru, "train": bench_train,
              "official_step": bench_official_step}
# Left out of a plain --quick run (name them with --only): official_step's paper-config steps take
# ~3 minutes on a 2-core CPU even at the smallest batches (the PCM3 port alone ~50 s a step).
NOT_IN_QUICK = {"official_step"}
# Benchmarks that run once, under the first allocator setting of the run (glibc's default with
# --allocator both): they time the training scripts as the scripts run, and no script tunes malloc.
ONCE = {"pcm3pp_gru", "train", "official_step"}
# With --quick linear_cache runs once too: its re-encoding side alone is ~12 s per run (tiny data).
ONCE_IN_QUICK = ONCE | {"linear_cache"}
# The ratio each benchmark reports, and its target on CPU (issue 2: batched views >= 10x the
# per-sample numpy pipeline; issue 8: linear with cached features >= 20x re-encoding every epoch;
# training step at the paper config no slower than a port of the official forward pass; issue 6:
# PCM3++ encoder >= 5x the step-by-step GRU).
SPEEDUP_TARGETS = {"speedup_vs_numpy_per_sample": 10.0, "speedup_cached_vs_reencode": 20.0,
                   "speedup_vs_official_port": 1.0, "speedup_vs_step_by_step": 5.0}


def _train_table(records):
    """{method: {"<measure> <config> b<batch> <device> [dtype]": value}} for the train lines."""
    sps, first = {}, {}
    for rec in records:
        if rec["what"] != "train":
            continue
        c = rec["config"]
        label = f'{c["config"]} b{c["batch"]} {rec["device"]}'
        if c["measure"] == "views":
            sps.setdefault(c["method"], {})[f"views {label}"] = rec["samples_per_s"]
            continue
        label += f' {c["dtype"]}{"+compile" if c["compile"] else ""}'
        sps.setdefault(c["method"], {})[f"step {label}"] = rec["samples_per_s"]
        first.setdefault(c["method"], {})[label] = rec["first_step_s"]
    return sps, first


def summary(records, walls=None):
    """One closing record: per speedup key, benchmark (and method) and allocator, the wall and
    CPU-time speedups of the lines that carry one, and whether they reach the key's target in
    SPEEDUP_TARGETS (and, where the line carries one, its same-result check) with the number of
    timed repeats behind it; the training samples/s and time to first step per method; each
    benchmark's wall time."""
    out = {"what": "summary"}
    for key, target in SPEEDUP_TARGETS.items():
        ratios = {}
        for rec in records:
            if key not in rec:
                continue
            entry = {"wall": rec[key]}
            if f"cpu_time_{key}" in rec:
                entry["cpu_time"] = rec[f"cpu_time_{key}"]
            met = all(v >= target for v in entry.values())
            for check in ("same_accuracy", "same_loss", "same_output"):
                if check in rec:
                    entry[check] = rec[check]
                    met = met and rec[check]
            label = rec["what"] + (f':{rec["config"]["method"]}' if "method" in rec["config"] else "")
            ratios.setdefault(label, {})[rec["config"]["allocator"]] = {
                **entry, "meets_target": met, "device": rec["device"],
                **({"repeats": rec["config"]["repeats"]} if "repeats" in rec["config"] else {})}
        if ratios:
            out[key] = ratios
    out["targets"] = {k: v for k, v in SPEEDUP_TARGETS.items() if k in out}
    bounds = {}
    for rec in records:  # pcm3pp_gru: the most an exact fp32 form could reach with these kernels
        if "max_speedup_vs_step_by_step" in rec:
            bounds.setdefault(rec["config"]["allocator"], {})[rec["config"]["impl"]] = {
                k: rec[k] for k in ("max_speedup_vs_step_by_step", "ours_over_floor")}
    if bounds:
        out["pcm3pp_gru_floors"] = bounds
    sps, first = _train_table(records)
    if sps:
        out["train_samples_per_s"], out["train_first_step_s"] = sps, first
    if walls:
        out["bench_wall_s"] = {k: round(v, 1) for k, v in walls.items()}
    out["load_avg_1min"] = round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats, smaller data, no paper-config training steps (see the module "
                        "docstring for the times)")
    p.add_argument("--only", default="", help="comma-separated benchmark names: " + ", ".join(BENCHMARKS)
                   + " (default: all; with --quick all but " + ", ".join(sorted(NOT_IN_QUICK)) + ")")
    p.add_argument("--device", default="cpu", help="device of the batched implementations (usdrl_views, "
                   "linear_cache) and of the training steps (train, official_step)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1 = one core for both sides, like one loader worker)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per measurement (9; 2 with --quick)")
    p.add_argument("--allocator", default="both", choices=["glibc_default", "glibc_tuned", "both"],
                   help="CPU allocator setting: as the process starts, after tune_glibc_malloc(), or "
                        "both in turn (tuning cannot be undone inside a process, so it runs second)")
    p.add_argument("--paper_batch", type=int, default=None,
                   help="batch of the paper-config training steps of train (not run with --quick) and "
                        "official_step (8; 2 with --quick; 0 = each paper's own batch; raised to a "
                        "method's minimum)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated methods of train and official_step: " + ", ".join(METHODS))
    opts = p.parse_args(argv)
    opts.methods = [m for m in opts.methods.split(",") if m]
    if any(m not in METHODS for m in opts.methods):
        p.error(f"--methods {','.join(opts.methods)}: choose from {', '.join(METHODS)}")
    if opts.paper_batch is None:
        opts.paper_batch = 2 if opts.quick else 8
    if opts.repeats is not None and opts.repeats < 1:
        p.error(f"--repeats {opts.repeats}: must be >= 1")
    if opts.paper_batch < 0:
        p.error(f"--paper_batch {opts.paper_batch}: must be >= 0")
    if opts.threads < 1:
        p.error(f"--threads {opts.threads}: must be >= 1")
    opts.repeats = opts.repeats or (2 if opts.quick else 9)
    torch.set_num_threads(opts.threads)
    names = ([n for n in opts.only.split(",") if n]
             or [n for n in BENCHMARKS if not (opts.quick and n in NOT_IN_QUICK)])
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    modes = ["glibc_default", "glibc_tuned"] if opts.allocator == "both" else [opts.allocator]
    records, walls = [], {}
    once = ONCE_IN_QUICK if opts.quick else ONCE
    for mode in modes:
        if mode == "glibc_tuned" and not tune_glibc_malloc():
            print(json.dumps({"note": "glibc mallopt unavailable; skipped glibc_tuned"}), flush=True)
            continue
        opts.allocator = mode
        for name in names:
            if name in once and mode != modes[0]:
                continue
            w0 = time.perf_counter()
            for rec in BENCHMARKS[name](opts):
                records.append(rec)
                print(json.dumps(rec), flush=True)
            walls[f"{name}/{mode}"] = time.perf_counter() - w0
    walls["total"] = sum(walls.values())
    print(json.dumps(summary(records, walls)), flush=True)


if __name__ == "__main__":
    main()
