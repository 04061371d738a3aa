"""The Args defaults are the papers' runs: pinned here so that a changed default fails a test
instead of silently changing what `python <method>.py --dataset ntu60` trains. Sources: the official
training scripts (USDRL scripts/pretrain.sh, SCD-Net README, PCM3 README, MCC / ST-GCN recipe) and
the precision each official run uses (USDRL fp16 AMP with a GradScaler; the others fp32)."""
import pytest

import mcc
import pcm3pp
import scd_net
import usdrl

PAPER = {
    usdrl: dict(lr=5e-4, weight_decay=1e-5, batch_size=356, epochs=451, lr_steps=[351], views=4,
                window=64, hidden=1024, w_sim=5.0, w_vac=1.0, w_xcorr=0.001, w_domain=0.5,
                w_std=5.0, w_offdiag=0.005, crop_scale=[0.1, 1.0], dtype="fp16"),
    scd_net: dict(lr=0.01, momentum=0.9, weight_decay=1e-4, batch_size=64, epochs=451,
                  lr_steps=[351], queue_size=8192, key_momentum=0.999, temperature=0.2, window=64,
                  gcn_channels=[64, 256, 64], hidden=2048, heads=8, ffn=2048, dropout=0.1,
                  cubes=16, masked_cubes=6, mask_joints=8, dtype="fp32"),
    pcm3pp: dict(optimizer="sgd", lr=0.02, momentum=0.9, weight_decay=1e-4, batch_size=128,
                 epochs=451, lr_steps=[351], queue_size=16384, key_momentum=0.999, temperature=0.07,
                 teacher_temp=0.05, student_temp=0.1, w_rec=40.0, hidden=1024, layers=3,
                 feat_dim=128, window=64, mask_chunks=8, clip_len=[16, 32], dtype="fp32"),
    mcc: dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, batch_size=64, epochs=80,
              lr_steps=[10, 50], margin=0.15, temperature=0.5, queue_size=65536, key_momentum=0.999,
              dropout=0.0, finetune_dropout=0.5, dtype="fp32"),
}


@pytest.mark.parametrize("mod", list(PAPER), ids=lambda m: m.__name__)
def test_defaults_are_the_paper_run(mod):
    a = mod.Args()
    wrong = {k: (getattr(a, k), v) for k, v in PAPER[mod].items() if list_or(getattr(a, k)) != v}
    assert not wrong, f"{mod.__name__}: (default, paper) {wrong}"
    assert a.dataset == "ntu60" and a.split == "xsub" and a.modality == "joint" and a.seed == 0


def list_or(v):
    return list(v) if isinstance(v, tuple) else v


def test_default_precision_is_the_official_runs(monkeypatch):
    import torch

    import common
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    # USDRL: fp16 autocast with a GradScaler on the GPU; the others plain fp32 (no autocast)
    assert common.amp_dtype(cuda, usdrl.Args().dtype) is torch.float16
    for mod in (scd_net, pcm3pp, mcc):
        assert common.amp_dtype(cuda, mod.Args().dtype) is None, mod.__name__
    made = []
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: made.append(enabled))
    common.make_scaler(cuda, usdrl.Args().dtype)
    common.make_scaler(cuda, "bf16")
    common.make_scaler(cpu, usdrl.Args().dtype)  # fp16 is a CUDA recipe: CPU runs fp32, no scaler
    assert made == [True, False, False]
    assert common.amp_dtype(cpu, "fp16") is None and common.amp_dtype(cpu, "bf16") is torch.bfloat16
