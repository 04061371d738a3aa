"""--dtype on the CPU: every method's first training step, exactly as its script's loop runs it
(tests/bench.py loop_step), from the same weights, views and dropout masks. fp16 is a CUDA recipe
(autocast + GradScaler): on the CPU it must be the fp32 step itself; bf16 autocast really lowers the
model's precision, and stays close to fp32."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

CPU = torch.device("cpu")


def _first_step(name, dtype):
    """Loss terms and parameter gradients of the first step, and whether a GradScaler is active."""
    s = bench.build_state(name, bench.method_args(name, "quick", batch=8, dtype=dtype), CPU)
    x, nf = bench.device_batch(8, 150, CPU)
    terms = bench.loop_step(s, x, nf)
    grads = {n: p.grad.clone() for n, p in s.model.named_parameters() if p.grad is not None}
    return terms, grads, s.scaler.is_enabled()


@pytest.mark.parametrize("name", ["usdrl", "scd_net", "pcm3pp", "mcc"])
def test_cpu_fp16_is_fp32_and_bf16_is_close(name):
    ref, ref_grads, scaled = _first_step(name, "fp32")
    assert not scaled and ref_grads
    terms, grads, scaled = _first_step(name, "fp16")
    assert not scaled  # no GradScaler on the CPU
    assert terms.keys() == ref.keys() and all(torch.equal(terms[k], ref[k]) for k in ref)
    assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[k], ref_grads[k]) for k in grads)

    terms, grads, scaled = _first_step(name, "bf16")
    loss = terms["loss"]
    assert not scaled and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() != ref["loss"].item()  # autocast lowered the model
    assert abs(loss.item() - ref["loss"].item()) < 0.05 * abs(ref["loss"].item())
    assert grads.keys() == ref_grads.keys()  # the backward reached the same parameters
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert sum(g.abs().sum().item() for g in grads.values()) > 0
