"""common.py: topology, CLI helper, dataset validation, batch loader, checkpoints, RNG, gathers."""
import dataclasses
import os
import pickle
import random

import numpy as np
import pytest
import torch

import common as C


# ---------------------------------------------------------------------------------------------
# Topology
# ---------------------------------------------------------------------------------------------
def test_topology_tables():
    assert len(C.JOINT_NAMES) == len(set(C.JOINT_NAMES)) == 25
    assert len(C.BONE_PAIRS_1B) == 25 and len(C.EDGES_1B) == 24
    A = C.adjacency()
    assert (A == A.T).all() and A.trace() == 0 and A.sum() == 48
    # the graph is a tree: 25 nodes, 24 edges, connected
    reach = np.linalg.matrix_power(np.eye(25) + A, 25) > 0
    assert reach.all()
    # the five body parts partition the 25 joints
    parts = sorted(j for p in C.BODY_PARTS.values() for j in p)
    assert parts == list(range(25))
    # flip is an involution that swaps left/right names and keeps the spine
    order = np.array(C.FLIP_ORDER)
    assert (order[order] == np.arange(25)).all()
    for j, k in enumerate(order):
        a, b = C.JOINT_NAMES[j], C.JOINT_NAMES[k]
        assert a.replace("left", "right") == b or a.replace("right", "left") == b or a == b
    assert C.JOINT_NAMES[order[21]] == "right_hand_tip"


def test_stgcn_spatial_partition_matches_official_counts():
    A = C.stgcn_spatial_graph()
    assert A.shape == (3, 25, 25)
    assert [int((a != 0).sum()) for a in A] == [25, 40, 8]
    # A D^-1 normalisation over the hop<=1 neighbourhood: every column sums to one over all subsets
    np.testing.assert_allclose(A.sum(0).sum(0), np.ones(25), atol=1e-6)
    # the root subset is the diagonal only
    np.testing.assert_allclose(A[0], np.diag(np.diag(A[0])))


def test_ctrgcn_graph():
    G = C.ctrgcn_graph()
    assert G.shape == (3, 25, 25)
    np.testing.assert_array_equal(G[0], np.eye(25))
    assert int((G[1] != 0).sum()) == int((G[2] != 0).sum()) == 24
    np.testing.assert_array_equal(G[1] != 0, (G[2] != 0).T)
    # inward: joint 2 (spine mid, index 1) -> 21 (index 20) sets A[20, 1]; columns are normalised
    assert G[1][20, 1] > 0 and G[1][1, 20] == 0
    cols = G[1].sum(0)
    assert np.allclose(cols[cols > 0], 1.0)


# ---------------------------------------------------------------------------------------------
# CLI helper
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Args:
    """Train a toy model."""
    dataset: str = C.arg("ntu60", "dataset name")
    hidden: int = C.arg(1024, "layer width")
    lr: float = C.arg(0.1, "learning rate")
    compile: bool = C.arg(False, "torch.compile the model")
    prompt: bool = C.arg(True, "use prompts")
    milestones: list = C.arg([351], "lr steps")
    ckpt: str | None = C.arg(None, "checkpoint path")


def test_parse_args_types_bools_lists_and_quick(capsys):
    a = C.parse_args(_Args, ["--hidden", "8", "--no_prompt", "--milestones", "3", "4",
                             "--ckpt", "x.pt", "--compile"])
    assert (a.hidden, a.prompt, a.milestones, a.ckpt, a.compile) == (8, False, [3, 4], "x.pt", True)
    assert C.parse_args(_Args, []) == _Args()
    quick = {"hidden": 16, "lr": 0.5, "prompt": False}
    a = C.parse_args(_Args, ["--dataset", "synthetic", "--lr", "0.2", "--prompt"], quick=quick)
    assert (a.hidden, a.lr, a.prompt) == (16, 0.2, True)  # explicit flags win over the quick config
    assert "--hidden 16" in capsys.readouterr().err
    a = C.parse_args(_Args, ["--dataset", "ntu60"], quick=quick)
    assert a.hidden == 1024  # the quick config only applies to synthetic data


