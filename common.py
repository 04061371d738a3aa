"""Method-neutral building blocks shared by the four method scripts, evaluate.py and data_prep.py.

What lives here (and nothing a fork of one method would want to change):
  * the NTU RGB+D 25-joint topology: names, bones, body parts, flip order, graph adjacency and the
    normalised subsets of the CTR-GCN and ST-GCN backbones;
  * readers of the processed AGCN-style layout (SPEC section 3) with validation, and a batch loader
    that yields raw clips + num_frame (+ labels), seeded, rank-sharded, optionally GPU-resident;
  * batched, seeded augmentations on (N, C, T, V, M) tensors and the joint/bone/motion modalities;
  * a dataclass-to-argparse helper, seeding, distributed setup and gathers, atomic checkpoints,
    a JSONL metrics logger and small helpers.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import pickle
import random
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, get_args, get_origin, get_type_hints

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
class UserError(Exception):
    """A mistake of the user (bad flag, missing or malformed file): reported as one line, no traceback."""


def run_main(fn: Callable[[], Any]) -> None:
    """Run a script's main(); a UserError becomes `error: <message>` on stderr and exit code 2."""
    try:
        fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------------------------
# Dataclass -> argparse
# ----------------------------------------------------------------------------------------------
def arg(default: Any, help: str, **kw: Any) -> Any:
    """A documented dataclass field: `hidden: int = arg(1024, "width of the layers")`."""
    meta = {"help": help, **kw}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    if isinstance(default, tuple):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _scalar_type(tp: Any, default: Any = None) -> Any:
    """int | None -> int; list[float] -> float (element type); bare list -> type of the default's items."""
    if tp in (list, tuple):
        return type(default[0]) if default else str
    origin = get_origin(tp)
    if origin in (list, tuple):
        inner = [a for a in get_args(tp) if a is not Ellipsis]
        return inner[0] if inner else str
    if origin is not None:  # Optional / Union
        inner = [a for a in get_args(tp) if a is not type(None)]
        return _scalar_type(inner[0]) if inner else str
    return tp


def _is_list(tp: Any) -> bool:
    if tp in (list, tuple):
        return True
    origin = get_origin(tp)
    if origin in (list, tuple):
        return True
    if origin is not None:
        return any(_is_list(a) for a in get_args(tp) if a is not type(None))
    return False


def _optional_parser(kind: Any) -> Callable[[str], Any]:
    def parse(s: str) -> Any:
        return None if s.lower() in ("none", "null", "") else kind(s)
    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field; booleans get --key and --no_key."""
    p = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = _field_default(f)
        help_ = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        if tp is bool:
            g = p.add_mutually_exclusive_group()
            g.add_argument(f"--{f.name}", dest=f.name, action="store_true", default=default,
                           help=help_)
            g.add_argument(f"--no_{f.name}", dest=f.name, action="store_false",
                           default=argparse.SUPPRESS, help=f"turn --{f.name} off")
            continue
        kind = _scalar_type(tp, default)
        optional = type(None) in get_args(tp)
        conv = _optional_parser(kind) if optional else kind
        if _is_list(tp):
            p.add_argument(f"--{f.name}", type=conv, nargs="+", default=default, help=help_,
                           choices=choices)
        else:
            p.add_argument(f"--{f.name}", type=conv, default=default, help=help_, choices=choices)
    return p


def parse_args(cls: type, argv: list[str] | None = None, quick: dict | None = None,
               description: str | None = None) -> Any:
    """Parse the command line into the dataclass `cls`.

    `quick` holds the small quick-start config: when the dataset is a synthetic one it replaces every
    field the user did not pass explicitly, so `python usdrl.py --dataset synthetic` runs in minutes
    on a CPU while the dataclass defaults stay the paper's run.
    """
    doc = (cls.__doc__ or "").strip()
    if not description and doc and not doc.startswith(cls.__name__ + "("):
        description = doc  # the Args docstring, not the auto-generated signature
    parser = build_parser(cls, description)
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(argv)
    values = vars(ns)
    if quick and str(values.get("dataset", "")).startswith("synthetic"):
        given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
        given |= {g[3:] for g in given if g.startswith("no_")}
        applied = {k: v for k, v in quick.items() if k not in given}
        unknown = [k for k in quick if k not in values]
        if unknown:
            raise ValueError(f"quick config names unknown fields {unknown}")
        values.update(applied)
        if applied:
            print("synthetic quick-start config: " +
                  " ".join(f"--{k} {v}" for k, v in applied.items()), flush=True)
    return cls(**values)


def args_to_dict(args: Any) -> dict:
    """A plain, JSON- and weights_only-safe dict of a dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(args)))


