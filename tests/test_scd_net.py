"""SCD-Net: parameter counts, loss, MoCo machinery, views, end-to-end run, resume, DDP."""
import copy
import dataclasses
import json
import math
import runpy
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import scd_net

TINY = dict(gcn_channels=[8, 16, 8], hidden=32, heads=2, ffn=32, window=16, cubes=4,
            masked_cubes=2, queue_size=24, proj_dim=16)
TINY_CLI = ["--gcn_channels", "8", "16", "8", "--hidden", "32", "--heads", "2", "--ffn", "32",
            "--window", "16", "--cubes", "4", "--masked_cubes", "2", "--queue_size", "24",
            "--proj_dim", "16", "--batch_size", "16", "--lr_steps", "1", "--log_every", "2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are slower with two threads on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_args(**kw):
    return scd_net.Args(**{**TINY, **kw})


def test_param_counts_at_paper_defaults():
    with torch.device("meta"):
        model = scd_net.Model(scd_net.Args())
    assert common.count_params(model.query) == 92_017_840   # one branch with projectors
    assert common.count_params(model.encoder) == 74_447_664  # backbone without projectors
    assert common.count_params(model.encoder.gcn_t) == 363_928
    assert common.count_params(model.encoder.channel_t) == 10_756_096
    assert common.count_params(model.encoder.channel_s) == 12_591_104
    assert common.count_params(model.encoder.t_encoder) == 25_186_304
    assert model.encoder.out_dim == 4096 and model.queue_i.shape == (128, 8192)


def test_encoder_shapes_and_dense():
    torch.manual_seed(0)
    enc = scd_net.Encoder(tiny_args()).eval()
    x = torch.randn(3, 3, 16, 25, 2)
    feat, dense = enc(x), enc.dense(x)
    assert feat.shape == (3, enc.out_dim) == (3, 64)
    assert dense.shape == (3, 16, enc.dense_dim)
    zt, zs = enc.tokens(x)
    assert zt.shape == (3, 16, 32) and zs.shape == (3, 50, 32)
    # forward = [max_t z_t, max_j z_s]; dense = [z_t, max_j z_s broadcast over time]
    torch.testing.assert_close(feat, torch.cat([zt.amax(1), zs.amax(1)], 1))
    torch.testing.assert_close(dense[:, :, :32], zt)
    torch.testing.assert_close(dense[:, 5, 32:], zs.amax(1))
    with pytest.raises(ValueError):
        enc(torch.randn(1, 3, 20, 25, 2))


def test_random_init_encoder_starts_where_pretraining_starts():
    """The official builder xavier-initialises every 2-D parameter; that init lives in Encoder and
    Branch, so evaluate.py's random-init baseline (Encoder alone) draws from the same distribution
    as the query encoder pre-training starts from (PyTorch's Linear default has ~half the std)."""
    args = tiny_args(gcn_channels=[8, 16, 8], hidden=128, ffn=128)
    torch.manual_seed(0)
    alone = scd_net.Encoder(args)
    torch.manual_seed(1)
    model = scd_net.Model(args)
    two_d = [n for n, p in alone.named_parameters() if p.dim() == 2]
    assert len(two_d) >= 8
    for name in two_d:
        p, q = alone.get_parameter(name), model.encoder.get_parameter(name)
        fan_out, fan_in = p.shape
        xavier_std = math.sqrt(2.0 / (fan_in + fan_out))
        assert p.std().item() == pytest.approx(xavier_std, rel=0.1), name
        assert q.std().item() == pytest.approx(xavier_std, rel=0.1), name
    for proj in (model.query.t_proj, model.query.i_proj):
        w = proj[0].weight
        assert w.std().item() == pytest.approx(math.sqrt(2.0 / sum(w.shape)), rel=0.1)


def _direct_infonce(u, v, queue, tau):
    """Eq. 8 written out: -log h(u,v) / (h(u,v) + sum_m h(u,m)), h = exp(u.v / tau), batch mean."""
    u, v, queue = u.double(), v.double(), queue.double()
    total = 0.0
    for i in range(len(u)):
        pos = torch.exp(u[i] @ v[i] / tau)
        neg = sum(torch.exp(u[i] @ queue[:, j] / tau) for j in range(queue.shape[1]))
        total += -torch.log(pos / (pos + neg))
    return total / len(u)


def test_loss_equals_direct_recomputation():
    torch.manual_seed(0)
    model = scd_net.Model(tiny_args(dropout=0.0, temperature=0.3))
    model.queue_t.copy_(F.normalize(torch.randn_like(model.queue_t), dim=0))  # 3 distinct queues
    xq, xk = torch.randn(4, 3, 16, 25, 2), torch.randn(4, 3, 16, 25, 2)
    queues = [q.clone() for q in (model.queue_t, model.queue_s, model.queue_i)]
    losses, (kt, ks, ki) = model(xq, xk)
    for q, now in zip(queues, (model.queue_t, model.queue_s, model.queue_i)):
        assert torch.equal(q, now)  # the forward leaves the queues alone (train_step enqueues)
    # train mode without dropout is deterministic: recompute the projections directly
    qt, qs, qi = (F.normalize(t, dim=1) for t in model.query(xq))
    k = [F.normalize(t, dim=1) for t in model.key(xk)]
    for a, b in zip((kt, ks, ki), k):
        torch.testing.assert_close(a, b)
    expect = {"l_ti": (qt, k[2], model.queue_i), "l_si": (qs, k[2], model.queue_i),
              "l_it": (qi, k[0], model.queue_t), "l_is": (qi, k[1], model.queue_s)}
    for name, (u, v, queue) in expect.items():
        direct = _direct_infonce(u, v, queue, 0.3)
        assert abs(losses[name].item() - direct.item()) < 1e-5, name
    assert sorted(losses) == sorted(expect)
    assert all(v.dtype == torch.float32 for v in losses.values())


def test_train_step_order_momentum_loss_enqueue():
    """Official order: momentum update first (with the pre-step query), keys and loss against the
    queues as they were, SGD step, then the new keys enqueued."""
    torch.manual_seed(0)
    args = tiny_args(dropout=0.0, key_momentum=0.9, queue_size=8)
    model = scd_net.Model(args)
    with torch.no_grad():
        for p in model.query.parameters():
            p.add_(0.01 * torch.randn_like(p))
    k0 = [p.clone() for p in model.key.parameters()]
    q0 = [p.clone() for p in model.query.parameters()]
    queue_i = model.queue_i.clone()
    ref = copy.deepcopy(model)
    ref.momentum_update()
    xq, xk = torch.randn(4, 3, 16, 25, 2), torch.randn(4, 3, 16, 25, 2)
    losses, (_, _, ki) = ref(xq, xk)
    opt = torch.optim.SGD(model.query.parameters(), lr=0.1)
    terms = scd_net.train_step(model, model, opt, common.make_scaler(torch.device("cpu"), "fp32"),
                               (xq, xk), args)
    for k, q, new in zip(k0, q0, model.key.parameters()):
        torch.testing.assert_close(new, 0.9 * k + 0.1 * q, rtol=0, atol=1e-6)
    for name, v in losses.items():
        assert abs(float(terms[name]) - v.item()) < 1e-5, name
    torch.testing.assert_close(model.queue_i[:, :4], ki.T)
    assert torch.equal(model.queue_i[:, 4:], queue_i[:, 4:]) and int(model.queue_ptr) == 4
    assert not torch.equal(q0[0], next(model.query.parameters()))  # the step moved the query


def test_momentum_update():
    torch.manual_seed(0)
    model = scd_net.Model(tiny_args(key_momentum=0.9))
    for p in model.key.parameters():
        assert not p.requires_grad
    # key == query at init (copy), so perturb the query first
    with torch.no_grad():
        for p in model.query.parameters():
            p.add_(torch.randn_like(p))
    k0 = [p.clone() for p in model.key.parameters()]
    q0 = [p.clone() for p in model.query.parameters()]
    model.momentum_update()
    for k, q, new in zip(k0, q0, model.key.parameters()):
        torch.testing.assert_close(new, 0.9 * k + 0.1 * q, rtol=0, atol=1e-6)
    for q, now in zip(q0, model.query.parameters()):
        assert torch.equal(q, now)


def test_queue_pointer_arithmetic():
    model = scd_net.Model(tiny_args(queue_size=10, proj_dim=3))
    before = model.queue_t.clone()
    batches = [torch.arange(12.0).view(4, 3) + 100 * b for b in range(3)]
    model.enqueue(batches[0], batches[0] + 1, batches[0] + 2)
    assert model.queue_ptr.item() == 4
    torch.testing.assert_close(model.queue_t[:, :4], batches[0].T)
    torch.testing.assert_close(model.queue_t[:, 4:], before[:, 4:])  # rest untouched
    model.enqueue(batches[1], batches[1] + 1, batches[1] + 2)
    assert model.queue_ptr.item() == 8
    model.enqueue(batches[2], batches[2] + 1, batches[2] + 2)  # 8 + 4 wraps: 8, 9, 0, 1
    assert model.queue_ptr.item() == 2
    torch.testing.assert_close(model.queue_t[:, 8:10], batches[2][:2].T)
    torch.testing.assert_close(model.queue_t[:, 0:2], batches[2][2:].T)
    torch.testing.assert_close(model.queue_t[:, 2:4], batches[0][2:].T)  # oldest survivors
    torch.testing.assert_close(model.queue_s[:, 0:2], batches[2][2:].T + 1)
    torch.testing.assert_close(model.queue_i[:, 4:8], batches[1].T + 2)


# ----------------------------------------------------------------------------------------- views
def gen(seed):
    return torch.Generator().manual_seed(seed)


def basis_probe(N, seed=0):
    """(N, 3, 1, 4, 2): joints 0..2 hold the unit vectors e0..e2, joint 3 random data."""
    x = torch.zeros(N, 3, 1, 4, 2)
    for j in range(3):
        x[:, j, :, j] = 1.0
    x[:, :, :, 3] = torch.randn(N, 3, 1, 2, generator=gen(seed))
    return x


def _rot(axis, a):
    c, s = math.cos(a), math.sin(a)
    return {0: np.array([[1, 0, 0], [0, c, s], [0, -s, c]]),
            1: np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]]),
            2: np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])}[axis]


