"""Shared pytest fixtures: tiny synthetic datasets generated once per session, and a helper that runs
a repo script in a subprocess (CleanRL-style end-to-end tests)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run_script(args, timeout=3600, env=None, check=True, cwd=None):
    """Run `python <args...>` from the repo root; one thread per process keeps runs reproducible
    and lets two torchrun workers share the 2-core CI machine. The timeout only stops a hung
    process: no test depends on how fast a busy machine runs."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(map(str, args))}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n"
                             f"{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(autouse=True)
def _seeded_global_rngs():
    """Every test starts from the same global RNG states (torch, numpy, random), so a test that
    draws from them without its own seed still sees the same numbers in any order or subset."""
    import random

    import numpy as np
    import torch
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def run_py():
    return run_script


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A data_dir with the tiny `synthetic` set (xsub, xview) and the untrimmed detection set."""
    import data_prep
    d = tmp_path_factory.mktemp("data")
    data_prep.prepare_synthetic(d, "synthetic", size="tiny", seed=0, quiet=True)
    return str(d)


@pytest.fixture(scope="session")
def tiny_data_ext(tmp_path_factory):
    """A data_dir with the tiny `synthetic_ext` set (30 classes, 21-30 novel)."""
    import data_prep
    d = tmp_path_factory.mktemp("data_ext")
    data_prep.prepare_synthetic(d, "synthetic_ext", size="tiny", seed=0, quiet=True)
    return str(d)


@pytest.fixture
def torchrun_vs_one(tmp_path, run_py, monkeypatch):
    """run(script_text, args) -> (one, two): the states a one-step script saves to argv[1] when run
    in this process (one) and as 2 gloo processes under torchrun with `args` after argv[1] (two).
    The script receives the rest of argv (the training flags) and may run main() under torchrun."""
    import torch

    def run(script_text, args):
        script = tmp_path / "step.py"
        script.write_text(script_text)
        run_py(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                script, tmp_path / "two.pt", *args])
        monkeypatch.setattr(sys, "argv", ["step.py", str(tmp_path / "one.pt")])
        exec(compile(script_text, "step.py", "exec"), {})
        return (torch.load(tmp_path / "one.pt", weights_only=True),
                torch.load(tmp_path / "two.pt", weights_only=True))
    return run
