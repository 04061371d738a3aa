"""Batched augmentations of common.py against the official per-sample numpy versions (feeder/
augmentations.py and feeder/tools.py of the official repos): statistics of the drawn parameters, exact counts of masked
joints/frames, exact outputs where the parameters can be replayed or recovered, seeding.

Parameters are recovered from outputs with probe inputs: basis vectors for the 3x3 maps, frame
indices stored as coordinates for the crops and permutations. Where a test replays draws it clones
the generator and repeats the draw order the function's docstring lists."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common as C

V = 25


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is fastest on the shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def close(a, b, rtol=1.3e-6, atol=1e-5):
    a, b = torch.as_tensor(a), torch.as_tensor(b).to(torch.as_tensor(a).dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs()
    assert bool((err <= atol + rtol * b.abs()).all()), f"max abs diff {err.max().item():.3g}"


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def replay(g):
    """A copy of generator g in its current state."""
    g2 = torch.Generator()
    g2.set_state(g.get_state())
    return g2


def official_resize(clip, out_len=64):
    """The official resize of a (C, L, V, M) crop: bilinear on (1, C*V*M, L, 1), align_corners=False."""
    c, L, v, m = clip.shape
    t = clip.permute(0, 2, 3, 1).reshape(1, c * v * m, L, 1)
    t = F.interpolate(t, size=(out_len, 1), mode="bilinear", align_corners=False)
    return t[0, :, :, 0].reshape(c, v, m, out_len).permute(0, 3, 1, 2)


def official_crop_window(n, u_scale, u_start, l0=0.1, l1=1.0, min_len=64):
    """temporal_cropresize's window for given uniform draws (numpy float64 arithmetic)."""
    scale = u_scale * (l1 - l0) + l0
    length = int(np.minimum(np.maximum(int(np.floor(n * scale)), min_len), n))
    start = int(np.floor(u_start * (n - length + 1)))
    return start, length


def frame_coded(N, T, v=1, m=1):
    """(N, 3, T, v, m) with every coordinate of frame t equal to t."""
    return torch.arange(T, dtype=torch.float32).view(1, 1, T, 1, 1).expand(N, 3, T, v, m).contiguous()


def basis_probe(N, T=1, extra=1, seed=0):
    """(N, 3, T, 3 + extra, 2): joints 0..2 hold the unit vectors e0..e2, the rest random data."""
    x = torch.zeros(N, 3, T, 3 + extra, 2)
    for j in range(3):
        x[:, j, :, j] = 1.0
    x[:, :, :, 3:] = torch.randn(N, 3, T, extra, 2, generator=gen(seed))
    return x


def changed_joints(out, x):
    """(N, V) bool: joints whose value changed anywhere (any coordinate, frame, body)."""
    return (out != x).any(dim=4).any(dim=2).any(dim=1)


# ----------------------------------------------------------------------------------------------
# Crop / resize
# ----------------------------------------------------------------------------------------------
def test_interpolation_weights_bit_identical_to_f_interpolate():
    for L in (30, 64, 137, 300):
        x = torch.eye(L).view(1, 1, L, L, 1)            # joint k is 1 at frame k only
        ours = C.center_crop_resize(x, torch.tensor([L]), 1.0)[0, 0, :, :, 0]   # (64, L)
        ref = F.interpolate(torch.eye(L)[None, :, :, None], size=(64, 1), mode="bilinear",
                            align_corners=False)[0, :, :, 0]                    # (L, 64)
        assert torch.equal(ours, ref.T), L


def test_resize_values_match_f_interpolate():
    x = torch.randn(6, 3, 300, V, 2, generator=gen(1))
    nf = torch.tensor([300, 250, 137, 64, 40, 1])
    out = C.center_crop_resize(x, nf, 1.0)
    for i, n in enumerate(nf.tolist()):
        # equal up to the rounding of the final multiply-add (PyTorch's kernel fuses it)
        close(out[i], official_resize(x[i, :, :n]), rtol=1e-6, atol=1e-6)
    close(C.resize_time(x[:2], 50), torch.stack(
        [official_resize(x[i], 50) for i in range(2)]), rtol=1e-6, atol=1e-6)


