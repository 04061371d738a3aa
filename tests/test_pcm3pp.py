"""pcm3pp.py: parameter counts, the forward-in-time BIGRU against the official per-step loop, official
state-dict keys, views (body-part mask, mixing, clip window), loss terms and their gradient routing,
end-to-end training with exact resume and post-distillation from a stage-one checkpoint, and 2-process
torchrun equivalence."""
import copy
import dataclasses
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import pcm3pp

# Tiny config for the subprocess runs (window 48: mixing needs >= 11 units of 4 frames).
TINY = ["--window", "48", "--hidden", "16", "--prompt_dim", "8", "--dec_dim", "16", "--queue_size", "100",
        "--batch_size", "60", "--log_every", "1", "--save_every", "1", "--lr_steps", "5"]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny GRUs here are dominated by per-op overhead; extra threads only add contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_args(**kw):
    base = dict(hidden=16, prompt_dim=8, dec_dim=12, queue_size=50, feat_dim=8)
    return pcm3pp.Args(**{**base, **kw})


def raw_batch(n=6, t=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, t, 25, 2, generator=g)
    nf = torch.randint(40, t + 1, (n,), generator=g)
    return x, nf


def batch(a, n=6, seed=0):
    x, nf = raw_batch(n, seed=seed)
    g, gs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    return pcm3pp.add_batch_params(pcm3pp.make_views(x, nf, a, g), a, gs, 0)


# ------------------------------------------------------------------------------------ model facts
def test_parameter_counts_at_paper_defaults():
    with torch.device("meta"):
        m = pcm3pp.Model(pcm3pp.Args())
        m_np = pcm3pp.Model(pcm3pp.Args(prompt=False))
    assert common.count_params(m) == 103_457_862
    assert common.count_params(m.encoder.encoder) == 44_998_656
    assert common.count_params(m.encoder) == 49_457_580
    assert common.count_params(m.linear) == 1_312_768
    assert common.count_params(m.decoder) + common.count_params(m.decoder_out) == 3_228_822
    assert common.count_params(m) - common.count_params(m_np) == 1_112  # 4 x 150 + 2 x 256 prompts
    assert m.encoder.out_dim == m.encoder.dense_dim == 2048
    assert not any(p.requires_grad for p in m.encoder_k.parameters())


def test_state_dict_keys_are_the_official_ones():
    class OfficialBIGRU(nn.Module):  # PCM3 BIGRU with MoCo's --mlp head, as in the official repo
        def __init__(self):
            super().__init__()
            self.encoder = nn.GRU(150, 1024, 3, batch_first=True, bidirectional=True)
            self.fc = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 128))
            self.input_norm = nn.BatchNorm1d(150)

    with torch.device("meta"):
        ours = pcm3pp.Model(pcm3pp.Args()).state_dict()
        official = OfficialBIGRU().state_dict()
    enc = {k[len("encoder_q."):]: v.shape for k, v in ours.items() if k.startswith("encoder_q.")}
    assert enc == {k: v.shape for k, v in official.items()}
    assert "encoder.weight_hh_l2_reverse" in enc and "fc.2.weight" in enc
    assert {k[len("encoder_k."):] for k in ours if k.startswith("encoder_k.")} == set(official)
    assert ours["queue"].shape == (128, 16384) and ours["queue_ptr"].shape == (1,)
    # an official encoder_q state dict loads strictly into Encoder (small widths, same names)
    a = small_args(hidden=8)
    off = OfficialBIGRU()
    off.encoder = nn.GRU(150, 8, 3, batch_first=True, bidirectional=True)
    off.fc = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    enc = pcm3pp.Encoder(a)
    enc.load_state_dict(off.state_dict())
    assert torch.equal(enc.encoder.weight_ih_l1_reverse, off.encoder.weight_ih_l1_reverse)


