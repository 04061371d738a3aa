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
The last line ({"what": "summary", ...}) repeats every speedup of the run, per benchmark and
allocator, next to the target, so the result of the comparison reads off one line.
"""
import argparse
import ctypes
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
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


BENCHMARKS = {"usdrl_views": bench_usdrl_views}
SPEEDUP_TARGET = 10.0   # issue 2: batched views >= 10x the per-sample numpy pipeline on CPU


def summary(records):
    """One closing record: per benchmark and allocator, the wall and CPU-time speedups of the
    lines that carry one, and whether they reach SPEEDUP_TARGET."""
    ratios = {}
    for rec in records:
        if "speedup_vs_numpy_per_sample" not in rec:
            continue
        entry = {"wall": rec["speedup_vs_numpy_per_sample"]}
        if "cpu_time_speedup_vs_numpy_per_sample" in rec:
            entry["cpu_time"] = rec["cpu_time_speedup_vs_numpy_per_sample"]
        met = all(v >= SPEEDUP_TARGET for v in entry.values())
        ratios.setdefault(rec["what"], {})[rec["config"]["allocator"]] = {
            **entry, "meets_target": met, "device": rec["device"]}
    return {"what": "summary", "speedup_vs_numpy_per_sample": ratios, "target": SPEEDUP_TARGET,
            "load_avg_1min": round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats (well under a minute on CPU)")
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
