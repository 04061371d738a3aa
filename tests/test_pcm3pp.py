"""pcm3pp.py: parameter counts, the forward-in-time BIGRU against the official per-step loop, official
state-dict keys and head init, fp32 GRUs under autocast, views (body-part mask, mixing, clip window),
loss terms and their gradient routing, plain PCM3 behind the switches, end-to-end training with exact
resume and post-distillation from a stage-one checkpoint, and 2-process torchrun equivalence."""
import copy
import dataclasses
import itertools
import json
import math

import numpy as np

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
    return pcm3pp.make_views(x, nf, g, a, gs, 0)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def replay(g):
    """A copy of generator g in its current state."""
    g2 = torch.Generator()
    g2.set_state(g.get_state())
    return g2


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


class OfficialBIGRU(nn.Module):
    """The official PCM3 encoder's module tree (moco/GRU.py BIGRU with EncoderRNN) after MoCo's --mlp
    head replacement in moco/builder_mask_recons.py."""

    def __init__(self, hidden=1024, feat=128):
        super().__init__()
        self.encoder = nn.Module()  # EncoderRNN
        self.encoder.gru = nn.GRU(150, hidden, 3, batch_first=True, bidirectional=True)
        self.fc = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(),
                                nn.Linear(2 * hidden, feat))
        self.input_norm = nn.BatchNorm1d(150)


def test_state_dict_keys_are_the_official_ones():
    with torch.device("meta"):
        ours = pcm3pp.Model(pcm3pp.Args()).state_dict()
        official = OfficialBIGRU().state_dict()
    enc = {k[len("encoder_q."):]: v.shape for k, v in ours.items() if k.startswith("encoder_q.")}
    assert enc == {k: v.shape for k, v in official.items()}
    assert "encoder.gru.weight_hh_l2_reverse" in enc and "fc.2.weight" in enc
    assert {k[len("encoder_k."):] for k in ours if k.startswith("encoder_k.")} == set(official)
    assert ours["queue"].shape == (128, 16384) and ours["queue_ptr"].shape == (1,)
    # an official encoder_q state dict loads strictly into Encoder (small widths, same names)
    off = OfficialBIGRU(hidden=8, feat=8)
    enc = pcm3pp.Encoder(small_args(hidden=8))
    enc.load_state_dict(off.state_dict())
    assert torch.equal(enc.encoder.gru.weight_ih_l1_reverse, off.encoder.gru.weight_ih_l1_reverse)
    # the one-layer GRUs that run the weights share them (and add no keys)
    assert enc.encoder.runs[3].weight_hh_l0 is enc.encoder.gru.weight_hh_l1_reverse
    # checkpoints before version 2 stored the GRU as encoder.weight_ih_l0: they still load
    old = {k.replace("encoder.gru.", "encoder."): v + 1 for k, v in off.state_dict().items()}
    enc.load_state_dict(old)
    assert torch.equal(enc.encoder.gru.bias_hh_l2, off.encoder.gru.bias_hh_l2 + 1)


def test_head_init_is_the_official_xavier_rule():
    """Official weights_init_gru: xavier-uniform on the BIGRU's fc before MoCo wraps it as fc.2;
    fc.0 (new) keeps PyTorch's Linear init; the key encoder starts as a copy."""
    torch.manual_seed(0)
    m = pcm3pp.Model(pcm3pp.Args(hidden=1024, prompt_dim=256, dec_dim=8, queue_size=256))
    w = m.encoder_q.fc[2].weight.detach()                            # (128, 2048)
    bound = math.sqrt(6 / (2048 + 128))                              # xavier_uniform, gain 1
    assert w.abs().max() <= bound and w.abs().max() > 0.999 * bound
    assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.01  # std 0.0303 (default: 0.0128)
    assert abs(w.mean().item()) < 1e-3
    w0 = m.encoder_q.fc[0].weight.detach()                           # PyTorch default: 1/sqrt(fan_in)
    assert w0.abs().max() <= 1 / math.sqrt(2048) and w0.abs().max() > 0.999 / math.sqrt(2048)
    gru = m.encoder_q.encoder.gru.weight_hh_l0.detach()              # (3H, H) xavier too
    assert abs(gru.abs().max().item() / math.sqrt(6 / (4 * 1024)) - 1) < 1e-3
    for k, v in m.encoder_q.state_dict().items():
        assert torch.equal(v, m.encoder_k.state_dict()[k]), k