def args_from_dict(cls: type, d: dict) -> Any:
    """Rebuild `cls` from a checkpoint's args dict, ignoring keys the class no longer has."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------------------------
# Seeding, devices, precision
# ----------------------------------------------------------------------------------------------
def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return dev


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(device: torch.device, name: str) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. "auto" = bf16 on CUDA, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name not in _DTYPES:
        raise UserError(f"--dtype {name!r}: expected auto, fp32, bf16 or fp16")
    return None if name == "fp32" else _DTYPES[name]


def autocast(device: torch.device, name: str):
    dt = amp_dtype(device, name)
    if dt is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dt)


def make_scaler(device: torch.device, name: str) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (bf16 needs none)."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(device, name) is torch.float16)


def step_lr(base_lr: float, epoch: int, milestones, gamma: float = 0.1) -> float:
    """Step schedule: the lr of `epoch` (0-based) after x`gamma` at each milestone reached."""
    return base_lr * gamma ** sum(epoch >= m for m in milestones)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


# ----------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool
    ddp: bool


def setup_distributed(device_name: str = "auto") -> Dist:
    """Single process, or the torchrun environment (NCCL on CUDA, gloo on CPU)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        dev = resolve_device(device_name)
        return Dist(0, 1, 0, dev, True, False)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device_name)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev, rank == 0, world > 1)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and returns this rank's slice,
    so a loss computed on the gathered global batch back-propagates exactly as in one process."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` of every rank on dim 0 (equal sizes); gradients reach the local part.

    DDP averages parameter gradients over ranks, so a loss on the gathered batch must be the same on
    every rank; the backward's all_reduce sum then makes each rank hold world_size x its share,
    which DDP's averaging divides back: the update equals the single-process one."""
    if _world() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    if _world() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


@torch.no_grad()
def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if _world() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers to every rank (identical initial weights)."""
    if _world() == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


# ----------------------------------------------------------------------------------------------
# Checkpoints and RNG state
# ----------------------------------------------------------------------------------------------
CKPT_VERSION = 1


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through `write(fileobj)` into a temp file beside `path`, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def save_json(obj: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"), mode="w")


def load_checkpoint(path: str | os.PathLike, method: str | None = None,
                    map_location: Any = "cpu") -> dict:
    """Load a checkpoint with weights_only=True; one clear UserError for every way it can be bad."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle with foreign objects, not a torch file...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable checkpoint (truncated or corrupt?): {reason}") \
            from None
    if not isinstance(ckpt, dict) or "method" not in ckpt or "args" not in ckpt:
        raise UserError(f"{path}: not a skeleton-ssl checkpoint (no 'method'/'args' entries)")
    if method is not None and ckpt["method"] != method:
        raise UserError(f"{path}: checkpoint of method {ckpt['method']!r}, expected {method!r}")
    return ckpt


def rng_state(*generators: torch.Generator) -> dict:
    """Python, numpy, torch (CPU and CUDA) and the given generators' states, weights_only-safe."""
    np_state = np.random.get_state()
    state = {
        "python": torch.tensor(list(pickle.dumps(random.getstate())), dtype=torch.uint8),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in generators],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, *generators: torch.Generator) -> None:
    random.setstate(pickle.loads(bytes(state["python"].tolist())))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)


# ----------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------
def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class RunLogger:
    """One printed line per call, mirrored to <out_dir>/log.txt and <out_dir>/metrics.jsonl (rank 0)."""

    def __init__(self, out_dir: str | os.PathLike, is_main: bool = True):
        self.dir = Path(out_dir)
        self.is_main = is_main
        if is_main:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _write(self, name: str, line: str) -> None:
        with open(self.dir / name, "a") as f:
            f.write(line + "\n")

    def info(self, msg: str) -> None:
        if not self.is_main:
            return
        _print(msg)
        self._write("log.txt", msg)

    def log(self, step: int, epoch: int | float, **metrics: Any) -> None:
        if not self.is_main:
            return
        metrics = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        line = f"epoch {_fmt(epoch)} step {step} " + " ".join(f"{k} {_fmt(v)}"
                                                               for k, v in metrics.items())
        _print(line)
        self._write("log.txt", line)
        self._write("metrics.jsonl", json.dumps({"step": step, "epoch": epoch, "time": time.time(),
                                                 **metrics}))