def test_rotate_follows_the_official_rule():
    """Official feeder/augmentations.py Rotate: main axis U(0, 30) deg, the others U(0, 1) deg,
    applied x, then y, then z."""
    N = 3000
    x = basis_probe(N)
    out = scd_net.rotate(x, gen(10), 30.0, 1.0)
    R = out[:, :, 0, :3, 0].double().numpy()                        # R[n, :, j] = R e_j
    # R = R_z(c) R_y(b) R_x(a): R[2] = [sin b, -cos b sin a, cos b cos a]
    b = np.arcsin(R[:, 2, 0])
    a = np.arctan2(-R[:, 2, 1], R[:, 2, 2])
    c = np.arctan2(-R[:, 1, 0], R[:, 0, 0])
    for i in range(0, N, 97):
        np.testing.assert_allclose(_rot(2, c[i]) @ _rot(1, b[i]) @ _rot(0, a[i]), R[i], atol=1e-5)
    deg = np.degrees(np.stack([a, b, c], 1))                        # (N, 3)
    assert deg.min() > -1e-3 and deg.max() < 30 + 1e-3
    assert ((deg > 1 + 1e-3).sum(1) <= 1).all()                     # only the main axis exceeds 1 deg
    assert np.abs(np.bincount(deg.argmax(1), minlength=3) / N - 1 / 3).max() < 0.04
    assert abs(deg.max(1).mean() - 15.0) < 0.7
    minor = np.sort(deg, 1)[:, :2]
    assert abs(minor.mean() - 0.5) < 0.06 and minor.max() <= 1 + 1e-3
    torch.testing.assert_close(out[:, :, 0, 3], torch.einsum("ncj,njm->ncm", out[:, :, 0, :3, 0],
                                                             x[:, :, 0, 3]))