def _official_loop(enc, x):
    """The official BIGRU forward: input_norm, then nn.GRU(bidirectional=True) called once per time
    step on a length-1 slice with the (2 * layers, N, H) state carried across calls."""
    h = enc.flatten(x)
    h = enc.input_norm(h.transpose(1, 2)).transpose(1, 2)
    state = h.new_zeros(2 * enc.encoder.num_layers, h.shape[0], enc.encoder.hidden_size)
    outs = []
    for t in range(h.shape[1]):
        out, state = enc.encoder(h[:, t:t + 1], state)
        outs.append(out)
    return torch.cat(outs, 1)


def test_whole_sequence_encoder_equals_official_step_by_step_recurrence(monkeypatch):
    torch.manual_seed(0)
    enc = pcm3pp.Encoder(small_args(hidden=48))
    x = torch.randn(3, 3, 64, 25, 2)
    ref = _official_loop(enc, x)                                     # (N, T, 2H)
    seq = enc.sequence(x)                                            # CPU kernel (_ForwardGRU)
    assert seq.shape == (3, 64, 96)
    assert (seq - ref).abs().max().item() < 1e-5
    h = enc.input_norm(enc.flatten(x).transpose(1, 2)).transpose(1, 2)
    native = pcm3pp.forward_in_time_gru(enc.encoder, h, native=True)  # torch.gru calls (cuDNN path)
    assert (native - ref).abs().max().item() < 1e-5
    assert torch.allclose(enc(x), ref[:, -1], atol=1e-5) and enc(x).shape == (3, enc.out_dim)
    assert torch.allclose(enc.dense(x), ref, atol=1e-5)
    # the quirk matters: a standard bidirectional pass (reverse weights backward in time) differs
    assert (enc.encoder(h)[0] - ref).abs().max().item() > 1e-2
    # the step-wise form would run the reverse direction as well; gradients agree too
    # gradients of both paths equal the official loop's (inputs and every GRU weight)
    x.requires_grad_(True)
    gy = torch.randn(3, 64, 96)
    wrt = [x] + list(enc.encoder.parameters())
    ref_g = torch.autograd.grad((_official_loop(enc, x) * gy).sum(), wrt)
    # CPU kernel with oneDNN's linear (where the build has it), with plain addmm, and torch.gru
    for native, onednn in ((False, common._ONEDNN), (False, False), (True, False)):
        monkeypatch.setattr(common, "_ONEDNN", onednn)
        h = enc.input_norm(enc.flatten(x).transpose(1, 2)).transpose(1, 2)
        out = pcm3pp.forward_in_time_gru(enc.encoder, h, native=native)
        assert (out - ref).abs().max().item() < 1e-5
        for g1, g2 in zip(torch.autograd.grad((out * gy).sum(), wrt), ref_g):
            assert (g1 - g2).abs().max().item() < 1e-4 * max(1.0, g2.abs().max().item())


def test_feature_prompt_hook_matches_official_offsets():
    torch.manual_seed(0)
    enc = pcm3pp.Encoder(small_args(hidden=16, prompt_dim=8))
    feat, prompt = torch.randn(2, 32), torch.randn(1, 8)
    out = enc.project(feat, prompt, torch.tensor(5))
    ref = feat.clone()
    ref[:, 5:9] += prompt[:, :4]
    ref[:, 21:25] += prompt[:, 4:]
    assert torch.allclose(out, enc.fc(ref))