def test_parse_args_help_and_unknown_flag(capsys):
    with pytest.raises(SystemExit) as e:
        C.parse_args(_Args, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(_Args):
        assert f"--{f.name}" in out and f.metadata["help"] in out
    assert "Train a toy model." in out
    with pytest.raises(SystemExit) as e:
        C.parse_args(_Args, ["--hiden", "3"])
    assert e.value.code == 2
    assert "unrecognized arguments: --hiden" in capsys.readouterr().err


def test_args_dict_round_trip():
    a = _Args(hidden=3, milestones=[1, 2])
    d = C.args_to_dict(a)
    assert C.args_from_dict(_Args, {**d, "gone": 1}) == a


def test_step_lr():
    assert C.step_lr(1.0, 0, [2, 4]) == 1.0
    assert C.step_lr(1.0, 2, [2, 4]) == pytest.approx(0.1)
    assert C.step_lr(1.0, 9, [2, 4]) == pytest.approx(0.01)


# ---------------------------------------------------------------------------------------------
# Dataset reading and validation
# ---------------------------------------------------------------------------------------------
def _write_split(root, dataset="ntu60", split="xsub", n=10, t=20, labels_as="npy", nf=True,
                 data=None, seed=0):
    d = C.split_dir(root, dataset, split)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    num_frame = rng.integers(5, t + 1, n)
    if data is None:
        data = np.zeros((n, 3, t, 25, 2), np.float32)
        for i in range(n):
            data[i, :, :num_frame[i]] = rng.normal(size=(3, num_frame[i], 25, 2))
    np.save(d / "train_data_joint.npy", data)
    labels = np.arange(n) % 5
    names = [f"S001C001P{i:03d}R001A{l + 1:03d}" for i, l in enumerate(labels)]
    if labels_as == "npy":
        np.save(d / "train_label.npy", labels)
    else:
        with open(d / "train_label.pkl", "wb") as f:
            pickle.dump((names, [float(l) for l in labels]), f)
    if nf:
        np.save(d / "train_num_frame.npy", num_frame)
    return d, data, labels, num_frame


def test_load_split_npy_pkl_and_derived_num_frame(tmp_path):
    _, data, labels, nf = _write_split(tmp_path / "a")
    s = C.load_split(tmp_path / "a", "ntu60", "xsub", "train")
    assert isinstance(s.data, np.memmap) and s.data.shape == data.shape
    np.testing.assert_array_equal(s.labels, labels)
    np.testing.assert_array_equal(s.num_frame, nf)
    assert s.num_classes == 60 and len(s) == 10
    # pickled float labels from other repos, no num_frame file: derived from the zero padding
    _, data, labels, nf = _write_split(tmp_path / "b", labels_as="pkl", nf=False)
    s = C.load_split(tmp_path / "b", "ntu60", "xsub", "train")
    assert s.labels.dtype == np.int64 and s.names[0].startswith("S001")
    np.testing.assert_array_equal(s.labels, labels)
    np.testing.assert_array_equal(s.num_frame, nf)


def test_load_split_xset_alias(tmp_path):
    _write_split(tmp_path, "ntu120", "xset")  # written to .../xsetup via the alias
    s = C.load_split(tmp_path, "ntu120", "xset", "train")
    assert s.path.name == "xsetup"


@pytest.mark.parametrize("case,needle", [
    ("shape", "expected shape (N, 3, T, 25, 2)"),
    ("nan", "NaN or inf values (first in sample 3)"),
    ("empty", "split is empty"),
    ("missing", "not found"),
    ("labels", "10 samples but 9 labels"),
    ("dataset", "unknown dataset"),
    ("string_labels", "expected names and numeric class indices"),
    ("fractional", "integer class indices"),
    ("num_frame", "train_num_frame.npy: unreadable frame counts"),
])
def test_load_split_errors_are_one_clear_line(tmp_path, case, needle):
    dataset = "ntu60"
    if case == "shape":
        _write_split(tmp_path, data=np.zeros((4, 3, 10, 24, 2), np.float32), n=4)
    elif case == "nan":
        d, data, _, _ = _write_split(tmp_path)
        data[3, 0, 0, 0, 0] = np.nan
        np.save(d / "train_data_joint.npy", data)
    elif case == "empty":
        d = C.split_dir(tmp_path, "ntu60", "xsub")
        d.mkdir(parents=True)
        np.save(d / "train_data_joint.npy", np.zeros((0, 3, 10, 25, 2), np.float32))
        np.save(d / "train_label.npy", np.zeros(0, np.int64))
    elif case == "labels":
        d, *_ = _write_split(tmp_path)
        np.save(d / "train_label.npy", np.zeros(9, np.int64))
    elif case == "dataset":
        dataset = "ntu61"
    elif case in ("string_labels", "fractional"):
        d, *_ = _write_split(tmp_path)
        (d / "train_label.npy").unlink()
        labels = ["a"] * 10 if case == "string_labels" else [0.5] * 10
        with open(d / "train_label.pkl", "wb") as f:
            pickle.dump(([f"n{i}" for i in range(10)], labels), f)
    elif case == "num_frame":
        d, *_ = _write_split(tmp_path)
        np.save(d / "train_num_frame.npy", np.array([object()] * 10, dtype=object))
    with pytest.raises(C.UserError) as e:
        C.load_split(tmp_path, dataset, "xsub", "train")
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_run_main_turns_user_error_into_exit_2(capsys):
    def bad():
        raise C.UserError("data/x.npy: broken")
    with pytest.raises(SystemExit) as e:
        C.run_main(bad)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: data/x.npy: broken"


# ---------------------------------------------------------------------------------------------
# Batch loader
# ---------------------------------------------------------------------------------------------
def _split(tmp_path, n=23, t=20):
    _write_split(tmp_path, n=n, t=t)
    return C.load_split(tmp_path, "ntu60", "xsub", "train")


def test_loader_shards_global_batches_and_reshuffles_per_epoch(tmp_path):
    s = _split(tmp_path)
    one = C.BatchLoader(s, 8, shuffle=True, drop_last=True, seed=3)
    ranks = [C.BatchLoader(s, 8, shuffle=True, drop_last=True, seed=3, rank=r, world_size=2)
             for r in range(2)]
    assert len(one) == 2
    for ep in (0, 1):
        for ld in [one, *ranks]:
            ld.set_epoch(ep)
        for (x, nf, y), (x0, nf0, y0), (x1, nf1, y1) in zip(one, *ranks):
            assert x0.shape[0] == x1.shape[0] == 4
            np.testing.assert_array_equal(torch.cat([y0, y1]).numpy(), y.numpy())
            np.testing.assert_array_equal(torch.cat([nf0, nf1]).numpy(), nf.numpy())
            # each batch reads only the frames its longest clip needs
            assert x.shape[2] == int(nf.max())
    one.set_epoch(0)
    e0 = torch.cat([b[2] for b in one])
    one.set_epoch(1)
    e1 = torch.cat([b[2] for b in one])
    one.set_epoch(0)
    assert torch.equal(e0, torch.cat([b[2] for b in one]))  # a function of (seed, epoch) only
    assert not torch.equal(e0, e1)


def test_loader_content_no_shuffle_and_on_device(tmp_path):
    s = _split(tmp_path, n=10)
    plain = list(C.BatchLoader(s, 4, shuffle=False, drop_last=False))
    assert [b[0].shape[0] for b in plain] == [4, 4, 2]
    x = torch.cat([torch.nn.functional.pad(b[0], (0, 0, 0, 0, 0, 20 - b[0].shape[2]))
                   for b in plain])
    np.testing.assert_array_equal(x.numpy(), np.asarray(s.data))
    res = list(C.BatchLoader(s, 4, shuffle=False, drop_last=False, on_device=True,
                             storage_dtype=torch.float16))
    for (a, _, ya), (b, _, yb) in zip(plain, res):
        assert torch.equal(ya, yb)
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
    thr = list(C.BatchLoader(s, 4, shuffle=False, drop_last=False, num_workers=2, with_labels=False))
    assert all(b[2] is None for b in thr)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(plain, thr))