def test_flip_reindexes_with_the_official_order():
    assert common.FLIP_ORDER == [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 16, 17, 18, 19, 12, 13, 14,
                                 15, 20, 23, 24, 21, 22]
    N = 2000
    x = torch.randn(N, 3, 2, 25, 2, generator=gen(11))
    out = scd_net.flip(x, gen(12), 0.5)
    flipped = (out == x[:, :, :, common.FLIP_ORDER]).flatten(1).all(1)
    assert (flipped ^ (out == x).flatten(1).all(1)).all()          # each clip: all or nothing
    assert abs(flipped.float().mean().item() - 0.5) < 0.05
    assert torch.equal(scd_net.flip(x, gen(12), 1.0), x[:, :, :, common.FLIP_ORDER])


def _two_hop_np():
    A = np.eye(25) + np.asarray(common.adjacency(), dtype=np.float64)
    return A @ A


def test_structural_mask_zeroes_the_top8_scores():
    N = 2000
    x = torch.ones(N, 3, 3, 25, 2)
    g = gen(19)
    draws = torch.randint(0, 25, (N, 5), generator=gen(19)).numpy()  # its first draw, replayed
    out = scd_net.structural_mask(x, g, 5, 8, 1.0)
    zero = out == 0
    masked = zero.all(4).all(2).all(1)                               # (N, V)
    assert torch.equal(zero.any(4).any(2).any(1), masked)            # whole joints only
    assert (masked.sum(1) == 8).all()
    score = _two_hop_np()[draws].sum(1)                              # (N, V) per-clip scores
    kth = np.sort(score, 1)[:, -8:-7]                                # the 8th largest
    m = masked.numpy()
    assert (m[score > kth]).all() and not (m[score < kth]).any()
    # equal scores ordered uniformly at random: per-joint frequencies match a numpy reference
    rng = np.random.default_rng(0)
    ref = np.zeros(25)
    for d in rng.integers(0, 25, (20000, 5)):
        ref[np.lexsort((rng.random(25), _two_hop_np()[d].sum(0)))[-8:]] += 1
    assert np.abs(m.mean(0) - ref / 20000).max() < 0.045


