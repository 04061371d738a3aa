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
    args = tiny_args(dropout=0.0, moco_m=0.9, queue_size=8)
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
                               xq, xk, args)
    for k, q, new in zip(k0, q0, model.key.parameters()):
        torch.testing.assert_close(new, 0.9 * k + 0.1 * q, rtol=0, atol=1e-6)
    for name, v in losses.items():
        assert abs(float(terms[name]) - v.item()) < 1e-5, name
    torch.testing.assert_close(model.queue_i[:, :4], ki.T)
    assert torch.equal(model.queue_i[:, 4:], queue_i[:, 4:]) and int(model.queue_ptr) == 4
    assert not torch.equal(q0[0], next(model.query.parameters()))  # the step moved the query


def test_momentum_update():
    torch.manual_seed(0)
    model = scd_net.Model(tiny_args(moco_m=0.9))
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


def _raw_clips(n=12, t=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, t, 25, 2, generator=g) + 0.5  # no coordinate is zero before masking
    num_frame = torch.randint(20, t + 1, (n,), generator=g)
    return x, num_frame


def test_view_pipeline_uses_common_augmentations():
    args = tiny_args(aug_p=1.0)
    x, nf = _raw_clips()
    v = scd_net.make_view(x, nf, torch.Generator().manual_seed(5), args)
    assert v.shape == (12, 3, 16, 25, 2)
    # the same chain written out with the common functions and the same generator stream
    g = torch.Generator().manual_seed(5)
    e = common.crop_resize(x, nf, g, out_len=16, scale=(0.1, 1.0), min_len=16)
    e = common.rotate(e, g, max_deg=30.0, p=1.0)
    e = common.flip(e, g, p=1.0)
    e = common.shear(e, g, amp=1.0, p=1.0)
    e = common.structural_mask(e, g, n_draw=5, k=8, p=1.0)
    e = common.cube_mask(e, g, n_cubes=4, n_masked=2, p=1.0)
    assert torch.equal(v, e)
    zero = v.abs().sum(1) == 0                            # (N, T, V, M)
    joints = zero.all(dim=(1, 3))                         # joint zero on every frame and body
    frames = zero.all(dim=(2, 3))                         # frame zero on every joint and body
    assert (joints.sum(1) == 8).all()                     # structural mask: exactly 8 joints
    assert (frames.sum(1) == 2 * 4).all()                 # cube mask: 2 cubes of 16/4 frames
    cubes = frames.view(12, 4, 4)
    assert (cubes.all(2) | ~cubes.any(2)).all()           # whole cubes only
    # nothing else is zero
    assert torch.equal(zero, joints[:, None, :, None].expand_as(zero)
                       | frames[:, :, None, None].expand_as(zero))
    # bone: converted right after the crop (official order), so the masks still zero whole
    # joints and frames of the bone stream
    vb = scd_net.make_view(x, nf, torch.Generator().manual_seed(5), tiny_args(aug_p=1.0,
                                                                              modality="bone"))
    g = torch.Generator().manual_seed(5)
    e = common.to_modality(common.crop_resize(x, nf, g, out_len=16, scale=(0.1, 1.0), min_len=16),
                           "bone")
    e = common.shear(common.flip(common.rotate(e, g, max_deg=30.0, p=1.0), g, p=1.0), g, amp=1.0,
                     p=1.0)
    e = common.cube_mask(common.structural_mask(e, g, n_draw=5, k=8, p=1.0), g, n_cubes=4,
                         n_masked=2, p=1.0)
    assert torch.equal(vb, e) and ((vb.abs().sum(1) == 0).all(dim=(1, 3)).sum(1) >= 8).all()


def test_view_probabilities_and_modality():
    x, nf = _raw_clips(n=400, t=32, seed=1)
    v = scd_net.make_view(x, nf, torch.Generator().manual_seed(0), tiny_args())
    zero = v.abs().sum(1) == 0
    masked_joints = zero.all(dim=(1, 3)).any(1).float().mean().item()
    masked_frames = zero.all(dim=(2, 3)).any(1).float().mean().item()
    assert abs(masked_joints - 0.5) < 0.1 and abs(masked_frames - 0.5) < 0.1
    # without augmentation a bone view is the bone conversion of the crop
    args = tiny_args(aug_p=0.0, modality="bone")
    v = scd_net.make_view(x[:4], nf[:4], torch.Generator().manual_seed(3), args)
    crop = common.crop_resize(x[:4], nf[:4], torch.Generator().manual_seed(3), out_len=16,
                              min_len=16)
    assert torch.equal(v, common.to_modality(crop, "bone"))


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
    with pytest.raises(common.UserError, match="--window"):
        scd_net.main(["--window", "30", "--cubes", "16"])


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
        terms = scd_net.train_step(model, net, opt, scaler, xq[part], xk[part], args)
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
            "--device", "cpu", "--epochs", "1", "--out_dir", tmp_path / "run", *TINY_CLI],
           timeout=180)
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
    assert "2 process(es)" in log and log.count("epoch 1 step 2 ") == 1  # rank 0 logs alone


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
    assert json.loads((full / "args.json").read_text())["window"] == 16
    rows = [json.loads(r) for r in (full / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "l_ti" in r]
    assert steps and all(math.isfinite(r["loss"]) and {"l_si", "l_it", "l_is", "lr", "samples_s",
                                                       "eta"} <= set(r) for r in steps)
    assert "samples_s" in proc.stdout + proc.stderr
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


def test_resume_without_checkpoint_is_a_user_error(tmp_path, tiny_data):
    with pytest.raises(common.UserError, match="not found"):
        scd_net.main(["--dataset", "synthetic", "--data_dir", tiny_data, "--device", "cpu",
                      "--out_dir", str(tmp_path), "--resume", *TINY_CLI])
    # a diverging run stops with one error line (UserError), not a traceback
    with pytest.raises(common.UserError, match=r"loss is (nan|inf) at step \d+: lower --lr"):
        scd_net.main(["--dataset", "synthetic", "--data_dir", tiny_data, "--device", "cpu",
                      "--out_dir", str(tmp_path / "nan"), *TINY_CLI, "--lr", "1e30",
                      "--log_every", "1"])
