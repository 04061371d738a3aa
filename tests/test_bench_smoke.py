"""tests/bench.py is a benchmark, not a test, but it drives every method's training loop through the
scripts' own functions and the scripts themselves: these run its logic on tiny inputs (no timing is
asserted) so that an API change in a method file cannot silently break it."""
import importlib
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

METHODS = ["usdrl", "scd_net", "pcm3pp", "mcc"]


def _records(proc):
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_quick_train_steps_and_gru(run_py):
    recs = _records(run_py(["tests/bench.py", "--only", "train,pcm3pp_gru", "--quick", "--repeats", "1"]))
    steps = {r["config"]["method"]: r for r in recs if r["what"] == "train"}
    assert set(steps) == set(METHODS)
    for method, r in steps.items():
        assert r["device"] == "cpu" and r["config"]["dtype"] == "fp32" and r["samples_per_s"] > 0, method
        assert math.isfinite(r["first_loss"]) and r["params"] > 0, method
        assert r["first_step_s"] > 0 and len(r["times_s"]) == 1, method
        if sys.platform == "linux":
            assert r["peak_mem_mb"] is not None, method
    gru = {r["config"]["impl"]: r for r in recs if r["what"] == "pcm3pp_gru"}
    assert set(gru) == {"step_by_step_official", "whole_sequence"}
    assert gru["whole_sequence"]["same_output"], gru["whole_sequence"]["max_abs_diff"]
    assert recs[-1]["what"] == "summary"
    assert set(recs[-1]["train_samples_per_s"]) == set(METHODS)
    assert "pcm3pp_gru" in recs[-1]["speedup_vs_step_by_step"]


def test_paper_config_draws_batches_from_resident_clips(run_py):
    recs = _records(run_py(["tests/bench.py", "--only", "train", "--methods", "mcc", "--paper_batch", "2",
                            "--resident", "8", "--repeats", "1"]))
    steps = {r["config"]["config"]: r for r in recs if r["what"] == "train"}
    assert set(steps) == {"quick", "paper"}
    paper = steps["paper"]
    assert paper["config"]["resident_clips"] == 8 and paper["config"]["batch"] == 2
    assert paper["config"]["raw_frames"] == 300 and math.isfinite(paper["first_loss"])
    assert steps["quick"]["config"]["resident_clips"] == 0


def test_learning_summary_pairs_the_seeds():
    rows = [(0, 50, 40), (1, 60, 45), (2, 70, 50)]  # seed, trained, random
    recs = [{"config": {"method": "m", "seed": s, "encoder": k}, "linear_top1": v, "knn_k1_top1": 10.0}
            for s, t, r in rows for k, v in (("trained", t), ("random", r))]
    out = bench.learning_summary("m", recs)
    lin = out["linear_top1"]
    assert out["seeds"] == [0, 1, 2]
    assert (lin["trained_mean"], lin["random_mean"], lin["diff_mean"]) == (60, 45, 15)
    assert lin["trained_std"] == 10 and lin["random_std"] == 5
    assert lin["diff_se"] == round(5 / math.sqrt(3), 2) and lin["ahead"]  # differences 10, 15, 20
    knn = out["knn_k1_top1"]
    assert knn["diff_mean"] == 0 and knn["diff_se"] == 0 and not knn["ahead"]


def test_fit_logistic_converges_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 4
    y = torch.arange(200) % 4
    x = centres[y] + torch.randn(200, 16, generator=g)
    assert bench.fit_logistic(x[:100], y[:100], x[100:], y[100:], 4) == (100.0, 100.0)
    noise = torch.randn(200, 16, generator=g)  # features that carry no label: near chance
    assert bench.fit_logistic(noise[:100], y[:100], noise[100:], y[100:], 4)[0] < 60


def test_learning_epochs_move_the_lr_decay():
    opts = SimpleNamespace(dataset="synthetic", split="xsub", data_dir="d", epochs=44)
    argv = bench.pretrain_argv("scd_net", 0, opts, "run")
    assert argv[argv.index("--epochs"):] == ["--epochs", "44", "--lr_steps", "36"]  # budget: 22, step 18
    argv = bench.pretrain_argv("usdrl", 0, opts, "run")
    assert argv[argv.index("--epochs"):] == ["--epochs", "44"]  # its QUICK has no decay
    argv = bench.pretrain_argv("mcc", 0, SimpleNamespace(**{**vars(opts), "epochs": None}), "run")
    assert argv[argv.index("--epochs"):] == ["--epochs", "12", "--lr_steps", "10"]


def test_learning_linear_trains_on_the_test_crop_unless_protocol():
    opts = SimpleNamespace(linear_train_crop="test")
    assert bench.learning_eval_args("pcm3pp", ["--allow_data_mismatch"], opts) == [
        "--allow_data_mismatch", "--train_crop", "center:0.95"]
    assert bench.learning_eval_args("mcc", [], opts) == ["--train_crop", "center:0.95"]
    assert bench.learning_eval_args("scd_net", [], opts) == []  # centre crops both already
    assert bench.learning_eval_args("pcm3pp", [], SimpleNamespace(linear_train_crop="protocol")) == []


