"""--dtype bf16 / fp16 (the GPU default is bf16; USDRL's official run is fp16 AMP): every method's
training step, exactly as its script runs it (tests/bench.py's *_step functions), under CPU
autocast from the same weights, views and dropout masks as the fp32 step."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def _step(name, dtype):
    """Loss of the first step and the gradients of the first step whose gradients are finite: an
    fp16 GradScaler starts at scale 2^16, so its first steps overflow and are skipped (the optimizer
    runs at lr 0 here: the weights stay at their init either way)."""
    a = bench.method_args(name, "quick", batch=8, dtype=dtype)
    s = bench.build_state(name, a, torch.device("cpu"))
    x, nf = bench.device_batch(8, 150, torch.device("cpu"))
    loss = bench.METHODS[name].step(s, x, nf)
    scale = s.scaler.get_scale() if s.scaler.is_enabled() else None
    for _ in range(30):
        grads = [p.grad for p in s.model.parameters() if p.grad is not None]
        if all(torch.isfinite(g).all() for g in grads):
            break
        assert dtype == "fp16", dtype                       # only a scaled fp16 backward overflows
        bench.METHODS[name].step(s, x, nf)
    if scale is not None:
        assert s.scaler.get_scale() <= scale                # overflowing steps lowered the scale
    return loss, grads


@pytest.mark.parametrize("name", ["usdrl", "scd_net", "pcm3pp", "mcc"])
def test_low_precision_step_runs_under_autocast_and_stays_close_to_fp32(name):
    ref, ref_grads = _step(name, "fp32")
    for dtype in ("bf16", "fp16"):
        loss, grads = _step(name, dtype)
        assert loss.dtype == torch.float32 and torch.isfinite(loss), (dtype, loss)
        # autocast really lowered the encoder (the loss moved) but not by more than rounding
        assert loss.item() != ref.item(), dtype
        assert abs(loss.item() - ref.item()) < 0.05 * abs(ref.item()), (dtype, loss.item(), ref.item())
        # the backward reached the same parameters with finite, non-zero (unscaled) gradients
        assert len(grads) == len(ref_grads)
        assert all(torch.isfinite(g).all() for g in grads), dtype
        assert sum(g.abs().sum().item() for g in grads) > 0, dtype