def test_crop_resize_exact_for_replayed_draws():
    N, T = 40, 300
    x = torch.randn(N, 3, T, V, 2, generator=gen(2))
    x[:, :, :, :, :] += torch.arange(T).view(1, 1, T, 1, 1)       # frames distinguishable
    nf = torch.randint(1, T + 1, (N,), generator=gen(3))
    nf[:4] = torch.tensor([1, 30, 64, 300])
    g = gen(4)
    g2 = replay(g)
    out = C.crop_resize(x, nf, g)
    u_scale = torch.rand(N, generator=g2, dtype=torch.float64)
    u_start = torch.rand(N, generator=g2, dtype=torch.float64)
    for i in range(N):
        start, length = official_crop_window(int(nf[i]), float(u_scale[i]), float(u_start[i]))
        close(out[i], official_resize(x[i, :, start:start + length]),
                                   rtol=1e-6, atol=1e-5)


def test_crop_lengths_and_starts_follow_the_official_distribution():
    N, n = 3000, 200
    x = frame_coded(N, 300)
    out = C.crop_resize(x, torch.full((N,), n), gen(5))[:, 0, :, 0, 0].double()   # (N, 64)
    # For length >= 64, output frame i sits at start + length/64*(i+0.5) - 0.5.
    length = torch.round((out[:, 63] - out[:, 0]) * 64 / 63).long()
    start = torch.round(out[:, 0] - (length / 128 - 0.5)).long()
    assert length.min() >= 64 and length.max() <= n
    assert (start >= 0).all() and (start + length <= n).all()
    rng = np.random.default_rng(0)
    ref = np.array([official_crop_window(n, rng.random(), 0.0)[1] for _ in range(20000)])
    assert abs((length == 64).float().mean().item() - (ref == 64).mean()) < 0.03   # ~0.25
    assert abs(length.double().mean().item() - ref.mean()) < 3.0
    for q in (0.25, 0.5, 0.75):
        assert abs(np.quantile(length.numpy(), q) - np.quantile(ref, q)) < 6
    room = (n - length).double()
    frac = (start.double() / room)[room > 20]
    assert abs(frac.mean().item() - 0.5) < 0.03 and frac.min() >= 0 and frac.max() <= 1


def test_crop_never_reads_past_num_frame_and_short_clips_are_stretched():
    x = torch.full((3, 3, 100, V, 2), float("nan"))
    nf = torch.tensor([10, 64, 90])
    for i, n in enumerate(nf.tolist()):
        x[i, :, :n] = torch.randn(3, n, V, 2, generator=gen(i))
    out = C.crop_resize(x, nf, gen(6))
    assert torch.isfinite(out).all()
    close(out[0], official_resize(x[0, :, :10]), rtol=1e-6, atol=1e-6)


