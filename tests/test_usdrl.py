"""USDRL: parameter counts, DSTE structure, MG-FD loss terms, views, end-to-end run, exact resume and
2-process torchrun equivalence."""
import itertools
import json

import pytest
import torch

import common
import usdrl

TINY = ["--hidden", "16", "--proj_dim", "32", "--proj_inst_dim", "48", "--window", "16",
        "--batch_size", "16", "--log_every", "2", "--save_every", "1", "--lr", "1e-3"]


def tiny_args(**kw):
    base = dict(hidden=16, proj_dim=32, proj_inst_dim=48, window=16, batch_size=8)
    return usdrl.Args(**{**base, **kw})


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------- architecture
def test_parameter_counts_at_paper_defaults():
    args = usdrl.Args()
    with torch.device("meta"):
        model = usdrl.Model(args)
        sttr = usdrl.Encoder(usdrl.Args(backbone="sttr"))
    assert n_params(model) == 94_931_160
    assert n_params(model.encoder) == 57_137_368
    assert n_params(model.t_proj) == n_params(model.s_proj) == 10_500_096
    assert n_params(model.i_proj) == 16_793_600
    assert n_params(model.encoder.t_stream.layers[0]) == 13_659_264
    assert n_params(model.encoder.s_stream.layers[0]) == 13_656_044
    assert n_params(sttr) == 27_713_536
    # one attention per DSTE layer, shared by CA and DSA: 4 in the whole encoder
    assert sum(isinstance(m, torch.nn.MultiheadAttention) for m in model.encoder.modules()) == 4
    assert model.encoder.out_dim == model.encoder.dense_dim == 2048


def test_token_mixing_size_follows_window_and_bodies():
    enc = usdrl.Encoder(tiny_args(window=12, bodies=1)).eval()
    assert enc.t_stream.layers[0].w1.weight.shape == (12, 12)
    assert enc.s_stream.layers[0].w1.weight.shape == (25, 25)
    assert enc.t_stream.embed[0].in_features == 25 * 3 and enc.s_stream.embed[0].in_features == 36
    x = torch.randn(2, 3, 12, 25, 2)
    assert torch.equal(enc(x), enc(x[..., :1]))  # the first body only
    with pytest.raises(ValueError, match="expects"):
        enc(torch.zeros(2, 3, 16, 25, 1))


def test_dense_shift_keeps_original_at_multiples_of_gap():
    torch.manual_seed(0)
    layer = usdrl.DSTLayer(dim=8, length=10, heads=1, alpha=0.5, gap=4, drop_path=0.0)
    with torch.no_grad():  # token mixing that adds 1 everywhere: F_h = F_1 + 1
        layer.w2.weight.zero_()
        layer.w2.bias.fill_(1.0)
    x = torch.randn(3, 10, 8)
    diff = layer.dense_shift(x) - x  # (N, L, D)
    kept = torch.arange(10) % 4 == 0  # the code's mask: original at positions 0, 4, 8
    assert torch.equal(diff[:, kept], torch.zeros_like(diff[:, kept]))
    assert torch.allclose(diff[:, ~kept], torch.ones_like(diff[:, ~kept]))


def test_ca_has_no_mlp_residual_and_layer_mixes_with_alpha():
    torch.manual_seed(0)
    layer = usdrl.DSTLayer(dim=8, length=6, heads=1, alpha=0.3, gap=4, drop_path=0.0).eval()
    x = torch.randn(2, 6, 8)
    with torch.no_grad():
        out = layer(x)
        assert torch.allclose(out, 0.3 * layer.ca(x) + 0.7 * layer.dsa(x), atol=1e-6)
        layer.ca_mlp[2].weight.zero_()
        layer.ca_mlp[2].bias.zero_()
        assert torch.equal(layer.ca(x), torch.zeros_like(x))  # CA(x) = MLP(...) with no residual


