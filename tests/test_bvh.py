"""data_prep.py BVH import: the parser and forward kinematics against hand-computed positions, the
joint-name presets (left/right, units, the fill rule), resampling to 30 fps, malformed files, and
the bandai / generic bvh conversions, all on BVH files written here in the exact format."""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

import common as C
import data_prep as D

J = C.JOINT_NAMES.index


# ---------------------------------------------------------------------------------------------
# An exact-format BVH writer: a joint is (name, offset, channels, children); an End Site is
# ("End Site", offset).
# ---------------------------------------------------------------------------------------------
def _block(node, depth, root=False):
    pad = "\t" * depth
    if node[0] == "End Site":
        return [f"{pad}End Site", f"{pad}{{",
                f"{pad}\tOFFSET {' '.join(f'{v:.6f}' for v in node[1])}", f"{pad}}}"]
    name, offset, channels, children = node
    out = [f"{pad}{'ROOT' if root else 'JOINT'} {name}", f"{pad}{{",
           f"{pad}\tOFFSET {' '.join(f'{v:.6f}' for v in offset)}",
           f"{pad}\tCHANNELS {len(channels)} {' '.join(channels)} "]
    for c in children:
        out += _block(c, depth + 1)
    return out + [f"{pad}}}"]


def write_bvh(path, root, frames, frame_time=1 / 30):
    frames = np.atleast_2d(np.asarray(frames, dtype=np.float64))
    lines = ["HIERARCHY"] + _block(root, 0, root=True) + [
        "MOTION", f"Frames:\t{len(frames)}", f"Frame Time:\t{frame_time:.7f}"]
    lines += [" ".join(f"{v:.6f}" for v in row) for row in frames]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


POS_ROT = ["Xposition", "Yposition", "Zposition", "Zrotation", "Xrotation", "Yrotation"]
ZXY = ["Zrotation", "Xrotation", "Yrotation"]
XYZ = ["Xrotation", "Yrotation", "Zrotation"]


def bandai_skeleton():
    """The Bandai-Namco joint names in cm, the subject facing +z with its left side at +x; every
    joint has the 3 rotation channels Z X Y (39 + 6 channels). Channel columns: root 0-5, then 3
    per joint in the order of BANDAI_ORDER."""
    def chain(names, offsets, end):
        node = ("End Site", end)
        for n, o in reversed(list(zip(names, offsets))):
            node = (n, o, ZXY, [node])
        return node
    arm = lambda s, x: chain([f"UpperArm_{s}", f"LowerArm_{s}", f"Hand_{s}"],
                             [(x * 15, 12, 0), (x * 25, 0, 0), (x * 25, 0, 0)], (0, 0, 0))
    leg = lambda s, x: chain([f"UpperLeg_{s}", f"LowerLeg_{s}", f"Foot_{s}", f"Toes_{s}"],
                             [(x * 9, -5, 0), (0, -40, 0), (0, -40, 0), (0, -5, 12)], (0, 0, 0))
    neck = chain(["Neck", "Head"], [(0, 15, 0), (0, 7, 0)], (0, 0, 0))
    chest = ("Chest", (0, 10, 0), ZXY, [neck, arm("L", 1), arm("R", -1)])
    spine = ("Spine", (0, 15, 0), ZXY, [chest])
    return ("Hips", (0, 0, 0), POS_ROT, [spine, leg("L", 1), leg("R", -1)])


BANDAI_ORDER = ["Spine", "Chest", "Neck", "Head", "UpperArm_L", "LowerArm_L", "Hand_L",
                "UpperArm_R", "LowerArm_R", "Hand_R", "UpperLeg_L", "LowerLeg_L", "Foot_L",
                "Toes_L", "UpperLeg_R", "LowerLeg_R", "Foot_R", "Toes_R"]


def bandai_frames(n, wave=None, root=(0, 95, 0)):
    """(n, 60) channel values: the root at `root`, all rotations 0, or the named shoulder swinging
    its arm (Zrotation of UpperArm_<side>) by up to 60 degrees."""
    f = np.zeros((n, 6 + 3 * len(BANDAI_ORDER)))
    f[:, :3] = root
    if wave:
        f[:, 6 + 3 * BANDAI_ORDER.index(wave)] = 60 * np.sin(np.arange(n) / 3.0)
    return f


