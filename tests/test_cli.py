"""What a user meets around every training script: the output folder is protected, a resume never
duplicates a metrics row, errors name what was typed, the printed config can be pasted back, and
--help shows each default once."""
import dataclasses
import json
import shlex
from pathlib import Path

import pytest

import common
import mcc
import pcm3pp
import scd_net
import usdrl

MODULES = [usdrl, scd_net, pcm3pp, mcc]
TINY = ["usdrl.py", "--dataset", "synthetic", "--hidden", "16", "--proj_dim", "32",
        "--proj_inst_dim", "48", "--window", "16", "--batch_size", "16", "--log_every", "2",
        "--save_every", "1", "--epochs", "1"]


def _rows(out):
    return [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]


def test_finished_run_is_refused_then_overwritten_cleanly(tiny_data, tmp_path, run_py):
    out = tmp_path / "run"
    args = [*TINY, "--data_dir", tiny_data, "--out_dir", out]
    run_py(args)
    before = (out / "last.pt").read_bytes()
    n_rows = len(_rows(out))
    proc = run_py(args, check=False)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "holds a run" in err[0] and "--overwrite" in err[0], proc.stderr
    assert (out / "last.pt").read_bytes() == before and len(_rows(out)) == n_rows
    run_py([*args, "--overwrite", "--seed", "1"])
    rows = _rows(out)
    assert len(rows) == n_rows  # the old run's rows are gone, not mixed with the new ones
    assert (out / "log.txt").read_text().count("config: python usdrl.py") == 1
    assert (out / "last.pt").read_bytes() != before


def test_resume_writes_a_marker_and_never_duplicates_a_row(tiny_data, tmp_path, run_py):
    out = tmp_path / "run"
    args = [*TINY, "--data_dir", tiny_data, "--out_dir", out]
    run_py(args)
    ck_step = max(r["step"] for r in _rows(out))
    # a run killed after its checkpoint had logged rows past it: the resume writes them again
    common.append_jsonl(out / "metrics.jsonl", {"step": ck_step + 2, "epoch": 1.5, "loss": 1.0})
    proc = run_py([*args, "--epochs", "2", "--resume"])  # the last --epochs wins
    assert "resumed from" in proc.stdout
    rows = _rows(out)
    marker = [r for r in rows if r.get("event") == "resume"]
    assert len(marker) == 1 and marker[0]["step"] == ck_step
    keys = [(r["step"], "event" in r, any(k.startswith("epoch_") for k in r)) for r in rows]
    assert len(keys) == len(set(keys)), keys
    assert not any(r.get("loss") == 1.0 for r in rows)


def test_failed_run_leaves_no_folder(tmp_path, run_py):
    out = tmp_path / "never"
    empty = tmp_path / "no_data"
    empty.mkdir()
    proc = run_py(["usdrl.py", "--dataset", "ntu60", "--data_dir", empty, "--out_dir", out],
                  check=False)
    assert proc.returncode == 2 and "not found" in proc.stderr and not out.exists()
    proc = run_py([*TINY, "--views", "1", "--out_dir", out], check=False)
    assert proc.returncode == 2 and "--views" in proc.stderr and not out.exists()


@pytest.mark.parametrize("mod", MODULES, ids=lambda m: m.__name__)
def test_check_args_names_a_bad_count_or_crop_range(mod):
    mod.check_args(mod.Args())  # the paper run and the quick config are valid
    mod.check_args(common.parse_args(mod.Args, ["--quick"], quick=mod.QUICK))
    with pytest.raises(common.UserError, match="--batch_size 0: must be positive"):
        mod.check_args(dataclasses.replace(mod.Args(), batch_size=0))
    if hasattr(mod.Args(), "crop_scale"):
        for bad in ([0.5], [0.8, 0.2], [0.0, 1.0], [0.5, 1.5]):
            with pytest.raises(common.UserError, match=r"--crop_scale .*0 < lo <= hi <= 1"):
                mod.check_args(dataclasses.replace(mod.Args(), crop_scale=bad))