def test_positional_encoding_readded_before_layer_two_and_max_pooling():
    torch.manual_seed(0)
    enc = usdrl.Encoder(tiny_args()).eval()
    seen = {}
    for s in ("t_stream", "s_stream"):
        stream = getattr(enc, s)
        stream.layers[0].register_forward_hook(lambda m, i, o, s=s: seen.__setitem__(s + "0", o))
        stream.layers[1].register_forward_pre_hook(lambda m, i, s=s: seen.__setitem__(s + "1", i[0]))
    x = torch.randn(3, 3, 16, 25, 2)
    with torch.no_grad():
        feat, dense = enc(x), enc.dense(x)
        yt, ys = enc.streams(x)
    for s in ("t_stream", "s_stream"):
        pe = getattr(enc, s).pe
        assert torch.allclose(seen[s + "1"], seen[s + "0"] + pe, atol=1e-6)
    assert torch.allclose(enc.t_stream.pe[0, 1, :2], torch.tensor([0.8414710, 0.5403023]))
    assert feat.shape == (3, 32) and torch.equal(feat, torch.cat([yt.amax(1), ys.amax(1)], 1))
    assert dense.shape == (3, 16, 32) and torch.equal(dense[..., :16], yt)
    ys_pooled = torch.nn.functional.adaptive_avg_pool1d(ys.transpose(1, 2), 16).transpose(1, 2)
    assert torch.allclose(dense[..., 16:], ys_pooled)


def test_sttr_backbone_trains():
    torch.manual_seed(0)
    args = tiny_args(backbone="sttr")
    model = usdrl.Model(args)
    assert not any(isinstance(m, usdrl.DSTLayer) for m in model.modules())
    loss, _ = usdrl.usdrl_loss(model(torch.randn(4 * 6, 3, 16, 25, 2)), args)
    loss.backward()
    assert torch.isfinite(loss) and model.encoder.s_stream.layers[1].linear2.weight.grad.abs().sum() > 0


def test_init_rules():
    torch.manual_seed(0)
    model = usdrl.Model(usdrl.Args(hidden=256, proj_dim=256, proj_inst_dim=256, window=16))
    lin = model.encoder.t_stream.layers[0].ca_mlp[0]
    attn = model.encoder.t_stream.layers[0].attn
    assert abs(lin.weight.std().item() - 0.02) < 0.001 and torch.all(lin.bias == 0)
    assert abs(attn.out_proj.weight.std().item() - 0.02) < 0.002
    xavier_std = (6 / (256 + 3 * 256)) ** 0.5 / 3 ** 0.5  # in_proj keeps PyTorch's xavier_uniform
    assert abs(attn.in_proj_weight.std().item() - xavier_std) < 0.003
    assert abs(model.i_proj[6].weight.std().item() - 0.02) < 0.001
    assert abs(model.encoder.s_stream.pe.std().item() - 0.02) < 0.002


# ----------------------------------------------------------------------------------------- loss
def _mse(a, b):
    return ((a - b) ** 2).sum() / a.numel()


def _ref_sim(z):
    c = (z[0] + z[1] + z[2]) / 3
    return (_mse(z[0], z[3]) + _mse(z[2], z[3]) + _mse(z[1], z[3])
            + _mse(z[0], c) + _mse(z[1], c) + _mse(z[2], c))


def _ref_vac(z, mu=5.0):
    K, B, D = z.shape
    total = 0.0
    for v in z:
        cov = torch.cov(v.T)  # unbiased, independent of the implementation
        std = torch.sqrt(torch.diagonal(cov) + 1e-4)
        off = sum(cov[i, j] ** 2 for i in range(D) for j in range(D) if i != j)
        total = total + mu * torch.clamp(1 - std, min=0).mean() + off / D
    return total


def _ref_xc(z, lam=0.005):
    K, B, D = z.shape
    total = 0.0
    for a, b in itertools.combinations(range(K), 2):
        za = (z[a] - z[a].mean(0)) / z[a].std(0)
        zb = (z[b] - z[b].mean(0)) / z[b].std(0)
        for i in range(D):
            for j in range(D):
                c = (za[:, i] * zb[:, j]).sum() / B
                total = total + ((c - 1) ** 2 if i == j else lam * c ** 2)
    return total


