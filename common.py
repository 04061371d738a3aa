"""Method-neutral building blocks shared by the four method scripts, evaluate.py and data_prep.py.

What lives here (and nothing a fork of one method would want to change):
  * the NTU RGB+D 25-joint topology: names, bones, body parts, flip order, graph adjacency and the
    normalised subsets of the CTR-GCN and ST-GCN backbones;
  * readers of the processed AGCN-style layout with validation, and a batch loader
    that yields raw clips + num_frame (+ labels), seeded, rank-sharded, optionally GPU-resident;
  * batched, seeded augmentations on (N, C, T, V, M) tensors and the joint/bone/motion modalities;
  * a dataclass-to-argparse helper, seeding, distributed setup and gathers, atomic checkpoints,
    a JSONL metrics logger and small helpers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import random
import sys
import tempfile
import time
from contextlib import nullcontext
from functools import lru_cache
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


def check_positive(args: Any, names: tuple[str, ...]) -> None:
    """UserError naming the first of the integer flags `names` that is below 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)}: must be positive")


def check_crop_scale(args: Any) -> None:
    """--crop_scale must be two ratios 0 < lo <= hi <= 1 (the temporal crop's range)."""
    lo, hi = (list(args.crop_scale) + [0, 0])[:2]
    if len(args.crop_scale) != 2 or not 0 < lo <= hi <= 1:
        raise UserError(f"--crop_scale {args.crop_scale}: expected two ratios 0 < lo <= hi <= 1")


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


def _show(v: Any) -> str:
    """A value as it is typed on the command line: lists space-separated, bools as yes/no."""
    if isinstance(v, (list, tuple)):
        return " ".join(map(str, v))
    return str(v)


def build_parser(cls: type, description: str | None = None,
                 quick: dict | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field; booleans get --key and --no_key.
    --help shows each default once and, where `quick` changes a field, its quick value."""
    epilog = None
    if quick:
        epilog = ("the quick config (--quick; automatic on synthetic* datasets) sets every flag "
                  "not given: " + " ".join(f"--{k} {_show(v)}" for k, v in quick.items()))
    p = argparse.ArgumentParser(description=description, allow_abbrev=False, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = _field_default(f)
        help_ = f.metadata.get("help", "")
        choices = f.metadata.get("choices")
        shown = "" if default in (None, "", []) or tp is bool and not default else \
            f" (default: {'on' if default is True else _show(default)})"
        if quick and f.name in quick:
            shown += f" (quick: {_show(quick[f.name])})"
        if tp is bool:
            g = p.add_mutually_exclusive_group()
            g.add_argument(f"--{f.name}", dest=f.name, action="store_true", default=default,
                           help=help_ + shown)
            g.add_argument(f"--no_{f.name}", dest=f.name, action="store_false",
                           default=argparse.SUPPRESS, help=f"turn --{f.name} off")
            continue
        kind = _scalar_type(tp, default)
        optional = type(None) in get_args(tp)
        conv = _optional_parser(kind) if optional else kind
        metavar = "{" + ",".join(map(str, choices)) + "}" if choices else f.name.upper()
        if _is_list(tp):
            p.add_argument(f"--{f.name}", type=conv, nargs="+", default=default, help=help_ + shown,
                           choices=choices, metavar=metavar)
        else:
            p.add_argument(f"--{f.name}", type=conv, default=default, help=help_ + shown,
                           choices=choices, metavar=metavar)
    return p


def parse_args(cls: type, argv: list[str] | None = None, quick: dict | None = None,
               description: str | None = None) -> Any:
    """Parse the command line into the dataclass `cls`.

    `quick` holds the small quick-start config: with --quick, or when the dataset is a synthetic
    one, it replaces every field the user did not pass explicitly, so `python usdrl.py --dataset
    synthetic` runs in minutes on a CPU while the dataclass defaults stay the paper's run.
    """
    doc = (cls.__doc__ or "").strip()
    if not description and doc and not doc.startswith(cls.__name__ + "("):
        description = doc  # the Args docstring, not the auto-generated signature
    parser = build_parser(cls, description, quick)
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(argv)
    values = vars(ns)
    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    given |= {g[3:] for g in given if g.startswith("no_")}
    splits = DATASETS.get(values.get("dataset"), (None, ()))[1]
    if "split" not in given and splits and values.get("split") and values["split"] not in splits:
        values["split"] = splits[0]  # e.g. bandai: xstyle, where the default xsub does not exist
    if quick and (values.get("quick") or str(values.get("dataset", "")).startswith("synthetic")):
        applied = {k: v for k, v in quick.items() if k not in given}
        unknown = [k for k in quick if k not in values]
        if unknown:
            raise ValueError(f"quick config names unknown fields {unknown}")
        values.update(applied)
        if "quick" in values:
            values["quick"] = True
        if applied:
            # stderr: scripts such as evaluate.py keep stdout for their JSON result lines
            print("quick config: " + " ".join(f"--{k} {_show(v)}" for k, v in applied.items()),
                  file=sys.stderr, flush=True)
    return cls(**values)


def to_flags(args: Any, quick: dict | None = None) -> str:
    """The flags that rebuild `args` through parse_args: every field that differs from its default,
    and, when the quick config is on, every field it names (parse_args would re-apply it)."""
    import shlex
    keep = set(quick or ()) if getattr(args, "quick", False) else set()
    out = []
    for f in dataclasses.fields(args):
        v = getattr(args, f.name)
        default = _field_default(f)
        if f.name not in keep and (v == default or isinstance(v, tuple) and list(v) == default):
            continue
        if isinstance(v, bool):
            out.append(f"--{f.name}" if v else f"--no_{f.name}")
        elif isinstance(v, (list, tuple)):
            out.append(f"--{f.name} " + " ".join(shlex.quote(str(x)) for x in v))
        else:
            out.append(f"--{f.name} {shlex.quote(str(v))}")
    return " ".join(out)


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
    """The autocast dtype, or None for plain fp32. fp16 is a CUDA recipe (autocast + GradScaler):
    on CPU it runs fp32. "auto" (checkpoints before version 2) = bf16 on CUDA, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name not in _DTYPES:
        raise UserError(f"--dtype {name!r}: expected fp32, bf16 or fp16")
    if name == "fp16" and device.type != "cuda":
        return None
    return None if name == "fp32" else _DTYPES[name]


def autocast(device: torch.device, name: str):
    dt = amp_dtype(device, name)
    if dt is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dt)


