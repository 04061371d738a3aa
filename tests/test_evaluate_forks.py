"""evaluate.py on forks of a method script (--script) and on checkpoints written before the flag
renames (version 1)."""
import json
from pathlib import Path

import pytest
import torch

import common
import evaluate as ev

ROOT = Path(__file__).resolve().parents[1]
TINY_USDRL = ["--hidden", "16", "--proj_dim", "32", "--proj_inst_dim", "48", "--window", "16",
              "--batch_size", "8"]


@pytest.fixture(scope="module")
def fork(tmp_path_factory, tiny_data, run_py):
    """my_usdrl.py: usdrl.py with a wider token MLP (a width its Args do not record), trained one
    tiny epoch by itself."""
    d = tmp_path_factory.mktemp("fork")
    src = (ROOT / "usdrl.py").read_text()
    old = "nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)"
    assert src.count(old) == 1, "usdrl.py's token MLP changed: update this fork"
    script = d / "my_usdrl.py"
    script.write_text(src.replace(old, "nn.Linear(d, 3 * d), nn.GELU(), nn.Linear(3 * d, d)"))
    run_py([script, "--dataset", "synthetic", "--data_dir", tiny_data, "--epochs", "1",
            "--out_dir", d / "run", "--log_every", "100", *TINY_USDRL], timeout=1800, cwd=d)
    return script, d / "run" / "last.pt"


def test_a_fork_evaluates_with_script_and_is_refused_without(fork, tiny_data, run_py, tmp_path):
    script, ckpt = fork
    res = tmp_path / "r.jsonl"
    p = run_py(["evaluate.py", "--ckpt", ckpt, "--script", script, "--task", "knn", "--data_dir",
                tiny_data, "--results", res])
    rec = json.loads(p.stdout)
    assert rec["script"] == "my_usdrl.py" and rec["metrics"]["k1_top1"] >= 0
    # without --script: one clear line (refused by the recorded script name, or, for a checkpoint
    # that records none, because the weights do not fit usdrl.py's Encoder), no traceback
    p = run_py(["evaluate.py", "--ckpt", ckpt, "--task", "knn", "--data_dir", tiny_data,
                "--results", res], check=False)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("error: ") and p.stderr.strip().count("\n") == 0
    assert "--script" in p.stderr
    assert len(res.read_text().splitlines()) == 1


def test_the_recorded_script_name_decides(fork, tmp_path):
    """A checkpoint that records a script other than the four is never rebuilt from a repository
    module, even with METHOD 'usdrl'; --script loads Args and Encoder from the named file."""
    script, ckpt = fork
    ck = torch.load(ckpt, weights_only=True)
    named = tmp_path / "named.pt"
    torch.save({**ck, "script": "my_usdrl.py"}, named)
    with pytest.raises(common.UserError, match=r"written by 'my_usdrl.py', not one of this "
                                               r"repository's scripts .*pass --script"):
        ev.load_ckpt(str(named))
    ld = ev.load_ckpt(str(named), str(script))
    assert ld.script == "my_usdrl.py" and ld.protocol == "usdrl" and ld.module.__file__ == str(script)
    assert ld.z_align is False  # usdrl's official data (Z_ALIGN, or the default for its protocol)
    # weights that do not fit the named script's Encoder: one line naming it
    with pytest.raises(common.UserError, match="does not match usdrl.py's Encoder"):
        ev.load_ckpt(str(named), str(ROOT / "usdrl.py"))
    with pytest.raises(common.UserError, match="--script .*nothing.py: file not found"):
        ev.load_ckpt(str(named), str(tmp_path / "nothing.py"))
    bad = tmp_path / "no_encoder.py"
    bad.write_text("class Args:\n    pass\n")
    with pytest.raises(common.UserError, match="defines no Encoder"):
        ev.load_ckpt(str(named), str(bad))


FAKE = '''
from dataclasses import dataclass
import torch.nn as nn
METHOD = "pcm3pp"
PROTOCOL = "pcm3pp"
Z_ALIGN = True

@dataclass
class Args:
    hidden: int = 4
    key_momentum: float = 0.0
    momentum: float = 0.0
    w_rec: float = 0.0

class Encoder(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.fc = nn.Linear(3, args.hidden)
'''


def test_version1_checkpoint_args_map_to_the_new_names(tmp_path):
    old = {"hidden": 4, "momentum": 0.999, "sgd_momentum": 0.9, "rec_weight": 2.0, "gone": 1}
    v1 = {"method": "pcm3pp", "version": 1, "args": old}
    assert common.checkpoint_args(v1) == {"hidden": 4, "key_momentum": 0.999, "momentum": 0.9,
                                          "w_rec": 2.0, "gone": 1}
    assert common.checkpoint_args({**v1, "version": 2}) == old  # version 2 is read as written
    # through evaluate.py: Args gets the renamed values, unknown keys are ignored
    script = tmp_path / "fake_pcm3pp.py"
    script.write_text(FAKE)
    ckpt = tmp_path / "v1.pt"
    enc = torch.nn.Module()
    enc.fc = torch.nn.Linear(3, 4)
    torch.save({**v1, "encoder": enc.state_dict()}, ckpt)
    ld = ev.load_ckpt(str(ckpt), str(script))
    assert (ld.margs.key_momentum, ld.margs.momentum, ld.margs.w_rec) == (0.999, 0.9, 2.0)
    for method, key, new in (("usdrl", "sim_weight", "w_sim"), ("scd_net", "num_person", "bodies"),
                             ("scd_net", "moco_m", "key_momentum"), ("mcc", "tau", "temperature")):
        assert common.checkpoint_args({"method": method, "args": {key: 1.5}}) == {new: 1.5}


def test_data_prepared_with_another_z_alignment_is_refused(fork, tmp_path):
    """USDRL's official run used data without z-alignment: a folder recorded as z-aligned is
    refused in one line before any data is read, unless --allow_data_mismatch."""
    script, ckpt = fork
    folder = tmp_path / "NTU-RGB-D-60-AGCN"
    folder.mkdir()
    (folder / "prep_info.json").write_text(json.dumps({"dataset": "ntu60", "z_align": True}))
    base = ["--ckpt", str(ckpt), "--script", str(script), "--task", "knn", "--dataset", "ntu60",
            "--data_dir", str(tmp_path), "--results", str(tmp_path / "r.jsonl")]
    with pytest.raises(common.UserError, match=r"prepared with z-alignment, but my_usdrl.py expects "
                                               r"no z-alignment.*--no_z_align"):
        ev.main(base)
    with pytest.raises(common.UserError, match="train_data_joint.npy: not found"):
        ev.main(base + ["--allow_data_mismatch"])  # past the check: the (absent) arrays are read