def test_loader_rejects_bad_batch(tmp_path):
    s = _split(tmp_path, n=5)
    with pytest.raises(C.UserError, match="fewer than one batch"):
        C.BatchLoader(s, 8, drop_last=True)
    with pytest.raises(C.UserError, match="divisible"):
        C.BatchLoader(s, 3, world_size=2)


# ---------------------------------------------------------------------------------------------
# Checkpoints and RNG state
# ---------------------------------------------------------------------------------------------
def test_checkpoint_atomic_and_errors(tmp_path):
    p = tmp_path / "run" / "last.pt"
    obj = {"method": "usdrl", "args": {"hidden": 4}, "model": {"w": torch.arange(3.0)}}
    C.save_checkpoint(obj, p)
    assert os.listdir(p.parent) == ["last.pt"]  # no temp file left behind
    back = C.load_checkpoint(p, method="usdrl")
    assert torch.equal(back["model"]["w"], torch.arange(3.0))
    with pytest.raises(C.UserError, match="expected 'mcc'"):
        C.load_checkpoint(p, method="mcc")
    raw = p.read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(C.UserError, match="cut.pt: not a readable checkpoint"):
        C.load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(C.UserError, match="checkpoint not found"):
        C.load_checkpoint(tmp_path / "none.pt")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        C.atomic_write(p, boom)
    assert os.listdir(p.parent) == ["last.pt"] and C.load_checkpoint(p)["method"] == "usdrl"
    old = os.umask(0o022)
    try:  # readable by the group like any file the user writes (mkstemp alone gives 0600)
        C.save_checkpoint(obj, p)
        assert p.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(5)
    C.seed_everything(1)
    state = C.rng_state(g)
    C.save_checkpoint({"method": "x", "args": {}, "rng": state}, tmp_path / "c.pt")
    draws = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=g))
    C.seed_everything(99)
    g.manual_seed(99)
    C.set_rng_state(C.load_checkpoint(tmp_path / "c.pt")["rng"], g)
    again = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=g))
    assert draws[0] == again[0] and draws[1] == again[1]
    assert torch.equal(draws[2], again[2]) and torch.equal(draws[3], again[3])
    # no pickled bytes in a checkpoint (weights_only loading must not run code on --resume)
    internal = state["python"]["internal"]
    assert internal.dtype == torch.int64 and len(internal) == 625
    # a generator state of another kind (a CUDA run resumed on CPU) is skipped, not a crash
    foreign = {**state, "generators": [torch.zeros(16, dtype=torch.uint8)]}
    before = g.get_state()
    C.set_rng_state(foreign, g)
    assert torch.equal(g.get_state(), before)