def make_scaler(device: torch.device, name: str) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (bf16 needs none)."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(device, name) is torch.float16)


def load_scaler(scaler: torch.amp.GradScaler, state: dict) -> None:
    """Restore a GradScaler. A run without fp16 saves a disabled scaler's empty state; an fp16 run
    resumed from it starts a fresh scaler (torch would raise on the empty dict)."""
    if state:
        scaler.load_state_dict(state)


def step_lr(base_lr: float, epoch: int, milestones, gamma: float = 0.1) -> float:
    """Step schedule: the lr of `epoch` (0-based) after x`gamma` at each milestone reached."""
    return base_lr * gamma ** sum(epoch >= m for m in milestones)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's lr to lr times the group's optional "lr_mult" (default 1)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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
    _stats_group()  # created by every rank at the same point, before any training collective
    return Dist(rank, world, local, dev, rank == 0, world > 1)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _STATS_GROUP.clear()


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


_STATS_GROUP: list = []


def _stats_group():
    """A process group of its own for batch-statistics all-reduces: gloo must see collectives in the
    same order on every rank, and DDP reduces its gradient buckets on the default group while the
    backward of these sums is still running. Created at the first use, which every rank reaches at
    the same point of the same forward."""
    if not _STATS_GROUP:
        _STATS_GROUP.append(dist.new_group())
    return _STATS_GROUP[0]


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the incoming gradients too (every rank's loss depends on
    every rank's input through the sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, group=_stats_group())
        return x

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        g = g.contiguous().clone()
        dist.all_reduce(g, group=_stats_group())
        return g


@torch.compiler.disable  # a collective inside a custom Function: keep it out of compiled graphs
def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(x) if _world() > 1 else x


class _GlobalBN:
    """BatchNorm whose training statistics cover the GLOBAL batch under torchrun, on any backend
    (nn.SyncBatchNorm is CUDA-only, so it cannot run the gloo equivalence tests on CPU).

    With it an N-process run normalises exactly as one process with the global batch. Outside a
    multi-process group (and in eval mode) it is plain BatchNorm; state-dict keys are nn.BatchNorm's.
    Ranks must hold equal local batches (BatchLoader guarantees it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _world() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        n = x.numel() // x.shape[1] * _world()
        # two passes (mean, then squared deviations) with float64 sums, as ATen's CPU kernel
        # accumulates: E[x^2] - E[x]^2 in float32 cancels when the mean dominates the spread
        f64 = torch.float64
        mean = (all_reduce_sum_with_grad(xf.sum(dims, dtype=f64)) / n).to(xf.dtype)
        xc = xf - mean.view(shape)
        var = (all_reduce_sum_with_grad((xc * xc).sum(dims, dtype=f64)) / n).to(xf.dtype)
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_((var.detach() * n / max(n - 1, 1)).to(self.running_var.dtype),
                                   self.momentum)
        y = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


class GlobalBatchNorm1d(_GlobalBN, nn.BatchNorm1d):
    pass


class GlobalBatchNorm2d(_GlobalBN, nn.BatchNorm2d):
    pass


# ----------------------------------------------------------------------------------------------
# Checkpoints and RNG state
# ----------------------------------------------------------------------------------------------
CKPT_VERSION = 2
# Flags renamed in checkpoint version 2 so that one concept has one name in all four scripts.
RENAMED_ARGS = {
    "usdrl": {"sim_weight": "w_sim", "vac_weight": "w_vac", "xcorr_weight": "w_xcorr",
              "domain_weight": "w_domain", "std_weight": "w_std", "offdiag_weight": "w_offdiag"},
    "scd_net": {"num_person": "bodies", "moco_m": "key_momentum"},
    "pcm3pp": {"momentum": "key_momentum", "sgd_momentum": "momentum", "rec_weight": "w_rec"},
    "mcc": {"tau": "temperature"},
}


def checkpoint_args(ckpt: dict) -> dict:
    """The checkpoint's args dict under today's flag names (version 1 used older names)."""
    args = dict(ckpt["args"])
    if ckpt.get("version", 1) < 2:
        renames = RENAMED_ARGS.get(ckpt.get("method"), {})
        args = {renames.get(k, k): v for k, v in args.items()}
    return args


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through `write(fileobj)` into a temp file beside `path`, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would make checkpoints private to the owner
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_state(module: nn.Module, state: dict, path: str | os.PathLike,
               what: str = "the model of these flags") -> None:
    """module.load_state_dict(state); a mismatch is one error line naming the first offending key
    (torch's message starts with a generic header line)."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or ["mismatch"]
        raise UserError(f"{path}: does not match {what} ({lines[min(1, len(lines) - 1)][:200]})"
                        ) from None


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
        "python": _python_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in generators],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_rng_state() -> dict:
    """random.getstate() as plain numbers (no pickle: a checkpoint must not be able to run code)."""
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss}