# ------------------------------------------------------------------------------------------ views
def test_body_part_mask_views_and_clip_window():
    a = small_args()
    b = batch(a, n=5)
    mask = b["mask"]
    assert mask.shape == b["v3"].shape and torch.equal(mask, mask[:1].expand_as(mask))
    assert bool((mask[:, :, :, :, 1] == 1).all())                      # body 2 never masked
    m = mask[0, 0, :, :, 0]                                             # (T, V) body 1
    for c in range(8):                                                  # 8 chunks of 8 frames
        chunk = m[8 * c:8 * c + 8]
        assert torch.equal(chunk, chunk[:1].expand_as(chunk))
        hidden_parts = [p for p, j in common.BODY_PARTS.items() if bool((chunk[0, j] == 0).all())]
        assert len(hidden_parts) == 3
        assert int((chunk[0] == 0).sum()) == sum(len(common.BODY_PARTS[p]) for p in hidden_parts)
    # clip: v2 inside one window of 16..32 frames, zero outside; lengths vary per sample
    lengths = []
    for seed in range(4):
        bb = batch(a, n=5, seed=seed)
        keep = (bb["clip"] != 0).transpose(1, 2).flatten(2).any(2)      # (N, T) frames kept
        for i in range(5):
            idx = keep[i].nonzero().flatten()
            assert 16 <= len(idx) <= 32 and int(idx[-1] - idx[0]) + 1 == len(idx)
            lengths.append(len(idx))
            assert torch.equal(bb["clip"][i][:, idx], bb["v2"][i][:, idx])
    assert len(set(lengths)) > 3
    assert b["offsets"].shape == (7,) and int(b["offsets"].max()) < 16 - 4


def test_view_chain_and_modality_replayed():
    """methods.md 3A.1 replayed on the same generator: v1, v2 crop-resize then joint corruption or
    shear, v3 crop-resize then always shear; bone/motion computed per view after them."""
    a = small_args()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 80, 25, 2, generator=g)
    nf = torch.tensor([80, 70, 64, 75, 66])
    views = pcm3pp.make_views(x, nf, a, torch.Generator().manual_seed(9))
    g2 = torch.Generator().manual_seed(9)

    def crop():
        return common.crop_resize(x, nf, g2, a.window, tuple(a.crop_scale), a.window)
    v1 = common.corrupt_or_shear(crop(), g2)
    v2 = common.corrupt_or_shear(crop(), g2)
    v3 = common.shear(crop(), g2)
    for name, v in (("v1", v1), ("v2", v2), ("v3", v3)):
        assert torch.equal(views[name], v), name
    bone = pcm3pp.make_views(x, nf, dataclasses.replace(a, modality="bone"),
                             torch.Generator().manual_seed(9))
    for name in ("v1", "v2", "v3"):
        assert torch.equal(bone[name], common.to_modality(views[name], "bone")), name


def test_mixing_modes_lambda_and_mixed_key():
    a = small_args()
    modes = set()
    for seed in range(30):
        b = batch(a, n=6, seed=seed)
        x, xm, lam, partner = b["v1"], b["x_mix"], b["lam"], b["partner"]
        shift = int(partner[0])
        assert 1 <= shift <= 4 and torch.equal(partner, (torch.arange(6) + shift) % 6)
        assert torch.equal(lam, lam[:1].expand(6)) and 0 <= float(lam[0]) <= 1
        other = x[partner]
        if torch.allclose(xm, (1 - lam[0]) * x + lam[0] * other, atol=1e-6):
            modes.add("mixup")
            continue
        changed = (xm != x).flatten(0, 1).any(0)                         # (T, V, M)
        region = changed.any(2)                                         # (T, V)
        frames = region.any(1).nonzero().flatten()
        joints = region.any(0).nonzero().flatten()
        assert len(frames) % 4 == 0 and 28 <= len(frames) <= 44
        assert abs(float(lam[0]) - len(frames) * len(joints) / (64 * 25)) < 1e-6
        if torch.equal(xm[:, :, frames][:, :, :, joints], other[:, :, frames][:, :, :, joints]):
            modes.add("swap")
        else:  # resized swap: the partner's first 2*len frames resized (nearest) into the region
            rt = len(frames)
            src = (torch.arange(rt).float() * (min(2 * rt, 64) / rt)).floor().long()
            assert torch.equal(xm[:, :, frames][:, :, :, joints], other[:, :, src][:, :, :, joints])
            modes.add("resized")
    assert modes == {"mixup", "swap", "resized"}


