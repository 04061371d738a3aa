"""tests/bench.py is a benchmark, not a test, but it drives every method's training step through the
scripts' own functions: this runs its quick training-step and PCM3++ GRU measurements once (no timing
asserted) so that an API change in a method file cannot silently break the benchmark."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_train_steps_and_gru_run():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "tests/bench.py", "--only", "train,pcm3pp_gru", "--quick",
                        "--repeats", "1"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    steps = {r["config"]["method"]: r for r in recs
             if r["what"] == "train" and r["config"].get("measure") == "step"}
    assert set(steps) == {"usdrl", "scd_net", "pcm3pp", "mcc"}
    for method, r in steps.items():
        assert r["device"] == "cpu" and r["samples_per_s"] > 0, method
        assert math.isfinite(r["first_loss"]) and r["params"] > 0, method
    gru = {r["config"]["impl"]: r for r in recs if r["what"] == "pcm3pp_gru"}
    assert set(gru) == {"step_by_step_official", "whole_sequence", "recurrent_floor", "exact_floor"}
    assert gru["whole_sequence"]["same_output"], gru["whole_sequence"]["max_abs_diff"]
    # the exact floor does the recurrent floor's products and more
    assert (gru["exact_floor"]["max_speedup_vs_step_by_step"]
            < gru["recurrent_floor"]["max_speedup_vs_step_by_step"])
    assert recs[-1]["what"] == "summary"
    for floors in recs[-1]["pcm3pp_gru_floors"].values():  # per allocator setting
        assert set(floors) == {"recurrent_floor", "exact_floor"}