def set_rng_state(state: dict, *generators: torch.Generator) -> None:
    """Restore rng_state() (from a checkpoint loaded to any device: every state is a CPU
    ByteTensor again before use). Generator states of another device type (a GPU run resumed on
    CPU or back) are skipped: every script re-seeds its generators at each epoch start."""
    py = state["python"]
    if isinstance(py, dict):  # checkpoints before this format stored pickled bytes: not restored
        random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():  # as many devices as both runs have
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)
    for g, s in zip(generators, state["generators"]):
        if s.numel() == g.get_state().numel():
            g.set_state(s.cpu())


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


RUN_FILES = ("last.pt", "stage1.pt", "args.json", "log.txt", "metrics.jsonl")


class Run:
    """The output folder of one training run and everything written into it (rank 0 writes).

    Construct it after the inputs were checked: it refuses a folder that holds a last.pt unless
    --resume or --overwrite is given, then creates the folder. It keeps a progress bar over steps,
    logs the global mean of the loss terms every --log_every steps and at each epoch end, and
    writes atomic checkpoints that record the training script's file name."""

    def __init__(self, args: Any, method: str, script: str, d: "Dist", quick: dict | None = None):
        self.args, self.method, self.script, self.d = args, method, Path(script).name, d
        self.dir = Path(args.out_dir or f"out/{method}_{args.dataset}_{args.split}")
        self.ckpt_path = self.dir / "last.pt"
        if args.resume and not self.ckpt_path.is_file():
            raise UserError(f"--resume: {self.ckpt_path} not found")
        if not args.resume and self.ckpt_path.exists() and not args.overwrite:
            raise UserError(f"{self.dir}: holds a run (last.pt); add --resume to continue it, "
                            f"--overwrite to start it again, or choose another --out_dir")
        if d.ddp:
            dist.barrier()  # every rank has checked the folder before rank 0 cleans it
        if d.is_main and args.overwrite and not args.resume:
            for name in RUN_FILES:
                (self.dir / name).unlink(missing_ok=True)
        self.logger = RunLogger(self.dir, d.is_main)
        self.info(f"config: python {self.script} {to_flags(args, quick)}")
        self.bar = None

    def info(self, msg: str) -> None:
        self.logger.info(msg)

    def resume(self, model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               *generators: torch.Generator) -> dict:
        """Restore model, optimizer, scaler and RNG states from last.pt; the metrics rows written
        after it was saved are dropped (they will be written again) and a marker row is added."""
        ck = load_checkpoint(self.ckpt_path, self.method)
        load_state(model, ck["model"], self.ckpt_path)
        opt.load_state_dict(ck["optimizer"])
        load_scaler(scaler, ck["scaler"])
        set_rng_state(ck["rng"], *generators)
        if self.d.is_main:
            path = self.dir / "metrics.jsonl"
            rows = path.read_text().splitlines() if path.exists() else []
            kept = [r for r in rows if json.loads(r).get("step", 0) <= ck["step"]]
            atomic_write(path, lambda f: f.write("".join(r + "\n" for r in kept)), mode="w")
            append_jsonl(path, {"event": "resume", "step": ck["step"], "epoch": ck["epoch"],
                                "time": time.time()})
        self.info(f"resumed from {self.ckpt_path} at epoch {ck['epoch']} (step {ck['step']})")
        return ck

    def start(self, total_steps: int, step: int) -> None:
        """args.json (after a resume was checked) and the progress bar over all steps of the run;
        the rate and ETA count from here."""
        from tqdm import tqdm
        if self.d.is_main:
            save_json(args_to_dict(self.args), self.dir / "args.json")
        self.total, self.t0, self.step0 = total_steps, time.time(), step
        self.t_log, self.step_log = self.t0, step
        self.bar = tqdm(total=total_steps, initial=step, desc=self.method, unit="step",
                        disable=not self.d.is_main, dynamic_ncols=True)

    def step(self, step: int, epoch: float, terms: dict, lr: float) -> None:
        """One finished step: terms = detached scalar loss tensors ("loss" first). Every
        --log_every steps: their mean over all processes, samples/s and ETA as one row."""
        self.bar.update(1)
        if step % self.args.log_every:
            return
        vals = dict(zip(terms, all_reduce_mean(torch.stack([v.float() for v in terms.values()]))
                        .tolist()))
        if not all(math.isfinite(v) for v in vals.values()):
            raise UserError(f"non-finite loss at step {step} ({_fmt_terms(vals)}): lower --lr or "
                            f"use --dtype fp32")
        now = time.time()
        rate = self.args.batch_size * (step - self.step_log) / max(now - self.t_log, 1e-9)
        eta = (now - self.t0) / max(step - self.step0, 1) * (self.total - step)
        self.logger.log(step, round(epoch, 3), **vals, lr=lr, samples_per_s=round(rate, 1),
                        eta=format_eta(eta))
        self.bar.set_postfix(loss=f"{vals[next(iter(vals))]:.4g}")
        self.t_log, self.step_log = now, step

    def end_epoch(self, step: int, epoch: int, sums: dict, n: int, lr: float) -> dict:
        """The epoch's mean loss terms over all processes, logged as epoch_* columns."""
        means = (all_reduce_mean(torch.stack([v.float() for v in sums.values()])) / max(n, 1))
        metrics = {**dict(zip(sums, means.tolist())), "lr": lr}
        self.logger.log(step, epoch + 1, **{f"epoch_{k}": v for k, v in metrics.items()})
        return metrics

    def save(self, model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             epoch: int, step: int, metrics: dict, generators: tuple = (),
             name: str = "last.pt") -> None:
        """An atomic checkpoint (rank 0): the unwrapped module's state, optimizer, scaler, RNG."""
        if not self.d.is_main:
            return
        save_checkpoint({
            "method": self.method, "script": self.script, "args": args_to_dict(self.args),
            "encoder": model.encoder.state_dict(), "model": model.state_dict(),
            "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
            "step": step, "rng": rng_state(*generators), "dataset": self.args.dataset,
            "split": self.args.split, "metrics": metrics, "version": CKPT_VERSION},
            self.dir / name)

    def done(self) -> None:
        """Close the bar and print the command that evaluates this checkpoint."""
        if self.bar is not None:
            self.bar.close()
        script = "" if self.script in METHOD_SCRIPTS else f" --script {self.script}"
        self.info(f"done: {self.ckpt_path}\nnext: python evaluate.py --ckpt {self.ckpt_path}"
                  f"{script} --task linear knn")