# ------------------------------------------------------------------------------------------- loss
def test_loss_terms_match_direct_formulas():
    g = torch.Generator().manual_seed(0)
    s = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    t = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    queue = F.normalize(torch.randn(8, 30, generator=g), dim=0)
    nce, kd = 0.0, 0.0
    for i in range(5):
        logits = torch.cat([(s[i] @ t[i])[None], s[i] @ queue]) / 0.07
        nce += -(logits[0] - torch.logsumexp(logits, 0))
        p_t = torch.softmax(t[i] @ queue / 0.05, 0)
        p_s = torch.softmax(s[i] @ queue / 0.1, 0)
        kd += (p_t * (p_t.log() - p_s.log())).sum()
    assert torch.allclose(pcm3pp.info_nce(s, t, queue, 0.07), nce / 5, atol=1e-5)
    assert torch.allclose(pcm3pp.distill(s, t, queue, 0.05, 0.1), kd / 5, atol=1e-5)
    terms = {f"{k}_{n}": torch.tensor(float(i + 2 * j)) for i, n in enumerate(pcm3pp.PAIRS)
             for j, k in enumerate(("nce", "kd"))}
    terms["rec"] = torch.tensor(0.5)
    nce_sum, kd_sum = sum(range(5)), sum(i + 2 for i in range(5))
    a = pcm3pp.Args()
    assert float(pcm3pp.total_loss(terms, a, False)) == nce_sum + kd_sum + 40 * 0.5
    assert float(pcm3pp.total_loss(terms, a, True)) == kd_sum + 40 * 0.5   # post-distillation
    a.prompt = False  # PCM3_woprompt: distillation computed, not added
    assert float(pcm3pp.total_loss(terms, a, False)) == nce_sum + 40 * 0.5


def test_forward_wiring_against_recomputation(monkeypatch):
    torch.manual_seed(0)
    a = small_args()
    model = pcm3pp.Model(a)
    with torch.no_grad():
        for p in model.encoder_k.parameters():
            p.add_(0.1)
    ref = copy.deepcopy(model)
    b = batch(a, n=6)
    seen = {}
    orig = pcm3pp.pcm3_losses
    monkeypatch.setattr(pcm3pp, "pcm3_losses",
                        lambda pairs, queue, args: seen.update(pairs=pairs, queue=queue) or
                        orig(pairs, queue, args))
    terms = model(b)
    pairs, off = seen["pairs"], b["offsets"]
    enc = ref.encoder_q
    q = F.normalize(enc.project(enc.sequence(b["v1"], ref.base_prompt)[:, -1], ref.cl_prompt, off[0]),
                    dim=1)
    clip = F.normalize(enc.project(enc.sequence(b["clip"], ref.base_prompt)[:, -1], ref.cl_prompt,
                                   off[5]), dim=1)
    mix = F.normalize(enc.project(enc.sequence(b["x_mix"], ref.mix_prompt)[:, -1], ref.cl_prompt,
                                  off[4]), dim=1)
    assert torch.allclose(pairs["base"][0], q, atol=1e-6)
    assert torch.allclose(pairs["clip"][0], clip, atol=1e-6)
    assert torch.allclose(pairs["mix"][0], mix, atol=1e-6)
    # momentum update happens before the key is computed: k_param = m k0 + (1 - m) q0
    for (n, pk), pk0, pq0 in zip(model.encoder_k.named_parameters(), ref.encoder_k.parameters(),
                                 ref.encoder_q.parameters()):
        assert torch.allclose(pk, 0.999 * pk0 + 0.001 * pq0, atol=1e-7), n
    k = pairs["base"][1]
    for name in ("mask", "recons", "clip"):
        assert pairs[name][1] is k
    lam = b["lam"][:, None]
    assert torch.allclose(pairs["mix"][1], F.normalize((1 - lam) * k + lam * k[b["partner"]], dim=1))
    assert torch.equal(seen["queue"], ref.queue)                         # logits use the old queue
    assert torch.equal(model.queue[:, :6], k.T) and int(model.queue_ptr) == 6
    for name, (s, t) in pairs.items():
        assert torch.allclose(terms[f"nce_{name}"], pcm3pp.info_nce(s, t, ref.queue, 0.07))
    mask, v3 = b["mask"], b["v3"]
    assert bool((mask == 0).any())
    seq = enc.sequence(v3 * mask, ref.mask_prompt)
    mp = torch.zeros(32)
    mp[int(off[1]):int(off[1]) + 4] = ref.mp_prompt[0, :4]
    mp[16 + int(off[1]):16 + int(off[1]) + 4] = ref.mp_prompt[0, 4:]
    recons = ref.decode(seq + mp, v3.shape)
    rec = ((recons - v3) ** 2 * (1 - mask)).sum() / (1 - mask).sum()
    assert torch.allclose(terms["rec"], rec, atol=1e-6)
    mask_q = F.normalize(enc.project(seq[:, -1], ref.cl_prompt, off[2]), dim=1)
    assert torch.allclose(pairs["mask"][0], mask_q, atol=1e-6)
    pred = recons * (1 - mask) + v3 * mask
    recons_q = F.normalize(enc.project(enc.sequence(pred, ref.recons_prompt)[:, -1], ref.cl_prompt,
                                       off[3]), dim=1)
    assert torch.allclose(pairs["recons"][0], recons_q, atol=1e-5)


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n: (p.grad is not None and bool(p.grad.abs().sum() > 0))
            for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_routing_and_queue_wrap():
    torch.manual_seed(0)
    a = small_args(queue_size=10)
    model = pcm3pp.Model(a)
    terms = model(batch(a, n=6))
    g = _grads(model, terms["nce_recons"])       # predicted-view positive: reaches the decoder
    assert g["decoder.weight_hh_l0"] and g["linear.0.weight"] and g["recons_prompt"]
    assert g["encoder_q.encoder.weight_ih_l0"]   # through the recons_q pass
    g = _grads(model, terms["nce_mask"])         # masked-view positive: encoder, not the decoder
    assert g["encoder_q.encoder.weight_ih_l0"] and g["mask_prompt"] and not g["decoder.weight_hh_l0"]
    g = _grads(model, terms["rec"])
    assert g["mp_prompt"] and g["decoder_out.weight"] and g["encoder_q.encoder.weight_hh_l2"]
    assert not g["cl_prompt"]
    g = _grads(model, terms["kd_clip"])
    assert g["base_prompt"] and g["cl_prompt"] and not g["mix_prompt"]
    model(batch(a, n=6, seed=1))                 # 6 + 6 keys in a queue of 10: wraps around
    assert int(model.queue_ptr) == 2
    a2 = small_args(prompt=False)
    m2 = pcm3pp.Model(a2)
    g = _grads(m2, m2(batch(a2, n=6))["nce_recons"])
    assert not g["decoder.weight_hh_l0"] and g["encoder_q.encoder.weight_ih_l0"]