def test_pcm3pp_bad_crop_scale_is_one_line_and_no_folder(tmp_path, run_py):
    out = tmp_path / "never"
    proc = run_py(["pcm3pp.py", "--dataset", "synthetic", "--crop_scale", "0.5", "--out_dir", out],
                  check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not out.exists()
    assert [s for s in proc.stderr.splitlines() if s.startswith("error")] == [
        "error: --crop_scale [0.5]: expected two ratios 0 < lo <= hi <= 1"]


def test_split_error_names_what_was_typed():
    with pytest.raises(common.UserError, match=r"--split 'xset': dataset synthetic has splits"):
        common.canonical_split("synthetic", "xset")
    assert common.canonical_split("ntu120", "xset") == "xsetup"  # the alias still works


@pytest.mark.parametrize("mod", MODULES, ids=lambda m: m.__name__)
def test_a_dataset_without_xsub_defaults_to_its_first_split(mod, capsys):
    assert common.parse_args(mod.Args, ["--dataset", "bandai", "--quick"], quick=mod.QUICK).split == "xstyle"
    assert common.parse_args(mod.Args, ["--dataset", "bandai", "--split", "xtake"]).split == "xtake"
    assert common.parse_args(mod.Args, ["--dataset", "bandai", "--split=xsub"]).split == "xsub"  # as typed
    assert common.parse_args(mod.Args, ["--dataset", "ntu60"]).split == "xsub"
    capsys.readouterr()


def test_an_empty_split_default_is_left_alone():
    import data_prep  # its --split "" means: read it from the --from_npz file name
    for dataset in ("ntu60", "bandai"):
        assert common.parse_args(data_prep.Args, ["--dataset", dataset, "--raw_dir", "x"]).split == ""


@pytest.mark.parametrize("mod", MODULES, ids=lambda m: m.__name__)
def test_banner_flags_parse_back_to_the_same_args(mod, capsys):
    for argv in ([], ["--dataset", "synthetic"], ["--dataset", "synthetic", "--epochs", "7"],
                 ["--quick", "--dataset", "ntu120", "--split", "xset", "--lr_steps", "3", "5",
                  "--no_data_on_device", "--out_dir", "a dir/with space"]):
        args = common.parse_args(mod.Args, argv, quick=mod.QUICK)
        flags = common.to_flags(args, mod.QUICK)
        again = common.parse_args(mod.Args, shlex.split(flags), quick=mod.QUICK)
        assert again == args, (argv, flags)
    capsys.readouterr()


@pytest.mark.parametrize("mod", MODULES, ids=lambda m: m.__name__)
def test_help_shows_each_default_once(mod, capsys):
    with pytest.raises(SystemExit) as e:
        common.parse_args(mod.Args, ["--help"], quick=mod.QUICK)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "(default: None)" not in out and "(default: )" not in out and "['']" not in out
    blocks = ("\n" + out.split("options:")[1]).split("\n  --")[1:]  # one per flag
    assert all(b.count("(default") <= 1 for b in blocks), [b for b in blocks if b.count("(default") > 1]
    assert "ntu60" in out and "synthetic" in out  # --dataset lists its choices
    assert "quick config" in out and "(quick: " in out
    for f in dataclasses.fields(mod.Args):
        assert f"--{f.name}" in out


def test_data_prepared_unlike_the_official_run_is_refused(tiny_data, tmp_path, run_py, capsys):
    # an "ntu60" folder recorded as z-aligned (data_prep's default): USDRL's official run is not
    data = tmp_path / "data"
    folder = data / common.DATASETS["ntu60"][0]
    (folder / "xsub").mkdir(parents=True)
    for f in (Path(tiny_data) / "synthetic" / "xsub").iterdir():
        (folder / "xsub" / f.name).symlink_to(f)
    (folder / "prep_info.json").write_text(json.dumps({"dataset": "ntu60", "z_align": True}))
    out = tmp_path / "run"
    proc = run_py([*TINY[:1], "--dataset", "ntu60", *TINY[3:], "--data_dir", data, "--out_dir", out],
                  check=False)
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(err) == 1 and not out.exists(), proc.stderr
    assert "prepared with z-alignment" in err[0] and "--no_z_align" in err[0]
    assert "--allow_data_mismatch" in err[0]
    common.check_data_prep(data, "ntu60", "xsub", False, True, "usdrl")  # overridden: no error
    common.check_data_prep(data, "ntu60", "xsub", True, False, "scd_net")  # z-aligned: as expected
    (folder / "prep_info.json").unlink()  # prepared elsewhere: accepted with one warning line
    common.check_data_prep(data, "ntu60", "xsub", False, False, "usdrl")
    warn = capsys.readouterr().err.splitlines()
    assert len(warn) == 1 and warn[0].startswith("warning:") and "prep_info.json" in warn[0]