METHOD_SCRIPTS = ("usdrl.py", "scd_net.py", "pcm3pp.py", "mcc.py")


def _fmt_terms(vals: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in vals.items())


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """The seed of one epoch's random draws, a function of (seed, epoch, stream) only, so a run
    resumed at an epoch boundary draws what an uninterrupted one does. stream: the rank for
    per-rank draws, -1 for draws that every rank shares. Values lie in [0, 2**62): adding 2**62
    gives a second, disjoint stream (the scripts seed dropout with it)."""
    return ((seed * 1_000_003 + epoch) * 1_009 + stream + 1) % 2**62


def load_train_split(args: Any, d: "Dist", z_align: bool, who: str) -> "SkeletonSplit":
    """The training split (rank 0 first generates the built-in synthetic set when it is missing),
    refused when prepared differently from `who`'s official run (check_data_prep)."""
    args.split = canonical_split(args.dataset, args.split)
    check_data_prep(args.data_dir, args.dataset, args.split, z_align, args.allow_data_mismatch,
                    who)
    if d.ddp and not d.is_main:
        dist.barrier()
    split = load_split(args.data_dir, args.dataset, args.split, "train")
    if d.ddp and d.is_main:
        dist.barrier()
    return split


def wrap(model: nn.Module, d: "Dist", compile: bool) -> nn.Module:
    """DDP under torchrun, then torch.compile if asked. Buffers are not broadcast: queues and the
    global-batch BatchNorm statistics are equal on every rank by construction."""
    net = model
    if d.ddp:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
            broadcast_buffers=False)
    return torch.compile(net) if compile else net


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
    # BVH mocap: Bandai-Namco-Research-Motiondataset-2 (xstyle: unseen styles, xtake: unseen takes)
    "bandai": ("Bandai-Namco-2", ("xstyle", "xtake"), 10),
    # any labelled BVH clips (data_prep.py --dataset bvh --labels CSV): up to 100 classes
    "bvh": ("BVH", ("custom",), 100),
}
SPLIT_ALIASES = {"xset": "xsetup"}


def canonical_split(dataset: str, split: str) -> str:
    if dataset not in DATASETS:
        raise UserError(f"--dataset {dataset!r}: unknown dataset (choose from "
                        f"{', '.join(DATASETS)})")
    if SPLIT_ALIASES.get(split, split) not in DATASETS[dataset][1]:  # the message names what was typed
        raise UserError(f"--split {split!r}: dataset {dataset} has splits "
                        f"{', '.join(DATASETS[dataset][1])}")
    return SPLIT_ALIASES.get(split, split)


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
    try:
        labels = np.asarray(labels).astype(np.float64)
        names = list(names)
    except (TypeError, ValueError) as e:
        raise UserError(f"{d}/{part}_label: expected names and numeric class indices ({e})"
                        ) from None
    if labels.ndim != 1 or not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
        raise UserError(f"{d}/{part}_label: expected a 1-D array of integer class indices")
    # PKU gendata stores labels as floats (np.loadtxt); cast to int.
    return names, labels.astype(np.int64)


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
    if dataset.startswith("synthetic") and not d.parent.exists():
        import data_prep  # generating the built-in dataset on first use keeps the quick start one command
        # stderr: evaluate.py keeps stdout for its JSON lines; only folders that do not exist yet are
        # written (temp folder + rename), an existing one is never replaced
        print(f"{d.parent} is missing: generating the built-in {dataset} dataset in {data_dir}",
              file=sys.stderr, flush=True)
        data_prep.prepare_synthetic(data_dir, dataset, quiet=True, keep_existing=True)
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
        try:
            num_frame = np.load(nf_file).astype(np.int64).reshape(-1)
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"{nf_file}: unreadable frame counts ({e})") from None
        if len(num_frame) != data.shape[0]:
            raise UserError(f"{nf_file}: {len(num_frame)} entries for {data.shape[0]} samples")
    else:
        num_frame = _frames_from_padding(data)
    # PKU clips can be longer than the stored 300 frames: always clamp.
    num_frame = np.clip(num_frame, 1, data.shape[2])
    if check:
        check_finite(data, f)
    return SkeletonSplit(data, num_frame, labels, names, num_classes, d)


def check_data_prep(data_dir: str | os.PathLike, dataset: str, split: str, z_align: bool,
                    allow: bool, who: str) -> None:
    """Refuse data prepared differently from what `who` was trained on in its official run
    (z-aligned or not, recorded by data_prep.py in <dataset folder>/prep_info.json)."""
    if dataset.startswith("synthetic"):  # the built-in set has no official run to match
        return
    folder = split_dir(data_dir, dataset, split).parent
    if not folder.is_dir():  # missing data: load_split names the file in its one error line
        return
    try:
        recorded = bool(json.loads((folder / "prep_info.json").read_text())["z_align"])
    except (OSError, ValueError, KeyError, TypeError):
        print(f"warning: {folder} has no readable prep_info.json (prepared elsewhere): cannot check "
              f"that it is {'' if z_align else 'not '}z-aligned as {who} expects", file=sys.stderr)
        return
    if recorded != z_align and not allow:
        flag = "" if z_align else " --no_z_align"
        raise UserError(f"{folder}: prepared {'with' if recorded else 'without'} z-alignment, but "
                        f"{who} expects {'' if z_align else 'no '}z-alignment; prepare it with "
                        f"`python data_prep.py --dataset {dataset}{flag}` or pass "
                        f"--allow_data_mismatch")