def _print(msg: str) -> None:
    """Print above an active tqdm bar when there is one."""
    try:
        from tqdm import tqdm
        tqdm.write(msg)
    except ImportError:
        print(msg, flush=True)


def append_jsonl(path: str | os.PathLike, obj: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


# ----------------------------------------------------------------------------------------------
# NTU RGB+D topology (25 joints). Joint numbers in names ending in _1B are 1-based (NTU numbering).
# ----------------------------------------------------------------------------------------------
NUM_JOINTS = 25
JOINT_NAMES = [
    "spine_base", "spine_mid", "neck", "head",
    "left_shoulder", "left_elbow", "left_wrist", "left_hand",
    "right_shoulder", "right_elbow", "right_wrist", "right_hand",
    "left_hip", "left_knee", "left_ankle", "left_foot",
    "right_hip", "right_knee", "right_ankle", "right_foot",
    "spine_shoulder", "left_hand_tip", "left_thumb", "right_hand_tip", "right_thumb",
]
# bone[v1-1] = x[v1-1] - x[v2-1]; joint 21 (spine shoulder) pairs with itself -> a zero bone.
BONE_PAIRS_1B = [(1, 2), (2, 21), (3, 21), (4, 3), (5, 21), (6, 5), (7, 6), (8, 7), (9, 21),
                 (10, 9), (11, 10), (12, 11), (13, 1), (14, 13), (15, 14), (16, 15), (17, 1),
                 (18, 17), (19, 18), (20, 19), (21, 21), (22, 23), (23, 8), (24, 25), (25, 12)]
# The 24 undirected edges of the skeleton graph, written (child, parent) as CTR-GCN's "inward" list.
EDGES_1B = [p for p in BONE_PAIRS_1B if p[0] != p[1]]
# SCD-Net's Flip: swap left/right arms, legs, and hand tip/thumb by re-indexing (no coordinate sign
# change, so it is a left/right label swap rather than a mirror; reproduced as the official code).
FLIP_ORDER = [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 16, 17, 18, 19, 12, 13, 14, 15, 20,
              23, 24, 21, 22]
# PCM3's five body parts (names as in its code, 0-based joints).
BODY_PARTS = {
    "trunk": [3, 2, 20, 1, 0],
    "left_hand": [8, 9, 10, 11, 23, 24],
    "right_hand": [4, 5, 6, 7, 21, 22],
    "left_leg": [16, 17, 18, 19],
    "right_leg": [12, 13, 14, 15],
}
SPINE_MID = 1  # the per-frame centre of the pre-normalisation


def adjacency() -> np.ndarray:
    """(25, 25) symmetric 0/1 adjacency of the skeleton graph, no self loops."""
    A = np.zeros((NUM_JOINTS, NUM_JOINTS), dtype=np.float32)
    for i, j in EDGES_1B:
        A[i - 1, j - 1] = A[j - 1, i - 1] = 1.0
    return A


def normalize_digraph(A: np.ndarray) -> np.ndarray:
    """A @ D^-1 with D the column sums (columns summing to 0 stay 0)."""
    col = A.sum(0)
    inv = np.where(col > 0, 1.0 / np.where(col > 0, col, 1.0), 0.0)
    return (A * inv[None, :]).astype(np.float32)


def ctrgcn_graph() -> np.ndarray:
    """(3, 25, 25) CTR-GCN subsets [I, norm(inward), norm(outward)]; edge (i, j) sets A[j, i]."""
    inward = np.zeros((NUM_JOINTS, NUM_JOINTS), dtype=np.float32)
    for i, j in EDGES_1B:
        inward[j - 1, i - 1] = 1.0
    return np.stack([np.eye(NUM_JOINTS, dtype=np.float32), normalize_digraph(inward),
                     normalize_digraph(inward.T.copy())])


def stgcn_spatial_graph(max_hop: int = 1, center: int = 20) -> np.ndarray:
    """(3, 25, 25) ST-GCN 'spatial' partition (root, closer, further), normalised A D^-1.

    Reproduces ST-GCN's algorithm, including its quirk: hop distances are only computed up to
    `max_hop`, so joints more than one hop from the centre (joint 21) are all at distance inf and
    every edge between two such joints lands in the "closer" subset in both directions
    (non-zeros 25 / 40 / 8 for NTU)."""
    V = NUM_JOINTS
    link = np.eye(V) + adjacency()
    hop = np.full((V, V), np.inf)
    reach = [np.linalg.matrix_power(link, d) for d in range(max_hop + 1)]
    for d in range(max_hop, -1, -1):
        hop[reach[d] > 0] = d
    adj = (hop <= max_hop).astype(np.float64)
    norm = normalize_digraph(adj).astype(np.float64)
    subsets = []
    for h in range(max_hop + 1):
        root, close, far = (np.zeros((V, V)) for _ in range(3))
        for i in range(V):
            for j in range(V):
                if hop[j, i] != h:
                    continue
                if hop[j, center] == hop[i, center]:
                    root[j, i] = norm[j, i]
                elif hop[j, center] > hop[i, center]:
                    close[j, i] = norm[j, i]
                else:
                    far[j, i] = norm[j, i]
        subsets += [root] if h == 0 else [root + close, far]
    return np.stack(subsets).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Datasets in the processed AGCN-style layout
# ----------------------------------------------------------------------------------------------
# name -> (folder under --data_dir, splits, number of classes)
DATASETS = {
    "ntu60": ("NTU-RGB-D-60-AGCN", ("xsub", "xview"), 60),
    "ntu120": ("NTU-RGB-D-120-AGCN", ("xsub", "xsetup"), 120),
    "pku1": ("PKU-MMD-v1", ("xsub",), 51),
    "pku2": ("PKU-MMD-v2", ("xsub", "xview"), 51),
    "synthetic": ("synthetic", ("xsub", "xview"), 20),
    "synthetic_ext": ("synthetic_ext", ("xsub", "xview"), 30),
}
SPLIT_ALIASES = {"xset": "xsetup"}


def canonical_split(dataset: str, split: str) -> str:
    if dataset not in DATASETS:
        raise UserError(f"--dataset {dataset!r}: unknown dataset (choose from "
                        f"{', '.join(DATASETS)})")
    split = SPLIT_ALIASES.get(split, split)
    if split not in DATASETS[dataset][1]:
        raise UserError(f"--split {split!r}: dataset {dataset} has splits "
                        f"{', '.join(DATASETS[dataset][1])}")
    return split


def split_dir(data_dir: str | os.PathLike, dataset: str, split: str) -> Path:
    split = canonical_split(dataset, split)
    folder = Path(data_dir) / DATASETS[dataset][0]
    if split == "xsetup" and not (folder / split).exists() and (folder / "xset").exists():
        return folder / "xset"  # PCM3 names the NTU-120 setup split "xset"
    return folder / split


@dataclasses.dataclass
class SkeletonSplit:
    data: np.ndarray        # (N, 3, T, 25, 2) float32, memory-mapped
    num_frame: np.ndarray   # (N,) int64 valid frames, clamped to [1, T]
    labels: np.ndarray      # (N,) int64, 0-based
    names: list
    num_classes: int
    path: Path

    def __len__(self) -> int:
        return len(self.labels)


def _frames_from_padding(data: np.ndarray) -> np.ndarray:
    """Valid length of each sample when num_frame.npy is missing: the last frame that is non-zero.

    (Data prepared with looped padding has no zero tail; then the whole T counts, which is what the
    feeders of the official repos would read as well.)"""
    n, _, t = data.shape[:3]
    out = np.empty(n, dtype=np.int64)
    for s in range(0, n, 256):
        chunk = np.asarray(data[s:s + 256])
        nz = np.abs(chunk).reshape(chunk.shape[0], 3, t, -1).sum(axis=(1, 3)) > 0  # (b, T)
        last = t - np.argmax(nz[:, ::-1], axis=1)
        out[s:s + 256] = np.where(nz.any(1), last, 1)
    return out


def _read_labels(d: Path, part: str) -> tuple[list, np.ndarray]:
    npy, pkl = d / f"{part}_label.npy", d / f"{part}_label.pkl"
    names: list = []
    if npy.exists():
        try:
            labels = np.load(npy, allow_pickle=False)
        except Exception as e:
            raise UserError(f"{npy}: unreadable label array ({e})") from None
        names_file = d / f"{part}_names.txt"
        if names_file.exists():
            names = names_file.read_text().split()
        elif pkl.exists():
            names = _read_pkl(pkl)[0]
    elif pkl.exists():
        names, labels = _read_pkl(pkl)
    else:
        raise UserError(f"{d}: missing {part}_label.npy / {part}_label.pkl")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.all(np.isfinite(labels.astype(np.float64))):
        raise UserError(f"{d}/{part}_label: expected a 1-D array of class indices")
    # PKU gendata stores labels as floats (np.loadtxt); cast to int.
    return list(names), labels.astype(np.int64)


def _read_pkl(path: Path) -> tuple[list, list]:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
        names, labels = obj[0], obj[1]
    except Exception as e:
        raise UserError(f"{path}: expected a pickled (names, labels) pair ({e})") from None
    return list(names), list(labels)


def check_finite(data: np.ndarray, path: Path | str, chunk: int = 512) -> None:
    """Scan a (memory-mapped) array chunk-wise for NaN/inf."""
    for s in range(0, data.shape[0], chunk):
        block = np.asarray(data[s:s + chunk])
        if not np.isfinite(block).all():
            ok = np.isfinite(block.reshape(block.shape[0], -1)).all(1)
            bad = s + int(np.argmin(ok))
            raise UserError(f"{path}: NaN or inf values (first in sample {bad})")


def load_split(data_dir: str | os.PathLike, dataset: str, split: str, part: str = "train",
               check: bool = True) -> SkeletonSplit:
    """Open `<data_dir>/<FOLDER>/<split>/{part}_*` (memory-mapped) and validate it."""
    if part not in ("train", "val"):
        raise ValueError(part)
    d = split_dir(data_dir, dataset, split)
    if dataset.startswith("synthetic") and not (d / f"{part}_data_joint.npy").exists():
        import data_prep  # generating the built-in dataset on first use keeps the quick start one command
        print(f"{d} is missing: generating the built-in {dataset} dataset in {data_dir}", flush=True)
        data_prep.prepare_synthetic(data_dir, dataset)
    f = d / f"{part}_data_joint.npy"
    if not f.exists():
        raise UserError(f"{f}: not found (prepare the data with data_prep.py or point --data_dir "
                        f"at the folder holding {DATASETS[dataset][0]}/)")
    try:
        data = np.load(f, mmap_mode="r")
    except Exception as e:
        raise UserError(f"{f}: not a readable .npy array ({e})") from None
    if data.ndim != 5 or data.shape[1] != 3 or data.shape[3] != NUM_JOINTS or data.shape[4] != 2:
        raise UserError(f"{f}: expected shape (N, 3, T, 25, 2), found {tuple(data.shape)}")
    if data.shape[0] == 0:
        raise UserError(f"{f}: the {part} split is empty")
    if data.dtype != np.float32:
        raise UserError(f"{f}: expected float32 data, found {data.dtype}")
    names, labels = _read_labels(d, part)
    if len(labels) != data.shape[0]:
        raise UserError(f"{d}: {part} has {data.shape[0]} samples but {len(labels)} labels")
    num_classes = DATASETS[dataset][2]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"{d}/{part}_label: labels must lie in [0, {num_classes}), found "
                        f"[{labels.min()}, {labels.max()}]")
    nf_file = d / f"{part}_num_frame.npy"
    if nf_file.exists():
        num_frame = np.load(nf_file).astype(np.int64).reshape(-1)
        if len(num_frame) != data.shape[0]:
            raise UserError(f"{nf_file}: {len(num_frame)} entries for {data.shape[0]} samples")
    else:
        num_frame = _frames_from_padding(data)
    # PKU clips can be longer than the stored 300 frames: always clamp.
    num_frame = np.clip(num_frame, 1, data.shape[2])
    if check:
        check_finite(data, f)
    return SkeletonSplit(data, num_frame, labels, names, num_classes, d)