# ---------------------------------------------------------------------------------------------
# Gathers under a real 2-process gloo group
# ---------------------------------------------------------------------------------------------
def _bn_input():
    return torch.randn(8, 3, 5, 4, generator=torch.Generator().manual_seed(2)) * 3 + 1


def _gather_worker(rank, world, init_file, out_dir):
    # file:// rendezvous: no TCP port that another process on the machine could take first
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world)
    torch.manual_seed(0)
    full = torch.randn(6, 3)
    local = full[rank * 3:(rank + 1) * 3].clone().requires_grad_(True)
    g = C.gather_with_grad(local)
    loss = (g.std(0) ** 2).sum()  # a batch statistic over the global batch
    loss.backward()
    bn_x = _bn_input()[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
    bn = C.GlobalBatchNorm2d(3)
    bn.weight.data.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
    (bn(bn_x) ** 3).sum().backward()
    torch.save({"loss": loss.item(), "grad": local.grad, "gathered": C.gather_nograd(local.detach()),
                "bn_grad": bn_x.grad, "bn_state": bn.state_dict(), "bn_wgrad": bn.weight.grad},
               os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_gather_with_grad_matches_single_process(tmp_path):
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, tmp_path / "init", str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    torch.manual_seed(0)
    full = torch.randn(6, 3).requires_grad_(True)
    loss = (full.std(0) ** 2).sum()
    loss.backward()
    bn_x = _bn_input().requires_grad_(True)
    bn = C.GlobalBatchNorm2d(3)  # single process: plain BatchNorm
    bn.weight.data.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
    (bn(bn_x) ** 3).sum().backward()
    wgrads = []
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert r["loss"] == pytest.approx(loss.item(), rel=1e-6)
        torch.testing.assert_close(r["gathered"], full.detach())
        # DDP averages gradients over ranks, so each rank holds world_size x its share
        torch.testing.assert_close(r["grad"] / 2, full.grad[rank * 3:(rank + 1) * 3])
        # global BatchNorm: one process's running statistics, and each rank's input gradient is the
        # gradient of the summed loss of all ranks (the statistics couple them), as in SyncBatchNorm
        torch.testing.assert_close(r["bn_state"]["running_mean"], bn.running_mean)
        torch.testing.assert_close(r["bn_state"]["running_var"], bn.running_var)
        torch.testing.assert_close(r["bn_grad"], bn_x.grad[rank * 4:(rank + 1) * 4])
        wgrads.append(r["bn_wgrad"])
    torch.testing.assert_close(wgrads[0] + wgrads[1], bn.weight.grad)


def test_load_scaler_resumes_fp16_from_a_run_without_it():
    """A bf16/fp32 run saves a disabled GradScaler's empty state; an fp16 resume starts fresh."""
    off = torch.amp.GradScaler("cpu", enabled=False)
    on = torch.amp.GradScaler("cpu", enabled=True, init_scale=8.0)
    with pytest.raises(RuntimeError):
        on.load_state_dict(off.state_dict())  # what torch does without the helper
    C.load_scaler(on, off.state_dict())
    assert on.get_scale() == 8.0
    on2 = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0)
    C.load_scaler(on2, on.state_dict())
    assert on2.get_scale() == 8.0