@pytest.mark.parametrize("name", METHODS)
def test_init_checkpoint_is_the_runs_starting_encoder(name, tiny_data, tmp_path):
    """At lr 1e-30 one epoch leaves every weight where it started (to within 1e-20): the encoder of
    the run's last.pt must then be the one write_init_checkpoint rebuilt from the same command."""
    opts = SimpleNamespace(dataset="synthetic", split="xsub", data_dir=tiny_data, epochs=1)
    argv = bench.pretrain_argv(name, 3, opts, tmp_path / "run") + ["--lr", "1e-30"]
    bench.write_init_checkpoint(name, argv, tmp_path / "init.pt")
    importlib.import_module(name).main(argv)
    init = torch.load(tmp_path / "init.pt", weights_only=True)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert init["method"] == last["method"] and init["args"] == {**last["args"]}
    assert init["encoder"].keys() == last["encoder"].keys()
    mod = importlib.import_module(name)
    params = dict(mod.Encoder(mod.Args()).named_parameters())
    assert params
    for k in params:
        assert torch.allclose(init["encoder"][k], last["encoder"][k], rtol=0, atol=1e-20), k
    other = tmp_path / "init_seed4.pt"
    bench.write_init_checkpoint(name, bench.pretrain_argv(name, 4, opts, tmp_path / "run4"), other)
    enc4 = torch.load(other, weights_only=True)["encoder"]
    assert any(not torch.equal(enc4[k], init["encoder"][k]) for k in params)


def test_learning_runs_evaluates_and_resumes(run_py, tiny_data, tmp_path):
    out = tmp_path / "learning"
    argv = ["tests/bench.py", "--only", "learning", "--methods", "usdrl", "--seeds", "0", "--epochs", "1",
            "--dataset", "synthetic", "--split", "xsub", "--data_dir", tiny_data, "--out", out]
    recs = _records(run_py(argv))
    raw = next(r for r in recs if r["what"] == "learning_raw_reference")
    assert raw["features"] == 3 * 64 * 25 * 2 and raw["n_train"] == raw["n_test"] == 120
    assert 0 <= raw["linear_top1"] <= 100 and 0 <= raw["knn_k1_top1"] <= 100
    runs = {r["config"]["encoder"]: r for r in recs if r["what"] == "learning"}
    assert set(runs) == {"trained", "random"}
    for kind, r in runs.items():
        assert r["config"]["seed"] == 0 and not r["resumed"], kind
        assert "--quick --seed 0" in r["config"]["pretrain"] and "--epochs 1" in r["config"]["pretrain"]
        assert 0 <= r["linear_top1"] <= 100 and 0 <= r["knn_k1_top1"] <= 100, kind
        assert set(r["metrics"]) == {"linear", "knn", "linear_converged"}
        conv = r["metrics"]["linear_converged"]
        assert r["linear_converged_top1"] == conv["top1"] and 0 <= conv["top1"] <= 100, kind
        assert conv["crop"] == "center:1.0" and conv["feature_dim"] == r["metrics"]["linear"]["feature_dim"]
        assert r["config"]["eval_args"] == []  # usdrl's linear protocol already trains on the test crop
    assert runs["trained"]["pretrain_epochs"] == 1 and runs["trained"]["pretrain_steps"] >= 1
    run_dir = out / "synthetic_xsub" / "usdrl_seed0"
    init = torch.load(run_dir / "init.pt", weights_only=True)["encoder"]
    last = torch.load(run_dir / "pretrain" / "last.pt", weights_only=True)["encoder"]
    assert any(not torch.equal(init[k], last[k]) for k in init)  # the trained one did train
    summ = next(r for r in recs if r["what"] == "learning_summary")
    assert summ["seeds"] == [0] and summ["linear_top1"]["diff_se"] is None  # one seed: no error bar
    assert summ["linear_top1"]["diff_mean"] == round(runs["trained"]["linear_top1"]
                                                     - runs["random"]["linear_top1"], 2)
    assert recs[-1]["what"] == "summary" and set(recs[-1]["learning"]) == {"raw_input", "usdrl"}

    # a rerun reads every finished result and starts nothing
    stamps = {p: os.stat(p).st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    again = _records(run_py(argv))
    assert [r["resumed"] for r in again if "resumed" in r] == [True, True, True]  # raw, trained, random
    assert [r for r in again if r["what"] == "learning"] == [{**r, "resumed": True} for r in recs
                                                             if r["what"] == "learning"]
    assert {p: os.stat(p).st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == stamps

    # another budget in the same folder is refused in one line, nothing overwritten
    proc = run_py([*argv[:8], "2", *argv[9:]], check=False)
    assert proc.returncode == 1 and "written with other settings" in proc.stderr
    assert "Traceback" not in proc.stderr