# ---------------------------------------------------------------------------------------------
# Parser and forward kinematics
# ---------------------------------------------------------------------------------------------
def test_forward_kinematics_hand_computed(tmp_path):
    # a 6-channel root (offset ignored: its position channels replace it), a 3-channel joint in
    # Z X Y order, a 3-channel joint in X Y Z order, and End Sites
    root = ("Hips", (100, 100, 100), POS_ROT, [
        ("A", (0, 10, 0), ZXY, [("B", (10, 0, 0), XYZ, [("End Site", (0, 0, 5))])]),
        ("C", (0, -3, 0), XYZ, [("End Site", (1, 0, 0))])])
    frames = [[1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
              # root: Rz 90; A: Xrotation 90; B: Xrotation 90 then Yrotation 90
              [1, 2, 3, 90, 0, 0, 0, 90, 0, 90, 90, 0, 0, 0, 0]]
    clip = D.read_bvh(write_bvh(tmp_path / "fk.bvh", root, frames))
    assert clip.names == ["Hips", "A", "B", "B_end", "C", "C_end"]
    assert clip.parents.tolist() == [-1, 0, 1, 2, 0, 4]
    assert clip.rot_axes == ["ZXY", "ZXY", "XYZ", "", "XYZ", ""]
    assert clip.pos_cols[0].tolist() == [0, 1, 2] and (clip.pos_cols[1:] == -1).all()
    assert clip.frame_time == pytest.approx(1 / 30, abs=1e-7)
    p = D.bvh_positions(clip)
    # frame 0: offsets only
    np.testing.assert_allclose(p[0], [[1, 2, 3], [1, 12, 3], [11, 12, 3], [11, 12, 8], [1, -1, 3],
                                      [2, -1, 3]], atol=1e-9)
    # frame 1 by hand: Rz90 maps x -> y, y -> -x; Rx90 maps y -> z, z -> -y; Ry90 maps z -> x.
    # A = (1,2,3) + Rz90 (0,10,0) = (-9,2,3); B = A + Rz90 Rx90 (10,0,0) = (-9,12,3);
    # B_end = B + Rz90 Rx90 (Rx90 Ry90) (0,0,5) = B + Rz90 Rx90 Rx90 (5,0,0) = B + (0,5,0);
    # C = (1,2,3) + Rz90 (0,-3,0) = (4,2,3); C_end = C + Rz90 (1,0,0) = C + (0,1,0)
    np.testing.assert_allclose(p[1], [[1, 2, 3], [-9, 2, 3], [-9, 12, 3], [-9, 17, 3], [4, 2, 3],
                                      [4, 3, 3]], atol=1e-9)


def _rot(axis, deg):
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return {"X": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "Y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "Z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


def test_rotation_order_as_written_and_bone_lengths(tmp_path):
    rng = np.random.default_rng(0)
    ang = np.round(rng.uniform(-170, 170, (20, 3)), 6)       # as the file writes them
    ends = {}
    for order in ("ZXY", "YXZ"):
        chans = [f"{a}rotation" for a in order]
        root = ("R", (0, 0, 0), ["Xposition", "Yposition", "Zposition"] + chans,
                [("End Site", (0, 0, 7))])
        vals = np.concatenate([np.zeros((20, 3)), ang], 1)   # the same numbers, other meaning
        p = D.bvh_positions(D.read_bvh(write_bvh(tmp_path / f"{order}.bvh", root, vals)))
        R = np.eye(3)[None].repeat(20, 0)
        for k, a in enumerate(order):                       # intrinsic, in written order
            R = R @ np.stack([_rot(a, v) for v in ang[:, k]])
        np.testing.assert_allclose(p[:, 1], R @ np.array([0, 0, 7.0]), atol=1e-9)
        np.testing.assert_allclose(np.linalg.norm(p[:, 1] - p[:, 0], axis=1), 7, atol=1e-9)
        ends[order] = p[:, 1]
    assert np.abs(ends["ZXY"] - ends["YXZ"]).max() > 1.0


# ---------------------------------------------------------------------------------------------
# Joint map: presets, left/right, units, fill rule
# ---------------------------------------------------------------------------------------------
def test_bandai_preset_left_right_units_and_fill(tmp_path):
    f = write_bvh(tmp_path / "t.bvh", bandai_skeleton(), bandai_frames(2, root=(10, 95, -20)))
    clip = D.read_bvh(f)
    assert D.detect_preset(clip.names, f) == "bandai"
    bandai = D.BVH_PRESETS["bandai"][1]
    x = D.load_bvh_ntu(f, bandai, 0.01)[0]                                  # (25, 3) metres
    # facing +z in the file -> facing the camera: its left at smaller x, its toes towards -z
    assert x[J("left_shoulder"), 0] < x[J("right_shoulder"), 0]
    assert x[J("left_hip"), 0] < x[J("right_hip"), 0]
    assert x[J("left_foot"), 2] < x[J("left_ankle"), 2]
    # metres, y up, half turn about y: the file's (10+15, 95+15+10+12, -20) cm for UpperArm_L
    np.testing.assert_allclose(x[J("left_shoulder")], [-0.25, 1.32, 0.20], atol=1e-9)
    np.testing.assert_allclose(x[J("spine_base")], [-0.10, 0.95, 0.20], atol=1e-9)
    assert set(bandai.values()) <= set(clip.names)
    # the fill rule: head = neck + 2 (neck - spine_shoulder), hand = wrist + 0.28 (wrist - elbow),
    # tip = hand + (hand - wrist), thumb = hand + 0.5 (hand - wrist)
    np.testing.assert_allclose(x[J("head"), 1] - x[J("neck"), 1], 0.14, atol=1e-9)
    lw, le = x[J("left_wrist")], x[J("left_elbow")]
    hand = lw + 0.28 * (lw - le)
    np.testing.assert_allclose(x[J("left_hand")], hand, atol=1e-9)
    np.testing.assert_allclose(x[J("left_hand_tip")], hand + (hand - lw), atol=1e-9)
    np.testing.assert_allclose(x[J("left_thumb")], hand + 0.5 * (hand - lw), atol=1e-9)
    assert np.isfinite(x).all()


def cmu_tpose():
    """CMU naming, 1/0.45-inch units, T-pose facing +z, left at +x; 3-channel joints, X Y Z."""
    def j(name, off, children):
        return (name, off, XYZ, children or [("End Site", (0.5, 0, 0) if "Hand" in name
                                                         else (0, 0.5, 0))])
    def side(s, x):
        L, Ls = ("Left", "L") if x > 0 else ("Right", "R")
        arm = j(f"{L}Shoulder", (0, 0, 0), [j(f"{L}Arm", (x * 3, 0.5, 0), [
            j(f"{L}ForeArm", (x * 5, 0, 0), [j(f"{L}Hand", (x * 4, 0, 0), [
                j(f"{L}FingerBase", (0, 0, 0), [j(f"{L}HandIndex1", (x * 0.7, 0, 0), [])]),
                j(f"{Ls}Thumb", (0, 0, 0.3), [])])])])])
        leg = j(f"{Ls}HipJoint", (0, 0, 0), [j(f"{L}UpLeg", (x * 1.5, -1, 0), [
            j(f"{L}Leg", (0, -7, 0), [j(f"{L}Foot", (0, -7, 0), [
                j(f"{L}ToeBase", (0, -0.5, 2), [])])])])])
        return arm, leg
    (la, ll), (ra, rl) = side("L", 1), side("R", -1)
    spine = j("LowerBack", (0, 0, 0), [j("Spine", (0, 2, 0), [j("Spine1", (0, 2, 0), [
        j("Neck", (0, 0, 0), [j("Neck1", (0, 1.7, 0), [j("Head", (0, 1.5, 0), [])])]), la, ra])])])
    return ("Hips", (0, 0, 0), ["Xposition", "Yposition", "Zposition"] + XYZ, [ll, rl, spine])


def cmu_frames(n):
    f = np.zeros((n, 6 + 3 * 30))            # root position and rotation, 30 joints x 3
    f[:, 1] = 17                             # hips 17 units (0.96 m) high
    return f


def test_cmu_preset_left_right_and_units(tmp_path):
    f = write_bvh(tmp_path / "cmu.bvh", cmu_tpose(), cmu_frames(3), frame_time=1 / 120)
    clip = D.read_bvh(f)
    assert D.detect_preset(clip.names, f) == "cmu"
    scale, jmap = D.BVH_PRESETS["cmu"]
    x = D.load_bvh_ntu(f, jmap, scale)
    assert x.shape == (1, 25, 3)                      # 3 frames at 120 fps span 1/60 s -> 1 frame
    x = x[0] / scale                                  # back to file units, camera-like axes
    # left hand tip: the End Site of LeftHandIndex1, 3 + 5 + 4 + 0.7 + 0.5 to the file's +x
    np.testing.assert_allclose(x[J("left_hand_tip")], [-13.2, 17 + 2 + 2 + 0.5, 0], atol=1e-6)
    np.testing.assert_allclose(x[J("right_hand")], [12.7, 21.5, 0], atol=1e-6)
    np.testing.assert_allclose(x[J("left_thumb")], [-12, 22, -0.3], atol=1e-6)   # LThumb_end
    np.testing.assert_allclose(x[J("head")], [0, 17 + 4 + 1.7 + 1.5, 0], atol=1e-6)
    assert x[J("left_elbow"), 0] < 0 < x[J("right_elbow"), 0]
    assert x[J("left_foot"), 2] < x[J("left_ankle"), 2]       # toes towards the camera (-z)


def test_joint_map_file_and_its_errors(tmp_path):
    root = ("pelvis", (0, 0, 0), POS_ROT, [("End Site", (0, 1, 0))])
    f = write_bvh(tmp_path / "odd.bvh", root, np.zeros((2, 6)))
    with pytest.raises(C.UserError, match="match no preset"):
        D.detect_preset(D.read_bvh(f).names, f)
    m = tmp_path / "map.txt"
    m.write_text("# a comment\nspine_base pelvis\nleft_elbo pelvis\n")
    with pytest.raises(C.UserError, match=r"map.txt:3: 'left_elbo' is not an NTU joint name"):
        D.read_joint_map(m)
    m.write_text("spine_base pelvis\n")
    with pytest.raises(C.UserError, match="lacks left_shoulder, .*right_ankle, neck or head"):
        D.check_joint_map(D.read_joint_map(m), "--joint_map map.txt")
    full = {n: "pelvis" for n in D.BVH_REQUIRED}
    full["head"] = "pelvis_end"
    m.write_text("".join(f"{k} {v}\n" for k, v in full.items()))
    jm = D.read_joint_map(m)
    assert jm == full
    x = D.load_bvh_ntu(f, jm, 0.5)
    np.testing.assert_allclose(x[0, J("head")], [0, 0.5, 0])
    np.testing.assert_allclose(x[0, J("neck")], [0, 0.5 / 3, 0])     # a third of the way up


# ---------------------------------------------------------------------------------------------
# Resampling to 30 fps
# ---------------------------------------------------------------------------------------------
def test_resampling_to_30_fps(tmp_path):
    root = ("Hips", (0, 0, 0), POS_ROT, [("End Site", (0, 1, 0))])
    vals = np.zeros((9, 6))
    vals[:, 0] = np.arange(9) ** 2                      # x = frame index squared
    clip = D.read_bvh(write_bvh(tmp_path / "r120.bvh", root, vals, frame_time=1 / 120))
    x = D.resample(D.bvh_positions(clip), clip.frame_time)
    np.testing.assert_allclose(x[:, 0, 0], [0, 16, 64], atol=1e-6)      # frames 0, 4, 8
    vals = np.zeros((11, 6))
    vals[:, 0] = np.arange(11) ** 2
    clip = D.read_bvh(write_bvh(tmp_path / "r50.bvh", root, vals, frame_time=0.02))
    x = D.resample(D.bvh_positions(clip), clip.frame_time)[:, 0, 0]
    u = np.arange(7) / 0.6                              # 0.2 s at 30 fps: source frames k * 5 / 3
    lo = np.floor(u).astype(int)
    expect = lo ** 2 + (u - lo) * ((lo + 1) ** 2 - lo ** 2)
    expect[-1] = 100.0
    np.testing.assert_allclose(x, expect, atol=1e-6)
    # a 30 fps file written with a rounded frame time keeps every frame
    clip = D.read_bvh(write_bvh(tmp_path / "r30.bvh", root, vals, frame_time=0.0333333))
    assert len(D.resample(D.bvh_positions(clip), clip.frame_time)) == 11


# ---------------------------------------------------------------------------------------------
# Malformed files
# ---------------------------------------------------------------------------------------------
def _good_lines(tmp_path):
    root = ("Hips", (0, 0, 0), POS_ROT, [("A", (0, 1, 0), ZXY, [("End Site", (0, 1, 0))])])
    return write_bvh(tmp_path / "good.bvh", root, np.zeros((3, 9))).read_text().splitlines()


@pytest.mark.parametrize("edit,line,msg", [
    (lambda L: L.__setitem__(19, "0 0 0 0 0 0 0 0"), 20, "expected 9 values, found 8"),
    (lambda L: L.__setitem__(18, "0 0 0 0 0 0 0 x 0"), 19, "non-numeric value 'x'"),
    (lambda L: L.__setitem__(4, "\tCHANNELS 6 Xposition Yposition Zposition Zrotation"), 5,
     "CHANNELS 6 lists 4 channel names"),
    (lambda L: L.__setitem__(8, "\t\tCHANNELS 3 Zrotation Xrotation Wrotation"), 9,
     "unknown channel 'Wrotation'"),
    (lambda L: L.__setitem__(3, "\tOFFSET 0 0"), 4, "OFFSET needs 3 values, found 2"),
    (lambda L: L.__setitem__(6, "\tOFFSET 0 1 0"), 7, "expected '{' after the declaration of 'A'"),
    (lambda L: L.__delitem__(14), 15, "MOTION before the hierarchy's '}' are all closed"),
    (lambda L: L.__setitem__(16, "Frames: 4"), 21,
     "file is truncated (4 frames declared, 3 found)"),
    (lambda L: L.__setitem__(17, "Frame Time: -1"), 18, "Frame Time must be positive"),
    (lambda L: L.__setitem__(0, "HIERARCHIE"), 1, "expected 'HIERARCHY'"),
])
def test_malformed_bvh_names_file_and_line(tmp_path, edit, line, msg):
    lines = _good_lines(tmp_path)
    assert lines[15] == "MOTION" and len(lines) == 21
    edit(lines)
    f = tmp_path / "bad.bvh"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(C.UserError) as e:
        D.read_bvh(f)
    assert str(e.value).startswith(f"{f}:{line}: ") and msg in str(e.value), str(e.value)


# ---------------------------------------------------------------------------------------------
# End to end: --dataset bandai and --dataset bvh
# ---------------------------------------------------------------------------------------------
def _bandai_raw(root: Path) -> Path:
    d = root / "dataset" / "Bandai-Namco-Research-Motiondataset-2" / "data"
    d.mkdir(parents=True)
    clips = [("wave-left-hand", "normal", 1, "UpperArm_L"),
             ("wave-left-hand", "elderly", 5, "UpperArm_L"),
             ("wave-right-hand", "active", 5, "UpperArm_R"),
             ("wave-right-hand", "youthful", 2, "UpperArm_R"),
             ("walk", "feminine", 10, None), ("run", "masculine", 3, None),
             ("raise-up-both-hands", "exhausted", 12, None)]
    for k, (cls, style, take, wave) in enumerate(clips):
        write_bvh(d / f"dataset-2_{cls}_{style}_{take:03d}.bvh", bandai_skeleton(),
                  bandai_frames(20 + 5 * k, wave))
    (d / "dataset-2_walk_normal_001.json").write_text('{"content": 0, "style": 5}')
    return root


def test_bandai_end_to_end(tmp_path, capsys):
    raw = _bandai_raw(tmp_path / "repo")
    out = tmp_path / "data"
    D.main(["--dataset", "bandai", "--raw_dir", str(raw), "--data_dir", str(out), "--workers", "1"])
    printed = capsys.readouterr().out
    assert "bandai: 7 clips from 7 files" in printed and "elderly" in printed
    folder = out / "Bandai-Namco-2"
    meta = json.loads((folder / "prep_info.json").read_text())
    assert meta["classes"] == D.BANDAI_CLASSES and meta["z_align"] is True
    assert meta["joint_map"] == "bandai" and meta["scale"] == 0.01
    expect = {  # name -> (label, xstyle train?, xtake train?)
        "dataset-2_wave-left-hand_normal_001.bvh": (5, 1, 1),
        "dataset-2_wave-left-hand_elderly_005.bvh": (5, 0, 0),
        "dataset-2_wave-right-hand_active_005.bvh": (6, 1, 0),
        "dataset-2_wave-right-hand_youthful_002.bvh": (6, 0, 1),
        "dataset-2_walk_feminine_010.bvh": (0, 1, 0),
        "dataset-2_run_masculine_003.bvh": (3, 1, 1),
        "dataset-2_raise-up-both-hands_exhausted_012.bvh": (7, 1, 1)}
    for split, col in (("xstyle", 1), ("xtake", 2)):
        for part, side in (("train", 1), ("val", 0)):
            s = C.load_split(out, "bandai", split, part)
            with open(s.path / f"{part}_label.pkl", "rb") as fh:
                names = pickle.load(fh)[0]
            want = sorted(n for n, v in expect.items() if v[col] == side)
            assert names == want, (split, part)
            assert s.labels.tolist() == [expect[n][0] for n in names]
            assert s.data.shape[1:] == (3, D.T_REAL, 25, 2)
            assert not np.asarray(s.data[..., 1]).any()                      # second body empty
            assert s.num_frame.tolist() == [20 + 5 * list(expect).index(n) for n in names]
            if split == "xstyle":
                for n, x, nf in zip(names, np.asarray(s.data), s.num_frame):
                    if "wave" in n:        # the waving arm's wrist moves most: left is NTU's left
                        spread = x[:, :nf, :, 0].std(1).sum(0)               # (25,)
                        side_ = "left" if "left" in n else "right"
                        other = "right" if side_ == "left" else "left"
                        assert spread[J(f"{side_}_wrist")] > 10 * spread[J(f"{other}_wrist")], n
    C.check_data_prep(out, "bandai", "xstyle", True, False, "test")
    with pytest.raises(C.UserError, match="prepared with z-alignment"):
        C.check_data_prep(out, "bandai", "xstyle", False, False, "test")
    # a re-run with the same inputs does nothing; --no_z_align rebuilds it unaligned
    D.main(["--dataset", "bandai", "--raw_dir", str(raw), "--data_dir", str(out), "--workers", "1"])
    assert "already prepared" in capsys.readouterr().out
    D.main(["--dataset", "bandai", "--raw_dir", str(raw / "dataset" /
                                                    "Bandai-Namco-Research-Motiondataset-2"),
            "--data_dir", str(out), "--no_z_align", "--workers", "1"])
    assert json.loads((folder / "prep_info.json").read_text())["z_align"] is False
    s = C.load_split(out, "bandai", "xstyle", "train")
    x = np.asarray(s.data[0, :, 0, :, 0]).T                                  # (25, 3) frame 0
    assert abs(x[J("spine_shoulder"), 1] - x[J("spine_base"), 1]) > 0.3      # still upright (y)
    assert x[J("left_foot"), 2] < x[J("left_ankle"), 2]                      # facing -z


def test_bad_file_one_line_and_skip_bad(tmp_path, capsys):
    raw = _bandai_raw(tmp_path / "repo")
    d = raw / D.BANDAI_SUBDIR
    bad = d / "dataset-2_run_normal_004.bvh"
    lines = (d / "dataset-2_run_masculine_003.bvh").read_text().splitlines()
    lines[-3] = lines[-3] + " 1.0"
    bad.write_text("\n".join(lines) + "\n")
    args = ["--dataset", "bandai", "--raw_dir", str(raw), "--data_dir", str(tmp_path / "out"),
            "--workers", "1"]
    with pytest.raises(SystemExit) as e:
        C.run_main(lambda: D.main(args))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()          # (above it: the progress bar)
    assert "Traceback" not in "".join(err) and [e for e in err if "error" in e] == err[-1:]
    assert err[-1].startswith(f"error: {bad}:{len(lines) - 2}: expected 60 values, found 61")
    assert not (tmp_path / "out" / "Bandai-Namco-2").exists()
    assert not list((tmp_path / "out").iterdir())                            # no temp leftovers
    D.main(args + ["--skip_bad"])
    folder = tmp_path / "out" / "Bandai-Namco-2"
    skipped = (folder / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith(f"bad: {bad}:{len(lines) - 2}: ")
    n = sum(len(C.load_split(tmp_path / "out", "bandai", "xstyle", p).labels)
            for p in ("train", "val"))
    assert n == 7
    (d / "dataset-2_jump_normal_001.bvh").write_text("")
    with pytest.raises(C.UserError, match="dataset-2_jump_normal_001.bvh: not a dataset-2_"):
        D.main(args)


def test_generic_bvh_with_labels_csv(tmp_path):
    raw = tmp_path / "mocap"
    (raw / "sub").mkdir(parents=True)
    for k in range(4):
        write_bvh(raw / "sub" / f"c{k}.bvh", cmu_tpose(), cmu_frames(4 + 2 * k), frame_time=1 / 120)
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label,split\nsub/c0.bvh,wave,train\nsub/c1.bvh,kick,train\n"
                   "sub/c2.bvh,wave,test\nsub/c3.bvh,kick,test\n")
    out = tmp_path / "data"
    D.prepare_bvh(raw, out, "bvh", str(csv), workers=1, quiet=True)
    meta = json.loads((out / "BVH" / "prep_info.json").read_text())
    assert meta["classes"] == ["kick", "wave"] and meta["joint_map"] == "cmu"
    tr = C.load_split(out, "bvh", "custom", "train")
    te = C.load_split(out, "bvh", "custom", "val")
    assert tr.labels.tolist() == [1, 0] and te.labels.tolist() == [1, 0]
    assert tr.num_frame.tolist() == [1, 2] and te.num_frame.tolist() == [2, 3]   # 120 fps -> 30
    m = tmp_path / "map.txt"
    m.write_text("".join(f"{k} {v}\n" for k, v in D.BVH_PRESETS["cmu"][1].items()))
    with pytest.raises(C.UserError, match="map.txt: give --bvh_scale"):
        D.prepare_bvh(raw, out, "bvh", str(csv), joint_map=str(m), workers=1, quiet=True)
    D.prepare_bvh(raw, out, "bvh", str(csv), joint_map=str(m), scale=0.0254 / 0.45, workers=1,
                  quiet=True)
    np.testing.assert_array_equal(C.load_split(out, "bvh", "custom", "train").data, tr.data)
    with pytest.raises(C.UserError, match="--labels is for --dataset bvh"):
        D.main(["--dataset", "bandai", "--raw_dir", str(raw), "--labels", str(csv)])
    csv.write_text("sub/c0.bvh,wave,training\n")
    with pytest.raises(C.UserError, match=r"labels.csv:1: split must be train or test"):
        D.prepare_bvh(raw, out, "bvh", str(csv), workers=1, quiet=True)
    csv.write_text("sub/none.bvh,wave,train\n")
    with pytest.raises(C.UserError, match="none.bvh does not exist"):
        D.prepare_bvh(raw, out, "bvh", str(csv), workers=1, quiet=True)
    with pytest.raises(C.UserError, match="needs --labels"):
        D.main(["--dataset", "bvh", "--raw_dir", str(raw), "--data_dir", str(out)])