def test_loss_terms_match_direct_formulas():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 12, 5, generator=g, dtype=torch.float64) * torch.rand(5, generator=g, dtype=torch.float64)
    assert torch.allclose(usdrl.similarity_term(z), _ref_sim(z))
    assert torch.allclose(usdrl.variance_covariance_term(z, 5.0), _ref_vac(z))
    assert torch.allclose(usdrl.cross_correlation_term(z, 0.005), _ref_xc(z))
    zs = {k: torch.randn(4, 12, 5, generator=g, dtype=torch.float64) for k in "tsi"}
    loss, terms = usdrl.usdrl_loss(zs, usdrl.Args())
    sim = _ref_sim(zs["i"]) + 0.5 * (_ref_sim(zs["t"]) + _ref_sim(zs["s"]))
    vac = _ref_vac(zs["i"]) + 0.5 * (_ref_vac(zs["t"]) + _ref_vac(zs["s"]))
    xc = _ref_xc(zs["i"]) + 0.5 * (_ref_xc(zs["t"]) + _ref_xc(zs["s"]))
    assert torch.allclose(loss, 5 * sim + vac + 0.001 * xc)
    assert torch.allclose(terms["sim"], sim) and torch.allclose(terms["xcorr"], xc)


def test_collapse_is_penalised_and_decorrelated_embeddings_are_not():
    g = torch.Generator().manual_seed(0)
    collapsed = torch.randn(1, 1, 64, generator=g).expand(4, 256, 64)  # every sample identical
    assert usdrl.variance_covariance_term(collapsed, 5.0) > 4 * 5 * 0.98  # hinge ~1 per view
    # exactly decorrelated standard-normal embeddings: QR of centred Gaussian columns gives
    # orthonormal zero-mean columns; scaled, their unbiased covariance is exactly I
    a = torch.randn(512, 16, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(a - a.mean(0))
    z = (q * 511 ** 0.5).expand(4, 512, 16)
    assert usdrl.variance_covariance_term(z, 5.0) < 1e-12  # no hinge, no off-diagonal covariance
    off = usdrl.cross_correlation_term(z, 1.0) - usdrl.cross_correlation_term(z, 0.0)
    assert 0 <= off < 1e-12
    # independent standard-normal views: off-diagonal cross-correlations ~ D (D - 1) / B, near zero
    zi = torch.randn(2, 20000, 8, generator=g, dtype=torch.float64)
    off = usdrl.cross_correlation_term(zi, 1.0) - usdrl.cross_correlation_term(zi, 0.0)
    assert off < 2 * 8 * 7 / 20000


# ---------------------------------------------------------------------------------------- views
def test_views_and_modality_switch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 40, 25, 2, generator=g)
    nf = torch.tensor([40, 20, 33])
    args = tiny_args()
    joint = usdrl.make_views(x, nf, torch.Generator().manual_seed(1), args)
    assert joint.shape == (4 * 3, 3, 16, 25, 2)
    # replayed on the same generator: per view crop-resize (ratio U(0.1, 1), at least `window`
    # frames) then joint corruption or shear (official feeder/augmentations.py)
    g2 = torch.Generator().manual_seed(1)
    assert args.crop_scale == [0.1, 1.0] and args.window == 16
    assert torch.equal(joint, torch.cat([common.corrupt_or_shear(
        common.crop_resize(x, nf, g2, out_len=16, scale=(0.1, 1.0), min_len=16), g2)
        for _ in range(4)]))
    assert not torch.allclose(joint[:3], joint[3:6])  # views are drawn independently
    for m in ("bone", "motion"):
        v = usdrl.make_views(x, nf, torch.Generator().manual_seed(1), tiny_args(modality=m))
        assert torch.equal(v, common.to_modality(joint, m))
        assert not torch.allclose(v, joint)


# ------------------------------------------------------------------------------ end to end runs
def _state(path):
    return torch.load(path, weights_only=True)


def test_cli_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit) as e:
        usdrl.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("--backbone", "--modality", "--gap", "--w_domain", "--data_on_device"):
        assert name in out
    with pytest.raises(SystemExit) as e:
        usdrl.main(["--no_such_flag", "1"])
    assert e.value.code == 2
    with pytest.raises(common.UserError, match="--views"):
        usdrl.main(["--views", "1"])
    for flags, match in ((["--hidden", "15", "--heads", "1"], "--hidden 15 must be even"),
                         (["--drop_path", "1.0"], "--drop_path 1.0 must be in"),
                         (["--lr", "-1"], "--lr -1.0 > 0")):
        with pytest.raises(common.UserError, match=match):
            usdrl.main(flags)


