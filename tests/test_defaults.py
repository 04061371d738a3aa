"""The Args defaults are the papers' runs (SPEC section 2): pinned here so that a changed default
fails a test instead of silently changing what `python <method>.py --dataset ntu60` trains.
Sources: specs/methods.md 1 (USDRL), 2 (SCD-Net), 3A/3B (PCM3++), 4 + SPEC section 5 (MCC), and
the method issues' build lists."""
import pytest

import mcc
import pcm3pp
import scd_net
import usdrl

PAPER = {
    usdrl: dict(lr=5e-4, weight_decay=1e-5, batch_size=356, epochs=451, lr_steps=[351], views=4,
                window=64, hidden=1024, sim_weight=5.0, vac_weight=1.0, xcorr_weight=0.001,
                std_weight=5.0, offdiag_weight=0.005, crop_scale=[0.1, 1.0]),
    scd_net: dict(lr=0.01, momentum=0.9, weight_decay=1e-4, batch_size=64, epochs=451,
                  lr_steps=[351], queue_size=8192, moco_m=0.999, temperature=0.2, window=64,
                  gcn_channels=[64, 256, 64], hidden=2048, heads=8, ffn=2048, dropout=0.1,
                  cubes=16, masked_cubes=6, mask_joints=8),
    pcm3pp: dict(optimizer="sgd", lr=0.02, sgd_momentum=0.9, weight_decay=1e-4, batch_size=128,
                 epochs=451, lr_steps=[351], queue_size=16384, momentum=0.999, temperature=0.07,
                 teacher_temp=0.05, student_temp=0.1, rec_weight=40.0, hidden=1024, layers=3,
                 feat_dim=128, window=64, mask_chunks=8, clip_len=[16, 32]),
    mcc: dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, batch_size=64, epochs=80,
              lr_steps=[10, 50], margin=0.15, tau=0.5, queue_size=65536, key_momentum=0.999,
              dropout=0.5),
}


@pytest.mark.parametrize("mod", list(PAPER), ids=lambda m: m.__name__)
def test_defaults_are_the_paper_run(mod):
    a = mod.Args()
    wrong = {k: (getattr(a, k), v) for k, v in PAPER[mod].items() if list_or(getattr(a, k)) != v}
    assert not wrong, f"{mod.__name__}: (default, paper) {wrong}"
    assert a.dataset == "ntu60" and a.split == "xsub" and a.modality == "joint"


def list_or(v):
    return list(v) if isinstance(v, tuple) else v
