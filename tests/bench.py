"""Throughput benchmarks (not a test module: pytest collects no test_ functions here).

    python tests/bench.py [--quick] [--only NAME[,NAME]] [--device cpu|cuda] [--threads 1]
                          [--allocator glibc_default|glibc_tuned|both]

Prints one JSON line per measurement: {"what", "config", "device", "median_s", "samples_per_s", ...},
the median over --repeats timed runs after one warm-up (implementations compared in one
measurement are timed interleaved). Add a benchmark by writing a function
`fn(opts) -> list[dict]` and registering it in BENCHMARKS.

usdrl_views: USDRL-style pre-training views (methods.md 1.4: crop-resize to 64 frames, then joint
corruption or shear, 4 views per clip) from one batch of raw (3, 300, 25, 2) clips, built
  * "batched": with common.crop_resize + common.corrupt_or_shear on the whole batch;
  * "numpy_per_sample": the official repos' way, written here from the description in methods.md
    0.4 / 1.4: a Python loop over samples and views, numpy crop, torch F.interpolate of each crop,
    `random.random()` to pick numpy joint corruption or numpy shear, then the DataLoader's collation
    (np.stack + torch.from_numpy) of each view.
The batched line carries `speedup_vs_numpy_per_sample` (wall) and, on CPU, the same ratio of process
CPU times (target >= 10 on CPU, same threads). Every benchmark runs twice by default: with glibc's
default allocator, then after tune_glibc_malloc() (see there), each line naming its "allocator".

linear_cache: evaluate.py's `linear` protocol (issue 8) with the training features extracted once
(`--cache`, the default) against re-encoding the training clips every epoch (`--no_cache`, the
official loop), same settings, same checkpoint, same seed. A small USDRL checkpoint is pre-trained
once per process in a temp folder (`usdrl.py --epochs 1 --hidden 32` on the synthetic data: the
"tiny" size, 120/120 clips, with --quick; the default size otherwise); both sides then run
evaluate.linear_eval in-process, so the time is the protocol itself (feature extraction, head
training, test passes), not interpreter start-up or checkpoint loading. Both use USDRL's full
protocol (160 epochs, lr 0.006, batch 512, steps 120/140, centre crop 1.0; the synthetic quick
protocol's eval every 10 epochs). The warm-up is a 2-epoch run of each side (a full re-encoding
warm-up would double the cost); then 1 (--quick) or min(--repeats, 3) interleaved timed runs. On
this shared 2-core CPU that is about 25 s per allocator with --quick and about 10 min per allocator
without it (1200/1200 clips; `--allocator glibc_default` halves it). The
cached line carries both top-1/top-5 (they must be equal: `same_accuracy`) and
`speedup_cached_vs_reencode` (target >= 20 on CPU; the summary counts it as met only with equal
accuracy).
The last line ({"what": "summary", ...}) repeats every speedup of the run, per benchmark and
allocator, next to its target, so the result of the comparison reads off one line.
"""
import argparse
import atexit
import ctypes
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402


def timed(fns, repeats, sync=None):
    """Time several implementations, interleaved (A, B, A, B, ...) so that both see the same load on
    a shared machine; one warm-up call each. Returns per fn (median wall s, median process-CPU s,
    all wall times).

    CPU time is reported too because this machine is shared: wall time includes the time other
    processes hold the cores, which is noise for both sides of a comparison."""
    for fn in fns:
        fn()
    wall = [[] for _ in fns]
    cpu = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            if sync:
                sync()
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            if sync:
                sync()
            wall[k].append(time.perf_counter() - w0)
            cpu[k].append(time.process_time() - c0)
    return [(statistics.median(w), statistics.median(c), w) for w, c in zip(wall, cpu)]


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

    def batched():
        return [common.corrupt_or_shear(common.crop_resize(x, nf, g), g) for _ in range(n_views)]

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
    batched_rec["speedup_vs_numpy_per_sample"] = round(med_n / med_b, 1)
    if dev.type == "cpu":
        batched_rec["cpu_time_speedup_vs_numpy_per_sample"] = round(cpu_n / cpu_b, 1)
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
        cmd = [sys.executable, str(ROOT / "usdrl.py"), "--dataset", "synthetic", "--data_dir",
               str(tmp / "data"), "--out_dir", str(tmp / "usdrl"), "--epochs", "1", "--hidden", "32",
               "--device", "cpu", "--seed", "0"]
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"pre-training the benchmark checkpoint failed:\n{r.stderr[-2000:]}")
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
    cached["speedup_cached_vs_reencode"] = round(reenc["median_s"] / cached["median_s"], 1)
    if dev.type == "cpu":
        cached["cpu_time_speedup_cached_vs_reencode"] = round(reenc["cpu_median_s"] / cached["cpu_median_s"], 1)
    return [reenc, cached]


BENCHMARKS = {"usdrl_views": bench_usdrl_views, "linear_cache": bench_linear_cache}
# The ratio each benchmark reports, and its target on CPU (issue 2: batched views >= 10x the
# per-sample numpy pipeline; issue 8: linear with cached features >= 20x re-encoding every epoch).
SPEEDUP_TARGETS = {"speedup_vs_numpy_per_sample": 10.0, "speedup_cached_vs_reencode": 20.0}


def summary(records):
    """One closing record: per speedup key, benchmark and allocator, the wall and CPU-time speedups
    of the lines that carry one, and whether they reach the key's target in SPEEDUP_TARGETS."""
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
            if "same_accuracy" in rec:
                entry["same_accuracy"] = rec["same_accuracy"]
                met = met and rec["same_accuracy"]
            ratios.setdefault(rec["what"], {})[rec["config"]["allocator"]] = {
                **entry, "meets_target": met, "device": rec["device"]}
        if ratios:
            out[key] = ratios
    out["targets"] = {k: v for k, v in SPEEDUP_TARGETS.items() if k in out}
    out["load_avg_1min"] = round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats, smaller data (usdrl_views well under a minute on CPU, linear_cache about one)")
    p.add_argument("--only", default="", help="comma-separated benchmark names: " + ", ".join(BENCHMARKS))
    p.add_argument("--device", default="cpu", help="device of the batched implementations")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1 = one core for both sides, like one loader worker)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (9; 3 with --quick)")
    p.add_argument("--allocator", default="both", choices=["glibc_default", "glibc_tuned", "both"],
                   help="CPU allocator setting: as the process starts, after tune_glibc_malloc(), or "
                        "both in turn (tuning cannot be undone inside a process, so it runs second)")
    opts = p.parse_args(argv)
    opts.repeats = opts.repeats or (3 if opts.quick else 9)
    torch.set_num_threads(opts.threads)
    names = [n for n in opts.only.split(",") if n] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    modes = ["glibc_default", "glibc_tuned"] if opts.allocator == "both" else [opts.allocator]
    records = []
    for mode in modes:
        if mode == "glibc_tuned" and not tune_glibc_malloc():
            print(json.dumps({"note": "glibc mallopt unavailable; skipped glibc_tuned"}), flush=True)
            continue
        opts.allocator = mode
        for name in names:
            for rec in BENCHMARKS[name](opts):
                records.append(rec)
                print(json.dumps(rec), flush=True)
    print(json.dumps(summary(records)), flush=True)


if __name__ == "__main__":
    main()