class BatchLoader:
    """Yields (x, num_frame, labels) batches of raw clips on `device`.

    `batch_size` is the GLOBAL batch: every rank draws the same seeded permutation (a function of
    (seed, epoch) only) and takes its contiguous slice of each global batch, so the ranks' batches
    concatenated in rank order equal the single-process batch. Only the first max(num_frame) frames
    of a batch are read (the crops never look further). With `on_device` the whole split is copied
    to the device once (optionally stored as float16) and batches are gathered there.
    Pre-training loops pass `with_labels=False`: the third item of each batch is then None, or,
    with `with_index=True`, the rows' int64 sample indices into the split (MCC keeps them with its
    queued keys so that a query never meets a key of its own sequence).
    """

    def __init__(self, split: SkeletonSplit, batch_size: int, *, shuffle: bool = True,
                 drop_last: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", on_device: bool = False,
                 storage_dtype: torch.dtype = torch.float32, with_labels: bool = True,
                 max_frames: int | None = None, num_workers: int = 0,
                 indices: np.ndarray | None = None, with_index: bool = False):
        if batch_size % world_size:
            raise UserError(f"--batch_size {batch_size} must be divisible by the number of "
                            f"processes ({world_size})")
        self.split, self.batch_size, self.shuffle, self.drop_last = split, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world = seed, rank, world_size
        self.device = torch.device(device)
        self.with_labels, self.max_frames, self.num_workers = with_labels, max_frames, num_workers
        if with_labels and with_index:
            raise ValueError("BatchLoader: with_labels and with_index both claim the third item")
        self.with_index = with_index
        if world_size > 1 and not drop_last:  # a short last batch cannot be split into equal parts
            raise ValueError("BatchLoader: drop_last=False needs a single process")
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
            t = min(max_frames or int(split.num_frame.max()), split.data.shape[2])
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
            return x, nf, self.res_labels[i] if self.with_labels else i if self.with_index else None
        nf = self.num_frame[idx]
        t = min(int(nf.max()) if self.max_frames is None else self.max_frames,
                self.split.data.shape[2])
        order = np.argsort(idx)  # sorted reads are much faster on a memory map
        block = np.empty((len(idx), 3, t) + tuple(self.split.data.shape[3:]), dtype=np.float32)
        block[order] = self.split.data[idx[order], :, :t]
        x = torch.from_numpy(block)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        third = (self.labels[idx].to(self.device) if self.with_labels
                 else torch.from_numpy(idx).to(self.device) if self.with_index else None)
        return x, nf.to(self.device), third

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


# ----------------------------------------------------------------------------------------------
# Batched augmentations and modalities
# ----------------------------------------------------------------------------------------------
# Every function works on a batch x of shape (N, C=3, T, V=25, M=2) on whatever device x lives on,
# draws its random numbers from the torch.Generator `g` (which must live on x's device, so a seed
# reproduces the views on that device), and has no per-sample Python loop. Each reproduces the
# distribution of the per-sample numpy version of the official repos (feeder/augmentations.py and
# feeder/tools.py in USDRL, PCM3 and SCD-Net). "Draws:" in a docstring lists the generator calls in
# order, so a test can replay them.


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
def _apply_mask(g: torch.Generator, N: int, p: float, device):
    """Per-sample "apply this augmentation" flags, probability p (official: `random.random() < p`);
    None when p >= 1 (always applied). Callers fold the flags into their parameters (identity matrix,
    empty mask) instead of blending two full batches.  Draws: rand(N) (only when p < 1)."""
    if p >= 1.0:
        return None
    return torch.rand(N, generator=g, device=device) < p


def _random_subset(g: torch.Generator, rows: int, n: int, k: int, device) -> torch.Tensor:
    """(rows, n) bool with exactly k True per row, each k-subset equally likely (the batched form
    of np.random.choice(n, k, replace=False) / random.sample).  Draws: rand(rows, n)."""
    order = torch.rand(rows, n, generator=g, device=device).argsort(dim=1)
    return torch.zeros(rows, n, dtype=torch.bool, device=device).scatter_(1, order[:, :k], True)


def _eye(N: int, device) -> torch.Tensor:
    return torch.eye(3, device=device).expand(N, 3, 3)