# ---------------------------------------------------------------------------------- end to end
def _state(path):
    return torch.load(path, weights_only=True)


def test_cli_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit) as e:
        pcm3pp.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("--post_distill_epochs", "--post_distill_from", "--no_prompt", "--clip_len",
                 "--rec_weight", "--data_on_device"):
        assert name in out
    with pytest.raises(SystemExit) as e:
        pcm3pp.main(["--no_such_flag", "1"])
    assert e.value.code == 2
    with pytest.raises(common.UserError, match="--clip_len"):
        pcm3pp.main(["--clip_len", "40", "20"])
    with pytest.raises(common.UserError, match="--window"):
        pcm3pp.main(["--window", "32"])
    with pytest.raises(common.UserError, match="--prompt_dim 9: must be even"):
        pcm3pp.main(["--prompt_dim", "9"])
    for flags in (["--mask_chunks", "0"], ["--queue_size", "64"]):
        with pytest.raises(common.UserError, match="--mask_chunks .* --queue_size"):
            pcm3pp.main(flags)
    with pytest.raises(common.UserError, match="--epochs -3 / --post_distill_epochs"):
        pcm3pp.main(["--epochs", "-3"])  # used to "finish" at once and write an untrained last.pt
    with pytest.raises(common.UserError, match="--save_every must be >= 1"):
        pcm3pp.main(["--save_every", "0"])