def test_train_resume_is_exact(tiny_data, tmp_path, run_py):
    full, part = tmp_path / "full", tmp_path / "part"
    common_args = ["usdrl.py", "--dataset", "synthetic", "--data_dir", tiny_data, *TINY]
    run_py([*common_args, "--epochs", "2", "--out_dir", full, "--modality", "motion",
            "--data_on_device"])  # same batches from the resident copy
    run_py([*common_args, "--epochs", "1", "--out_dir", part, "--modality", "motion"])
    proc = run_py([*common_args, "--epochs", "2", "--out_dir", part, "--modality", "motion",
                   "--resume"])
    assert "resumed from" in proc.stdout
    a, b = _state(full / "last.pt"), _state(part / "last.pt")
    assert a["method"] == "usdrl" and a["epoch"] == 2 and a["step"] == b["step"] > 0
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][k]["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])
    # the checkpoint rebuilds the downstream encoder from its args alone
    enc = usdrl.Encoder(usdrl.Args(**a["args"]))
    enc.load_state_dict(a["encoder"])
    assert enc(torch.randn(2, 3, 16, 25, 2)).shape == (2, 32)
    assert json.loads((full / "args.json").read_text())["modality"] == "motion"
    lines = [json.loads(s) for s in (full / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "sim", "vac", "xcorr", "lr", "samples_per_s", "eta"} <= set(lines[0])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in lines if "loss" in r)
    with pytest.raises(common.UserError, match="last.pt not found"):
        usdrl.main([*common_args[1:], "--out_dir", str(tmp_path / "none"), "--resume"])
    with pytest.raises(common.UserError, match="does not match"):
        usdrl.main([*common_args[1:], "--out_dir", str(part), "--resume", "--hidden", "8"])


TORCHRUN_SCRIPT = """
import sys, torch, common, usdrl
d = common.setup_distributed("cpu")
args = usdrl.Args(hidden=16, proj_dim=32, proj_inst_dim=48, window=16, drop_path=0.0, batch_size=8)
torch.manual_seed(0)
model = usdrl.Model(args).double()  # float64 so that only real differences show, not rounding
views = torch.randn(4, 8, 3, 16, 25, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
b = 8 // d.world_size
local = views[:, d.rank * b:(d.rank + 1) * b].reshape(-1, 3, 16, 25, 2)
net = torch.nn.parallel.DistributedDataParallel(model) if d.ddp else model
opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the step leaves the gradients in place
terms = usdrl.train_step(model, net, opt, common.make_scaler(d.device, "fp32"), local, args)
loss = terms["loss"]
if d.is_main:
    torch.save({"loss": loss.detach(), "grads": {n: p.grad for n, p in model.named_parameters()},
                "buffers": dict(model.named_buffers())}, sys.argv[1])
if d.ddp:  # the training loop itself under torchrun
    usdrl.main(sys.argv[2:])
"""


def test_torchrun_two_processes_match_one(tiny_data, tmp_path, torchrun_vs_one):
    out = tmp_path / "ddp"
    one, two = torchrun_vs_one(TORCHRUN_SCRIPT, ["--dataset", "synthetic", "--data_dir", tiny_data,
                                                 *TINY, "--epochs", "1", "--out_dir", out])
    assert torch.allclose(one["loss"], two["loss"], rtol=0, atol=1e-10)
    for k, g1 in one["grads"].items():
        assert torch.allclose(g1, two["grads"][k], rtol=0, atol=1e-10), k
    for k in ("t_proj.1.running_mean", "i_proj.4.running_var"):  # global-batch BN statistics
        assert torch.allclose(one["buffers"][k], two["buffers"][k], rtol=0, atol=1e-10), k
    ck = _state(out / "last.pt")
    assert ck["epoch"] == 1 and ck["args"]["batch_size"] == 16
    assert not list(out.glob(".last.pt.*")) and len((out / "log.txt").read_text().splitlines()) >= 2