def test_cube_mask_six_cubes_of_four_frames():
    N = 1000
    out = scd_net.cube_mask(torch.ones(N, 3, 64, 4, 2), gen(20), 16, 6, 1.0)
    zero_t = (out == 0).all(4).all(3).all(1)                         # (N, T)
    assert torch.equal((out == 0).any(4).any(3).any(1), zero_t)
    cubes = zero_t.view(N, 16, 4)
    assert torch.equal(cubes.all(2), cubes.any(2))                   # whole cubes
    assert (cubes.all(2).sum(1) == 6).all() and (zero_t.sum(1) == 24).all()
    assert (cubes.all(2).float().mean(0) - 6 / 16).abs().max() < 0.06


AUGMENTATIONS = {"rotate": lambda x, g, p: scd_net.rotate(x, g, 30.0, p),
                 "flip": scd_net.flip,
                 "structural_mask": lambda x, g, p: scd_net.structural_mask(x, g, 5, 8, p),
                 "cube_mask": lambda x, g, p: scd_net.cube_mask(x, g, 4, 2, p)}


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_augmentation_probability_and_seeding(name):
    fn = AUGMENTATIONS[name]
    x = torch.rand(2000, 3, 4, 25, 2, generator=gen(9)) + 0.5
    changed = (fn(x, gen(9), 0.3) != x).flatten(1).any(1).float().mean().item()
    assert abs(changed - 0.3) < 0.05                                 # p applies per clip
    assert torch.equal(fn(x, gen(9), 0.0), x)
    a, b, c = (fn(x[:64], gen(s), 0.5) for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _raw_clips(n=12, t=40, seed=0):
    g = gen(seed)
    x = torch.rand(n, 3, t, 25, 2, generator=g) + 0.5  # no coordinate is zero before masking
    num_frame = torch.randint(20, t + 1, (n,), generator=g)
    return x, num_frame


def _chain(x, nf, g, modality):
    """make_views written out: two crops, the modality, then the spatial chain at p = 1."""
    v = torch.cat([common.crop_resize(x, nf, g, 16, (0.1, 1.0), 16) for _ in range(2)])
    v = common.to_modality(v, modality)
    v = common.shear(scd_net.flip(scd_net.rotate(v, g, 30.0, 1.0), g, 1.0), g, 1.0, 1.0)
    return scd_net.cube_mask(scd_net.structural_mask(v, g, 5, 8, 1.0), g, 4, 2, 1.0).chunk(2)


def test_make_views_chain_and_masks():
    x, nf = _raw_clips()
    xq, xk = scd_net.make_views(x, nf, gen(5), tiny_args(aug_p=1.0))
    assert xq.shape == xk.shape == (12, 3, 16, 25, 2) and not torch.equal(xq, xk)
    eq, ek = _chain(x, nf, gen(5), "joint")
    assert torch.equal(xq, eq) and torch.equal(xk, ek)
    for v in (xq, xk):
        zero = v.abs().sum(1) == 0                        # (N, T, V, M)
        joints = zero.all(dim=(1, 3))                     # joint zero on every frame and body
        frames = zero.all(dim=(2, 3))                     # frame zero on every joint and body
        assert (joints.sum(1) == 8).all()                 # structural mask: exactly 8 joints
        assert (frames.sum(1) == 2 * 4).all()             # cube mask: 2 cubes of 16/4 frames
        cubes = frames.view(12, 4, 4)
        assert (cubes.all(2) | ~cubes.any(2)).all()       # whole cubes only
        assert torch.equal(zero, joints[:, None, :, None].expand_as(zero)   # nothing else is zero
                           | frames[:, :, None, None].expand_as(zero))
    # bone right after the crop (official order): the masks still zero whole joints and frames
    vb = scd_net.make_views(x, nf, gen(5), tiny_args(aug_p=1.0, modality="bone"))
    eb = _chain(x, nf, gen(5), "bone")
    assert all(torch.equal(a, b) for a, b in zip(vb, eb))
    assert ((vb[0].abs().sum(1) == 0).all(dim=(1, 3)).sum(1) >= 8).all()


def test_view_probabilities_and_modality():
    x, nf = _raw_clips(n=400, t=32, seed=1)
    for v in scd_net.make_views(x, nf, gen(0), tiny_args()):
        zero = v.abs().sum(1) == 0
        masked_joints = zero.all(dim=(1, 3)).any(1).float().mean().item()
        masked_frames = zero.all(dim=(2, 3)).any(1).float().mean().item()
        assert abs(masked_joints - 0.5) < 0.1 and abs(masked_frames - 0.5) < 0.1
    # without augmentation a bone view is the bone conversion of its crop
    xq, xk = scd_net.make_views(x[:4], nf[:4], gen(3), tiny_args(aug_p=0.0, modality="bone"))
    g = gen(3)
    crops = [common.crop_resize(x[:4], nf[:4], g, out_len=16, min_len=16) for _ in range(2)]
    assert torch.equal(xq, common.to_modality(crops[0], "bone"))
    assert torch.equal(xk, common.to_modality(crops[1], "bone"))


def test_cli_help_unknown_flag_and_bad_values(capsys):
    with pytest.raises(SystemExit) as e:
        scd_net.main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for f in dataclasses.fields(scd_net.Args):
        assert f"--{f.name}" in help_text
    with pytest.raises(SystemExit) as e:
        scd_net.main(["--no_such_flag", "1"])
    assert e.value.code == 2
    for flags, match in ((["--window", "30", "--cubes", "16"], "--window 30 must be divisible"),
                         (["--gcn_channels", "8", "6"], "--gcn_channels"),
                         (["--bodies", "3"], "--bodies 3"),
                         (["--key_momentum", "1.5"], "--key_momentum 1.5"),
                         (["--batch_size", "64", "--queue_size", "32"], "--queue_size 32")):
        with pytest.raises(common.UserError, match=match):
            scd_net.main(flags)


def test_module_contract_and_renamed_flags():
    assert (scd_net.METHOD, scd_net.PROTOCOL, scd_net.Z_ALIGN) == ("scd_net", "scd_net", True)
    a = scd_net.Args()
    assert a.dtype == "fp32" and a.bodies == 2 and a.key_momentum == 0.999 and a.momentum == 0.9
    # a version-1 checkpoint's args (num_person, moco_m) rebuild today's Args and Model
    old = {**common.args_to_dict(scd_net.Args(**TINY)), "num_person": 1, "moco_m": 0.9}
    del old["bodies"], old["key_momentum"]
    args = scd_net.Args(**common.checkpoint_args({"method": "scd_net", "version": 1, "args": old}))
    assert args.bodies == 1 and args.key_momentum == 0.9
    assert scd_net.Model(args).m == 0.9


def test_one_body_encoder_reads_the_first_body():
    torch.manual_seed(0)
    enc = scd_net.Encoder(tiny_args(bodies=1)).eval()
    assert enc.gcn_t.data_bn.num_features == 75 and enc.channel_t[0].in_features == 25 * 8
    x = torch.randn(2, 3, 16, 25, 2)
    torch.testing.assert_close(enc(x), enc(x[..., :1]))
    x2 = x.clone()
    x2[..., 1] = 5.0  # the second body is never read
    torch.testing.assert_close(enc(x), enc(x2))
    zt, zs = enc.tokens(x)
    assert zs.shape == (2, 25, 32)


DDP_HELPER = textwrap.dedent("""
    import sys
    import torch
    import common
    import scd_net

    # three training steps on fixed global batches of views; every rank takes its slice
    torch.set_num_threads(1)
    out_path, tiny, main_argv = sys.argv[1], eval(sys.argv[2]), sys.argv[3:]
    d = common.setup_distributed("cpu")
    args = scd_net.Args(**tiny, dropout=0.0, dtype="fp32")  # no dropout: same RNG use everywhere
    common.seed_everything(0)
    model = scd_net.Model(args)
    common.broadcast_module(model)
    net = (torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
           if d.ddp else model)
    opt = torch.optim.SGD(model.query.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    scaler = common.make_scaler(d.device, "fp32")
    gen = torch.Generator().manual_seed(1)
    B = 8
    b = B // d.world_size
    losses, queues = [], []
    for step in range(3):
        xq, xk = torch.randn(2, B, 3, 16, 25, 2, generator=gen)
        part = slice(d.rank * b, (d.rank + 1) * b)
        terms = scd_net.train_step(model, net, opt, scaler, (xq[part], xk[part]), args)
        losses.append(common.all_reduce_mean(terms["loss"]).item())
        queues.append(torch.cat([model.queue_t, model.queue_s, model.queue_i]).clone())
    if d.is_main:
        torch.save({"loss": losses, "queues": torch.stack(queues),
                    "ptr": model.queue_ptr.clone(), "state": model.state_dict()}, out_path)
    if main_argv:  # then the training script itself under the same process group
        scd_net.main(main_argv)
    common.cleanup_distributed()
""")


def test_ddp_two_processes_match_one(tmp_path, run_py, tiny_data):
    helper = tmp_path / "ddp_helper.py"
    helper.write_text(DDP_HELPER)
    tiny = repr(TINY)
    argv = sys.argv
    try:  # the one-process reference runs in this process (saves a start-up)
        sys.argv = [str(helper), str(tmp_path / "one.pt"), tiny]
        runpy.run_path(str(helper), run_name="__main__")
    finally:
        sys.argv = argv
    run_py(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", helper,
            tmp_path / "two.pt", tiny, "--dataset", "synthetic", "--data_dir", tiny_data,
            "--device", "cpu", "--epochs", "1", "--out_dir", tmp_path / "run", *TINY_CLI])
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    # the loss of the global batch and the keys enqueued (all ranks, in batch order) agree
    np.testing.assert_allclose(one["loss"], two["loss"], rtol=1e-5)
    torch.testing.assert_close(one["queues"], two["queues"], rtol=1e-5, atol=1e-5)
    assert one["ptr"].item() == two["ptr"].item() == 0  # 3 x 8 keys in a queue of 24
    # the queue really changed at every step (keys were enqueued)
    assert not torch.allclose(one["queues"][0], one["queues"][1])
    # identical updates: query weights, key weights and BN statistics of the global batch
    for k, v in one["state"].items():
        torch.testing.assert_close(v, two["state"][k], rtol=1e-4, atol=1e-5, msg=k)
    # the script itself under torchrun: one checkpoint (rank 0), the global batch per step
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["step"] == 120 // 16 and math.isfinite(ck["metrics"]["loss"])
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "2 process(es)" in log and log.count(" step 2 ") == 1  # rank 0 logs alone