def _official_loop(enc, x):
    """The official BIGRU forward: input_norm, then nn.GRU(bidirectional=True) called once per time
    step on a length-1 slice with the (2 * layers, N, H) state carried across calls."""
    h = enc.flatten(x)
    h = enc.input_norm(h.transpose(1, 2)).transpose(1, 2)
    gru = enc.encoder.gru
    state = h.new_zeros(2 * gru.num_layers, h.shape[0], gru.hidden_size)
    outs = []
    for t in range(h.shape[1]):
        out, state = gru(h[:, t:t + 1], state)
        outs.append(out)
    return torch.cat(outs, 1)


def test_whole_sequence_encoder_equals_official_step_by_step_recurrence():
    torch.manual_seed(0)
    enc = pcm3pp.Encoder(small_args(hidden=48))
    x = torch.randn(3, 3, 64, 25, 2)
    ref = _official_loop(enc, x)                                     # (N, T, 2H)
    seq = enc.sequence(x)
    assert seq.shape == (3, 64, 96)
    assert (seq - ref).abs().max().item() < 1e-5
    assert torch.allclose(enc(x), ref[:, -1], atol=1e-5) and enc(x).shape == (3, enc.out_dim)
    assert torch.allclose(enc.dense(x), ref, atol=1e-5)
    # the quirk matters: a standard bidirectional pass (reverse weights backward in time) differs
    h = enc.input_norm(enc.flatten(x).transpose(1, 2)).transpose(1, 2)
    assert (nn.GRU.forward(enc.encoder.gru, h)[0] - ref).abs().max().item() > 1e-2
    # gradients equal the official loop's (inputs and every GRU weight)
    x.requires_grad_(True)
    gy = torch.randn(3, 64, 96)
    wrt = [x] + list(enc.encoder.parameters())
    ref_g = torch.autograd.grad((_official_loop(enc, x) * gy).sum(), wrt)
    for g1, g2 in zip(torch.autograd.grad((enc.sequence(x) * gy).sum(), wrt), ref_g):
        assert (g1 - g2).abs().max().item() < 1e-4 * max(1.0, g2.abs().max().item())


def test_gru_runs_fp32_under_autocast_and_the_rest_autocasts():
    """--dtype bf16: both GRUs run outside autocast in fp32 (CUDA autocast would run cuDNN RNNs in
    fp16); the Linear layers around them still run in bf16."""
    torch.manual_seed(0)
    a = small_args()
    model = pcm3pp.Model(a)
    seen = []

    def record(mod, inputs, output):
        seen.append((torch.is_autocast_enabled("cpu"), inputs[0].dtype, output[0].dtype))
    model.decoder.register_forward_hook(record)
    for run in model.encoder_q.encoder.runs:
        run.register_forward_hook(record)
    head = []
    model.encoder_q.fc[2].register_forward_hook(lambda mod, i, o: head.append(o.dtype))
    model.linear[0].register_forward_hook(lambda mod, i, o: head.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = model(batch(a))
        assert len(seen) == 5 * 3 * 2 + 2  # 5 query passes x 3 layers x 2 weight sets, 2 decoder passes
        assert model.encoder_q.sequence(batch(a)["v1"]).dtype == torch.float32
    assert all(s == (False, torch.float32, torch.float32) for s in seen), set(seen)
    assert set(head) == {torch.bfloat16}
    assert terms["loss"].dtype == torch.float32 and torch.isfinite(terms["loss"])


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
    """The official view chain replayed on the same generator: v1, v2 crop-resize then joint
    corruption or shear, v3 crop-resize then always shear; bone/motion per view after them."""
    a = small_args()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 80, 25, 2, generator=g)
    nf = torch.tensor([80, 70, 64, 75, 66])
    views = pcm3pp.sample_views(x, nf, torch.Generator().manual_seed(9), a)
    g2 = torch.Generator().manual_seed(9)

    def crop():
        return common.crop_resize(x, nf, g2, a.window, tuple(a.crop_scale), a.window)
    v1 = common.corrupt_or_shear(crop(), g2)
    v2 = common.corrupt_or_shear(crop(), g2)
    v3 = common.shear(crop(), g2)
    for name, v in (("v1", v1), ("v2", v2), ("v3", v3)):
        assert torch.equal(views[name], v), name
    bone = pcm3pp.sample_views(x, nf, torch.Generator().manual_seed(9),
                               dataclasses.replace(a, modality="bone"))
    for name in ("v1", "v2", "v3"):
        assert torch.equal(bone[name], common.to_modality(views[name], "bone")), name