def _linear_map(x: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
    """Per-sample 3x3 map on the coordinate axis: out[n, :, t, v, m] = mat[n] @ x[n, :, t, v, m].

    x (N, 3, T, V, M), mat (N, 3, 3) -> (N, 3, T, V, M). (flatten, not reshape(N, 3, -1), so that
    an empty batch works too.)"""
    return torch.bmm(mat.to(x.dtype), x.flatten(2)).view(x.shape)


def _block_size(N: int, device: torch.device) -> int:
    """Samples processed together. On CPU, blocks of 32 samples (about 1 MB of output at 64 frames)
    keep a block in cache across the gather and the three multiply-adds of _per_joint_map /
    crop_corrupt_or_shear; on an accelerator the whole batch is one block."""
    return 32 if device.type == "cpu" else max(N, 1)


def _joint_mats(a_sel: torch.Tensor, a_other: torch.Tensor, sel: torch.Tensor, M: int,
                dtype: torch.dtype) -> torch.Tensor:
    """Per-(sample, joint, body) 3x3 matrices of _per_joint_map: (N, 3, 3, 1, V*M) [n, c, k, 0, vm]
    = (a_sel[n] if sel[n, v] else a_other[n])[c, k], ready to broadcast over frames."""
    sel_vm = sel.repeat_interleave(M, dim=1) if M > 1 else sel                  # (N, V*M)
    return torch.where(sel_vm[:, None, None, None, :], a_sel.to(dtype)[..., None, None],
                       a_other.to(dtype)[..., None, None])


def _map_block(o: torch.Tensor, x: torch.Tensor, mats: torch.Tensor) -> None:
    """o (n, 3, T, V*M) = per-joint 3x3 map of x (n, 3, T, V*M) with mats (n, 3, 3, 1, V*M): three
    broadcast multiply-adds (contiguous V*M inner loops), o written in place."""
    torch.mul(x[:, None, 0], mats[:, :, 0], out=o)
    o.addcmul_(x[:, None, 1], mats[:, :, 1])
    o.addcmul_(x[:, None, 2], mats[:, :, 2])


def _per_joint_map(x: torch.Tensor, a_sel: torch.Tensor, a_other: torch.Tensor,
                   sel: torch.Tensor) -> torch.Tensor:
    """out[n, :, t, v, m] = (a_sel[n] if sel[n, v] else a_other[n]) @ x[n, :, t, v, m].

    x (N, 3, T, V, M), a_sel / a_other (N, 3, 3), sel (N, V) bool -> (N, 3, T, V, M). Three
    broadcast multiply-adds over a (N, 3, T, V*M) layout (contiguous V*M inner loops), in blocks of
    samples that stay in cache across the three."""
    N, _, T, V, M = x.shape
    mats = _joint_mats(a_sel, a_other, sel, M, x.dtype)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    res, xf = out.view(N, 3, T, V * M), x.reshape(N, 3, T, V * M)
    step = _block_size(N, x.device)
    for s in range(0, N, step):
        _map_block(res[s:s + step], xf[s:s + step], mats[s:s + step])
    return res.view(N, 3, T, V, M)


def _check_batch(x: torch.Tensor, name: str) -> None:
    if x.dim() != 5 or x.shape[1] != 3:
        raise ValueError(f"{name}: expected a (N, 3, T, V, M) batch, got shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------------------------
# Temporal crop / resize (official feeder/augmentations.py: temporal_cropresize, crop_subsequence)
# ----------------------------------------------------------------------------------------------
def _resample_plan(start: torch.Tensor, length: torch.Tensor, out_len: int, C: int, T: int,
                   sample: torch.Tensor, n_in: int,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and weights of _resample's fused gather, for output clip i read from input clip
    sample[i] of an (n_in, C, T, ...) batch viewed as (n_in*C*T, V*M) rows: rows (B, C*out_len, 2)
    (int32 when the row numbers fit: half the index traffic), weights (B, C*out_len, 2) of `dtype`,
    B = len(start) (see _resample for the rule)."""
    dev = start.device
    it = torch.int32 if n_in * C * T < 2 ** 31 else torch.int64
    scale = length.to(torch.float32) / out_len                                  # (B,)
    dst = torch.arange(out_len, device=dev, dtype=torch.float32) + 0.5          # (out_len,)
    src = (scale[:, None] * dst - 0.5).clamp_(min=0.0)                          # (B, out_len)
    last = (length - 1).to(it)[:, None]
    i0 = torch.minimum(src.floor().to(it), last)                                # (B, out_len)
    w1 = (src - i0).clamp_(0.0, 1.0)                                            # i0 promoted to float32
    pair = torch.stack([i0, i0 + (i0 < last).to(it)], dim=-1)                   # (B, out_len, 2)
    # One contiguous V*M row per (clip, coord, frame); index and weight tensors are built per clip
    # and broadcast over C in a single op each.
    base = ((sample[:, None] * C + torch.arange(C, device=dev)) * T + start[:, None]).to(it)  # (B, C)
    B = len(start)
    rows = (base[:, :, None, None] + pair[:, None]).view(B, C * out_len, 2)
    weights = torch.stack([1.0 - w1, w1], dim=-1).to(dtype)[:, None].expand(B, C, out_len, 2)
    return rows, weights.reshape(B, C * out_len, 2)


def _frame_rows(x: torch.Tensor) -> torch.Tensor:
    """x (N, C, T, V, M) as the (N*C*T, V*M) table _gather_frames reads (a view when contiguous)."""
    return x.reshape(-1, x.shape[3] * x.shape[4])


def _gather_frames(table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """embedding_bag sums the two weighted V*M rows of every output frame: table (N*C*T, V*M) from
    _frame_rows, rows / weights (B, C*L, 2) from _resample_plan -> (B*C*L, V*M)."""
    return F.embedding_bag(rows.view(-1, 2), table, mode="sum",
                           per_sample_weights=weights.reshape(-1, 2))


def _resample(x: torch.Tensor, start: torch.Tensor, length: torch.Tensor, out_len: int) -> torch.Tensor:
    """Per-sample linear resampling of frames [start, start+length) to out_len frames.

    x (N, C, T, V, M); start, length (N,) int64 on x's device -> (N, C, out_len, V, M).
    Reproduces F.interpolate(mode='bilinear', align_corners=False) on a (1, C*V*M, length, 1) tensor,
    the official call: the source indices and weights are computed as PyTorch's CPU kernel does
    (float32 scale = length/out_len, half-pixel source index clamped at 0, lower index capped at
    length-1, upper index = lower+1 unless at the end, w0 = 1 - w1). For power-of-two out_len
    (64, 32, 16) they are bit-identical to it; otherwise PyTorch's fused multiply-add for the
    source index can differ in its last bit (values then differ by up to ~1e-4 on unit-scale
    clips). The values w0*x0 + w1*x1 agree up to the rounding of the final multiply-add (<= 2 ulp).
    Frames at or after start+length are never read."""
    N, C, T = x.shape[:3]
    rows, weights = _resample_plan(start, length, out_len, C, T,
                                   torch.arange(N, device=x.device), N, x.dtype)
    return _gather_frames(_frame_rows(x), rows, weights).view(N, C, out_len, *x.shape[3:])


def _crop_window(num_frame: torch.Tensor, T: int, g: torch.Generator, scale, min_len: int):
    """Random crop (start, length) per sample, the official `temporal_cropresize` rule:
    s ~ U(scale[0], scale[1]); length = min(max(floor(n*s), min_len), n);
    start ~ randint[0, n-length] inclusive.  num_frame is clamped to [1, T].

    Draws: rand(N) float64 (scale), rand(N) float64 (start)."""
    dev = num_frame.device
    n = num_frame.long().clamp(1, T)
    N = n.shape[0]
    u_scale = torch.rand(N, generator=g, device=dev, dtype=torch.float64)
    u_start = torch.rand(N, generator=g, device=dev, dtype=torch.float64)
    s = u_scale * (scale[1] - scale[0]) + scale[0]               # numpy: rand(1)*(l1-l0)+l0 (float64)
    length = torch.minimum((n.double() * s).floor().long().clamp(min=min_len), n)
    room = n - length + 1                                        # randint(0, n-length+1) choices
    start = torch.minimum((u_start * room.double()).floor().long(), room - 1)
    return start, length


def crop_resize(x: torch.Tensor, num_frame: torch.Tensor, g: torch.Generator, out_len: int = 64,
                scale=(0.1, 1.0), min_len: int = 64) -> torch.Tensor:
    """Random temporal crop + linear resize (official `temporal_cropresize`, all three repos).

    x (N, C, T, V, M) raw clips, num_frame (N,) valid frames (clamped to [1, T]) ->
    (N, C, out_len, V, M).  Draws: see _crop_window."""
    start, length = _crop_window(num_frame.to(x.device), x.shape[2], g, scale, min_len)
    return _resample(x, start, length, out_len)


def center_crop_resize(x: torch.Tensor, num_frame: torch.Tensor, ratio: float = 1.0,
                       out_len: int = 64) -> torch.Tensor:
    """Deterministic evaluation crop (official `crop_subsequence`'s centre branch):
    start = int((1-ratio)*n/2), frames [start, n-start) resized to out_len.

    x (N, C, T, V, M), num_frame (N,) -> (N, C, out_len, V, M)."""
    n = num_frame.to(x.device).long().clamp(1, x.shape[2])
    start = ((1.0 - ratio) * n.double() / 2).floor().long()          # python int() of a float >= 0
    length = (n - 2 * start).clamp(min=1)
    return _resample(x, start, length, out_len)


def resize_time(x: torch.Tensor, out_len: int) -> torch.Tensor:
    """Linear (align_corners=False) resample of the whole clip: (N, C, T, V, M) -> (N, C, out_len, V, M)."""
    N, T = x.shape[0], x.shape[2]
    start = torch.zeros(N, dtype=torch.long, device=x.device)
    return _resample(x, start, torch.full_like(start, T), out_len)


# ----------------------------------------------------------------------------------------------
# Spatial transforms (official feeder/tools.py shear, augmentations.py joint_courruption)
# ----------------------------------------------------------------------------------------------
def _shear_matrices(g: torch.Generator, N: int, amp: float, device) -> torch.Tensor:
    """(N, 3, 3) S = [[1,a,b],[c,1,d],[e,f,1]], a..f ~ U(-amp, amp).  Draws: rand(N, 6) (a..f)."""
    off = torch.rand(N, 6, generator=g, device=device) * (2 * amp) - amp
    one = torch.ones(N, 1, device=device)
    return torch.cat([one, off[:, :3], one, off[:, 3:], one], dim=1).view(N, 3, 3)  # row-major a..f


def shear(x: torch.Tensor, g: torch.Generator, amp: float = 1.0, p: float = 1.0) -> torch.Tensor:
    """Official `pose_augmentation`: p_new = S @ p (np.dot(S, x.reshape(3, -1))) for every joint,
    frame and body, S per sample (see _shear_matrices), applied with probability p per sample.

    x (N, 3, T, V, M) -> same.  Draws: rand(N, 6), then rand(N) if p < 1."""
    _check_batch(x, "shear")
    if p <= 0:
        return x
    N = x.shape[0]
    S = _shear_matrices(g, N, amp, x.device)
    apply = _apply_mask(g, N, p, x.device)
    if apply is not None:
        S = torch.where(apply[:, None, None], S, _eye(N, x.device))
    return _linear_map(x, S)


@lru_cache(maxsize=None)
def _bone_parent(device: torch.device) -> torch.Tensor:
    """(V,) int64 on a device: per joint v1-1 the joint v2-1 of BONE_PAIRS_1B (cached)."""
    idx = [0] * NUM_JOINTS
    for v1, v2 in BONE_PAIRS_1B:
        idx[v1 - 1] = v2 - 1
    return torch.tensor(idx, dtype=torch.long, device=device)


def _corruption_params(g: torch.Generator, N: int, V: int, n_joints: int, device):
    """Official `joint_courruption` parameters: (a_sel (N, 3, 3), joints (N, V) bool). With
    probability 0.5 (`random.random() < 0.5`) a_sel = 0 (zero the joints), else a_sel = R^T with all
    entries of R ~ U(-1, 1), since the official row-vector product p @ R equals R^T p.
    Draws: rand(N) (branch), rand(N, V) (joints), rand(N, 3, 3) (R)."""
    zero_branch = torch.rand(N, generator=g, device=device) < 0.5
    joints = _random_subset(g, N, V, n_joints, device)
    R = torch.rand(N, 3, 3, generator=g, device=device) * 2 - 1
    a_sel = torch.where(zero_branch[:, None, None], torch.zeros((), device=device), R.transpose(1, 2))
    return a_sel, joints


def joint_corruption(x: torch.Tensor, g: torch.Generator, n_joints: int = 15, p: float = 1.0) -> torch.Tensor:
    """Official `joint_courruption` (USDRL/PCM3 feeder/augmentations.py): per sample, with probability 0.5
    zero n_joints joints drawn without replacement, otherwise multiply the coordinates of n_joints
    such joints by a 3x3 matrix R with all entries U(-1, 1) (row vector: p_new = p @ R). The same
    joints for every frame and both bodies. Probability p per sample.

    x (N, 3, T, V, M) -> same.  Draws: _corruption_params, then rand(N) if p < 1."""
    _check_batch(x, "joint_corruption")
    if p <= 0:
        return x
    N, V, dev = x.shape[0], x.shape[3], x.device
    a_sel, joints = _corruption_params(g, N, V, n_joints, dev)
    apply = _apply_mask(g, N, p, dev)
    if apply is not None:
        joints = joints & apply[:, None]
    return _per_joint_map(x, a_sel, _eye(N, dev), joints)


def corrupt_or_shear(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """USDRL/PCM3 view rule (official `joint_courruption` or `pose_augmentation`, p 0.5 each): per
    sample, with probability 0.5 joint_corruption, otherwise shear; both become one per-(sample,
    joint) 3x3 map M (zero matrix on zeroed joints, R^T on mixed ones, S on every joint of a sheared
    sample, identity elsewhere), applied to the whole batch at once by _per_joint_map.

    x (N, 3, T, V, M) -> same.  Draws: rand(N) (branch), _corruption_params, rand(N, 6) (shear)."""
    _check_batch(x, "corrupt_or_shear")
    return _per_joint_map(x, *_corrupt_or_shear_params(g, x.shape[0], x.shape[3], x.device))


def _corrupt_or_shear_params(g: torch.Generator, N: int, V: int, device):
    """(a_sel, a_other (N, 3, 3), joints (N, V) bool) of corrupt_or_shear, in its draw order."""
    use_corruption = (torch.rand(N, generator=g, device=device) < 0.5)[:, None, None]
    a_sel, joints = _corruption_params(g, N, V, 15, device)
    S = _shear_matrices(g, N, 1.0, device)
    return (torch.where(use_corruption, a_sel, S),
            torch.where(use_corruption, torch.eye(3, device=device), S), joints)


def crop_corrupt_or_shear(x: torch.Tensor, num_frame: torch.Tensor, g: torch.Generator,
                          out_len: int = 64, scale=(0.1, 1.0), min_len: int = 64,
                          views: int = 1) -> torch.Tensor:
    """`views` independent views corrupt_or_shear(crop_resize(x, ...)), view-major, with the draws
    of those calls in the same order (view 0's crop and corrupt/shear draws, then view 1's...) and
    bit-identical values. The gather indices and joint matrices of all views are built at once;
    then, per block of clips, each view is resampled and mapped while in cache: no batch-sized
    intermediate (on an accelerator the whole batch is one block).

    x (N, 3, T, V, M), num_frame (N,) -> (views*N, 3, out_len, V, M)."""
    _check_batch(x, "crop_corrupt_or_shear")
    if views < 1:
        raise ValueError(f"crop_corrupt_or_shear: views must be >= 1, got {views}")
    N, T, V, M, dev = x.shape[0], x.shape[2], x.shape[3], x.shape[4], x.device
    nf = num_frame.to(dev)
    draws = []
    for _ in range(views):
        draws.append((*_crop_window(nf, T, g, scale, min_len),
                      *_corrupt_or_shear_params(g, N, V, dev)))
    start, length, a_sel, a_other, joints = (torch.cat(d) for d in zip(*draws))
    sample = torch.arange(N, device=dev).repeat(views)                          # (views*N,)
    rows, weights = _resample_plan(start, length, out_len, 3, T, sample, N, x.dtype)
    mats = _joint_mats(a_sel, a_other, joints, M, x.dtype)                      # (views*N, 3, 3, 1, V*M)
    B = views * N
    out = x.new_empty(B, 3, out_len, V, M)
    res, table = out.view(B, 3, out_len, V * M), _frame_rows(x)  # table: one copy at most
    step = _block_size(N, dev)
    for s in range(0, N, step):      # blocks of clips, every view of a block in turn: the views
        for k in range(views):       # re-read the same raw clips, still in cache
            b = slice(k * N + s, k * N + min(s + step, N))
            frames = _gather_frames(table, rows[b], weights[b]).view(-1, 3, out_len, V * M)
            _map_block(res[b], frames, mats[b])
    return out


# ----------------------------------------------------------------------------------------------
# Modalities (joint, bone = joint minus its parent, motion = next frame minus this one)
# ----------------------------------------------------------------------------------------------
MODALITIES = ("joint", "bone", "motion")


def to_modality(x: torch.Tensor, modality: str) -> torch.Tensor:
    """joint: x itself; bone: bone[:, :, :, v1-1] = x[..., v1-1, :] - x[..., v2-1, :] over BONE_PAIRS_1B
    (joint 21 -> 0); motion: x[:, :, t+1] - x[:, :, t], last frame 0. (N, C, T, V, M) -> same."""
    if modality == "joint":
        return x
    if modality == "bone":
        return x - x[:, :, :, _bone_parent(x.device)]
    if modality == "motion":
        return F.pad(x[:, :, 1:] - x[:, :, :-1], (0, 0, 0, 0, 0, 1))
    raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