class BatchLoader:
    """Yields (x, num_frame, labels) batches of raw clips on `device`.

    `batch_size` is the GLOBAL batch: every rank draws the same seeded permutation (a function of
    (seed, epoch) only) and takes its contiguous slice of each global batch, so the ranks' batches
    concatenated in rank order equal the single-process batch. Only the first max(num_frame) frames
    of a batch are read (the crops never look further). With `on_device` the whole split is copied
    to the device once (optionally stored as float16) and batches are gathered there.
    """

    def __init__(self, split: SkeletonSplit, batch_size: int, *, shuffle: bool = True,
                 drop_last: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", on_device: bool = False,
                 storage_dtype: torch.dtype = torch.float32, with_labels: bool = True,
                 max_frames: int | None = None, num_workers: int = 0,
                 indices: np.ndarray | None = None):
        if batch_size % world_size:
            raise UserError(f"--batch_size {batch_size} must be divisible by the number of "
                            f"processes ({world_size})")
        self.split, self.batch_size, self.shuffle, self.drop_last = split, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world = seed, rank, world_size
        self.device = torch.device(device)
        self.with_labels, self.max_frames, self.num_workers = with_labels, max_frames, num_workers
        self.indices = np.arange(len(split)) if indices is None else np.asarray(indices)
        if len(self.indices) == 0:
            raise UserError(f"{split.path}: no samples to load")
        if drop_last and len(self.indices) < batch_size:
            raise UserError(f"{split.path}: {len(self.indices)} samples, fewer than one batch of "
                            f"--batch_size {batch_size}")
        self.epoch = 0
        self.num_frame = torch.from_numpy(split.num_frame)
        self.labels = torch.from_numpy(split.labels)
        self.resident = None
        if on_device:
            t = max_frames or int(split.num_frame.max())
            self.resident = torch.empty((len(split),) + (3, t) + tuple(split.data.shape[3:]),
                                        dtype=storage_dtype, device=self.device)
            for s in range(0, len(split), 1024):
                block = torch.from_numpy(np.ascontiguousarray(split.data[s:s + 1024, :, :t]))
                self.resident[s:s + 1024] = block.to(self.device, storage_dtype)
            self.res_num_frame = self.num_frame.to(self.device)
            self.res_labels = self.labels.to(self.device)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return self.indices
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return self.indices[torch.randperm(len(self.indices), generator=g).numpy()]

    def _rank_slice(self, idx: np.ndarray) -> np.ndarray:
        per = math.ceil(len(idx) / self.world)
        return idx[self.rank * per:(self.rank + 1) * per]

    def _fetch(self, idx: np.ndarray):
        if self.resident is not None:
            i = torch.from_numpy(idx).to(self.device)
            nf = self.res_num_frame[i]
            t = int(nf.max()) if self.max_frames is None else self.max_frames
            x = self.resident[i, :, :t].float()
            return x, nf, self.res_labels[i]
        nf = self.num_frame[idx]
        t = min(int(nf.max()) if self.max_frames is None else self.max_frames,
                self.split.data.shape[2])
        order = np.argsort(idx)  # sorted reads are much faster on a memory map
        block = np.empty((len(idx), 3, t) + tuple(self.split.data.shape[3:]), dtype=np.float32)
        block[order] = self.split.data[idx[order], :, :t]
        x = torch.from_numpy(block)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        return x, nf.to(self.device), self.labels[idx].to(self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = self._order()
        batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches = batches[:-1]
        parts = [self._rank_slice(b) for b in batches]
        if self.num_workers > 0 and self.resident is None:
            yield from _prefetch(self._fetch, parts, self.num_workers)
        else:
            for p in parts:
                yield self._fetch(p)


def _prefetch(fetch: Callable, parts: list, workers: int) -> Iterator:
    """Read the next `workers` batches in background threads (numpy releases the GIL on copies)."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(fetch, p) for p in parts[:workers]]
        for i in range(len(parts)):
            result = futures[i].result()
            if i + workers < len(parts):
                futures.append(pool.submit(fetch, parts[i + workers]))
            yield result


# TEMP (merge in progress): the augmentation section is developed in augment_part.py.
if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), "augment_part.py")):
    from augment_part import *  # noqa: E402,F401,F403
