"""Prepare skeleton datasets in the processed AGCN-style layout.

Built-in synthetic data (no download; what the quick starts, the tests and CI use):
    python data_prep.py --dataset synthetic          # 20 classes -> data/synthetic/{xsub,xview}
    python data_prep.py --dataset synthetic_ext      # 30 classes (21-30 novel, for few-shot)
    python data_prep.py --dataset synthetic --size tiny --raw   # + raw files in data/synthetic_raw/
Every synthetic call also writes the untrimmed PKU-MMD-like detection set
data/synthetic_untrimmed/xsub/.

Real data:
    python data_prep.py --dataset ntu60 --raw_dir NTU/nturgb+d_skeletons
    python data_prep.py --dataset ntu120 --raw_dir NTU/nturgb+d_skeletons NTU/<S018-S032 folder>
    python data_prep.py --dataset pku1 --raw_dir PKU-MMD     # PKU_Skeleton_Renew/,
                                          # Train_Label_PKU_final/, cross-subject.txt
    python data_prep.py --dataset pku2 --raw_dir PKU-MMD-v2  # skeleton/, label/, cross-*.txt
    python data_prep.py --dataset ntu60 --from_npz NTU60_CS.npz   # CTR-GCN / SGN arrays
Motion capture in BVH (no request form):
    python data_prep.py --dataset bandai --raw_dir Bandai-Namco-Research-Motiondataset
                                          # the cloned repository -> Bandai-Namco-2/{xstyle,xtake}
    python data_prep.py --dataset bvh --raw_dir DIR --labels clips.csv [--joint_map FILE
                        --bvh_scale 0.01]     # any BVH: lines 'file,label,split' -> BVH/custom
--no_z_align gives the UmURL/USDRL variant of the pre-normalisation; --skip_bad skips (and lists in
<output>/skipped.txt) malformed inputs instead of stopping at the first one.

Output per benchmark folder: {train,val}_data_joint.npy (N, 3, T, 25, 2) float32,
{train,val}_label.npy (int64, 0-based), {train,val}_label.pkl ((names, labels) for the other
repos) and {train,val}_num_frame.npy. T = 300 for real data (the reference gendata); T = T_SYNTH =
150 for synthetic data, whose clips are at most 120 frames (half the disk). Every output folder is
built in a temporary folder next to the target and renamed into place, so an interrupted or
concurrent run never leaves a half-written folder; a re-run with the same inputs does nothing.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import shutil
import sys
import time
import uuid
import warnings
import zipfile
from pathlib import Path

import numpy as np

from common import DATASETS, UserError, arg, parse_args, run_main


@dataclasses.dataclass
class Args:
    """Prepare NTU RGB+D 60/120, PKU-MMD I/II, BVH motion capture (Bandai-Namco dataset-2 or any
    labelled clips) or the built-in synthetic data (processed layout)."""
    dataset: str = arg("synthetic", "dataset to prepare", choices=[
        "synthetic", "synthetic_ext", "ntu60", "ntu120", "pku1", "pku2", "bandai", "bvh"])
    data_dir: str = arg("data", "output root; the training scripts read the same --data_dir")
    size: str = arg("default", "synthetic only: 'tiny' (tests, 240 clips) or 'default' (2400 "
                               "clips; 3600 for synthetic_ext)", choices=["tiny", "default"])
    seed: int = arg(0, "synthetic only: generator seed (the output is a function of it)")
    raw: bool = arg(False, "synthetic only: also write NTU .skeleton and PKU-MMD txt files to "
                           "<data_dir>/<dataset>_raw/ (inputs for testing the real parsers)")
    z_align: bool = arg(True, "rotate the spine of body 0 at frame 0 onto +z (2s-AGCN, SCD-Net, "
                              "PCM3); --no_z_align gives the UmURL/USDRL variant")
    raw_dir: list = arg([], "real data: the raw folder(s); NTU-120 takes both skeleton folders")
    from_npz: str = arg("", "convert a CTR-GCN/SGN NTU60_CS.npz-style file (x_train (N,T,150), "
                            "one-hot y_train, x_test, y_test) instead of parsing raw files")
    split: str = arg("", "--from_npz only: its benchmark split (default: from the file name, "
                         "*_CS/_CSub -> xsub, *_CV -> xview, *_CSet -> xsetup)")
    labels: str = arg("", "--dataset bvh: CSV with lines 'file,label,split' (file relative to "
                          "--raw_dir, any class name, split train or test)")
    joint_map: str = arg("auto", "BVH joint names -> NTU joints: a preset (bandai, cmu), 'auto' "
                                 "(the preset matching the first file) or a FILE of lines "
                                 "'ntu_joint bvh_joint'")
    bvh_scale: float = arg(0.0, "metres per BVH file unit (0: the preset's, bandai cm 0.01, cmu "
                                "0.0254/0.45); required with a --joint_map FILE")
    skip_bad: bool = arg(False, "skip malformed raw files and list them in <output>/skipped.txt "
                                "instead of stopping with an error")
    workers: int = arg(2, "parallel worker processes for parsing raw NTU / BVH files")
    force: bool = arg(False, "rebuild outputs that already exist")


T_REAL = 300    # frames stored for real data (2s-AGCN gendata)
T_SYNTH = 150   # frames stored for synthetic data (clips are 40..120 frames long)
MAX_BODY_KINECT = 4
MAX_BODY = 2
PKU_LABELS = 51  # raw PKU-MMD I/II label IDs run 1..51 (the datasets' Actions.xlsx)
NTU60_TRAIN_SUBJECTS = (1, 2, 4, 5, 8, 9, 13, 14, 15, 16, 17, 18, 19, 25, 27, 28, 31, 34, 35, 38)
NTU120_TRAIN_SUBJECTS = NTU60_TRAIN_SUBJECTS + (
    45, 46, 47, 49, 50, 52, 53, 54, 55, 56, 57, 58, 59, 70, 74, 78, 80, 81, 82, 83, 84, 85, 86, 89,
    91, 92, 93, 94, 95, 97, 98, 100, 103)
NTU_XVIEW_TRAIN_CAMERAS = (2, 3)


# ----------------------------------------------------------------------------------------------
# 2s-AGCN gendata: body selection and pre-normalisation (2s-AGCN data_gen/ntu_gendata.py, preprocess.py)
# ----------------------------------------------------------------------------------------------
def select_bodies(bodies: np.ndarray, max_body: int = MAX_BODY) -> np.ndarray:
    """(B<=4, T, 25, 3) float32 slots (slot = position in the frame's body list, not bodyID) ->
    (max_body, T, 25, 3): the `max_body` bodies of highest energy, most active first.

    Energy = std(x) + std(y) + std(z) over the body's non-zero frames (all joints pooled), as
    read_xyz/get_nonzero_std of the reference; computed in float64 from the float32 coordinates."""
    energy = np.zeros(len(bodies))
    for m, b in enumerate(bodies):
        b = b[b.sum(-1).sum(-1) != 0].astype(np.float64)
        if len(b):
            energy[m] = b[..., 0].std() + b[..., 1].std() + b[..., 2].std()
    order = energy.argsort()[::-1][:max_body]
    out = np.zeros((max_body,) + bodies.shape[1:], dtype=np.float32)
    out[:len(order)] = bodies[order]
    return out


def _rotation_to(v: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N, 3) vectors -> (N, 3, 3) rotations about axis v x target by the angle between them
    (Euler-Rodrigues, as rotation.py of 2s-AGCN); identity when the axis or the angle is < 1e-6."""
    v = v.astype(np.float64)
    axis = np.cross(v, target)
    norm_v = np.linalg.norm(v, axis=1)
    cos = np.clip((v @ target) / np.maximum(norm_v, 1e-30), -1.0, 1.0)
    theta = np.where(norm_v > 0, np.arccos(cos), 0.0)
    an = np.linalg.norm(axis, axis=1)
    k = axis / np.maximum(an, 1e-30)[:, None]
    c, s = np.cos(theta), np.sin(theta)
    K = np.zeros((len(v), 3, 3))
    K[:, 0, 1], K[:, 0, 2], K[:, 1, 2] = -k[:, 2], k[:, 1], -k[:, 0]
    K = K - K.transpose(0, 2, 1)
    R = np.eye(3) + s[:, None, None] * K + (1 - c)[:, None, None] * (K @ K)
    ident = (np.abs(axis).sum(1) < 1e-6) | (np.abs(theta) < 1e-6)
    R[ident] = np.eye(3)
    return R


def pre_normalization(s: np.ndarray, z_align: bool = True) -> np.ndarray:
    """In place on (N, M, T, V, C) float32; returns s. The four steps of the reference, vectorised:
    1. per body with data: if frame 0 is empty, move the non-empty frames to the front; then fill
       everything after the last non-empty frame by looping frames [0, last] (frames beyond
       num_frame are a loop, not zeros);
    2. subtract joint 1 (spine mid) of body 0 per frame, keep exact zeros where a joint was absent;
    3. (z_align) rotate so spine base -> spine mid of body 0 at frame 0 is +z;
    4. rotate so left shoulder -> right shoulder (joint 4 -> 8) of body 0 at frame 0 is +x.
    'Empty' uses the reference's signed sums (frame.sum() == 0)."""
    N, M, T, V, C = s.shape
    if N == 0:
        return s
    empty_sample = s.reshape(N, -1).sum(1) == 0
    frame_nz = s.sum(axis=(3, 4)) != 0                                  # (N, M, T)
    has = s.reshape(N, M, -1).sum(2) != 0                               # (N, M)
    t_idx = np.arange(T)
    # 1a. compaction when frame 0 is empty (stable: keeps the order of the non-empty frames)
    compact = has & ~frame_nz[:, :, 0]
    if compact.any():
        n_i, m_i = np.nonzero(compact)
        order = np.argsort(~frame_nz[n_i, m_i], axis=1, kind="stable")   # non-empty frames first
        moved = s[n_i, m_i][np.arange(len(n_i))[:, None], order]
        keep = np.take_along_axis(frame_nz[n_i, m_i], order, axis=1)
        s[n_i, m_i] = moved * keep[..., None, None]
        frame_nz[n_i, m_i] = keep
    # 1b. loop-pad after the last non-empty frame
    last = T - np.argmax(frame_nz[:, :, ::-1], axis=2)                  # (N, M) = i_f
    pad = has & (last < T)
    if pad.any():
        n_i, m_i = np.nonzero(pad)
        src = t_idx[None, :] % last[n_i, m_i][:, None]                  # frame t <- t mod i_f
        s[n_i, m_i] = s[n_i, m_i][np.arange(len(n_i))[:, None], src]
    # 2. centre on spine mid of body 0, per frame
    center = s[:, 0, :, 1:2, :].copy()                                  # (N, T, 1, C)
    mask = (s.sum(-1) != 0)[..., None]                                  # (N, M, T, V, 1)
    body = has[:, :, None, None, None]
    s[:] = np.where(body, (s - center[:, None]) * mask, s).astype(np.float32)
    # 3./4. rotations computed from body 0, frame 0, applied to every frame of every body
    # (head joint, tail joint, target axis): spine base -> spine mid onto +z, then
    # left shoulder -> right shoulder onto +x
    steps = [(1, 0, np.array([0.0, 0.0, 1.0]))] if z_align else []
    steps.append((8, 4, np.array([1.0, 0.0, 0.0])))
    for head, tail, target in steps:
        R = _rotation_to(s[:, 0, 0, head] - s[:, 0, 0, tail], target)
        R[empty_sample] = np.eye(3)
        s[:] = np.einsum("nij,nmtvj->nmtvi", R, s.astype(np.float64)).astype(np.float32)
    return s


# ----------------------------------------------------------------------------------------------
# Raw formats: NTU .skeleton (protocols 8.1) and PKU-MMD txt (protocols 8.4)
# ----------------------------------------------------------------------------------------------
def _bad(path, line: int | None, msg: str) -> UserError:
    return UserError(f"{path}:{line}: {msg}" if line else f"{path}: {msg}")


def _read_text(path: Path) -> list[str]:
    try:
        with open(path, "r", encoding="ascii") as f:
            return f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise _bad(path, None, f"unreadable ({e.__class__.__name__}: {e})") from None


def _progress(it, total: int, desc: str, quiet: bool):
    """A tqdm bar over `it` (or a bare bar to update by hand when it is None); None when quiet."""
    if quiet:
        return it
    from tqdm import tqdm
    return tqdm(it, total=total, desc=desc, unit="file" if desc != "clips" else "clip",
                dynamic_ncols=True)


def _numbers(path, lines: list[str], per_line: int, lineno=lambda i: i + 1,
             finite: int | None = None) -> np.ndarray:
    """Parse `lines`, each holding `per_line` numbers -> (len, per_line) float64; the first `finite`
    columns (all when None) must be finite, the others may be nan/inf (the reference's float()
    accepts them). Fast path: one C-level parse of the joined block; otherwise a line-by-line parse
    that names the offending line (`lineno(i)` is the 1-based file line of lines[i])."""
    # A "nan" after every line marks its end: a line one value short next to one a value long
    # keeps the total count right but moves a marker off the last column.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            vals = np.fromstring(" nan\n".join(lines) + " nan", sep=" ")
        except (ValueError, DeprecationWarning):
            vals = None
    if vals is not None and vals.size == (per_line + 1) * len(lines):
        vals = vals.reshape(len(lines), per_line + 1)
        if np.isnan(vals[:, -1]).all() and np.isfinite(vals[:, :-1]).all():
            return vals[:, :-1]
    n_finite = per_line if finite is None else finite
    rows = []
    for i, line in enumerate(lines):
        tok = line.split()
        if len(tok) != per_line:
            raise _bad(path, lineno(i), f"expected {per_line} values, found {len(tok)}")
        row = []
        for c, t in enumerate(tok):
            try:
                x = float(t)
            except ValueError:
                raise _bad(path, lineno(i), f"non-numeric value {t!r}") from None
            if c < n_finite and not math.isfinite(x):
                raise _bad(path, lineno(i), f"non-finite value {t!r}")
            row.append(x)
        rows.append(row)
    return np.array(rows, dtype=np.float64).reshape(len(lines), per_line)


def _count(path, lines: list[str], i: int, what: str) -> int:
    if i >= len(lines):
        raise _bad(path, len(lines), f"file is truncated (expected {what})")
    try:
        n = int(lines[i].strip())
    except ValueError:
        raise _bad(path, i + 1, f"expected {what}, found {lines[i].strip()[:40]!r}") from None
    if n < 0:
        raise _bad(path, i + 1, f"negative {what} {n}")
    return n


def read_ntu_skeleton(path, max_body: int = MAX_BODY_KINECT) -> np.ndarray:
    """NTU RGB+D .skeleton -> (max_body, T, 25, 3) float32 xyz; a body's slot is its position in
    the frame's list (the reference behaviour), bodies beyond `max_body` are read and dropped.
    The structure (frame / body / joint counts) is scanned first, then all joint lines are parsed
    in one go."""
    lines = _read_text(Path(path))
    n_frames = _count(path, lines, 0, "the frame count")
    info, starts, slots = [], [], []
    i = 1
    for f in range(n_frames):
        n_body = _count(path, lines, i, f"the body count of frame {f + 1}")
        i += 1
        for m in range(n_body):
            if i >= len(lines):
                raise _bad(path, len(lines), f"file is truncated (frame {f + 1} of {n_frames})")
            n_joint = _count(path, lines, i + 1, "the joint count")
            if n_joint != 25:
                raise _bad(path, i + 2, f"expected 25 joints, found {n_joint}")
            if i + 2 + n_joint > len(lines):
                raise _bad(path, len(lines), f"file is truncated (frame {f + 1} of {n_frames})")
            info.append(i)
            starts.append(i + 2)
            slots.append((m, f))
            i += 2 + n_joint
    if any(line.strip() for line in lines[i:]):
        raise _bad(path, i + 1, f"unexpected content after the last of {n_frames} frames")
    data = np.zeros((max_body, n_frames, 25, 3), dtype=np.float32)
    if not starts:
        return data
    # Only x, y, z (the first 3 of a joint line's 12 values) are used and must be finite; the
    # body-info line and the depth/colour/orientation columns only have to parse.
    _numbers(path, [lines[k] for k in info], 10, lambda j: info[j] + 1, finite=0)
    joint_lines = [line for s in starts for line in lines[s:s + 25]]
    vals = _numbers(path, joint_lines, 12, lambda j: starts[j // 25] + j % 25 + 1, finite=3)
    m, f = np.array(slots).T
    keep = m < max_body
    data[m[keep], f[keep]] = vals.reshape(-1, 25, 12)[keep, :, :3]
    return data


def write_ntu_skeleton(path, bodies: np.ndarray, present: np.ndarray, info: np.ndarray,
                       extra: np.ndarray) -> None:
    """Write (B, T, 25, 3) float32 xyz (frames where `present[b, t]` is False omit body b) with
    per-body info lines info (B, 10) and per-joint extras (B, T, 25, 9) = depthX, depthY, colorX,
    colorY, orientation W X Y Z, trackingState. xyz use '%.9g': it round-trips float32 exactly."""
    B, T = present.shape
    joint_fmt = ("%.9g %.9g %.9g %.2f %.2f %.2f %.2f %.4f %.4f %.4f %.4f %d\n") * 25
    rows = np.concatenate([bodies.astype(np.float64), extra.astype(np.float64)], axis=-1)
    out = [f"{T}\n"]
    for t in range(T):
        ms = np.nonzero(present[:, t])[0]
        out.append(f"{len(ms)}\n")
        for m in ms:
            out.append("%d %d %d %d %d %d %d %.7g %.7g %d\n25\n" % tuple(info[m]))
            out.append(joint_fmt % tuple(rows[m, t].ravel().tolist()))
    Path(path).write_text("".join(out))


def read_pku_skeleton(path) -> np.ndarray:
    """PKU-MMD skeleton txt (one line of 150 values per frame: body 1's 25 xyz, then body 2's)
    -> (T, 2, 25, 3) float32."""
    lines = _read_text(Path(path))
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise _bad(path, None, "empty skeleton file")
    return _numbers(path, lines, 150).astype(np.float32).reshape(len(lines), 2, 25, 3)


def write_pku_skeleton(path, seq: np.ndarray) -> None:
    """(T, 2, 25, 3) float32 -> PKU-MMD skeleton txt."""
    fmt = " ".join(["%.9g"] * 150) + "\n"
    flat = seq.reshape(len(seq), 150).astype(np.float64)
    Path(path).write_text("".join(fmt % tuple(r) for r in flat.tolist()))


def read_pku_labels(path) -> np.ndarray:
    """Label txt 'label,start,end,confidence' per line -> (K, 4) int64 (always 2-D, even for one
    line: the np.loadtxt pitfall). Labels are raw (1-based)."""
    rows = []
    for i, line in enumerate(_read_text(Path(path))):
        if not line.strip():
            continue
        tok = [t for t in line.replace(",", " ").split()]
        if len(tok) != 4:
            raise _bad(path, i + 1,
                       f"expected 'label,start,end,confidence', found {line.strip()!r}")
        try:
            vals = [int(float(t)) for t in tok]
        except ValueError:
            raise _bad(path, i + 1, f"non-numeric value in {line.strip()!r}") from None
        if vals[1] < 0 or vals[2] <= vals[1] or not 1 <= vals[0] <= PKU_LABELS:
            raise _bad(path, i + 1, f"bad instance {line.strip()!r} "
                       f"(need 1 <= label <= {PKU_LABELS}, 0 <= start < end)")
        rows.append(vals)
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def write_pku_labels(path, rows) -> None:
    Path(path).write_text("".join("%d,%d,%d,%d\n" % tuple(r) for r in rows))


def read_pku_split(path) -> tuple[list[str], list[str]]:
    """PKU-MMD split file: 'Training videos:' then a line of names, 'Validataion videos:' (sic; the
    correct spelling is accepted too) then a line of names; comma-separated, trailing comma ok."""
    lines = _read_text(Path(path))
    found: dict[str, list[str]] = {}
    key = None
    for i, line in enumerate(lines):
        low = line.strip().lower()
        if low.startswith("training videos"):
            key = "train"
        elif low.startswith(("validataion videos", "validation videos", "testing videos")):
            key = "val"
        elif low and key is None:
            raise _bad(path, i + 1, "expected a 'Training videos:' or 'Validataion videos:' header")
        if key is None:
            continue
        head, colon, tail = line.partition(":")
        rest = tail if colon and head.strip().lower().endswith("videos") else line
        names = [n.strip() for n in rest.split(",") if n.strip()]
        found.setdefault(key, []).extend(n[:-4] if n.endswith(".txt") else n for n in names)
    for key in ("train", "val"):
        if not found.get(key):
            header = "Training" if key == "train" else "Validataion"
            raise _bad(path, None, f"no {header} videos listed")
    return found["train"], found["val"]


def write_pku_split(path, train: list[str], val: list[str]) -> None:
    Path(path).write_text("Training videos: \n" + ", ".join(train) + ",\n"
                          "Validataion videos: \n" + ", ".join(val) + ",\n")


# ----------------------------------------------------------------------------------------------
# Synthetic data: body model and forward kinematics
# ----------------------------------------------------------------------------------------------
# Kinematic tree of the NTU joints (0-based; see common.JOINT_NAMES) and the rest-pose bone vectors
# parent -> joint of a 1.75 m adult, metres, in the body frame x = the person's right, y = up,
# z = backwards (the person faces -z, i.e. faces a camera placed in front at yaw 0).
PARENT = np.array([-1, 0, 20, 2, 20, 4, 5, 6, 20, 8, 9, 10, 0, 12, 13, 14, 0, 16, 17, 18, 1, 7, 7,
                   11, 11])
FK_ORDER = [1, 20, 2, 3, 4, 5, 6, 7, 21, 22, 8, 9, 10, 11, 23, 24, 12, 13, 14, 15, 16, 17, 18, 19]
REST_BONES = np.array([
    [0, 0, 0], [0, 0.27, 0], [0, 0.07, 0], [0, 0.14, -0.01],               # base, mid, neck, head
    [-0.17, -0.04, 0], [0, -0.27, 0], [0, -0.25, 0], [0, -0.07, 0],        # left arm
    [0.17, -0.04, 0], [0, -0.27, 0], [0, -0.25, 0], [0, -0.07, 0],         # right arm
    [-0.08, -0.04, 0], [0, -0.41, 0], [0, -0.40, 0], [0, -0.05, -0.11],    # left leg
    [0.08, -0.04, 0], [0, -0.41, 0], [0, -0.40, 0], [0, -0.05, -0.11],     # right leg
    [0, 0.22, 0],                                                          # spine shoulder
    [0, -0.07, 0], [0.025, -0.03, -0.025], [0, -0.07, 0], [-0.025, -0.03, -0.025]])  # tips, thumbs
BONE_GROUPS = {"trunk": [1, 20, 2, 3], "shoulders": [4, 8], "hips": [12, 16],
               "arms": [5, 6, 7, 9, 10, 11, 21, 22, 23, 24], "legs": [13, 14, 15, 17, 18, 19]}
# Amplitude (rad) of the smooth per-bone angle noise (performer style, idle sway): the main knob of
# how hard the synthetic task is.
ANGLE_NOISE = np.zeros((25, 3))
NOISE_SCALE = 2.0
ANGLE_NOISE[[1, 20]] = 0.05
ANGLE_NOISE[[2, 3]] = 0.10
ANGLE_NOISE[[5, 9]] = 0.13
ANGLE_NOISE[[6, 10]] = 0.15
ANGLE_NOISE[[7, 11]] = 0.20
ANGLE_NOISE[[13, 17, 14, 18]] = 0.05
ANGLE_NOISE[[15, 19]] = 0.08
ANGLE_NOISE *= NOISE_SCALE


def _rotations(ang: np.ndarray) -> np.ndarray:
    """(..., 3) angles (rx, ry, rz) -> (..., 3, 3) = Ry(ry) @ Rx(rx) @ Rz(rz): rz raises a limb
    sideways, rx swings it forwards, ry turns the result about the vertical (horizontal swing)."""
    c, s = np.cos(ang), np.sin(ang)
    one, zero = np.ones_like(c[..., 0]), np.zeros_like(c[..., 0])
    rx = np.stack([one, zero, zero, zero, c[..., 0], -s[..., 0], zero, s[..., 0], c[..., 0]], -1)
    ry = np.stack([c[..., 1], zero, s[..., 1], zero, one, zero, -s[..., 1], zero, c[..., 1]], -1)
    rz = np.stack([c[..., 2], -s[..., 2], zero, s[..., 2], c[..., 2], zero, zero, zero, one], -1)
    shape = ang.shape[:-1] + (3, 3)
    return ry.reshape(shape) @ rx.reshape(shape) @ rz.reshape(shape)


def _yaw(phi) -> np.ndarray:
    return _rotations(np.stack([np.zeros_like(phi), phi, np.zeros_like(phi)], -1))


def forward_kinematics(ang: np.ndarray, yaw: np.ndarray, bones: np.ndarray) -> np.ndarray:
    """(T, 25, 3) bone rotations (bone parent->j turned by ang[:, j], inherited by j's subtree),
    (T,) root yaw, (25, 3) bone vectors -> (T, 25, 3) joint positions relative to the spine base."""
    local = _rotations(ang)
    glob = np.empty_like(local)
    pos = np.zeros(ang.shape[:2] + (3,))
    glob[:, 0] = _yaw(yaw) @ local[:, 0]
    for j in FK_ORDER:
        p = PARENT[j]
        glob[:, j] = glob[:, p] @ local[:, j]
        pos[:, j] = pos[:, p] + glob[:, j] @ bones[j]
    return pos


# ----------------------------------------------------------------------------------------------
# Synthetic data: motion programs
# ----------------------------------------------------------------------------------------------
def _ease(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _bump(u, a, b):
    """0 outside [a, b], a smooth sin^2 hump peaking at the middle."""
    return np.sin(np.pi * np.clip((u - a) / (b - a), 0.0, 1.0)) ** 2


def _plateau(u, a, b, r):
    """Rises over [a, a+r], holds 1, falls over [b-r, b]."""
    return _ease((u - a) / r) * _ease((b - u) / r)


class _Pose:
    """Angle / root offsets of one person over one action, written by a motion program. `u` is the
    normalised action time (0 = start pose, 1 = end pose), `a` the style amplitude, `dom` +1 for a
    right-handed and -1 for a left-handed performer ('d' = dominant side, 'o' = the other)."""

    def __init__(self, u: np.ndarray, amp: float, dom: int, rng: np.random.Generator):
        self.u, self.a, self.dom, self.rng = u, amp, dom, rng
        self.ang = np.zeros((len(u), 25, 3))
        self.root = np.zeros((len(u), 3))  # body-frame displacement (x right, z backwards)
        self.yaw = np.zeros(len(u))
        self.air = np.zeros(len(u))        # height above the ground contact

    def _side(self, side: str) -> int:
        return {"d": self.dom, "o": -self.dom, "R": 1, "L": -1}[side]

    def arm(self, side, flex=0.0, abd=0.0, horiz=0.0, elbow=0.0, elbow_z=0.0, wrist=0.0):
        s = self._side(side)  # mirrored rotations flip the sign of ry and rz
        up, fo, ha = (9, 10, 11) if s > 0 else (5, 6, 7)
        self.ang[:, up, 0] += flex
        self.ang[:, up, 1] += s * horiz        # horizontal swing towards the body midline
        self.ang[:, up, 2] += s * abd          # sideways raise
        self.ang[:, fo, 0] += elbow
        self.ang[:, fo, 2] += s * elbow_z      # forearm raised in the arm's frontal plane
        self.ang[:, ha, 0] += wrist

    def leg(self, side, flex=0.0, abd=0.0, knee=0.0, ankle=0.0):
        s = self._side(side)
        th, sh, ft = (17, 18, 19) if s > 0 else (13, 14, 15)
        self.ang[:, th, 0] += flex
        self.ang[:, th, 2] += s * abd
        self.ang[:, sh, 0] -= knee
        self.ang[:, ft, 0] += ankle

    def spine(self, bend=0.0, side=0.0, twist=0.0):
        for j, w in ((1, 0.55), (20, 0.45)):
            self.ang[:, j, 0] -= w * bend                # forwards
            self.ang[:, j, 2] -= self.dom * w * side     # towards the dominant side
            self.ang[:, j, 1] += self.dom * w * twist

    def head(self, nod=0.0, turn=0.0):
        self.ang[:, 3, 0] -= nod
        self.ang[:, 2, 1] += self.dom * turn

    def steps(self, n, amp=1.0, env=1.0):
        for i, side in enumerate("do"):
            lift = np.maximum(0.0, np.sin(2 * np.pi * n * self.u + np.pi * i)) * env * amp
            self.leg(side, flex=0.45 * lift, knee=0.8 * lift)


def _wave(c, _):
    n = c.rng.uniform(2.0, 4.5)
    r = _plateau(c.u, 0.0, 1.0, 0.22) * c.a
    c.arm("d", flex=0.3 * r, abd=1.35 * r, elbow_z=r * (1.3 + 0.45 * np.sin(2 * np.pi * n * c.u)),
          wrist=0.2 * r)
    c.head(turn=0.15 * r)


def _punch(c, _):
    g, p = _plateau(c.u, 0.0, 1.0, 0.25), _bump(c.u, 0.4, 0.75) * c.a
    c.arm("d", flex=0.6 * g + 0.9 * p, horiz=0.25 * g, elbow=1.9 * g - 1.7 * p)
    c.arm("o", flex=0.6 * g, horiz=0.25 * g, elbow=1.9 * g)
    c.spine(twist=-0.35 * p, bend=0.1 * p)
    c.leg("o", flex=0.15 * g, knee=0.2 * g)


def _kick(c, _):
    c.leg("d", flex=1.25 * c.a * _bump(c.u, 0.15, 0.85), ankle=0.3 * _bump(c.u, 0.3, 0.7),
          knee=1.3 * _bump(c.u, 0.1, 0.5) + 0.35 * _bump(c.u, 0.55, 0.9))
    for side in "do":
        c.arm(side, abd=0.45 * _bump(c.u, 0.1, 0.9))
    c.spine(bend=-0.2 * _bump(c.u, 0.2, 0.8))


def _clap(c, _):
    n = c.rng.integers(3, 7)
    r = _plateau(c.u, 0.0, 1.0, 0.2)
    closed = 0.5 + 0.5 * np.cos(2 * np.pi * n * c.u)
    for side in "do":
        c.arm(side, flex=1.2 * r, horiz=r * (0.05 + 0.4 * c.a * closed), elbow=0.6 * r)


def _squat(c, _):
    b = _plateau(c.u, 0.05, 0.95, 0.35) * min(c.a, 1.15)
    for side in "do":
        c.leg(side, flex=1.5 * b, knee=2.1 * b, ankle=0.6 * b, abd=0.15 * b)
        c.arm(side, flex=1.35 * b, elbow=0.2 * b)
    c.spine(bend=0.45 * b)


def _jump(c, _):
    crouch = 0.65 * _bump(c.u, 0.0, 0.45) + 0.5 * _bump(c.u, 0.62, 1.0)
    fly = _bump(c.u, 0.4, 0.72)
    for side in "do":
        c.leg(side, flex=1.3 * crouch + 0.3 * fly, knee=1.9 * crouch + 0.5 * fly,
              ankle=0.5 * crouch - 0.4 * fly)
        c.arm(side, flex=-0.6 * _bump(c.u, 0.0, 0.42) + 2.4 * fly * c.a)
    c.spine(bend=0.4 * crouch)
    c.air += 0.28 * c.a * np.sin(np.pi * np.clip((c.u - 0.42) / 0.26, 0.0, 1.0))


def _bow(c, _):
    b = _plateau(c.u, 0.05, 0.95, 0.35) * c.a
    c.spine(bend=1.0 * b)
    c.head(nod=0.3 * b)
    for side in "do":
        c.arm(side, flex=0.9 * b)


def _reach_up(c, _):
    r = _plateau(c.u, 0.0, 1.0, 0.3)
    for side in "do":
        c.arm(side, flex=2.9 * r * min(c.a, 1.08), elbow=0.1 * r, horiz=-0.1 * r)
        c.leg(side, ankle=-0.25 * r)
    c.head(nod=-0.35 * r)


def _throw(c, _):
    w, t = _bump(c.u, 0.05, 0.55), _bump(c.u, 0.45, 0.85) * c.a
    c.arm("d", abd=1.4 * w + 0.3 * t, horiz=-0.7 * w + 1.0 * t, elbow_z=1.5 * w, elbow=0.2 * t,
          flex=1.2 * t)
    c.arm("o", flex=0.9 * w, horiz=0.3 * w)
    c.spine(twist=0.5 * w - 0.5 * t, bend=-0.15 * w + 0.45 * t)
    c.leg("o", flex=0.45 * w, knee=0.3 * w)


def _turn_around(c, _):
    c.yaw += c.dom * np.pi * _ease((c.u - 0.05) / 0.9)
    c.steps(2.5, c.a, _plateau(c.u, 0.0, 1.0, 0.1))
    for side in "do":
        c.arm(side, abd=0.15 * _bump(c.u, 0.0, 1.0))


def _sit_down(c, _):
    e, lean = _ease((c.u - 0.1) / 0.75), _bump(c.u, 0.15, 0.85)
    for side in "do":
        c.leg(side, flex=1.55 * e, knee=1.55 * e, abd=0.1 * e)
        c.arm(side, flex=0.5 * lean * c.a + 0.15 * e, elbow=0.5 * e)
    c.spine(bend=0.55 * lean * c.a + 0.1 * e)
    c.root[:, 2] += 0.22 * e  # the hips move back onto the seat


def _pick_up(c, _):
    down, hold = _bump(c.u, 0.0, 0.75), _ease((c.u - 0.4) / 0.45)
    c.spine(bend=1.1 * down * min(c.a, 1.1))
    c.head(nod=0.2 * down)
    for side in "do":
        c.leg(side, flex=0.9 * down, knee=1.3 * down, ankle=0.4 * down)
        c.arm(side, flex=1.2 * down + 0.5 * hold, elbow=1.7 * hold, horiz=0.3 * hold)


def _reversed(prog):
    """The same program played backwards (stand up = sit down reversed, put down = pick up
    reversed): the pair differs only in temporal order."""
    def run(c, o):
        for p in (c, o):
            if p is not None:
                p.u = 1.0 - p.u
        prog(c, o)
    return run


def _handshake(c, o):
    for p in (c, o):
        r = _plateau(p.u, 0.05, 0.95, 0.3)
        shake = 0.18 * np.sin(2 * np.pi * 3 * p.u) * _plateau(p.u, 0.3, 0.85, 0.1)
        p.arm("R", flex=(0.95 + shake) * r, horiz=0.2 * r, elbow=0.5 * r)
        p.root[:, 2] -= 0.2 * r


def _hug(c, o):
    for p in (c, o):
        r = _plateau(p.u, 0.1, 0.9, 0.3)
        p.root[:, 2] -= 0.3 * r
        for side in "RL":
            p.arm(side, flex=1.3 * r, abd=0.2 * r, horiz=0.5 * r, elbow=0.9 * r)
        p.spine(bend=0.15 * r)


def _push(c, o):
    r, hit = _plateau(c.u, 0.1, 0.75, 0.2), _bump(c.u, 0.3, 0.6) * c.a
    for side in "RL":
        c.arm(side, flex=1.35 * r, elbow=1.3 * r - 1.2 * hit)
    c.root[:, 2] -= 0.15 * _plateau(c.u, 0.1, 0.8, 0.3)
    back = _bump(o.u, 0.4, 1.0)  # the partner stumbles back and returns
    o.root[:, 2] += 0.35 * back
    o.spine(bend=-0.3 * _bump(o.u, 0.4, 0.7))
    for side in "RL":
        o.arm(side, abd=0.6 * _bump(o.u, 0.4, 0.8))
    o.steps(2, 0.6, back)


def _point(c, _):
    r = _plateau(c.u, 0.0, 1.0, 0.25) * c.a
    c.arm("d", flex=1.45 * r, horiz=-0.25 * r, elbow=0.05 * r)
    c.head(turn=-0.3 * r)


def _drink(c, _):
    r = _plateau(c.u, 0.0, 1.0, 0.3)
    c.arm("d", flex=0.55 * r, horiz=0.35 * r, elbow=2.3 * r * min(c.a, 1.1))
    c.head(nod=-0.35 * _plateau(c.u, 0.35, 0.75, 0.1))


def _salute(c, _):
    r = _plateau(c.u, 0.0, 1.0, 0.25)
    c.arm("d", abd=1.3 * r, horiz=0.5 * r, elbow=2.2 * r * min(c.a, 1.1))
    c.spine(bend=-0.05 * r)


def _hop(c, _):
    lift = _plateau(c.u, 0.0, 1.0, 0.15)
    hops = np.abs(np.sin(np.pi * 3 * c.u)) * _plateau(c.u, 0.1, 0.9, 0.1)
    c.leg("o", flex=0.5 * lift, knee=1.4 * lift)
    c.leg("d", flex=0.2 * (1 - hops) * lift, knee=0.35 * (1 - hops) * lift)
    c.air += 0.1 * c.a * hops
    for side in "do":
        c.arm(side, abd=0.5 * lift)


def _side_kick(c, _):
    k = _bump(c.u, 0.2, 0.8) * c.a
    c.leg("d", abd=1.0 * k, flex=0.2 * k, knee=0.3 * _bump(c.u, 0.1, 0.4))
    c.spine(side=-0.35 * k)
    c.arm("o", abd=0.5 * k)


def _arm_circles(c, _):
    r, ph = _plateau(c.u, 0.0, 1.0, 0.2), 2 * np.pi * c.rng.integers(2, 5) * c.u
    for side in "do":
        c.arm(side, abd=(1.45 + 0.35 * c.a * np.sin(ph)) * r, horiz=0.35 * c.a * np.cos(ph) * r)


def _touch_toes(c, _):
    b = _plateau(c.u, 0.05, 0.95, 0.35) * min(c.a, 1.1)
    c.spine(bend=1.5 * b)
    c.head(nod=0.2 * b)
    for side in "do":
        c.arm(side, flex=1.5 * b)


def _walk(c, _):
    env, ph = _plateau(c.u, 0.0, 1.0, 0.1), 2 * np.pi * 2 * c.u
    for i, side in enumerate("do"):
        c.leg(side, flex=0.4 * np.sin(ph + np.pi * i) * env,
              knee=0.7 * np.maximum(0.0, np.sin(ph + np.pi * i + 0.5 * np.pi)) * env)
        c.arm(side, flex=-0.3 * np.sin(ph + np.pi * i) * env)
    c.root[:, 2] -= 0.8 * c.a * c.u


def _march(c, _):
    env, ph = _plateau(c.u, 0.0, 1.0, 0.1), 2 * np.pi * 3 * c.u
    for i, side in enumerate("do"):
        lift = np.maximum(0.0, np.sin(ph + np.pi * i)) * env
        c.leg(side, flex=1.1 * lift * c.a, knee=1.3 * lift)
        c.arm(side, flex=-0.6 * np.sin(ph + np.pi * i) * env, elbow=0.8 * env)


def _uppercut(c, _):
    g, p = _plateau(c.u, 0.0, 1.0, 0.25), _bump(c.u, 0.4, 0.75) * c.a
    c.arm("d", flex=0.4 * g + 1.6 * p, elbow=1.9 * g - 0.2 * p, horiz=0.25 * g)
    c.arm("o", flex=0.6 * g, elbow=1.9 * g, horiz=0.25 * g)
    for side in "do":
        c.leg(side, flex=0.3 * g - 0.25 * p, knee=0.5 * g - 0.4 * p, ankle=0.2 * g - 0.2 * p)
    c.spine(twist=-0.3 * p, bend=-0.15 * p)


def _high_five(c, o):
    for p in (c, o):
        r = _bump(p.u, 0.15, 0.85)
        p.arm("R", flex=2.3 * r, horiz=0.25 * r, elbow=0.35 * r)
        p.root[:, 2] -= 0.2 * r


def _side_stretch(c, _):
    r = _plateau(c.u, 0.05, 0.95, 0.35) * c.a
    c.arm("o", abd=2.7 * r, elbow_z=0.3 * r)
    c.arm("d", abd=0.2 * r)
    c.spine(side=0.45 * r)


def _kick_person(c, o):
    c.leg("d", flex=1.1 * c.a * _bump(c.u, 0.2, 0.7),
          knee=1.2 * _bump(c.u, 0.15, 0.45) + 0.2 * _bump(c.u, 0.45, 0.8))
    for side in "do":
        c.arm(side, abd=0.35 * _bump(c.u, 0.1, 0.9))
    hit = _bump(o.u, 0.4, 0.9)
    o.spine(bend=0.5 * hit)
    for side in "RL":
        o.arm(side, flex=0.7 * hit, elbow=1.2 * hit, horiz=0.3 * hit)
    o.root[:, 2] += 0.15 * hit


# (name, program, base length in frames at 30 fps, persons, start state, end state).
# `synthetic` uses the first 20, `synthetic_ext` all 30 (21-30 are the novel few-shot classes).
CLASSES = [
    ("wave", _wave, 55, 1, "stand", "stand"),
    ("punch", _punch, 32, 1, "stand", "stand"),
    ("kick", _kick, 38, 1, "stand", "stand"),
    ("clap", _clap, 50, 1, "stand", "stand"),
    ("squat", _squat, 60, 1, "stand", "stand"),
    ("jump", _jump, 40, 1, "stand", "stand"),
    ("bow", _bow, 55, 1, "stand", "stand"),
    ("reach up", _reach_up, 50, 1, "stand", "stand"),
    ("throw", _throw, 45, 1, "stand", "stand"),
    ("turn around", _turn_around, 65, 1, "stand", "stand"),
    ("sit down", _sit_down, 65, 1, "stand", "sit"),
    ("stand up", _reversed(_sit_down), 65, 1, "sit", "stand"),
    ("pick up", _pick_up, 65, 1, "stand", "hold"),
    ("put down", _reversed(_pick_up), 65, 1, "hold", "stand"),
    ("shake hands", _handshake, 55, 2, "stand", "stand"),
    ("hug", _hug, 60, 2, "stand", "stand"),
    ("push other person", _push, 45, 2, "stand", "stand"),
    ("point", _point, 50, 1, "stand", "stand"),
    ("drink", _drink, 60, 1, "stand", "stand"),
    ("salute", _salute, 45, 1, "stand", "stand"),
    ("hop on one leg", _hop, 60, 1, "stand", "stand"),
    ("side kick", _side_kick, 40, 1, "stand", "stand"),
    ("arm circles", _arm_circles, 60, 1, "stand", "stand"),
    ("touch toes", _touch_toes, 60, 1, "stand", "stand"),
    ("walk forward", _walk, 70, 1, "stand", "stand"),
    ("march in place", _march, 60, 1, "stand", "stand"),
    ("uppercut", _uppercut, 35, 1, "stand", "stand"),
    ("high five", _high_five, 45, 2, "stand", "stand"),
    ("side stretch", _side_stretch, 65, 1, "stand", "stand"),
    ("kick other person", _kick_person, 45, 2, "stand", "stand"),
]
CLASS_NAMES = [c[0] for c in CLASSES]


# ----------------------------------------------------------------------------------------------
# Synthetic data: performers, animation, scene, cameras, sensor
# ----------------------------------------------------------------------------------------------
CAMERA_YAW = {1: 0.0, 2: -45.0, 3: 45.0}  # NTU camera id -> yaw (degrees) around the stage
PKU_VIEWS = {"L": -45.0, "M": 0.0, "R": 45.0}
DISTAL = [6, 7, 10, 11, 14, 15, 18, 19, 21, 22, 23, 24]  # joints a tracking glitch may hit
ARM_JOINTS = [4, 5, 6, 7, 8, 9, 10, 11, 21, 22, 23, 24]
FPS = 30.0


def _smooth(rng, n: int, shape: tuple, fmin: float = 0.15, fmax: float = 1.0) -> np.ndarray:
    """(n, *shape) smooth noise with unit standard deviation: a sum of 3 random sinusoids."""
    k = 3
    amp = rng.normal(0.0, math.sqrt(2.0 / k), (k,) + shape)
    freq = rng.uniform(fmin, fmax, (k,) + shape)
    phase = rng.uniform(0, 2 * np.pi, (k,) + shape)
    t = np.arange(n, dtype=np.float64).reshape((n, 1) + (1,) * len(shape))
    return (amp * np.sin(2 * np.pi * freq * t / FPS + phase)).sum(1)


def _performer(seed: int, pid: int) -> dict:
    """Body, posture and style of performer `pid` (the same in every clip of that performer)."""
    rng = np.random.default_rng([seed, 1, pid])
    bones = REST_BONES * rng.uniform(1.5, 1.95) / 1.75
    for joints in BONE_GROUPS.values():
        bones[joints] *= rng.uniform(0.92, 1.08)
    posture = np.zeros((25, 3))
    posture[[5, 9], 2] = np.array([-1, 1]) * rng.uniform(0.06, 0.18)   # arms hang slightly out
    posture[[6, 10], 0] = rng.uniform(0.05, 0.3)                         # elbows slightly bent
    posture[1, 0] = rng.normal(0, 0.04)                                  # habitual lean
    posture[3, 0] = rng.normal(0, 0.06)
    posture[[13, 17], 2] = np.array([-1, 1]) * rng.uniform(0.0, 0.08)  # stance width
    return {"bones": bones, "posture": posture, "dom": -1 if rng.random() < 0.2 else 1,
            "tempo": rng.uniform(0.85, 1.15), "amp": rng.uniform(0.85, 1.15),
            "noise": rng.uniform(0.7, 1.3)}


# Idle arm gestures a person may hold through a clip (hand on hip, at the belly, behind the back,
# arms folded), as (flex, abd, horiz, elbow) offsets of one arm.
IDLE_GESTURES = [(0.0, 0.5, -0.3, 1.6), (0.3, 0.0, 0.5, 1.4), (-0.3, 0.0, -0.4, 1.0),
                 (0.4, 0.0, 0.7, 1.9)]


def _animate(segments: list, W: int, people: list, rng) -> list:
    """Perform `segments` [(class, start, length), ...] over W frames. Between actions a person
    holds the last pose (idle); root and yaw displacements accumulate. -> per person (W, 25, 3)
    positions in the person's frame (spine base above the origin, feet on the ground y = 0)."""
    n = len(people)
    ang = np.zeros((n, W, 25, 3))
    root, yaw, air = np.zeros((n, W, 3)), np.zeros((n, W)), np.zeros((n, W))
    base_r, base_y = np.zeros((n, 3)), np.zeros(n)
    t = np.arange(W, dtype=np.float64)
    # this time the performer may use the other hand, and may keep an arm in an idle gesture
    dom = [p["dom"] * (-1 if rng.random() < 0.15 else 1) for p in people]
    idle = _Pose(np.zeros(W), 1.0, 1, rng)
    for side in "RL":
        if rng.random() < 0.3:
            flex, abd, horiz, elbow = IDLE_GESTURES[rng.integers(len(IDLE_GESTURES))]
            idle.arm(side, flex=flex, abd=abd, horiz=horiz, elbow=elbow)
    for k, (cls, start, length) in enumerate(segments):
        a = 0 if k == 0 else start
        b = segments[k + 1][1] if k + 1 < len(segments) else W
        x = np.clip((t[a:b] - start) / length, 0.0, 1.0)
        x = x + rng.uniform(-0.3, 0.3) * x * (1 - x)          # monotone time warp
        u = np.concatenate([[0.0], x, [1.0]])                 # + the start and end poses
        poses = [_Pose(u.copy(), rng.uniform(0.65, 1.35) * p["amp"], d, rng)
                 for p, d in zip(people, dom)]
        CLASSES[cls][1](poses[0], poses[1] if n > 1 else None)
        for i, p in enumerate(poses):
            rot = _yaw(np.array(base_y[i]))
            ang[i, a:b] = p.ang[1:-1]
            root[i, a:b] = base_r[i] + (p.root[1:-1] - p.root[0]) @ rot.T
            yaw[i, a:b] = base_y[i] + p.yaw[1:-1] - p.yaw[0]
            air[i, a:b] = p.air[1:-1]
            base_r[i] += (p.root[-1] - p.root[0]) @ rot.T
            base_y[i] += p.yaw[-1] - p.yaw[0]
    out = []
    for i, p in enumerate(people):
        noise = _smooth(rng, W, (25, 3)) * ANGLE_NOISE * p["noise"]
        pos = forward_kinematics(p["posture"] + idle.ang + ang[i] + noise,
                                 yaw[i] + 0.04 * _smooth(rng, W, ()), p["bones"])
        sway = 0.015 * _smooth(rng, W, (3,), 0.1, 0.5) * np.array([1.0, 0.0, 1.0])
        pos += (root[i] + sway)[:, None, :]
        pos[..., 1] += (0.03 - pos[:, [15, 19], 1].min(1) + air[i])[:, None]
        out.append(pos)
    return out


def _place(people_pos: list, rng, facing_deg: float) -> np.ndarray:
    """Put the person(s) on the stage: one person at the centre facing `facing_deg`; two persons
    1.0-1.4 m apart facing each other. -> (W, P, 25, 3) world coordinates (y up, floor y = 0)."""
    if len(people_pos) == 1:
        spots = [(0.0, 0.0)]
    else:
        d = rng.uniform(1.0, 1.4) / 2
        spots = [(-d, -np.pi / 2), (d, np.pi / 2)]
    turn = _yaw(np.array(np.deg2rad(facing_deg + rng.uniform(-15, 15))))
    offset = np.array([rng.uniform(-0.3, 0.3), 0.0, rng.uniform(-0.3, 0.3)])
    world = []
    for pos, (x, phi) in zip(people_pos, spots):
        local = pos @ _yaw(np.array(phi)).T + np.array([x, 0.0, 0.0])
        world.append(local @ turn.T + offset)
    return np.stack(world, 1)


def _camera(rng, yaw_deg: float, dist: float, height: float) -> tuple[np.ndarray, np.ndarray]:
    """Kinect-like camera on a circle around the stage looking at it: rows of R are the camera axes
    in world coordinates (x = the sensor's left = a facing person's right, y up, z depth)."""
    psi = np.deg2rad(yaw_deg + rng.uniform(-5, 5))
    d = dist * rng.uniform(0.95, 1.05)
    pos = np.array([d * np.sin(psi), height + rng.uniform(-0.05, 0.05), -d * np.cos(psi)])
    f = np.array([0.0, rng.uniform(0.8, 1.1), 0.0]) - pos
    f /= np.linalg.norm(f)
    x = np.cross([0.0, 1.0, 0.0], f)
    x /= np.linalg.norm(x)
    return np.stack([x, np.cross(f, x), f]), pos


def _setup(seed: int, setup: int) -> tuple[np.ndarray, np.ndarray]:
    """Camera distances and heights of a recording setup (3 cameras)."""
    rng = np.random.default_rng([seed, 2, setup])
    return rng.uniform(2.7, 3.8, 3), rng.uniform(0.8, 1.4, 3)


def _sensor(rng, xyz: np.ndarray, dropouts: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kinect-like measurement of (n, P, 25, 3) camera coordinates: 5-10 mm jitter, joints hidden
    behind the torso tracked badly ('inferred'), occasional glitches of a distal joint, and (for NTU
    clips) rare frames where tracking is lost. -> (P, n, 25, 3) float32, present (P, n) bool,
    trackingState (P, n, 25) int."""
    n, P = xyz.shape[:2]
    out = xyz + rng.normal(0.0, rng.uniform(0.005, 0.010), xyz.shape)
    ref = xyz[:, :, 1:2]                                                  # spine mid
    behind = (xyz[..., 2] > ref[..., 2] + 0.06) & (np.abs(xyz[..., 0] - ref[..., 0]) < 0.2)
    behind[..., [j for j in range(25) if j not in ARM_JOINTS]] = False
    # skeleton fitting errors depend on the view: a per-joint bias, larger along the depth axis,
    # and a large drifting error for joints hidden behind the torso
    out = out + rng.normal(0.0, 1.0, (P, 25, 3)) * np.array([0.02, 0.02, 0.04])
    drift = rng.normal(0.0, 0.05, (P, 25, 3)) + 0.02 * _smooth(rng, n, (P, 25, 3))
    out = out + behind[..., None] * drift
    state = np.where(behind, 1, 2)
    if rng.random() < 0.25:
        for _ in range(rng.integers(1, 3)):
            t0, ln = rng.integers(0, n - 6), rng.integers(2, 7)
            p, j = rng.integers(P), rng.choice(DISTAL)
            out[t0:t0 + ln, p, j] += rng.normal(0.0, 0.15, 3)
            state[t0:t0 + ln, p, j] = 1
    present = np.ones((P, n), dtype=bool)
    if dropouts and rng.random() < 0.05:
        t0 = rng.integers(5, n - 10)
        present[:, t0:t0 + rng.integers(1, 5)] = False
    if dropouts and rng.random() < 0.03:
        present[:, :rng.integers(1, 4)] = False
    return out.transpose(1, 0, 2, 3).astype(np.float32), present, state.transpose(1, 0, 2)


def _spurious(rng, n: int, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A false detection (furniture, a reflection): a crumpled, low-energy 'body' over part of the
    clip, only in frames where `present` (any row) is True."""
    center = np.array([rng.uniform(-1.5, 1.5), rng.uniform(-0.6, 0.4), rng.uniform(2.0, 4.5)])
    body = center + rng.normal(0.0, 0.05, (25, 3)) + rng.normal(0.0, 0.01, (n, 25, 3))
    t0 = rng.integers(0, n // 2)
    t1 = rng.integers(t0 + max(1, n // 5), n + 1)
    on = np.zeros(n, dtype=bool)
    on[t0:t1] = True
    return body.astype(np.float32), on & present.any(0)


def _slots(bodies: np.ndarray, present: np.ndarray, max_body: int = MAX_BODY_KINECT) -> np.ndarray:
    """(B, T, 25, 3) + present (B, T) -> (max_body, T, 25, 3): the m-th body listed in a frame goes
    to slot m, exactly what read_ntu_skeleton returns for the written file."""
    out = np.zeros((max_body,) + bodies.shape[1:], dtype=np.float32)
    rank = np.cumsum(present, 0) - 1
    for b in range(len(bodies)):
        sel = present[b] & (rank[b] < max_body)
        out[rank[b, sel], np.nonzero(sel)[0]] = bodies[b, sel]
    return out


def _kinect_extras(rng, bodies: np.ndarray, state: np.ndarray) -> tuple[list, np.ndarray]:
    """The values of the .skeleton format we do not use: body info lines (bodyID, clipedEdges, hand
    confidences/states, isRestricted, leanX, leanY, trackingState) and per joint depth/color pixel
    coordinates, orientation quaternion (zero, as Kinect writes for untracked ones), state."""
    B, T = bodies.shape[:2]
    info = [(int(rng.integers(72057594037927936, 72057594037999999)), 0, int(rng.integers(0, 2)),
             int(rng.integers(0, 4)), int(rng.integers(0, 2)), int(rng.integers(0, 4)), 0,
             float(rng.normal(0, 0.05)), float(rng.normal(0, 0.05)), 2) for _ in range(B)]
    z = np.maximum(bodies[..., 2].astype(np.float64), 0.1)
    x, y = bodies[..., 0] / z, bodies[..., 1] / z
    extra = np.zeros((B, T, 25, 9))
    extra[..., 0], extra[..., 1] = 256 + 365 * x, 212 - 365 * y
    extra[..., 2], extra[..., 3] = 960 + 1060 * x, 540 - 1060 * y
    extra[..., 8] = state
    return info, extra


# ----------------------------------------------------------------------------------------------
# Synthetic data: datasets
# ----------------------------------------------------------------------------------------------
# Bumped whenever the generated data change, so folders written by an older version are rebuilt.
GENERATOR_VERSION = 2
NTU60_TEST_SUBJECTS = tuple(p for p in range(1, 41) if p not in NTU60_TRAIN_SUBJECTS)
# Trimmed set: every subject performs every class once (one replication, seen by the 3 cameras).
# Untrimmed set: (sequence id, performer, two-person video) for PKU-MMD-like long videos.
SIZES = {
    "tiny": {"subjects": (1, 2, 3, 6), "actions": (4, 6),
             "videos": [(1, 1, False), (2, 2, False), (3, 4, True), (4, 3, False)]},
    "default": {"subjects": tuple(range(1, 41)), "actions": (6, 10),
                "videos": [(i + 1, p, i % 4 == 2) for i, p in
                           enumerate(NTU60_TRAIN_SUBJECTS[:18] + NTU60_TEST_SUBJECTS[:6])]},
}


def _partner(pid: int) -> int:
    """The second person of an interaction: the next subject of the same xsub side (no leakage)."""
    group = NTU60_TRAIN_SUBJECTS if pid in NTU60_TRAIN_SUBJECTS else NTU60_TEST_SUBJECTS
    return group[(group.index(pid) + 1) % len(group)] if pid in group else pid % 40 + 1


def _trimmed_plan(seed: int, subjects, num_classes: int) -> list[tuple[int, int, int, int]]:
    """Events (setup, performer, replication, class); drawn per (performer, class) so that the
    `synthetic` clips are exactly the first 20 classes of `synthetic_ext` and tiny is a subset of
    default."""
    events = []
    for pid in subjects:
        for cls in range(num_classes):
            r = np.random.default_rng([seed, 4, pid, cls])
            events.append((int(r.integers(1, 18)), pid, int(r.integers(1, 3)), cls))
    return events


def _sample_name(setup: int, cam: int, pid: int, rep: int, cls: int) -> str:
    return f"S{setup:03d}C{cam:03d}P{pid:03d}R{rep:03d}A{cls + 1:03d}"


def _trimmed_event(seed: int, event: tuple) -> list[dict]:
    """One performance seen by the 3 cameras -> 3 raw clips {bodies (B, n, 25, 3) float32, present
    (B, n), state (B, n, 25), cam}. The cameras start and stop recording at different frames."""
    setup, pid, rep, cls = event
    rng = np.random.default_rng([seed, 3, pid, cls])
    people = [_performer(seed, pid)]
    if CLASSES[cls][3] == 2:
        people.append(_performer(seed, _partner(pid)))
    tempo = people[0]["tempo"] * rng.uniform(0.7, 1.4)
    length = int(np.clip(round(CLASSES[cls][2] * tempo), 20, 100))
    lead_in, lead_out = (int(v) for v in rng.integers(0, 36, 2))
    lead_out += max(0, 40 - (lead_in + length + lead_out))
    core, margin = lead_in + length + lead_out, 20
    W = core + 2 * margin
    # NTU: in R001 the performer faces the left camera, in R002 the right one
    world = _place(_animate([(cls, margin + lead_in, length)], W, people, rng), rng,
                   45.0 if rep == 1 else -45.0)
    dists, heights = _setup(seed, setup)
    clips = []
    for cam in (1, 2, 3):
        n = int(np.clip(core + rng.integers(-16, 17), 40, min(120, W)))
        s = int(np.clip(margin + rng.integers(-16, 17), 0, W - n))
        R, pos = _camera(rng, CAMERA_YAW[cam], dists[cam - 1], heights[cam - 1])
        bodies, present, state = _sensor(rng, (world[s:s + n] - pos) @ R.T, dropouts=True)
        extra_bodies = 1 if rng.random() < 0.08 else 0
        extra_bodies += 1 if extra_bodies and rng.random() < 0.2 else 0
        for _ in range(extra_bodies):
            # a second false body only shows while the first does, so list positions stay stable
            b, on = _spurious(rng, n, present if len(present) == len(people) else present[-1:])
            bodies = np.concatenate([bodies, b[None]])
            present = np.concatenate([present, on[None]])
            state = np.concatenate([state, np.full((1, n, 25), 1)])
        clips.append({"bodies": bodies, "present": present, "state": state, "cam": cam})
    return clips


def _ntu_sample(bodies4: np.ndarray, T: int) -> tuple[np.ndarray, int]:
    """(4, n, 25, 3) slots -> (2, T, 25, 3) float32 selected bodies (first T frames) and n."""
    sel = select_bodies(bodies4)
    out = np.zeros((MAX_BODY, T, 25, 3), dtype=np.float32)
    n = bodies4.shape[1]
    out[:, :min(n, T)] = sel[:, :T]
    return out, n


class NpyRows:
    """A float32 .npy file of shape (N, *row) written row by row with plain file writes (no memory
    map, so resident memory stays small however large the file grows); rows never written are
    zeros."""

    def __init__(self, path: Path, shape: tuple):
        self.path, self.shape = Path(path), tuple(int(v) for v in shape)
        self.row_bytes = int(np.prod(self.shape[1:])) * 4
        self.f = open(self.path, "wb+")
        np.lib.format.write_array_header_1_0(self.f, {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
            "shape": self.shape})
        self.offset = self.f.tell()
        self.f.truncate(self.offset + self.shape[0] * self.row_bytes)

    def write(self, pos: np.ndarray, rows: np.ndarray) -> None:
        """rows[k] -> row pos[k] (rows (k, *row) any float dtype)."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        for k in np.argsort(pos, kind="stable"):
            self.f.seek(self.offset + int(pos[k]) * self.row_bytes)
            self.f.write(rows[k].tobytes())

    def read(self, pos: int, n: int) -> np.ndarray:
        self.f.seek(self.offset + pos * self.row_bytes)
        buf = self.f.read(n * self.row_bytes)
        return np.frombuffer(buf, dtype=np.float32).reshape((n,) + self.shape[1:])

    def close(self) -> None:
        self.f.close()


class _LayoutWriter:
    """Streams normalised samples into the processed layout of one dataset folder: per benchmark
    split the train/val data are .npy files written chunk by chunk (bounded memory).
    `member[split]` holds per sample 1 (train), 0 (val) or -1 (not in this benchmark)."""

    def __init__(self, root: Path, names: list[str], labels: np.ndarray, member: dict, T: int):
        self.names, self.labels = names, np.asarray(labels, dtype=np.int64)
        self.num_frame = np.zeros(len(names), dtype=np.int64)
        self.parts = []
        for split, m in member.items():
            d = root / split
            d.mkdir(parents=True, exist_ok=True)
            for part, sel in (("train", np.asarray(m) == 1), ("val", np.asarray(m) == 0)):
                idx = np.nonzero(sel)[0]
                pos = np.full(len(names), -1)
                pos[idx] = np.arange(len(idx))
                out = NpyRows(d / f"{part}_data_joint.npy", (len(idx), 3, T, 25, 2))
                self.parts.append((d, part, idx, pos, out))

    def put(self, g: np.ndarray, chunk: np.ndarray, num_frame: np.ndarray) -> None:
        """Samples with global indices g: chunk (k, M, T, V, C) normalised, their frame counts."""
        self.num_frame[g] = num_frame
        x = chunk.transpose(0, 4, 2, 3, 1)                                  # (k, C, T, V, M)
        for _, _, _, pos, out in self.parts:
            p = pos[g]
            if (p >= 0).any():
                out.write(p[p >= 0], x[p >= 0])

    def close(self, keep: np.ndarray | None = None) -> dict:
        """Write labels / num_frame / names; samples with keep False (unreadable or empty inputs)
        are dropped by copying the kept rows into a new file. Returns {split/part: size}."""
        sizes = {}
        for d, part, idx, _, out in self.parts:
            if keep is not None and not keep[idx].all():
                rows = np.nonzero(keep[idx])[0]
                new = NpyRows(d / f"{part}_data_joint.tmp.npy", (len(rows),) + out.shape[1:])
                for k, r in enumerate(rows):
                    new.write(np.array([k]), out.read(int(r), 1))
                new.close()
                out.close()
                os.replace(new.path, out.path)
                idx = idx[rows]
            else:
                out.close()
            np.save(d / f"{part}_label.npy", self.labels[idx])
            np.save(d / f"{part}_num_frame.npy", self.num_frame[idx])
            with open(d / f"{part}_label.pkl", "wb") as fh:
                pickle.dump(([self.names[i] for i in idx], [int(v) for v in self.labels[idx]]), fh)
            sizes[f"{d.name}/{part}"] = len(idx)
        self.parts = []
        return sizes


def _synth_trimmed(seed: int, size: str, num_classes: int, z_align: bool, out: Path | None,
                   raw: Path | None, chunk: int = 64, quiet: bool = True) -> None:
    """Generate the trimmed clips: the processed layout to `out` and/or .skeleton files to `raw`."""
    events = _trimmed_plan(seed, SIZES[size]["subjects"], num_classes)
    keys = [(_sample_name(s, c, p, r, a), e, c) for e, (s, p, r, a) in enumerate(events)
            for c in (1, 2, 3)]
    order = sorted(range(len(keys)), key=lambda i: keys[i][0])
    gidx = np.empty(len(keys), dtype=np.int64)
    gidx[order] = np.arange(len(keys))
    names = [keys[i][0] + ".skeleton" for i in order]
    labels = np.array([events[keys[i][1]][3] for i in order])
    pids = np.array([events[keys[i][1]][1] for i in order])
    cams = np.array([keys[i][2] for i in order])
    writer = None
    if out is not None:
        writer = _LayoutWriter(out, names, labels, {
            "xsub": np.isin(pids, NTU60_TRAIN_SUBJECTS).astype(int),
            "xview": np.isin(cams, NTU_XVIEW_TRAIN_CAMERAS).astype(int)}, T_SYNTH)
    if raw is not None:
        raw.mkdir(parents=True, exist_ok=True)
    bar = _progress(None, len(events) * 3, "clips", quiet)
    for e0 in range(0, len(events), chunk):
        buf, g, nf = [], [], []
        for e in range(e0, min(e0 + chunk, len(events))):
            for k, clip in enumerate(_trimmed_event(seed, events[e])):
                i = gidx[3 * e + k]
                if raw is not None:
                    info, extra = _kinect_extras(np.random.default_rng([seed, 6, 3 * e + k]),
                                                 clip["bodies"], clip["state"])
                    write_ntu_skeleton(raw / names[i], clip["bodies"], clip["present"], info, extra)
                if writer is not None:
                    sample, n = _ntu_sample(_slots(clip["bodies"], clip["present"]), T_SYNTH)
                    buf.append(sample)
                    g.append(i)
                    nf.append(n)
        if writer is not None:
            writer.put(np.array(g), pre_normalization(np.stack(buf), z_align), np.array(nf))
        if bar is not None:
            bar.update(3 * (min(e0 + chunk, len(events)) - e0))
    if writer is not None:
        writer.close()
    if bar is not None:
        bar.close()


def _untrimmed_video(seed: int, seq: int, pid: int, pair: bool, n_actions: tuple
                     ) -> tuple[dict, list]:
    """A long PKU-MMD-like recording: several actions with idle background between them, seen from
    views L, M, R. -> ({view: (W, 2, 25, 3) float32 camera coordinates},
    [(label 1.., start, end, confidence), ...])."""
    rng = np.random.default_rng([seed, 5, seq])
    people = [_performer(seed, pid)] + ([_performer(seed, _partner(pid))] if pair else [])
    pool = [c for c in range(20) if (CLASSES[c][3] == 2) == pair]
    state, t, segs = "stand", int(rng.integers(20, 60)), []
    for _ in range(int(rng.integers(n_actions[0], n_actions[1] + 1))):
        cls = int(rng.choice([c for c in pool if CLASSES[c][4] == state]))
        length = int(round(CLASSES[cls][2] * people[0]["tempo"] * rng.uniform(0.8, 1.25)))
        segs.append((cls, t, length))
        state = CLASSES[cls][5]
        t += length + int(rng.integers(15, 60))
    world = _place(_animate(segs, t, people, rng), rng, rng.uniform(-30, 30))
    dists, heights = _setup(seed, 100 + seq)
    views = {}
    for v, (view, yaw) in enumerate(PKU_VIEWS.items()):
        R, pos = _camera(rng, yaw, dists[v], heights[v])
        bodies, _, _ = _sensor(rng, (world - pos) @ R.T, dropouts=False)
        seq_xyz = np.zeros((t, 2, 25, 3), dtype=np.float32)
        seq_xyz[:, :len(bodies)] = bodies.transpose(1, 0, 2, 3)
        views[view] = seq_xyz
    labels = [(cls + 1, start, start + length, int(rng.integers(1, 3)))
              for cls, start, length in segs]
    return views, labels


def write_detection(out: Path, part: str, names: list[str], get_seq, labels: list,
                    lengths: list[int]) -> None:
    """Untrimmed PKU-MMD I detection arrays (protocols section 5), streamed into memory maps:
    {part}_data.npy (N, Tmax, 25, 3, 2) float32 raw camera coordinates, where data[n, t, j, c, m] is
    body m, joint j, coordinate c (NOT the reference's plain reshape of the 150 values, which
    interleaves the two bodies; transpose to (N, 3, T, 25, 2) for our encoders), {part}_label.npy
    (N, Tmax) uint8 (0 background, label + 1 inside [start, end), 255 padding),
    {part}_num_frame.npy, {part}_video_name.txt and {part}_gt/<video>.txt holding the raw
    'label,start,end,confidence' lines.
    get_seq(i) -> (T_i, 2, 25, 3) float32 skeleton of video i; labels[i] (K, 4) rows."""
    n, tmax = len(names), max(lengths) if lengths else 1
    data = NpyRows(out / f"{part}_data.npy", (n, tmax, 25, 3, 2))
    lab = np.full((n, tmax), 255, dtype=np.uint8)
    for i in range(n):
        seq = get_seq(i)
        row = np.zeros((1, tmax, 25, 3, 2), dtype=np.float32)
        row[0, :len(seq)] = seq.transpose(0, 2, 3, 1)
        data.write(np.array([i]), row)
        lab[i, :len(seq)] = 0
        for label, start, end, _ in np.asarray(labels[i]).reshape(-1, 4):
            lab[i, start:min(end, len(seq))] = label + 1
    data.close()
    np.save(out / f"{part}_label.npy", lab)
    np.save(out / f"{part}_num_frame.npy", np.asarray(lengths, dtype=np.int64))
    (out / f"{part}_video_name.txt").write_text("".join(v + "\n" for v in names))
    gt = out / f"{part}_gt"
    gt.mkdir(parents=True, exist_ok=True)
    for name, rows in zip(names, labels):
        write_pku_labels(gt / f"{name}.txt", np.asarray(rows).reshape(-1, 4).tolist())


def _synth_untrimmed(seed: int, size: str, out: Path | None, raw: Path | None) -> None:
    """The untrimmed detection set: arrays to `out` (= <data_dir>/synthetic_untrimmed/xsub) and/or
    PKU-MMD Part I files to `raw` (PKU_Skeleton_Renew/, Train_Label_PKU_final/,
    cross-subject.txt)."""
    cfg = SIZES[size]
    parts: dict[str, tuple[list, list, list]] = {"train": ([], [], []), "val": ([], [], [])}
    if raw is not None:
        for sub in ("PKU_Skeleton_Renew", "Train_Label_PKU_final"):
            (raw / sub).mkdir(parents=True, exist_ok=True)
    for seq, pid, pair in cfg["videos"]:
        views, labels = _untrimmed_video(seed, seq, pid, pair, cfg["actions"])
        part = "train" if pid in NTU60_TRAIN_SUBJECTS else "val"
        for view, xyz in views.items():
            name = f"{seq:04d}-{view}"
            parts[part][0].append(name)
            parts[part][1].append(xyz)
            parts[part][2].append(np.array(labels, dtype=np.int64))
            if raw is not None:
                write_pku_skeleton(raw / "PKU_Skeleton_Renew" / f"{name}.txt", xyz)
                write_pku_labels(raw / "Train_Label_PKU_final" / f"{name}.txt", labels)
    if raw is not None:
        write_pku_split(raw / "cross-subject.txt", parts["train"][0], parts["val"][0])
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for part, (names, seqs, labels) in parts.items():
            write_detection(out, part, names, seqs.__getitem__, labels, [len(q) for q in seqs])


# ----------------------------------------------------------------------------------------------
# Atomic output folders
# ----------------------------------------------------------------------------------------------
META = "prep_info.json"


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return None


def _check_replaceable(target: Path, force: bool) -> None:
    """Refuse (before any work) to replace a non-empty folder that data_prep.py did not write:
    arrays prepared by other repos (bone/motion streams, other splits) may live there."""
    try:
        foreign = not force and _read_meta(target) is None and any(Path(target).iterdir())
    except OSError:  # absent (or unreadable: the build reports it)
        return
    if foreign:
        raise UserError(f"{target}: exists and was not written by data_prep.py (no {META}); move "
                        f"it away or pass --force to replace the whole folder")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tmp_dir(target: Path) -> Path:
    """A fresh build folder next to `target` (same file system, so the final rename is atomic);
    leftovers of killed runs (their process is gone) are removed first."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        for old in target.parent.glob(f".{target.name}.tmp-*"):
            pid = old.name.split(".tmp-")[-1].split("-")[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"{target.parent}: cannot create the output folder ({e.strerror})"
                        ) from None
    return tmp


def _publish(tmp: Path, target: Path, meta: dict) -> None:
    """Rename the finished build folder onto `target`. If a concurrent run already published the
    same output, keep theirs; an outdated folder is moved aside and deleted."""
    (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
    for _ in range(20):
        try:
            os.rename(tmp, target)   # atomic; fails if target exists and is not empty
            return
        except OSError:
            pass
        if _read_meta(target) == meta:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(target, old)
        except FileNotFoundError:
            continue
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    raise UserError(f"{target}: could not replace the existing folder")


def _build(target: Path, meta: dict, fill) -> None:
    """Run fill(tmp_folder) and publish it as `target`; nothing half-written survives an error."""
    tmp = _tmp_dir(target)
    try:
        fill(tmp)
        _publish(tmp, target, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# Synthetic entry point and summaries
# ----------------------------------------------------------------------------------------------
def prepare_synthetic(data_dir, dataset: str = "synthetic", size: str = "default", seed: int = 0,
                      raw: bool = False, quiet: bool = False, z_align: bool = True,
                      force: bool = False, keep_existing: bool = False) -> Path:
    """Generate `<data_dir>/<synthetic|synthetic_ext>/{xsub,xview}` (processed layout), the
    untrimmed detection set `<data_dir>/synthetic_untrimmed/xsub` and, with raw=True,
    `<data_dir>/<dataset>_raw/` (nturgb+d_skeletons/*.skeleton and a PKU-MMD/ folder in Part I
    layout). Outputs that already hold the same (dataset, size, seed, z_align) are kept; with
    keep_existing=True every output folder that exists at all is kept (the automatic generation of
    a missing set must not replace anything already in data_dir). Returns the dataset folder."""
    if dataset not in ("synthetic", "synthetic_ext"):
        raise UserError(f"--dataset {dataset!r}: not a synthetic dataset "
                        "(synthetic, synthetic_ext)")
    if size not in SIZES:
        raise UserError(f"--size {size!r}: choose from {', '.join(SIZES)}")
    data_dir = Path(data_dir)
    folder = data_dir / DATASETS[dataset][0]
    num_classes = DATASETS[dataset][2]
    base = {"generator": GENERATOR_VERSION, "size": size, "seed": int(seed)}
    metas = {folder: {**base, "dataset": dataset, "z_align": bool(z_align), "frames": T_SYNTH},
             data_dir / "synthetic_untrimmed": {**base, "dataset": "synthetic_untrimmed"}}
    if raw:
        metas[data_dir / f"{dataset}_raw"] = {**base, "dataset": f"{dataset}_raw"}
    todo = [t for t, m in metas.items() if force or _read_meta(t) != m]
    if keep_existing:
        todo = [t for t in todo if not t.exists()]
    for t in todo:
        _check_replaceable(t, force)
    t0 = time.time()
    if todo:
        tmps = {t: _tmp_dir(t) for t in todo}
        try:
            raw_root = tmps.get(data_dir / f"{dataset}_raw")
            if folder in tmps or raw_root is not None:
                _synth_trimmed(seed, size, num_classes, z_align, tmps.get(folder),
                               raw_root / "nturgb+d_skeletons" if raw_root else None,
                               quiet=quiet)
            if data_dir / "synthetic_untrimmed" in tmps or raw_root is not None:
                out = tmps.get(data_dir / "synthetic_untrimmed")
                _synth_untrimmed(seed, size, out / "xsub" if out else None,
                                 raw_root / "PKU-MMD" if raw_root else None)
            for t, tmp in tmps.items():
                if keep_existing:  # a folder that appeared meanwhile (another run) stays as it is
                    (tmp / META).write_text(json.dumps(metas[t], indent=1) + "\n")
                    try:
                        os.rename(tmp, t)
                    except OSError:
                        shutil.rmtree(tmp, ignore_errors=True)
                else:
                    _publish(tmp, t, metas[t])
        except BaseException:
            for tmp in tmps.values():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    if not quiet:
        head = f"{dataset} ({size}, seed {seed})"
        if todo:
            print(f"{head}: wrote {', '.join(str(t) for t in todo)} in {time.time() - t0:.1f} s")
        else:
            print(f"{head}: already prepared in {data_dir} (--force rebuilds)")
        print(summary(folder, CLASS_NAMES[:num_classes]))
        det = data_dir / "synthetic_untrimmed" / "xsub"
        print("  untrimmed " + ", ".join(
            f"{part}: {len(list((det / f'{part}_gt').glob('*.txt')))} videos "
            f"({sum(len(read_pku_labels(f)) for f in (det / f'{part}_gt').glob('*.txt'))} actions)"
            for part in ("train", "val")))
    return folder


def summary(folder: Path, class_names: list[str] | None = None) -> str:
    """Samples per split and per class of a processed dataset folder."""
    lines, per_class = [], {}
    for d in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        row = []
        for part in ("train", "val"):
            f = d / f"{part}_label.npy"
            if f.exists():
                lab = np.load(f)
                row.append(f"{part} {len(lab)}")
                per_class[(d.name, part)] = np.bincount(lab, minlength=len(class_names or []))
        lines.append(f"  {d.name}: " + ", ".join(row))
    if per_class:
        keys = list(per_class)
        n = max(len(v) for v in per_class.values())
        lines.append("  class" + " " * 20 + "".join(f"{s}/{p}".rjust(12) for s, p in keys))
        for c in range(n):
            name = class_names[c] if class_names and c < len(class_names) else ""
            lines.append(f"  {c:3d} {name:<20}" + "".join(
                f"{per_class[k][c] if c < len(per_class[k]) else 0:12d}" for k in keys))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Real data: NTU RGB+D 60 / 120 (protocols 8.1-8.3)
# ----------------------------------------------------------------------------------------------
# published sizes after dropping the missing-skeleton samples (protocols 8.2)
NTU_EXPECTED = {"ntu60": {"xsub/train": 40091, "xsub/val": 16487, "xview/train": 37646,
                          "xview/val": 18932},
                "ntu120": {"xsub/train": 63026, "xsub/val": 50919, "xsetup/train": 54468,
                           "xsetup/val": 59477}}
MISSING_LISTS = ("samples_with_missing_skeletons.txt",
                 "NTU_RGBD_samples_with_missing_skeletons.txt",
                 "NTU_RGBD120_samples_with_missing_skeletons.txt")
NTU_MISSING_COUNT = {"ntu60": 302, "ntu120": 535}  # samples on the official lists


def ntu_fields(name: str) -> tuple[int, int, int, int, int] | None:
    """'S001C002P003R002A013[.skeleton]' -> (setup, camera, performer, replication, action)."""
    stem = name.split(".")[0]
    if len(stem) != 20 or [stem[i] for i in (0, 4, 8, 12, 16)] != list("SCPRA"):
        return None
    try:
        s, c, p, r, a = (int(stem[i + 1:i + 4]) for i in (0, 4, 8, 12, 16))
    except ValueError:
        return None
    return s, c, p, r, a


def ntu_membership(dataset: str, fields: list[tuple]) -> dict:
    """Benchmark splits by the official rules: 1 = train, 0 = val."""
    f = np.array(fields, dtype=np.int64).reshape(-1, 5)
    if dataset == "ntu60":
        return {"xsub": np.isin(f[:, 2], NTU60_TRAIN_SUBJECTS).astype(int),
                "xview": np.isin(f[:, 1], NTU_XVIEW_TRAIN_CAMERAS).astype(int)}
    return {"xsub": np.isin(f[:, 2], NTU120_TRAIN_SUBJECTS).astype(int),
            "xsetup": (f[:, 0] % 2 == 0).astype(int)}


def _ntu_job(job: tuple) -> tuple:
    """Worker: parse one .skeleton file -> (status, sample (2, T, 25, 3) or None, frames, msg)."""
    path, T = job
    try:
        bodies = read_ntu_skeleton(path)
    except UserError as e:
        return "bad", None, 0, str(e)
    if not bodies.any():
        return "empty", None, 0, f"{path}: no skeleton in any frame"
    sample, n = _ntu_sample(bodies, T)
    return "ok", sample, n, ""


def _convert_files(jobs: list, job_fn, writer, z_align: bool, skip_bad: bool, workers: int,
                   chunk: int, desc: str, quiet: bool, what: str) -> tuple[np.ndarray, list[str]]:
    """Parse `jobs` with `job_fn` (-> (status, sample (2, T, 25, 3), frames, msg)) in blocks of
    `chunk`, pre-normalise and write each block with `writer`. -> (kept mask, report lines of the
    skipped files); a "bad" file stops the run unless skip_bad."""
    keep = np.ones(len(jobs), dtype=bool)
    report: list[str] = []
    blocks = [range(s, min(s + chunk, len(jobs))) for s in range(0, len(jobs), chunk)]
    pool = None
    if workers > 1:
        import multiprocessing as mp
        pool = mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers)
    bar = _progress(None, len(jobs), desc, quiet)
    try:
        # the workers parse block b+1 while this process normalises and writes block b: at most two
        # blocks of samples are in memory at any time
        pending = pool.map_async(job_fn, [jobs[i] for i in blocks[0]], chunksize=4) if pool else None
        for b, block in enumerate(blocks):
            results = pending.get() if pool else [job_fn(jobs[i]) for i in block]
            if pool and b + 1 < len(blocks):
                pending = pool.map_async(job_fn, [jobs[i] for i in blocks[b + 1]], chunksize=4)
            buf, g, nf = [], [], []
            for i, (status, sample, n, msg) in zip(block, results):
                if status == "bad" and not skip_bad:
                    raise UserError(msg + " (use --skip_bad to skip such files)")
                if status != "ok":
                    keep[i] = False
                    report.append(f"{status}: {msg}")
                    continue
                buf.append(sample)
                g.append(i)
                nf.append(n)
            if buf:
                writer.put(np.array(g), pre_normalization(np.stack(buf), z_align), np.array(nf))
            if bar is not None:
                bar.update(len(block))
    finally:
        if bar is not None:
            bar.close()
        if pool:
            pool.terminate()
    if not keep.any():
        raise UserError(f"no usable sample among {len(jobs)} {what}")
    return keep, report


def gendata_ntu(files: list[Path], out: Path, dataset: str, z_align: bool = True,
                skip_bad: bool = False, workers: int = 2, T: int = T_REAL, quiet: bool = False,
                chunk: int = 128) -> tuple[dict, list[str]]:
    """2s-AGCN gendata for .skeleton `files` (sorted by name) into `out`/<split>/: up to 4 bodies
    read, the 2 most active kept, T frames, pre_normalization. Files are parsed by `workers`
    processes and streamed into memory-mapped outputs. -> (sizes, report lines of skipped files)."""
    names = [f.name for f in files]
    fields = [ntu_fields(n) for n in names]
    writer = _LayoutWriter(out, names, np.array([f[4] - 1 for f in fields]),
                           ntu_membership(dataset, fields), T)
    keep, report = _convert_files([(str(f), T) for f in files], _ntu_job, writer, z_align, skip_bad,
                                  workers, chunk, dataset, quiet, ".skeleton files")
    return writer.close(keep), report


def _list_dir(d: Path, what: str) -> list[str]:
    if not d.is_dir():
        raise UserError(f"{what} {d}: not a folder")
    try:
        return sorted(os.listdir(d))
    except OSError as e:
        raise UserError(f"{what} {d}: unreadable folder ({e.strerror})") from None


def prepare_ntu(raw_dirs: list, data_dir, dataset: str = "ntu60", z_align: bool = True,
                skip_bad: bool = False, workers: int = 2, force: bool = False, quiet: bool = False,
                T: int = T_REAL) -> Path:
    """`python data_prep.py --dataset ntu60|ntu120 --raw_dir DIR [DIR2]`: every S???C???P???R???A???
    .skeleton file of the folder(s) (NTU-60: setups 1-17, actions 1-60), minus the samples of a
    missing-skeleton list found in or next to the folders, minus files without any skeleton."""
    if not raw_dirs:
        raise UserError(f"--raw_dir: give the nturgb+d_skeletons folder(s) of {dataset}")
    files: dict[str, Path] = {}
    missing: set[str] = set()
    for d in map(Path, raw_dirs):
        for n in _list_dir(d, "--raw_dir"):
            if not n.endswith(".skeleton"):
                continue
            f = ntu_fields(n)
            if f is None:
                raise UserError(f"{d / n}: not an NTU sample name (SsssCcccPpppRrrrAaaa.skeleton)")
            if dataset == "ntu60" and (f[0] > 17 or f[4] > 60):
                continue
            if n in files:
                raise UserError(f"{d / n}: the same sample also is in {files[n].parent}")
            files[n] = d / n
        for cand in (d / m for m in MISSING_LISTS):
            for c in (cand, d.parent / cand.name):
                if c.is_file():
                    missing |= {line.strip().split(".")[0] for line in _read_text(c)
                                if line.strip()}
    if not files:
        raise UserError(f"--raw_dir {' '.join(map(str, raw_dirs))}: no .skeleton files found")
    dropped = sorted(n for n in files if n.split(".")[0] in missing)
    chosen = [files[n] for n in sorted(files) if n.split(".")[0] not in missing]
    target = Path(data_dir) / DATASETS[dataset][0]
    meta = {"dataset": dataset, "z_align": bool(z_align), "frames": T, "files": len(chosen),
            "first": chosen[0].name if chosen else "", "last": chosen[-1].name if chosen else "",
            "skip_bad": bool(skip_bad)}
    if not force and _read_meta(target) == meta:
        if not quiet:
            print(f"{target}: already prepared from the same {len(chosen)} files "
                  "(--force rebuilds)")
        return target
    _check_replaceable(target, force)
    if not missing and not quiet:
        print(f"warning: no {' / '.join(MISSING_LISTS)} in or beside --raw_dir: only samples "
              f"without any skeleton are dropped (the benchmark drops the listed "
              f"{NTU_MISSING_COUNT[dataset]})")
    t0 = time.time()

    def fill(tmp: Path) -> None:
        sizes, report = gendata_ntu(chosen, tmp, dataset, z_align, skip_bad, workers, T, quiet)
        report = [f"missing-skeleton list: {n}" for n in dropped] + report
        if report:
            (tmp / "skipped.txt").write_text("".join(r + "\n" for r in report))
        if not quiet:
            print(f"{dataset}: {len(chosen)} files in {time.time() - t0:.0f} s, skipped "
                  f"{len(report)} (listed in {target / 'skipped.txt'})" if report else
                  f"{dataset}: {len(chosen)} files in {time.time() - t0:.0f} s")
            expected = NTU_EXPECTED[dataset]
            print("  " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
            if sizes != expected:
                print("  (the published full-dataset sizes are " +
                      ", ".join(f"{k} {v}" for k, v in expected.items()) + ")")

    _build(target, meta, fill)
    return target


# ----------------------------------------------------------------------------------------------
# Real data: PKU-MMD Part I / II (protocols 5 and 8.4)
# ----------------------------------------------------------------------------------------------
PKU_LAYOUT = {  # dataset -> (skeleton folder, label folder, {split: split-file name patterns})
    "pku1": (("PKU_Skeleton_Renew", "skeleton"), ("Train_Label_PKU_final", "label"),
             {"xsub": ("cross-subject.txt", "cross_subject.txt", "cross_subject_v1.txt")}),
    "pku2": (("skeleton", "PKU_Skeleton_Renew"), ("label", "Train_Label_PKU_final"),
             {"xsub": ("cross-subject.txt", "cross_subject_v2.txt", "pku_cross_subject_v2.txt",
                       "cross_subject.txt"),
              "xview": ("cross-view.txt", "cross_view_v2.txt", "pku_cross_view_v2.txt",
                        "cross_view.txt")}),
}


def _pku_paths(raw: Path, dataset: str) -> tuple[Path, Path, dict]:
    skel_names, label_names, split_names = PKU_LAYOUT[dataset]
    _list_dir(raw, "--raw_dir")
    skel = next((raw / n for n in skel_names if (raw / n).is_dir()), None)
    lab = next((raw / n for n in label_names if (raw / n).is_dir()), None)
    if skel is None or lab is None:
        raise UserError(f"--raw_dir {raw}: expected the folders {skel_names[0]}/ and "
                        f"{label_names[0]}/")
    splits = {}
    for split, cands in split_names.items():
        f = next((raw / n for n in cands if (raw / n).is_file()), None)
        if f is None:
            raise UserError(f"--raw_dir {raw}: no {split} split file "
                            f"(looked for {', '.join(cands)})")
        splits[split] = f
    return skel, lab, splits


def prepare_pku(raw_dir, data_dir, dataset: str = "pku1", z_align: bool = True,
                skip_bad: bool = False, force: bool = False, quiet: bool = False,
                T: int = T_REAL) -> Path:
    """Trimmed clips (one per label line: frames [start, end), first T kept, num_frame clamped to T,
    label - 1, name '<video>.txt_<k>', pre_normalization) for every benchmark split file; for Part I
    also the untrimmed detection arrays in <data_dir>/PKU-MMD-v1-detection/xsub."""
    raw = Path(raw_dir)
    skel, labd, split_files = _pku_paths(raw, dataset)
    splits = {k: read_pku_split(f) for k, f in split_files.items()}
    videos = sorted({v for tr, va in splits.values() for v in tr + va})
    report: list[str] = []
    ok: dict[str, bool] = {}
    for v in videos:
        for path in (skel / f"{v}.txt", labd / f"{v}.txt"):
            if not path.is_file():
                split = next(k for k, (tr, va) in splits.items() if v in tr + va)
                msg = f"{split_files[split]}: names video {v!r}, but {path} does not exist"
                if not skip_bad:
                    raise UserError(msg + " (use --skip_bad to skip it)")
                report.append(f"missing: {msg}")
                ok[v] = False
        ok.setdefault(v, True)
    target = Path(data_dir) / DATASETS[dataset][0]
    det_target = Path(data_dir) / "PKU-MMD-v1-detection"
    meta = {"dataset": dataset, "z_align": bool(z_align), "frames": T, "videos": len(videos),
            "skip_bad": bool(skip_bad)}
    targets = [target] + ([det_target] if dataset == "pku1" else [])
    if not force and all(_read_meta(t) == meta for t in targets):
        if not quiet:
            print(f"{target}: already prepared from the same {len(videos)} videos "
                  "(--force rebuilds)")
        return target
    for t in targets:
        _check_replaceable(t, force)
    # pass 1: the label files (small) fix the list of clips, their labels and split membership
    names, labels, vid_of, rows_of = [], [], [], {}
    for v in videos:
        if not ok[v]:
            continue
        try:
            rows_of[v] = read_pku_labels(labd / f"{v}.txt")
        except UserError as e:
            if not skip_bad:
                raise UserError(f"{e} (use --skip_bad to skip it)") from None
            report.append(f"bad: {e}")
            ok[v] = False
            continue
        for k, row in enumerate(rows_of[v]):
            names.append(f"{v}.txt_{k}")
            labels.append(int(row[0]) - 1)
            vid_of.append(v)
    if not names:
        raise UserError(f"--raw_dir {raw}: no action instance in the label files")
    member = {}
    for split, (tr, va) in splits.items():
        side = {**{v: 0 for v in va}, **{v: 1 for v in tr}}
        member[split] = np.array([side.get(v, -1) for v in vid_of])
    lengths: dict[str, int] = {}

    def fill(tmp: Path) -> None:
        # pass 2: each skeleton file once, clips streamed to disk in chunks (bounded memory)
        writer = _LayoutWriter(tmp, names, np.array(labels), member, T)
        keep = np.ones(len(names), dtype=bool)
        buf, g, nf = [], [], []
        first = {v: i for i, v in reversed(list(enumerate(vid_of)))}
        for v in _progress([v for v in videos if v in rows_of], len(rows_of), dataset, quiet):
            try:
                seq = read_pku_skeleton(skel / f"{v}.txt")
            except UserError as e:
                if not skip_bad:
                    raise UserError(f"{e} (use --skip_bad to skip it)") from None
                report.append(f"bad: {e}")
                keep[[i for i, u in enumerate(vid_of) if u == v]] = False
                continue
            lengths[v] = len(seq)
            for k, (_, start, end, _) in enumerate(rows_of[v]):
                i = first[v] + k
                clip = seq[start:end]
                if len(clip) == 0:
                    report.append(f"empty: {labd / f'{v}.txt'}:{k + 1}: [{start}, {end}) is "
                                  f"outside the {len(seq)} frames of the video")
                    keep[i] = False
                    continue
                sample = np.zeros((MAX_BODY, T, 25, 3), dtype=np.float32)
                sample[:, :min(len(clip), T)] = clip[:T].transpose(1, 0, 2, 3)
                buf.append(sample)
                g.append(i)
                nf.append(min(len(clip), T))
                if len(buf) == 128:
                    writer.put(np.array(g), pre_normalization(np.stack(buf), z_align), np.array(nf))
                    buf, g, nf = [], [], []
        if buf:
            writer.put(np.array(g), pre_normalization(np.stack(buf), z_align), np.array(nf))
        if not keep.any():
            raise UserError(f"--raw_dir {raw}: no usable action instance")
        sizes = writer.close(keep)
        if report:
            (tmp / "skipped.txt").write_text("".join(r + "\n" for r in report))
        if not quiet:
            skipped = f"; skipped {len(report)} (see {target / 'skipped.txt'})" if report else ""
            print(f"{dataset}: {int(keep.sum())} clips from {len(lengths)} videos; " +
                  ", ".join(f"{k} {v}" for k, v in sizes.items()) + skipped)

    def fill_det(tmp: Path) -> None:
        out = tmp / "xsub"
        out.mkdir()
        tr, va = splits["xsub"]
        for part, vids in (("train", tr), ("val", va)):
            vids = [v for v in vids if v in lengths]
            write_detection(out, part, vids, lambda i, vids=vids: read_pku_skeleton(
                skel / f"{vids[i]}.txt"), [rows_of[v] for v in vids], [lengths[v] for v in vids])

    _build(target, meta, fill)
    if dataset == "pku1":
        _build(det_target, meta, fill_det)
    return target


# ----------------------------------------------------------------------------------------------
# Real data: BVH motion capture (Bandai-Namco-Research-Motiondataset-2, CMU, any BVH + joint map)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BvhClip:
    """One parsed .bvh file. Joints are in file order (a parent precedes its children); End Sites
    are joints too, named '<parent>_end', without channels."""
    names: list
    parents: np.ndarray    # (J,) parent index, -1 for the root
    offsets: np.ndarray    # (J, 3) OFFSET in file units
    pos_cols: np.ndarray   # (J, 3) motion column of the X/Y/Z position channel, -1 when absent
    rot_cols: list         # per joint: motion columns of its rotation channels, in written order
    rot_axes: list         # per joint: their axes, e.g. "ZXY"
    motion: np.ndarray     # (F, channels) float64
    frame_time: float      # seconds


def _bvh_float(path, lineno: int, tok: str, what: str) -> float:
    try:
        x = float(tok)
    except ValueError:
        raise _bad(path, lineno, f"{what}: non-numeric value {tok!r}") from None
    if not math.isfinite(x):
        raise _bad(path, lineno, f"{what}: non-finite value {tok!r}")
    return x


def read_bvh(path) -> BvhClip:
    """Parse a BVH file (HIERARCHY: ROOT / JOINT / End Site blocks with OFFSET and CHANNELS in any
    order of the six channel names; MOTION: 'Frames:', 'Frame Time:' and one line of channel values
    per frame). Malformed input raises UserError('<file>:<line>: what is wrong')."""
    lines = _read_text(Path(path))
    names, parents, offsets, pos_cols, rot_cols, rot_axes = [], [], [], [], [], []
    has_offset, is_end = [], []
    stack: list[int] = []
    pending = None   # joint declared, its '{' not yet read
    n_chan = 0
    i = 0
    while i < len(lines) and not lines[i].strip():
        i += 1
    if i == len(lines) or lines[i].split()[0] != "HIERARCHY":
        raise _bad(path, min(i + 1, len(lines)), "expected 'HIERARCHY' (not a BVH file)")
    i += 1
    while True:
        if i == len(lines):
            raise _bad(path, len(lines), "file is truncated (no MOTION section)")
        tok = lines[i].split()
        ln = i + 1
        i += 1
        if not tok:
            continue
        key = tok[0]
        if key == "MOTION":
            if stack or pending is not None:
                raise _bad(path, ln, "MOTION before the hierarchy's '}' are all closed")
            break
        if pending is not None and key != "{":
            raise _bad(path, ln, f"expected '{{' after the declaration of {names[pending]!r}")
        if key in ("ROOT", "JOINT") or tok[:2] == ["End", "Site"]:
            end = key == "End"
            brace = tok[-1] == "{" and len(tok) > (2 if end else 1)
            if key == "ROOT" and (stack or names):
                raise _bad(path, ln, "a second ROOT (one skeleton per file is supported)")
            if key != "ROOT" and not stack:
                raise _bad(path, ln, f"{key} outside the ROOT block")
            if end:
                if is_end[stack[-1]]:
                    raise _bad(path, ln, "End Site inside an End Site")
                name = names[stack[-1]] + "_end"
            else:
                name = " ".join(tok[1:-1] if brace else tok[1:])
                if not name:
                    raise _bad(path, ln, f"{key} without a name")
                if name in names:
                    raise _bad(path, ln, f"joint name {name!r} used twice")
            names.append(name)
            parents.append(stack[-1] if stack else -1)
            offsets.append([0.0, 0.0, 0.0])
            pos_cols.append([-1, -1, -1])
            rot_cols.append([])
            rot_axes.append("")
            has_offset.append(False)
            is_end.append(end)
            pending = len(names) - 1
            if brace:
                stack.append(pending)
                pending = None
        elif key == "{":
            if pending is None:
                raise _bad(path, ln, "'{' without a ROOT / JOINT / End Site before it")
            stack.append(pending)
            pending = None
        elif key == "}":
            if not stack:
                raise _bad(path, ln, "'}' without a matching '{'")
            if not has_offset[stack[-1]]:
                raise _bad(path, ln, f"{names[stack[-1]]!r} has no OFFSET")
            stack.pop()
        elif key == "OFFSET":
            if not stack:
                raise _bad(path, ln, "OFFSET outside a joint block")
            if len(tok) != 4:
                raise _bad(path, ln, f"OFFSET needs 3 values, found {len(tok) - 1}")
            offsets[stack[-1]] = [_bvh_float(path, ln, t, "OFFSET") for t in tok[1:]]
            has_offset[stack[-1]] = True
        elif key == "CHANNELS":
            j = stack[-1] if stack else None
            if j is None or is_end[j]:
                raise _bad(path, ln, "CHANNELS outside a ROOT / JOINT block")
            if rot_axes[j] or max(pos_cols[j]) >= 0:
                raise _bad(path, ln, f"a second CHANNELS line for {names[j]!r}")
            try:
                n = int(tok[1])
            except (IndexError, ValueError):
                raise _bad(path, ln, "CHANNELS must be followed by their number") from None
            if n != len(tok) - 2:
                raise _bad(path, ln, f"CHANNELS {n} lists {len(tok) - 2} channel names")
            for c in tok[2:]:
                axis, kind = c[:1].upper(), c[1:].lower()
                if not axis or axis not in "XYZ" or kind not in ("position", "rotation"):
                    raise _bad(path, ln, f"unknown channel {c!r} (expected X/Y/Z position or "
                                         "rotation)")
                if kind == "position":
                    if pos_cols[j]["XYZ".index(axis)] >= 0:
                        raise _bad(path, ln, f"channel {c!r} given twice")
                    pos_cols[j]["XYZ".index(axis)] = n_chan
                else:
                    rot_cols[j].append(n_chan)
                    rot_axes[j] += axis
                n_chan += 1
        else:
            raise _bad(path, ln, f"unexpected {key!r} in the HIERARCHY")
    if not names:
        raise _bad(path, i, "MOTION before any ROOT")
    header = {}
    for field in ("Frames", "Frame Time"):
        while i < len(lines) and not lines[i].strip():
            i += 1
        line = lines[i].strip() if i < len(lines) else ""
        if not line.startswith(field + ":"):
            raise _bad(path, min(i + 1, len(lines)), f"expected '{field}:'")
        header[field] = (line[len(field) + 1:].strip(), i + 1)
        i += 1
    try:
        frames = int(header["Frames"][0])
    except ValueError:
        frames = -1
    if frames < 0:
        raise _bad(path, header["Frames"][1], f"'Frames:' needs a count, found "
                                              f"{header['Frames'][0]!r}")
    dt_text, dt_line = header["Frame Time"]
    dt = _bvh_float(path, dt_line, dt_text, "Frame Time")
    if dt <= 0:
        raise _bad(path, dt_line, f"Frame Time must be positive, found {dt_text!r}")
    rows = lines[i:i + frames]
    if len(rows) < frames or (frames and not rows[-1].strip()):
        found = sum(1 for r in rows if r.strip())
        raise _bad(path, len(lines), f"file is truncated ({frames} frames declared, "
                                     f"{found} found)")
    extra = [k for k, r in enumerate(lines[i + frames:]) if r.strip()]
    if extra:
        raise _bad(path, i + frames + extra[0] + 1, f"more frame lines than 'Frames: {frames}'")
    motion = _numbers(path, rows, n_chan, lineno=lambda k: i + k + 1) if frames else \
        np.zeros((0, n_chan))
    return BvhClip(names, np.array(parents), np.array(offsets, dtype=np.float64),
                   np.array(pos_cols, dtype=np.int64), rot_cols, rot_axes, motion, dt)


def _axis_rotations(axis: str, deg: np.ndarray) -> np.ndarray:
    """(F,) angles in degrees about axis X, Y or Z -> (F, 3, 3) right-handed rotation matrices."""
    a = np.radians(deg)
    c, s = np.cos(a), np.sin(a)
    R = np.zeros(a.shape + (3, 3))
    i, j = {"X": (1, 2), "Y": (2, 0), "Z": (0, 1)}[axis]
    k = 3 - i - j
    R[:, k, k] = 1.0
    R[:, i, i], R[:, i, j], R[:, j, i], R[:, j, j] = c, -s, s, c
    return R


def bvh_positions(clip: BvhClip) -> np.ndarray:
    """Forward kinematics -> (F, J, 3) world positions in file units and axes, vectorised over
    frames. A joint's local transform is translation then rotation: the translation is its OFFSET,
    with each axis that has a position channel taken from that channel instead (the channel
    replaces the OFFSET, as in Blender's BVH import); the rotation is the product of its rotation
    channels in the order written (CHANNELS ... Zrotation Xrotation Yrotation -> Rz @ Rx @ Ry)."""
    F, J = len(clip.motion), len(clip.names)
    pos = np.zeros((F, J, 3))
    rot = np.zeros((F, J, 3, 3))
    for j in range(J):
        t = np.repeat(clip.offsets[j][None], F, axis=0)                   # (F, 3)
        cols = clip.pos_cols[j]
        t[:, cols >= 0] = clip.motion[:, cols[cols >= 0]]
        R = np.broadcast_to(np.eye(3), (F, 3, 3))
        for col, axis in zip(clip.rot_cols[j], clip.rot_axes[j]):
            R = R @ _axis_rotations(axis, clip.motion[:, col])
        p = clip.parents[j]
        if p < 0:
            pos[:, j], rot[:, j] = t, R
        else:
            pos[:, j] = pos[:, p] + np.einsum("fij,fj->fi", rot[:, p], t)
            rot[:, j] = rot[:, p] @ R
    return pos


# Joint-name presets: NTU joint (common.JOINT_NAMES) -> BVH joint ('<joint>_end' = its End Site),
# and metres per file unit. NTU joints absent from a map are filled by BVH_FILL.
BVH_PRESETS = {
    # Bandai-Namco-Research-Motiondataset: cm; Neck is the base of the neck, Head the top of the
    # neck (its End Site has offset 0, so there is no head point), Hand_* is the wrist.
    "bandai": (0.01, {
        "spine_base": "Hips", "spine_mid": "Chest", "spine_shoulder": "Neck", "neck": "Head",
        "left_shoulder": "UpperArm_L", "left_elbow": "LowerArm_L", "left_wrist": "Hand_L",
        "right_shoulder": "UpperArm_R", "right_elbow": "LowerArm_R", "right_wrist": "Hand_R",
        "left_hip": "UpperLeg_L", "left_knee": "LowerLeg_L", "left_ankle": "Foot_L",
        "left_foot": "Toes_L", "right_hip": "UpperLeg_R", "right_knee": "LowerLeg_R",
        "right_ankle": "Foot_R", "right_foot": "Toes_R"}),
    # CMU mocap as BVH (the 31-joint conversion of the ASF/AMC files): lengths stay in the ASF unit
    # of 1/0.45 inch; LeftFingerBase sits on the wrist, so the hand is LeftHandIndex1.
    "cmu": (0.0254 / 0.45, {
        "spine_base": "Hips", "spine_mid": "Spine", "spine_shoulder": "Neck", "neck": "Neck1",
        "head": "Head",
        "left_shoulder": "LeftArm", "left_elbow": "LeftForeArm", "left_wrist": "LeftHand",
        "left_hand": "LeftHandIndex1", "left_hand_tip": "LeftHandIndex1_end",
        "left_thumb": "LThumb_end",
        "right_shoulder": "RightArm", "right_elbow": "RightForeArm", "right_wrist": "RightHand",
        "right_hand": "RightHandIndex1", "right_hand_tip": "RightHandIndex1_end",
        "right_thumb": "RThumb_end",
        "left_hip": "LeftUpLeg", "left_knee": "LeftLeg", "left_ankle": "LeftFoot",
        "left_foot": "LeftToeBase", "right_hip": "RightUpLeg", "right_knee": "RightLeg",
        "right_ankle": "RightFoot", "right_foot": "RightToeBase"}),
}
# NTU joints every map must give (neck or head: at least one of the two).
BVH_REQUIRED = ["spine_base", "left_shoulder", "left_elbow", "left_wrist", "right_shoulder",
                "right_elbow", "right_wrist", "left_hip", "left_knee", "left_ankle", "right_hip",
                "right_knee", "right_ankle"]
# The one rule for NTU joints a map does not give, applied in this order, each only when the joint
# is missing: joint = a + t * (a - b) (t < 0 interpolates between a and b, t > 0 extends the bone
# b -> a by t times its length). The factors follow the proportions of an adult Kinect skeleton;
# hand tips and thumbs continue the forearm line (a BVH without finger joints has no palm
# direction to place a thumb by).
BVH_FILL = [
    ("spine_shoulder", "left_shoulder", "right_shoulder", -0.5),   # between the shoulders
    ("spine_mid", "spine_base", "spine_shoulder", -0.5),           # halfway up the spine
    ("neck", "spine_shoulder", "head", -1 / 3),                    # a third of the way to the head
    ("head", "neck", "spine_shoulder", 2.0),                       # neck-head = 2 x shoulder-neck
    ("left_hand", "left_wrist", "left_elbow", 0.28),               # 7 cm past a 25 cm forearm
    ("right_hand", "right_wrist", "right_elbow", 0.28),
    ("left_hand_tip", "left_hand", "left_wrist", 1.0),
    ("right_hand_tip", "right_hand", "right_wrist", 1.0),
    ("left_thumb", "left_hand", "left_wrist", 0.5),
    ("right_thumb", "right_hand", "right_wrist", 0.5),
    ("left_foot", "left_ankle", "left_knee", 0.12),                # below the ankle
    ("right_foot", "right_ankle", "right_knee", 0.12),
]
BVH_FPS = 30.0


def read_joint_map(path) -> dict:
    """A --joint_map file: one 'ntu_joint bvh_joint' pair per line (NTU names as in
    common.JOINT_NAMES; the BVH name is the rest of the line, '<joint>_end' for an End Site);
    blank lines and '#' comments are ignored."""
    from common import JOINT_NAMES
    out = {}
    for k, line in enumerate(_read_text(Path(path))):
        line = line.split("#")[0].strip()
        if not line:
            continue
        tok = line.split(None, 1)
        if len(tok) != 2:
            raise _bad(path, k + 1, "expected 'ntu_joint bvh_joint'")
        if tok[0] not in JOINT_NAMES:
            raise _bad(path, k + 1, f"{tok[0]!r} is not an NTU joint name "
                                    f"({', '.join(JOINT_NAMES)})")
        if tok[0] in out:
            raise _bad(path, k + 1, f"{tok[0]!r} mapped twice")
        out[tok[0]] = tok[1].strip()
    return out


def check_joint_map(jmap: dict, where: str) -> None:
    missing = [n for n in BVH_REQUIRED if n not in jmap]
    if "neck" not in jmap and "head" not in jmap:
        missing.append("neck or head")
    if missing:
        raise UserError(f"{where}: the joint map lacks {', '.join(missing)} (no rule fills them)")


def detect_preset(names: list, path) -> str:
    """The preset whose BVH joint names all occur in `names`."""
    for preset, (_, jmap) in BVH_PRESETS.items():
        if set(jmap.values()) <= set(names):
            return preset
    raise UserError(f"{path}: its joint names match no preset ({', '.join(BVH_PRESETS)}): pass "
                    "--joint_map FILE (lines 'ntu_joint bvh_joint') and --bvh_scale")


def _detect_in(files: list, skip_bad: bool) -> str:
    """The preset of the first readable file (with --skip_bad, unreadable ones are passed over;
    the conversion lists them)."""
    for f in files:
        try:
            return detect_preset(read_bvh(f).names, f)
        except UserError:
            if not skip_bad or f == files[-1]:
                raise
    raise UserError("no .bvh files")


def bvh_to_ntu(pos: np.ndarray, names: list, jmap: dict, scale: float, path="") -> np.ndarray:
    """(F, J, 3) BVH positions (file units, Y up) -> (F, 25, 3) NTU joints in metres in camera-like
    axes: x' = -x, y' = y, z' = -z (a half turn about the vertical, no mirror), so a subject facing
    +z in the file faces the camera, its left side at smaller x like NTU's Kinect skeletons."""
    from common import JOINT_NAMES
    index = {n: i for i, n in enumerate(names)}
    out = np.full((len(pos), 25, 3), np.nan)
    for ntu, src in jmap.items():
        if src not in index:
            raise UserError(f"{path}: no joint {src!r} (the joint map's {ntu})")
        out[:, JOINT_NAMES.index(ntu)] = pos[:, index[src]]
    for joint, a, b, t in BVH_FILL:
        j, a, b = (JOINT_NAMES.index(n) for n in (joint, a, b))
        if np.isnan(out[:, j]).all():
            out[:, j] = out[:, a] + t * (out[:, a] - out[:, b])
    return out * (scale * np.array([-1.0, 1.0, -1.0]))


def resample(x: np.ndarray, frame_time: float, fps: float = BVH_FPS) -> np.ndarray:
    """(F, ...) frames at 1 / frame_time Hz -> frames at `fps` by linear interpolation in time,
    covering the same duration (frame k at time k / fps). A rate within 0.1% of a whole number is
    taken as that number (files write Frame Time rounded: 0.0083333 for 120 Hz)."""
    src = 1.0 / frame_time
    if abs(src - round(src)) <= 1e-3 * src:
        src = float(round(src))
    ratio = fps / src
    if ratio == 1.0 or len(x) < 2:
        return x
    n = int(math.floor((len(x) - 1) * ratio + 1e-6)) + 1
    u = np.minimum(np.arange(n) / ratio, len(x) - 1)                   # source frame positions
    lo = np.minimum(np.floor(u).astype(np.int64), len(x) - 2)
    w = (u - lo).reshape((-1,) + (1,) * (x.ndim - 1))
    return x[lo] * (1 - w) + x[lo + 1] * w


def load_bvh_ntu(path, jmap: dict, scale: float) -> np.ndarray:
    """A .bvh file -> (F', 25, 3) float64 NTU joints in metres at 30 fps."""
    clip = read_bvh(path)
    return resample(bvh_to_ntu(bvh_positions(clip), clip.names, jmap, scale, path),
                    clip.frame_time)


def _bvh_job(job: tuple) -> tuple:
    """Worker: one .bvh file -> (status, sample (2, T, 25, 3) or None, frames, msg): its first T
    frames as body 0, body 1 empty."""
    path, jmap, scale, T = job
    try:
        xyz = load_bvh_ntu(path, jmap, scale)[:T]
    except UserError as e:
        return "bad", None, 0, str(e)
    if len(xyz) == 0:
        return "empty", None, 0, f"{path}: no frames"
    sample = np.zeros((MAX_BODY, T, 25, 3), dtype=np.float32)
    sample[0, :len(xyz)] = xyz
    return "ok", sample, len(xyz), ""


def gendata_bvh(files: list, out: Path, labels, member: dict, jmap: dict, scale: float,
                z_align: bool = True, skip_bad: bool = False, workers: int = 2, T: int = T_REAL,
                quiet: bool = False, desc: str = "bvh", chunk: int = 128
                ) -> tuple[dict, list, np.ndarray]:
    """.bvh `files` -> the processed layout in `out`/<split>/ (body 0 = the mocap subject, body 1
    empty; first T frames kept, num_frame clamped to T; pre_normalization).
    -> (sizes, report lines of skipped files, kept mask)."""
    writer = _LayoutWriter(out, [Path(f).name for f in files], labels, member, T)
    keep, report = _convert_files([(str(f), jmap, scale, T) for f in files], _bvh_job, writer,
                                  z_align, skip_bad, workers, chunk, desc, quiet, ".bvh files")
    return writer.close(keep), report, keep


# Bandai-Namco-Research-Motiondataset-2: classes in the order of its cfg/content_label.txt (the
# 'content' id of each clip's .json), styles as cfg/style_label.txt.
BANDAI_CLASSES = ["walk", "walk-turn-left", "walk-turn-right", "run", "wave-both-hands",
                  "wave-left-hand", "wave-right-hand", "raise-up-both-hands", "raise-up-left-hand",
                  "raise-up-right-hand"]
BANDAI_STYLES = ["active", "elderly", "exhausted", "feminine", "masculine", "normal", "youthful"]
BANDAI_TEST_STYLES = ("elderly", "youthful")   # xstyle: tested on styles never seen in training
BANDAI_TEST_TAKE = 5                           # xtake: takes numbered 5, 10, 15, ... are tested
BANDAI_SUBDIR = Path("dataset") / "Bandai-Namco-Research-Motiondataset-2" / "data"


def bandai_fields(name: str) -> tuple[int, str, int] | None:
    """'dataset-2_<class>_<style>_<take>.bvh' -> (class index, style, take), None otherwise."""
    parts = name[:-4].split("_") if name.endswith(".bvh") else []
    if len(parts) != 4 or parts[0] != "dataset-2" or parts[1] not in BANDAI_CLASSES or \
            parts[2] not in BANDAI_STYLES or not parts[3].isdigit():
        return None
    return BANDAI_CLASSES.index(parts[1]), parts[2], int(parts[3])


def _bandai_files(raw: Path) -> tuple[Path, list[str]]:
    """The folder of dataset-2's .bvh files: the cloned repository, its dataset-2 folder or the
    data folder itself."""
    _list_dir(raw, "--raw_dir")
    for d in (raw / BANDAI_SUBDIR, raw / "data", raw):
        if d.is_dir():
            names = [n for n in _list_dir(d, "--raw_dir") if n.startswith("dataset-2_")
                     and n.endswith(".bvh")]
            if names:
                return d, names
    zipped = [z for z in (raw / BANDAI_SUBDIR.parent / "data.zip", raw / "data.zip")
              if z.is_file()]
    hint = f" (unzip {zipped[0]} first)" if zipped else ""
    raise UserError(f"--raw_dir {raw}: no dataset-2_*.bvh files in it, in data/ or in "
                    f"{BANDAI_SUBDIR}/{hint}")


def read_bvh_labels(path: Path, raw: Path) -> tuple[list, list, np.ndarray, np.ndarray]:
    """--labels CSV for --dataset bvh: lines 'file,label,split' (file relative to --raw_dir, label
    any class name, split train or test; an optional header line 'file,label,split').
    -> (files, class names (whole numbers first in numeric order, then the others
    alphabetically), (N,) 1 = train / 0 = test, (N,) class indices into the names)."""
    rows = []
    for k, line in enumerate(_read_text(path)):
        if not line.strip() or (k == 0 and line.replace(" ", "").lower() == "file,label,split"):
            continue
        tok = [t.strip() for t in line.rsplit(",", 2)]
        if len(tok) != 3 or not all(tok):
            raise _bad(path, k + 1, "expected 'file,label,split'")
        if tok[2] not in ("train", "test"):
            raise _bad(path, k + 1, f"split must be train or test, found {tok[2]!r}")
        rows.append((k + 1, *tok))
    if not rows:
        raise UserError(f"--labels {path}: no 'file,label,split' lines")
    labels = {r[2] for r in rows}
    classes = sorted(labels, key=lambda s: (0, int(s), s) if s.isdigit() else (1, 0, s))
    files, seen = [], {}
    for ln, f, lab, split in rows:
        if f in seen:
            raise _bad(path, ln, f"{f!r} listed twice (first on line {seen[f]})")
        seen[f] = ln
        files.append(raw / f)
    return files, classes, np.array([int(r[3] == "train") for r in rows]), \
        np.array([classes.index(r[2]) for r in rows])


def prepare_bvh(raw_dir, data_dir, dataset: str = "bandai", labels_csv: str = "",
                joint_map: str = "auto", scale: float = 0.0, z_align: bool = True,
                skip_bad: bool = False, workers: int = 2, force: bool = False,
                quiet: bool = False, T: int = T_REAL) -> Path:
    """`--dataset bandai`: Bandai-Namco-Research-Motiondataset-2 -> <data_dir>/Bandai-Namco-2/
    {xstyle, xtake}, labels from the file names. `--dataset bvh --labels CSV`: any BVH clips ->
    <data_dir>/BVH/custom with the CSV's labels and train/test split. The joint map is a preset
    ('auto' picks the one whose joint names the first file has) or a --joint_map FILE; the scale
    (metres per file unit) is --bvh_scale, else the preset's."""
    raw = Path(raw_dir)
    if dataset == "bandai":
        folder, names = _bandai_files(raw)
        files, fields = [], []
        for n in names:
            f = bandai_fields(n)
            if f is None:
                raise UserError(f"{folder / n}: not a dataset-2_<class>_<style>_<take>.bvh name "
                                f"with a known class and style")
            files.append(folder / n)
            fields.append(f)
        classes = BANDAI_CLASSES
        labels = np.array([f[0] for f in fields])
        member = {"xstyle": np.array([int(f[1] not in BANDAI_TEST_STYLES) for f in fields]),
                  "xtake": np.array([int(f[2] % BANDAI_TEST_TAKE != 0) for f in fields])}
    else:
        if not labels_csv:
            raise UserError("--dataset bvh needs --labels CSV (lines 'file,label,split')")
        _list_dir(raw, "--raw_dir")
        files, classes, side, labels = read_bvh_labels(Path(labels_csv), raw)
        if len(classes) > DATASETS["bvh"][2]:
            raise UserError(f"--labels {labels_csv}: {len(classes)} classes, at most "
                            f"{DATASETS['bvh'][2]} are supported")
        for f in files:
            if not f.is_file():
                raise UserError(f"--labels {labels_csv}: {f} does not exist")
        member = {DATASETS["bvh"][1][0]: side}
    if joint_map in BVH_PRESETS or joint_map == "auto":
        preset = joint_map if joint_map != "auto" else _detect_in(files, skip_bad)
        preset_scale, jmap = BVH_PRESETS[preset]
        scale = scale or preset_scale
        map_desc = preset
    else:
        jmap = read_joint_map(Path(joint_map))
        if not scale:
            raise UserError(f"--joint_map {joint_map}: give --bvh_scale (metres per file unit, "
                            "e.g. 0.01 for cm)")
        map_desc = str(Path(joint_map).resolve())
    check_joint_map(jmap, f"--joint_map {joint_map}")
    if scale <= 0:
        raise UserError(f"--bvh_scale {scale}: must be positive (metres per file unit)")
    order = sorted(range(len(files)), key=lambda k: str(files[k]))
    files = [files[k] for k in order]
    labels = np.asarray(labels)[order]
    member = {k: v[order] for k, v in member.items()}
    target = Path(data_dir) / DATASETS[dataset][0]
    meta = {"dataset": dataset, "z_align": bool(z_align), "frames": T, "fps": BVH_FPS,
            "files": len(files), "first": files[0].name, "last": files[-1].name,
            "classes": list(classes), "joint_map": map_desc, "joint_map_entries": jmap,
            "scale": scale, "skip_bad": bool(skip_bad)}
    if dataset == "bandai":
        meta["splits"] = {"xstyle": f"test styles {', '.join(BANDAI_TEST_STYLES)}",
                          "xtake": f"test takes divisible by {BANDAI_TEST_TAKE}"}
    if not force and _read_meta(target) == meta:
        if not quiet:
            print(f"{target}: already prepared from the same {len(files)} files "
                  "(--force rebuilds)")
        return target
    _check_replaceable(target, force)
    t0 = time.time()

    def fill(tmp: Path) -> None:
        sizes, report, keep = gendata_bvh(files, tmp, labels, member, jmap, scale, z_align,
                                          skip_bad, workers, T, quiet, dataset)
        if report:
            (tmp / "skipped.txt").write_text("".join(r + "\n" for r in report))
        if not quiet:
            skipped = f"; skipped {len(report)} (listed in {target / 'skipped.txt'})" \
                if report else ""
            print(f"{dataset}: {int(keep.sum())} clips from {len(files)} files in "
                  f"{time.time() - t0:.0f} s (joint map {map_desc}, {scale:g} m per unit)"
                  f"{skipped}")
            print(summary(tmp, list(classes)))
            if dataset == "bandai":
                kept = [f for f, k in zip(files, keep) if k]
                styles = [bandai_fields(f.name)[1] for f in kept]
                print("  style        clips  xstyle")
                for s in BANDAI_STYLES:
                    n = styles.count(s)
                    part = "train" if s not in BANDAI_TEST_STYLES else "val"
                    print(f"  {s:<12}{n:6d}  {part}")

    _build(target, meta, fill)
    return target


# ----------------------------------------------------------------------------------------------
# Arrays prepared for other repos: CTR-GCN / SGN NTU60_CS.npz
# ----------------------------------------------------------------------------------------------
def _npz_member(path: Path, key: str) -> np.ndarray:
    """One array of an .npz: memory-mapped when stored uncompressed (np.savez; NTU60_CS.npz's
    x_train is ~7 GB), otherwise read into memory."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{key}.npy")
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)
                start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + \
                    int.from_bytes(local[28:30], "little")
                f.seek(start)
                version = np.lib.format.read_magic(f)
                shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                         else np.lib.format.read_array_header_2_0(f))
                if not fortran and dtype.hasobject is False:
                    return np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape)
        with zf.open(info) as f:
            return np.lib.format.read_array(f, allow_pickle=False)


NPZ_SPLITS = {"CS": "xsub", "CSUB": "xsub", "CV": "xview", "CSET": "xsetup", "XSUB": "xsub",
              "XVIEW": "xview", "XSET": "xsetup", "XSETUP": "xsetup"}


def convert_npz(path, data_dir, dataset: str = "ntu60", split: str = "", force: bool = False,
                quiet: bool = False) -> Path:
    """x_train / x_test (N, T, 150: body 1's 25 xyz then body 2's) and y_train / y_test (one-hot or
    class ids) -> <data_dir>/<FOLDER>/<split>/. The data is taken as it is (those repos already
    normalised it); num_frame = frames with any non-zero value, as CTR-GCN's feeder counts them."""
    path = Path(path)
    if not split:
        tag = path.stem.upper().split("_")[-1]
        split = NPZ_SPLITS.get(tag, "")
        if not split:
            raise UserError(f"--from_npz {path}: cannot tell the benchmark from the file name; "
                            f"pass --split ({'/'.join(DATASETS[dataset][1])})")
    split = {"xset": "xsetup"}.get(split, split)
    if split not in DATASETS[dataset][1]:
        raise UserError(f"--split {split!r}: {dataset} has splits "
                        f"{', '.join(DATASETS[dataset][1])}")
    try:
        with zipfile.ZipFile(path) as zf:
            keys = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    except (OSError, zipfile.BadZipFile) as e:
        raise UserError(f"--from_npz {path}: not a readable .npz file ({e})") from None
    need = {"x_train", "y_train", "x_test", "y_test"}
    if not need <= keys:
        raise UserError(f"--from_npz {path}: missing arrays {sorted(need - keys)} "
                        f"(has {sorted(keys)})")
    z = {k: _npz_member(path, k) for k in need}
    target = Path(data_dir) / DATASETS[dataset][0] / split
    meta = {"dataset": dataset, "from_npz": str(path.resolve()), "size": path.stat().st_size}
    if not force and _read_meta(target) == meta:
        if not quiet:
            print(f"{target}: already converted from {path} (--force rebuilds)")
        return target
    _check_replaceable(target, force)

    def fill(tmp: Path) -> None:
        for part, key in (("train", "train"), ("val", "test")):
            x, y = z[f"x_{key}"], np.asarray(z[f"y_{key}"])
            if x.ndim != 3 or x.shape[2] != 150:
                raise UserError(f"--from_npz {path}: x_{key} has shape {x.shape}, "
                                "expected (N, T, 150)")
            labels = y.argmax(1) if y.ndim == 2 else y.astype(np.int64)
            if len(labels) != len(x):
                raise UserError(f"--from_npz {path}: {len(x)} samples in x_{key}, "
                                f"{len(labels)} labels")
            n, t = x.shape[:2]
            out = NpyRows(tmp / f"{part}_data_joint.npy", (n, 3, t, 25, 2))
            nf = np.zeros(n, dtype=np.int64)
            for s in range(0, n, 512):
                b = np.asarray(x[s:s + 512], dtype=np.float32)
                if not np.isfinite(b).all():
                    raise UserError(f"--from_npz {path}: NaN or inf in x_{key}")
                out.write(np.arange(s, s + len(b)),
                          b.reshape(len(b), t, 2, 25, 3).transpose(0, 4, 1, 3, 2))
                nf[s:s + 512] = np.maximum((b != 0).any(2).sum(1), 1)
            out.close()
            names = [f"{path.stem}_{key}_{i:06d}" for i in range(n)]
            np.save(tmp / f"{part}_label.npy", labels.astype(np.int64))
            np.save(tmp / f"{part}_num_frame.npy", nf)
            with open(tmp / f"{part}_label.pkl", "wb") as fh:
                pickle.dump((names, [int(v) for v in labels]), fh)
        if not quiet:
            print(f"{path} -> {target}")

    _build(target, meta, fill)
    # The dataset folder's record of a raw build no longer describes this split: drop it, so that
    # a later raw build neither reports "already prepared" nor replaces this split unasked.
    (target.parent / META).unlink(missing_ok=True)
    return target


# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    args = parse_args(Args, argv)
    if (args.joint_map != "auto" or args.bvh_scale) and args.dataset not in ("bandai", "bvh"):
        raise UserError("--joint_map / --bvh_scale are for --dataset bandai or bvh")
    if args.labels and args.dataset != "bvh":
        raise UserError("--labels is for --dataset bvh (bandai's labels come from its file "
                        "names)")
    if args.dataset.startswith("synthetic"):
        if args.raw_dir or args.from_npz:
            raise UserError("--raw_dir / --from_npz are for real datasets, not --dataset "
                            f"{args.dataset}")
        prepare_synthetic(args.data_dir, args.dataset, args.size, args.seed, args.raw,
                          z_align=args.z_align, force=args.force)
    elif args.from_npz:
        if not args.dataset.startswith("ntu"):
            raise UserError("--from_npz converts NTU arrays: use --dataset ntu60 or ntu120")
        convert_npz(args.from_npz, args.data_dir, args.dataset, args.split, args.force)
    elif args.dataset in ("bandai", "bvh"):
        if len(args.raw_dir) != 1:
            raise UserError(f"--raw_dir: give the one folder of the {args.dataset} .bvh files")
        prepare_bvh(args.raw_dir[0], args.data_dir, args.dataset, args.labels, args.joint_map,
                    args.bvh_scale, args.z_align, args.skip_bad, args.workers, args.force)
    elif args.dataset.startswith("ntu"):
        prepare_ntu(args.raw_dir, args.data_dir, args.dataset, args.z_align, args.skip_bad,
                    args.workers, args.force)
    else:
        if len(args.raw_dir) != 1:
            raise UserError(f"--raw_dir: give the one PKU-MMD folder of {args.dataset}")
        prepare_pku(args.raw_dir[0], args.data_dir, args.dataset, args.z_align, args.skip_bad,
                    args.force)


if __name__ == "__main__":
    run_main(main)