def test_center_crop_start_rule():
    T = 300
    nf = torch.arange(1, T + 1)
    x = frame_coded(T, T)
    for ratio in (0.95, 0.5):
        out = C.center_crop_resize(x, nf, ratio)
        for n in (1, 7, 64, 101, 255, 300):
            start = int((1 - ratio) * n / 2)
            ref = official_resize(x[n - 1, :, start:n - start])
            close(out[n - 1], ref, rtol=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Shear / corruption / jitter
# ----------------------------------------------------------------------------------------------
def test_shear_matrix_distribution_and_application():
    N = 4000
    x = basis_probe(N)
    out = C.shear(x, gen(7))
    S = out[:, :, 0, :3, 0]                                         # S[n, :, j] = S e_j
    assert torch.equal(torch.diagonal(S, dim1=1, dim2=2), torch.ones(N, 3))
    off = S[:, [0, 0, 1, 1, 2, 2], [1, 2, 0, 2, 0, 1]]             # (N, 6)
    assert off.abs().max() <= 1.0
    assert off.mean(0).abs().max() < 0.03
    assert (off.var(0) - 1 / 3).abs().max() < 0.03                 # U(-1, 1) variance
    corr = np.corrcoef(off.T.numpy())
    assert np.abs(corr - np.eye(6)).max() < 0.06                    # independent entries
    close(out[:, :, 0, 3], torch.einsum("ncj,njm->ncm", S, x[:, :, 0, 3]))
    off_half = C.shear(x, gen(8), amp=0.5)[:, :, 0, :3, 0][:, [0, 1, 2], [1, 0, 0]]
    assert off_half.abs().max() <= 0.5 and abs(off_half.var().item() - 1 / 12) < 0.01


def test_p_applies_per_sample():
    N = 2000
    x = torch.rand(N, 3, 2, V, 2, generator=gen(9)) + 0.5
    for fn in (C.shear, C.joint_corruption):
        out = fn(x, gen(9), p=0.3)
        changed = (out != x).flatten(1).any(1).float().mean().item()
        assert abs(changed - 0.3) < 0.05, fn.__name__
        assert torch.equal(fn(x, gen(9), p=0.0), x)


def test_joint_corruption_counts_branches_and_matrix():
    N = 2000
    x = torch.zeros(N, 3, 4, V, 2)
    for t in range(3):
        x[:, t, t] = 1.0                                             # frame t holds e_t at every joint
    x[:, :, 3] = torch.rand(N, 3, V, 2, generator=gen(13)) + 0.5     # nonzero data
    out = C.joint_corruption(x, gen(14))
    chosen = changed_joints(out, x)                                  # (N, V)
    assert (chosen.sum(1) == 15).all()
    per_pos = out[:, :, 3] != x[:, :, 3]                             # same joints for all frames/bodies
    assert torch.equal(per_pos.any(1)[..., 0], chosen) and torch.equal(per_pos.any(1)[..., 1], chosen)
    assert (chosen.float().mean(0) - 0.6).abs().max() < 0.05         # uniform choice of 15 of 25
    sel = chosen[:, :, None, None, None].permute(0, 2, 3, 1, 4).expand_as(out)
    zeroed = ((out == 0) | ~sel).flatten(1).all(1)
    assert abs(zeroed.float().mean().item() - 0.5) < 0.05
    Rs = []
    for i in torch.nonzero(~zeroed).flatten()[:300].tolist():
        js = torch.nonzero(chosen[i]).flatten()
        R = out[i, :, :3, js[0], 0].T                                # R[t, c] = (e_t @ R)[c]
        for j in js.tolist():
            assert torch.equal(out[i, :, :3, j, 1].T, R)
            close(out[i, :, 3, j], (x[i, :, 3, j].T @ R).T)
        Rs.append(R)
    Rs = torch.stack(Rs)
    assert Rs.abs().max() <= 1 and Rs.mean().abs() < 0.03 and abs(Rs.var().item() - 1 / 3) < 0.03


def test_corrupt_or_shear_picks_one_per_sample():
    N = 2000
    x = torch.rand(N, 3, 2, V, 2, generator=gen(15)) + 0.5
    n_changed = changed_joints(C.corrupt_or_shear(x, gen(16)), x).sum(1)
    assert set(n_changed.unique().tolist()) == {15, 25}
    assert abs((n_changed == 15).float().mean().item() - 0.5) < 0.05


def test_crop_corrupt_or_shear_is_the_blocked_composition():
    # 150 clips span five CPU blocks (4 x 32, 22): same draws, same order, bit-identical values
    N, T = 150, 90
    x = torch.randn(N, 3, T, V, 2, generator=gen(40))
    nf = torch.randint(20, T + 1, (N,), generator=gen(41))
    g1, g2 = gen(42), gen(42)
    ref = C.corrupt_or_shear(C.crop_resize(x, nf, g1, 32, (0.1, 1.0), 32), g1)
    got = C.crop_corrupt_or_shear(x, nf, g2, 32, (0.1, 1.0), 32)
    assert torch.equal(got, ref)
    assert torch.equal(g1.get_state(), g2.get_state())   # the next draws match too
    assert torch.equal(C.crop_corrupt_or_shear(x, nf, gen(42), 32, (0.1, 1.0), 32), ref)


def test_crop_corrupt_or_shear_views_equal_repeated_calls():
    # views=3 in one call = three one-view calls in a row: same draws in the same order, the same
    # values view-major, and the generator left where the three calls leave it
    N, T = 70, 80
    x = torch.randn(N, 3, T, V, 2, generator=gen(43))
    nf = torch.randint(20, T + 1, (N,), generator=gen(44))
    g1, g2 = gen(45), gen(45)
    ref = torch.cat([C.crop_corrupt_or_shear(x, nf, g1, 32, (0.2, 1.0), 32) for _ in range(3)])
    got = C.crop_corrupt_or_shear(x, nf, g2, 32, (0.2, 1.0), 32, views=3)
    assert got.shape == (3 * N, 3, 32, V, 2) and torch.equal(got, ref)
    assert torch.equal(g1.get_state(), g2.get_state())
    assert not torch.equal(got[:N], got[N:2 * N])   # the views are independent draws
    # a non-contiguous batch (body-major storage seen as (N, 3, T, V, M)) gives the same views
    xs = torch.empty(N, 3, T, V, 2).transpose(3, 4).contiguous().transpose(3, 4).copy_(x)
    assert not xs.is_contiguous()
    assert torch.equal(C.crop_corrupt_or_shear(xs, nf, gen(45), 32, (0.2, 1.0), 32, views=3), ref)
    with pytest.raises(ValueError, match="views"):
        C.crop_corrupt_or_shear(x, nf, gen(45), 32, (0.2, 1.0), 32, views=0)


# ----------------------------------------------------------------------------------------------
# Modalities, seeding
# ----------------------------------------------------------------------------------------------
def test_modalities():
    x = torch.randn(2, 3, 8, V, 2, generator=gen(27))
    bone = torch.zeros_like(x)
    for v1, v2 in C.BONE_PAIRS_1B:
        bone[:, :, :, v1 - 1] = x[:, :, :, v1 - 1] - x[:, :, :, v2 - 1]
    assert torch.equal(C.to_modality(x, "bone"), bone)
    assert (C.to_modality(x, "bone")[:, :, :, 20] == 0).all()
    motion = torch.zeros_like(x)
    motion[:, :, :-1] = x[:, :, 1:] - x[:, :, :-1]
    assert torch.equal(C.to_modality(x, "motion"), motion)
    assert C.to_modality(x, "joint") is x
    with pytest.raises(ValueError, match="modality"):
        C.to_modality(x, "velocity")


RANDOM_FNS = {
    "crop_resize": lambda x, g: C.crop_resize(x, torch.full((x.shape[0],), 40), g, out_len=16,
                                              min_len=16),
    "shear": C.shear, "joint_corruption": C.joint_corruption,
    "corrupt_or_shear": C.corrupt_or_shear,
}


@pytest.mark.parametrize("name", sorted(RANDOM_FNS))
def test_seeded_reproducibility(name):
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        x = torch.randn(64, 3, 64, V, 2, generator=gen(28)).to(dev)
        fn = RANDOM_FNS[name]
        a = fn(x, torch.Generator(dev).manual_seed(5))
        b = fn(x, torch.Generator(dev).manual_seed(5))
        c = fn(x, torch.Generator(dev).manual_seed(6))
        assert a.device == x.device and a.shape[:2] == x.shape[:2]
        assert torch.equal(a, b) and not torch.equal(a, c)