def test_body_part_mask_structure_and_frequencies():
    parts = list(common.BODY_PARTS.values())
    assert sorted(itertools.chain(*parts)) == list(range(25))
    counts = np.zeros(5)
    g = gen(21)
    for _ in range(200):
        mask = pcm3pp.body_part_mask((3, 3, 64, 25, 2), g)
        assert mask.shape == (3, 3, 64, 25, 2) and mask.dtype == torch.float32
        assert torch.equal(mask, mask[:1, :1].expand_as(mask))       # one pattern for the batch
        assert (mask[..., 1] == 1).all()                             # body 2 never masked
        hidden = mask[0, 0, :, :, 0] == 0                            # (T, V)
        chunks = hidden.view(8, 8, 25)
        assert torch.equal(chunks, chunks[:, :1].expand_as(chunks))  # constant within a chunk
        for k in range(8):
            on = [bool(chunks[k, 0, p].all()) for p in parts]
            assert sum(on) == 3
            assert int(chunks[k, 0].sum()) == sum(len(p) for p, o in zip(parts, on) if o)
            counts += on
    assert np.abs(counts / 1600 - 0.6).max() < 0.05


def test_mix_samples_follows_ske_swap():
    parts = [set(p) for p in common.BODY_PARTS.values()]
    N, T = 5, 64
    g = gen(24)
    branches, shifts, n_parts, units = [], [], [], []
    for k in range(300):
        x = torch.randn(N, 3, T, 25, 2, generator=gen(1000 + k))
        g2 = replay(g)
        out, lam, partner = pcm3pp.mix_samples(x, g)
        # Replay the draws (docstring order) to get the branch variable b: > .5 swap, > .25 resized.
        torch.randint(1, N - 1, (1,), generator=g2), torch.randint(2, 4, (1,), generator=g2)
        torch.rand(1, 5, generator=g2), torch.randint(7, 12, (1,), generator=g2)
        torch.rand(1, generator=g2, dtype=torch.float64)
        b = float(torch.rand(1, generator=g2, dtype=torch.float64))
        expected = "swap" if b > 0.5 else "resized" if b > 0.25 else "mixup"
        assert lam.shape == (N,) and torch.equal(lam, lam[:1].expand(N))
        shift = int(partner[0])
        assert 1 <= shift <= N - 2 and torch.equal(partner, (torch.arange(N) + shift) % N)
        shifts.append(shift)
        other = x[partner]
        diff = out != x
        if diff.float().mean() > 0.9:        # Mixup (a swap region covers < 1/2 of the clip)
            lm = float(lam[0])
            assert 0 < lm < 1
            assert torch.allclose(out, x * (1 - lm) + other * lm, rtol=1.3e-6, atol=1e-5)
            branches.append("mixup")
            assert expected == "mixup"
            continue
        region = diff.any(4).any(1).any(0)                            # (T, V)
        assert torch.equal(diff, region[None, None, :, :, None].expand_as(diff))
        frames = torch.nonzero(region.any(1)).flatten()
        joints = set(torch.nonzero(region.any(0)).flatten().tolist())
        t0, rt = int(frames[0]), len(frames)
        assert t0 % 4 == 0 and rt % 4 == 0 and 7 <= rt // 4 <= 11
        assert frames.tolist() == list(range(t0, t0 + rt))
        chosen = [p for p in parts if p <= joints]
        assert set().union(*chosen) == joints and len(chosen) in (2, 3)
        assert math.isclose(float(lam[0]), (rt // 4) * len(joints) / (16 * 25), rel_tol=1e-6)
        js = sorted(joints)
        got = out[:, :, t0:t0 + rt][:, :, :, js]
        if torch.equal(got, other[:, :, t0:t0 + rt][:, :, :, js]):
            branches.append("swap")
        else:
            src = other[:, :, :min(2 * rt, T)]
            ref = F.interpolate(src, size=(rt, 25, 2))                  # official: default 'nearest'
            assert torch.equal(got, ref[:, :, :, js])
            branches.append("resized")
        assert branches[-1] == expected
        n_parts.append(len(chosen))
        units.append(rt // 4)
    freq = {b: branches.count(b) / 300 for b in ("swap", "resized", "mixup")}
    assert abs(freq["swap"] - 0.5) < 0.09 and abs(freq["resized"] - 0.25) < 0.08
    assert abs(freq["mixup"] - 0.25) < 0.08
    assert set(shifts) == {1, 2, 3} and set(units) == set(range(7, 12))
    assert abs(n_parts.count(2) / len(n_parts) - 0.5) < 0.1


def test_mix_samples_small_batches():
    x = torch.randn(2, 3, 64, 25, 2, generator=gen(25))
    assert pcm3pp.mix_samples(x, gen(26))[2].tolist() == [1, 0]
    out, lam, partner = pcm3pp.mix_samples(x[:1], gen(26))
    assert partner.tolist() == [0] and torch.allclose(out, x[:1])
    with pytest.raises(ValueError, match="44 frames"):
        pcm3pp.mix_samples(x[:, :, :40], gen(26))


def test_batch_draws_are_seeded():
    x = torch.randn(8, 3, 64, 25, 2, generator=gen(28))
    for fn in (lambda g: pcm3pp.mix_samples(x, g)[0], lambda g: pcm3pp.body_part_mask(x.shape, g)):
        assert torch.equal(fn(gen(5)), fn(gen(5))) and not torch.equal(fn(gen(5)), fn(gen(6)))


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
    assert g["encoder_q.encoder.gru.weight_ih_l0"]   # through the recons_q pass
    g = _grads(model, terms["nce_mask"])         # masked-view positive: encoder, not the decoder
    assert g["encoder_q.encoder.gru.weight_ih_l0"] and g["mask_prompt"] and not g["decoder.weight_hh_l0"]
    g = _grads(model, terms["rec"])
    assert g["mp_prompt"] and g["decoder_out.weight"] and g["encoder_q.encoder.gru.weight_hh_l2"]
    assert not g["cl_prompt"]
    g = _grads(model, terms["kd_clip"])
    assert g["base_prompt"] and g["cl_prompt"] and not g["mix_prompt"]
    model(batch(a, n=6, seed=1))                 # 6 + 6 keys in a queue of 10: wraps around
    assert int(model.queue_ptr) == 2
    a2 = small_args(prompt=False)
    m2 = pcm3pp.Model(a2)
    g = _grads(m2, m2(batch(a2, n=6))["nce_recons"])
    assert not g["decoder.weight_hh_l0"] and g["encoder_q.encoder.gru.weight_ih_l0"]


def test_plain_pcm3_behind_the_switches():
    """--w_clip 0: PCM3's encoder passes (4 query + 1 key) and BatchNorm updates, its loss terms and
    total on identical inputs; the default adds one query pass (the clip) and its weighted terms."""
    torch.manual_seed(0)
    a = small_args()
    pcm3 = pcm3pp.Model(dataclasses.replace(a, w_clip=0.0))
    pp = pcm3pp.Model(dataclasses.replace(a, w_clip=0.5))
    pp.load_state_dict(pcm3.state_dict())
    passes = {}
    for name, model in (("pcm3", pcm3), ("pp", pp)):
        for enc in (model.encoder_q, model.encoder_k):
            enc.encoder.register_forward_hook(lambda *_, n=name: passes.update({n: passes.get(n, 0) + 1}))
    x, nf = raw_batch(6)
    b_pcm3 = pcm3pp.make_views(x, nf, gen(0), pcm3.args, gen(1), 0)
    b_pp = pcm3pp.make_views(x, nf, gen(0), pp.args, gen(1), 0)
    assert "clip" not in b_pcm3 and "clip" in b_pp
    for k in b_pcm3:  # the clip draws come after every view and batch draw: the same views
        assert torch.equal(b_pcm3[k], b_pp[k]), k
    t0, t1 = pcm3(b_pcm3), pp(b_pp)
    assert passes == {"pcm3": 5, "pp": 6}
    assert int(pcm3.encoder_q.input_norm.num_batches_tracked) == 4
    assert int(pp.encoder_q.input_norm.num_batches_tracked) == 5
    pcm3_names = [f"{k}_{n}" for n in ("base", "mix", "mask", "recons") for k in ("nce", "kd")]
    assert set(t0) == {"loss", "rec", *pcm3_names}
    for k in ["rec", *pcm3_names]:
        assert torch.equal(t0[k], t1[k]), k
    pcm3_loss = sum(t0[k] for k in pcm3_names) + 40 * t0["rec"]   # official: every term weight 1
    assert torch.allclose(t0["loss"], pcm3_loss, rtol=1e-6)
    assert torch.allclose(t1["loss"], pcm3_loss + 0.5 * (t1["nce_clip"] + t1["kd_clip"]), rtol=1e-6)
    post = pcm3pp.total_loss(t0, pcm3.args, True)                     # post-distillation off: unused
    assert torch.allclose(post, sum(t0[k] for k in pcm3_names if k.startswith("kd")) + 40 * t0["rec"])


# ---------------------------------------------------------------------------------- end to end
def _state(path):
    return torch.load(path, weights_only=True)


def test_cli_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit) as e:
        pcm3pp.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("--post_distill_epochs", "--post_distill_from", "--no_prompt", "--clip_len",
                 "--w_rec", "--w_clip", "--key_momentum", "--momentum", "--data_on_device"):
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
    with pytest.raises(common.UserError, match="--mask_chunks 0: must be positive"):
        pcm3pp.main(["--mask_chunks", "0"])
    with pytest.raises(common.UserError, match="--queue_size 64: must be >= --batch_size 128"):
        pcm3pp.main(["--queue_size", "64"])
    with pytest.raises(common.UserError, match="--epochs -3 / --post_distill_epochs"):
        pcm3pp.main(["--epochs", "-3"])  # used to "finish" at once and write an untrained last.pt
    with pytest.raises(common.UserError, match="--save_every 0: must be positive"):
        pcm3pp.main(["--save_every", "0"])
    with pytest.raises(common.UserError, match="--w_clip -1.0"):
        pcm3pp.main(["--w_clip", "-1"])


def test_train_resume_and_post_distillation_from_checkpoint(tiny_data, tmp_path, run_py):
    full, part, post = tmp_path / "full", tmp_path / "part", tmp_path / "post"
    # --lr_steps 0: x0.1 from the first epoch, so stage one's final lr (post-distillation's lr)
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
    # a version-1 checkpoint: flags under their old names, written before --optimizer (SGD)
    renamed = {v: k for k, v in common.RENAMED_ARGS["pcm3pp"].items()}
    old_args = {renamed.get(k, k): v for k, v in stage1["args"].items() if k != "optimizer"}
    torch.save(dict(stage1, version=1, args={**old_args, "rec_weight": 20.0}), tmp_path / "old.pt")
    bad = run_py(["pcm3pp.py", "--dataset", "synthetic", "--data_dir", tiny_data, *TINY,
                  "--post_distill_from", tmp_path / "old.pt", "--out_dir", tmp_path / "bad"],
                 check=False)
    assert bad.returncode == 2 and bad.stderr.splitlines()[-1].endswith(
        "stage one ran with --w_rec 20.0, --optimizer sgd; repeat these flags")
    assert not (tmp_path / "bad").exists()
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
    assert not torch.equal(a["model"]["encoder_q.encoder.gru.weight_hh_l0"],
                           stage1["model"]["encoder_q.encoder.gru.weight_hh_l0"])
    enc = pcm3pp.Encoder(pcm3pp.Args(**a["args"]))
    enc.load_state_dict(a["encoder"])
    assert enc.eval()(torch.randn(2, 3, 48, 25, 2)).shape == (2, 32)
    lines = [json.loads(s) for s in (full / "metrics.jsonl").read_text().splitlines()]
    step_lines = [r for r in lines if "samples_per_s" in r]
    assert list(step_lines[0])[3:5] == ["loss", "nce_base"]   # after step, epoch, time
    assert {"loss", "rec", "nce_clip", "kd_clip", "lr", "samples_per_s", "eta"} <= set(step_lines[0])
    assert [r["step"] for r in step_lines] == [1, 2, 3, 4]
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
views = pcm3pp.sample_views(x, nf, torch.Generator().manual_seed(3), a)  # the global batch's views
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