def test_train_resume_and_post_distillation_from_checkpoint(tiny_data, tmp_path, run_py):
    full, part, post = tmp_path / "full", tmp_path / "part", tmp_path / "post"
    # --lr_steps 0: x0.1 from the first epoch, so stage one's final lr (post-distillation's, SPEC 5)
    # differs from --lr
    base = ["pcm3pp.py", "--dataset", "synthetic", "--data_dir", tiny_data, *TINY, "--epochs", "1",
            "--lr_steps", "0"]
    run_py([*base, "--post_distill_epochs", "1", "--out_dir", full])
    run_py([*base, "--post_distill_epochs", "0", "--out_dir", part])
    stage1 = _state(part / "last.pt")
    proc = run_py(["pcm3pp.py", "--dataset", "synthetic", "--data_dir", tiny_data, *TINY,
                   "--lr_steps", "0", "--post_distill_from", part / "last.pt",
                   "--post_distill_epochs", "1", "--out_dir", post])
    assert "post-distillation from" in proc.stdout
    proc = run_py([*base, "--post_distill_epochs", "1", "--out_dir", part, "--resume"])
    assert "resumed from" in proc.stdout
    a, b, c = (_state(d / "last.pt") for d in (full, part, post))
    assert stage1["epoch"] == 1 and a["method"] == "pcm3pp" and a["epoch"] == b["epoch"] == c["epoch"] == 2
    # the full run keeps its stage-one model beside last.pt (the "w/o post-distillation" row)
    kept = _state(full / "stage1.pt")
    assert kept["epoch"] == 1 and all(torch.equal(kept["model"][k], v) for k, v in stage1["model"].items())
    bad = run_py(["pcm3pp.py", "--dataset", "synthetic", "--data_dir", tiny_data, *TINY,
                  "--post_distill_from", full / "last.pt", "--out_dir", tmp_path / "bad"], check=False)
    assert bad.returncode == 2 and "not at the end of its stage one" in bad.stderr.splitlines()[-1]
    bad = run_py(["pcm3pp.py", "--dataset", "synthetic", "--data_dir", tiny_data, *TINY,
                  "--modality", "bone", "--post_distill_from", full / "stage1.pt", "--out_dir",
                  tmp_path / "bad"], check=False)
    assert bad.returncode == 2 and bad.stderr.splitlines()[-1].endswith(
        "stage one ran with --modality joint; repeat these flags")
    bad = run_py(["pcm3pp.py", "--dataset", "synthetic", "--data_dir", tiny_data, *TINY,
                  "--optimizer", "sgd", "--post_distill_from", full / "stage1.pt", "--out_dir",
                  tmp_path / "bad"], check=False)  # Adam's state cannot continue as SGD's
    assert bad.returncode == 2 and bad.stderr.splitlines()[-1].endswith(
        "stage one ran with --optimizer adam; repeat these flags")
    old = dict(stage1, args={k: v for k, v in stage1["args"].items() if k != "optimizer"})
    torch.save(old, tmp_path / "old.pt")  # written before --optimizer existed: it trained with SGD
    bad = run_py(["pcm3pp.py", "--dataset", "synthetic", "--data_dir", tiny_data, *TINY,
                  "--post_distill_from", tmp_path / "old.pt", "--out_dir", tmp_path / "bad"],
                 check=False)
    assert bad.returncode == 2 and bad.stderr.splitlines()[-1].endswith(
        "stage one ran with --optimizer sgd; repeat these flags")
    bad = run_py([*base, "--post_distill_epochs", "1", "--out_dir", part, "--resume", "--optimizer",
                  "sgd"], check=False)
    assert bad.returncode == 2 and "resume with --optimizer adam" in bad.stderr.splitlines()[-1]
    assert a["step"] == b["step"] == c["step"] == 2 * stage1["step"] > 0
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["model"][k], c["model"][k]), k
    assert a["args"]["optimizer"] == "adam"  # the quick start's; its moments resume exactly too
    for i, st in a["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(st[k], b["optimizer"]["state"][i][k]), (i, k)
            assert torch.equal(st[k], c["optimizer"]["state"][i][k]), (i, k)
    assert not torch.equal(a["model"]["encoder_q.encoder.weight_hh_l0"],
                           stage1["model"]["encoder_q.encoder.weight_hh_l0"])
    enc = pcm3pp.Encoder(pcm3pp.Args(**a["args"]))
    enc.load_state_dict(a["encoder"])
    assert enc.eval()(torch.randn(2, 3, 48, 25, 2)).shape == (2, 32)
    lines = [json.loads(s) for s in (full / "metrics.jsonl").read_text().splitlines()]
    step_lines = [r for r in lines if "stage" in r]
    assert {"loss", "rec", "nce_clip", "kd_clip", "lr", "samples_per_s", "eta"} <= set(step_lines[0])
    assert [r["stage"] for r in step_lines] == [1, 1, 2, 2]
    lr = json.loads((full / "args.json").read_text())["lr"]          # the quick start's 3e-3
    assert all(abs(r["lr"] - 0.1 * lr) < 1e-12 for r in step_lines), [r["lr"] for r in step_lines]
    # post-distillation drops every InfoNCE term: loss = kd sum + 40 rec
    r = step_lines[-1]
    kd = sum(r[f"kd_{n}"] for n in pcm3pp.PAIRS)
    assert abs(r["loss"] - (kd + 40 * r["rec"])) < 1e-3 * r["loss"]
    assert json.loads((post / "args.json").read_text())["epochs"] == 1


TORCHRUN_SCRIPT = """
import sys, torch, common, pcm3pp
d = common.setup_distributed("cpu")
a = pcm3pp.Args(hidden=12, prompt_dim=8, dec_dim=12, queue_size=20, feat_dim=8, batch_size=8)
torch.manual_seed(0)
model = pcm3pp.Model(a).double()  # float64 so that only real differences show, not rounding
x = torch.randn(8, 3, 80, 25, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
nf = torch.randint(50, 81, (8,), generator=torch.Generator().manual_seed(2))
views = pcm3pp.make_views(x, nf, a, torch.Generator().manual_seed(3))   # the global batch's views
b = 8 // d.world_size
local = {k: v[d.rank * b:(d.rank + 1) * b] for k, v in views.items()}
batch = pcm3pp.add_batch_params(local, a, torch.Generator().manual_seed(4), d.rank)
net = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if d.ddp else model
terms = net(batch)
terms["loss"].backward()
loss = common.all_reduce_mean(terms["loss"].detach())
if d.is_main:
    torch.save({"loss": loss, "grads": {n: p.grad for n, p in model.named_parameters() if p.requires_grad},
                "buffers": dict(model.named_buffers())}, sys.argv[1])
if d.ddp:  # the training loop itself under torchrun
    pcm3pp.main(sys.argv[2:])
"""


def test_torchrun_two_processes_match_one(tiny_data, tmp_path, torchrun_vs_one):
    out = tmp_path / "ddp"
    one, two = torchrun_vs_one(TORCHRUN_SCRIPT, ["--dataset", "synthetic", "--data_dir", tiny_data,
                                                 *TINY, "--epochs", "1", "--post_distill_epochs", "0",
                                                 "--optimizer", "sgd", "--out_dir", out])
    assert torch.allclose(one["loss"], two["loss"], rtol=0, atol=1e-10)
    for k, g1 in one["grads"].items():
        assert torch.allclose(g1, two["grads"][k], rtol=0, atol=1e-10), k
    for k, v in one["buffers"].items():  # enqueued global keys, global-batch BN statistics
        assert torch.allclose(v.double(), two["buffers"][k].double(), rtol=0, atol=1e-10), k
    assert int(two["buffers"]["queue_ptr"]) == 8
    ck = _state(out / "last.pt")
    assert ck["epoch"] == 1 and ck["args"]["batch_size"] == 60
    assert ck["args"]["optimizer"] == "sgd" and "momentum_buffer" in ck["optimizer"]["state"][0]
    assert not list(out.glob(".*last.pt*")) and len((out / "log.txt").read_text().splitlines()) >= 2
