"""evaluate.py's detection protocol `ssd` (Simple-Skeleton-Detection's, point by point): training
window draws, labels, test windows, the encoder's BatchNorm mode, and what a frame's prediction sees."""
import numpy as np
import pytest
import torch

import common
import evaluate as ev
import pcm3pp

CPU = torch.device("cpu")


def test_training_windows_strides_centres_and_clamping():
    L = np.array([300, 120, 500])
    rng = np.random.RandomState(0)
    video, centre, start, stride, label_frame = ev.ssd_train_windows(L, 16, 16, rng)
    assert np.array_equal(video, np.repeat([0, 1, 2], 16))  # 16 windows per video and epoch
    # many epochs: strides uniform on {3, 4, 5}, centres uniform on {0, ..., L-1}
    draws = [ev.ssd_train_windows(np.array([100]), 20000, 16, rng) for _ in range(10)]
    strides = np.concatenate([d[3] for d in draws])
    centres = np.concatenate([d[1] for d in draws])
    assert set(np.unique(strides)) == {3, 4, 5}
    n = len(strides)
    counts = np.bincount(strides, minlength=6)[3:]
    assert np.all(np.abs(counts / n - 1 / 3) < 0.01)
    hist = np.bincount(centres // 10, minlength=10)  # 10 bins of 10 frames
    expected = n / 10
    chi2 = ((hist - expected) ** 2 / expected).sum()
    assert centres.min() == 0 and centres.max() == 99 and chi2 < 27.9  # df 9, p = 0.001
    # every window lies in the video, is centred on the drawn centre unless clamped at an edge
    for d in draws[:2] + [(video, centre, start, stride, label_frame)]:
        v, c, s, st, lf = d
        lengths = (L if len(v) == 48 else np.array([100]))[v]
        span = 16 * st
        assert np.all(s >= 0) and np.all(s + span <= np.maximum(lengths, span))
        assert np.array_equal(lf, s + span // 2)  # official label[(sample_s + sample_e) // 2]
        inner = (c >= span // 2) & (c <= lengths - span // 2)
        assert np.array_equal(lf[inner], c[inner])
        assert np.all(s[c < span // 2] == 0)
        assert np.all(s[c > lengths - span // 2] == (lengths - span)[c > lengths - span // 2])
    # redrawn every epoch
    again = ev.ssd_train_windows(L, 16, 16, rng)
    assert not np.array_equal(again[1], centre)


def _untrimmed(L=400, classes=(0, 3, 5)):
    """A video whose frame t has joint 0 at x = t, with labels changing every 50 frames."""
    data = np.zeros((1, L, 25, 3, 2), np.float32)
    data[0, :, :, 0, 0] = np.arange(L, dtype=np.float32)[:, None]
    data[0, :, :, 1, 0] = 1.0
    stored = np.array([0 if c == 0 else c + 1 for c in classes], np.uint8)
    labels = stored[(np.arange(L) // 50) % len(classes)][None]
    return ev.Untrimmed(data, labels, np.array([L]), ["v"], [], None)


def test_training_window_label_is_its_centre_frame():
    u = _untrimmed()
    rng = np.random.RandomState(3)
    video, _, start, stride, label_frame = ev.ssd_train_windows(u.num_frame, 64, 16, rng)
    x, y = ev.ssd_batch(u, video, start, stride, label_frame, 16, CPU)
    assert x.shape == (64, 3, 16, 25, 2)
    frames = x[:, 0, :, 0, 0].long().numpy()  # which raw frame each step holds
    assert np.array_equal(frames, start[:, None] + np.arange(16)[None] * stride[:, None])
    # the label is the centre frame's: step 8 of 16 (span // 2 = 8 strides after the start)
    assert np.array_equal(frames[:, 8], label_frame)
    raw = u.labels[0, label_frame].astype(int)
    assert np.array_equal(y.numpy(), np.where(raw == 0, 0, raw - 1))
    assert set(y.tolist()) <= {0, 3, 5} and len(set(y.tolist())) > 1


def test_test_windows_are_centred_on_each_frame():
    L, steps = 300, 16
    starts = ev.ssd_test_starts(L, steps)
    assert len(starts) == L  # one window per frame
    t = np.arange(L)
    span = steps * ev.SSD_TEST_STRIDE  # 64 raw frames, every 4th
    inner = (t >= span // 2) & (t <= L - span // 2)
    assert np.array_equal(starts[inner] + span // 2, t[inner])  # centred: 32 frames each side
    assert np.all(starts[t < span // 2] == 0) and np.all(starts[t > L - span // 2] == L - span)
    assert np.all((starts <= t) & (t < starts + span))  # the frame is always inside its window
    # a video shorter than the window: the window starts at 0 and repeats the last frame
    assert np.all(ev.ssd_test_starts(20, steps) == 0)
    u = _untrimmed(L=20)
    x = ev.ssd_windows(np.asarray(u.data[0]), [0], 4, steps, CPU)
    assert x[0, 0, :, 0, 0].tolist() == [0, 4, 8, 12, 16] + [19] * 11


def _tiny_pcm3pp():
    margs = common.args_from_dict(pcm3pp.Args, dict(hidden=8, prompt_dim=8, dec_dim=8, window=16))
    torch.manual_seed(0)
    enc = pcm3pp.Encoder(margs).eval()
    return ev.Loaded("x.pt", "pcm3pp", pcm3pp, margs, {}), enc


def test_a_frames_prediction_sees_its_future(tiny_data):
    """PCM3++'s dense() is causal (step k sees frames <= k), so the ssd readout matters: frame t is
    predicted from the LAST step of a window centred on t, which has seen 32 frames after t."""
    _, enc = _tiny_pcm3pp()
    head = ev.WindowHead(enc, 4).eval()
    u = ev.load_untrimmed(tiny_data, "synthetic_untrimmed", "val")
    L = int(u.num_frame[0])
    frames = np.asarray(u.data[0, :L]).copy()
    t = L // 2
    base = ev.ssd_video_probs(head, frames, 16, 512, CPU)
    assert base.shape == (L, 4)
    future = frames.copy()
    future[t + 1:t + 30] += 0.5  # only frames after t, inside its window
    moved = ev.ssd_video_probs(head, future, 16, 512, CPU)
    assert np.abs(moved[t] - base[t]).max() > 1e-4
    far = frames.copy()
    far[t + 40:] += 0.5  # beyond its window: frame t's prediction is untouched
    assert np.array_equal(ev.ssd_video_probs(head, far, 16, 512, CPU)[t], base[t])
    # the encoder itself is causal: its dense output at step 8 ignores steps 9..15
    x = ev.ssd_windows(frames, [t - 32], 4, 16, CPU)
    y = x.clone()
    y[:, :, 9:] += 0.5
    with torch.no_grad():
        assert torch.equal(enc.dense(x)[:, :9], enc.dense(y)[:, :9])


@pytest.mark.parametrize("det_protocol", ["ssd", "dense"])
def test_frozen_encoder_batchnorm_mode(det_protocol, tiny_data, tmp_path):
    """ssd: the frozen encoder is in train mode while the head trains (official model.train()): its
    weights stay, its BatchNorm running statistics move. dense: nothing in the encoder moves."""
    ld, enc = _tiny_pcm3pp()
    snap = ev.encoder_snapshot(enc)
    args = common.parse_args(ev.Args, ["--ckpt", "x.pt", "--det_protocol", det_protocol,
                                       "--epochs", "1", "--batch_size", "16", "--det_windows", "2",
                                       "--tiou", "0.5"])
    m = ev.detection_eval(enc, ld, args, CPU, "synthetic_untrimmed", tiny_data, tmp_path / "p")
    assert m["mode"] == "frozen" and m["det_protocol"] == det_protocol
    params = dict(enc.named_parameters())
    for k, v in enc.state_dict().items():
        if k in params:
            assert torch.equal(v, snap[k]), k
    bn = "input_norm.running_mean"
    assert torch.equal(enc.state_dict()[bn], snap[bn]) == (det_protocol == "dense")
    assert m["final"]["epoch"] == 1 and 0 <= m["final"]["voc_mAP_a@0.5"] <= 100