def test_end_to_end_checkpoint_and_exact_resume(tmp_path, run_py, tiny_data, capsys):
    base = ["--dataset", "synthetic", "--data_dir", tiny_data, "--device", "cpu",
            "--save_every", "1", *TINY_CLI]
    full, part = tmp_path / "full", tmp_path / "part"
    proc = run_py(["scd_net.py", *base, "--epochs", "2", "--out_dir", full])  # 1 thread, as here
    scd_net.main(base + ["--epochs", "1", "--out_dir", str(part)])
    scd_net.main(base + ["--epochs", "2", "--out_dir", str(part), "--resume"])
    assert "resumed from" in capsys.readouterr().out
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(part / "last.pt", weights_only=True)
    # 2 epochs == 1 epoch + resume 1 epoch, bit for bit (weights, key encoder, queues, optimizer)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] > 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(s["momentum_buffer"], t["momentum_buffer"])
    # checkpoint contract and logs
    assert {"method", "args", "encoder", "model", "optimizer", "scaler", "epoch", "step", "rng",
            "dataset", "split", "metrics", "version"} <= set(a)
    assert a["method"] == "scd_net" and a["dataset"] == "synthetic" and a["split"] == "xsub"
    assert a["script"] == "scd_net.py" and a["version"] == common.CKPT_VERSION == 2
    assert json.loads((full / "args.json").read_text())["window"] == 16
    rows = [json.loads(r) for r in (full / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "l_ti" in r]
    assert steps and all(math.isfinite(r["loss"]) and {"l_si", "l_it", "l_is", "lr", "samples_per_s",
                                                       "eta"} <= set(r) for r in steps)
    assert "samples_per_s" in proc.stdout + proc.stderr
    for k, v in a["encoder"].items():
        assert torch.equal(v, a["model"]["query.encoder." + k])
    # evaluate.py's path: Encoder(Args(**args)) + the encoder state, on the clips it will see
    args = scd_net.Args(**a["args"])
    enc = scd_net.Encoder(args)
    enc.load_state_dict(a["encoder"])
    split = common.load_split(tiny_data, "synthetic", "xsub", "val")
    x = torch.from_numpy(np.array(split.data[:6]))
    clip = common.center_crop_resize(x, torch.from_numpy(split.num_frame[:6]), 0.95, args.window)
    with torch.no_grad():
        feat = enc.eval()(clip)
    assert feat.shape == (6, 64) and torch.isfinite(feat).all()
    # training moved the query and (by momentum) the key branch away from the initial weights
    common.seed_everything(args.seed)
    init = scd_net.Model(args).state_dict()
    for k in ("query.t_proj.0.weight", "key.encoder.channel_s.0.weight"):
        assert not torch.equal(init[k], a["model"][k]), k


def test_resume_without_checkpoint_and_reused_out_dir_are_user_errors(tmp_path, tiny_data):
    with pytest.raises(common.UserError, match="not found"):
        scd_net.main(["--dataset", "synthetic", "--data_dir", tiny_data, "--device", "cpu",
                      "--out_dir", str(tmp_path), "--resume", *TINY_CLI])
    # a diverging run stops with one error line (UserError), not a traceback
    nan = ["--dataset", "synthetic", "--data_dir", tiny_data, "--device", "cpu",
           "--out_dir", str(tmp_path / "nan"), *TINY_CLI, "--lr", "1e30", "--log_every", "1"]
    with pytest.raises(common.UserError, match=r"non-finite loss at step \d+ .*lower --lr"):
        scd_net.main(nan)
    # the folder of a run (here: its checkpoint) is refused without --resume / --overwrite
    torch.save({}, tmp_path / "nan" / "last.pt")
    with pytest.raises(common.UserError, match="holds a run"):
        scd_net.main(nan)
