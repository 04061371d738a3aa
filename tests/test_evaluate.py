"""evaluate.py: detection metrics against hand-worked cases, subset / episode / mask sampling, the
pre-normalisation, and every task end to end on tiny synthetic data for every method's checkpoint."""
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import data_prep
import evaluate as ev


# ------------------------------------------------------------------------------ detection metrics
def P(label, s, e, conf=1.0, video="v"):
    return (label, s, e, conf, video)


def test_oracle_frame_probabilities_give_perfect_detection():
    """The label chain of detection: stored frame labels (raw + 1) -> frame_targets (head class =
    raw label) -> one-hot probabilities -> get_segments -> metrics against the ground truth runs."""
    lab = np.zeros(200, dtype=np.uint8)
    lab[20:70], lab[100:160] = 1 + 1, 2 + 1                    # raw labels 1 and 2, stored + 1
    t = ev.frame_targets(lab, [0], 200, 1, 200)[0]             # (200,) 0 = background
    assert t[20].item() == 1 and t[100].item() == 2 and t[0].item() == 0
    prob = np.eye(3)[t.numpy()]                                # a perfect head, (L, 1 + C)
    props = [(c, s_, e, conf, "v") for c, s_, e, conf in ev.get_segments(prob, 10, 0.4)]
    gts = [(1, 20, 70, 1.0, "v"), (2, 100, 160, 1.0, "v")]
    assert [p[0] for p in props] == [1, 2]
    m = ev.detection_metrics(props, gts, ["v"], 2, [0.5])
    assert m["official_mAP_action@0.5"] == 100 and m["voc_mAP_a@0.5"] == 100
    swapped = [(3 - c, s_, e, conf, v) for c, s_, e, conf, v in props]  # labels off by a class
    assert ev.detection_metrics(swapped, gts, ["v"], 2, [0.5])["voc_mAP_a@0.5"] == 0


def test_official_tiou_is_continuous_and_signed():
    assert ev.official_tiou(P(1, 0, 10), P(1, 5, 15)) == pytest.approx(5 / 15)
    assert ev.official_tiou(P(1, 0, 10), P(1, 20, 30)) == pytest.approx(-10 / 30)  # disjoint: < 0
    assert ev.official_tiou(P(1, 0, 10), P(2, 0, 10)) == 0.0                       # other label
    assert ev.official_tiou(P(1, 0, 10), P(1, 0, 10, video="w")) == 0.0             # other video
    assert ev.official_tiou(P(1, 3, 3), P(1, 3, 3)) == 0.0                          # official: 0/0


def test_voc_iou_uses_inclusive_frames():
    assert ev.voc_iou(P(1, 0, 10), P(1, 5, 15)) == pytest.approx(6 / 16)  # inter 10-5+1, lens 11
    assert ev.voc_iou(P(1, 0, 10), P(1, 10, 20)) == pytest.approx(1 / 21)  # touching: 1 frame
    assert ev.voc_iou(P(1, 0, 10), P(1, 12, 20)) == 0.0


# GT g0 [0,10), g1 [20,30); p1 hits g0 (conf .9), p2 hits nothing (.8), p3 hits g1 (.7).
GT2 = [P(1, 0, 10), P(1, 20, 30)]
PROPS3 = [P(1, 0, 10, 0.9), P(1, 40, 50, 0.8), P(1, 20, 30, 0.7)]


def test_official_ap_ascending_sweep_skips_precision_after_unmatched_removal():
    # Ascending sweep: start {p1,p2,p3}: P=2/3, R=1, old_p=2/3.
    # drop p3 (hit g1): {p1,p2} P=1/2 R=1/2 -> old_p stays 2/3, area += 2/3 * 1/2.
    # drop p2 (unmatched): only the proposal count changes, precision NOT re-evaluated.
    # drop p1: empty set -> (0, 0), area += 2/3 * 1/2.  Total 2/3 (VOC would give 5/6).
    assert ev.official_ap(PROPS3, GT2, 0.5) == pytest.approx(2 / 3)
    # VOC: TP, FP, TP -> precision 1, 1/2, 2/3 -> monotone 1, 2/3, 2/3 -> 1/2 * 1 + 1/2 * 2/3.
    m, aps = ev.voc_map(PROPS3, GT2, 0.5)
    assert m == pytest.approx(5 / 6) and aps == {1: pytest.approx(5 / 6)}


def test_official_matching_is_not_exclusive():
    # g0 [0,10), g1 [5,15) overlap. p1 = g0 exactly; p2 [1,11) has tIoU 9/11 with g0 and 6/14 with
    # g1: official assigns p2 to g0 as well (g1 never hit).
    gts = [P(1, 0, 10), P(1, 5, 15)]
    props = [P(1, 0, 10, 0.9), P(1, 1, 11, 0.8)]
    assign, count, pos = ev.official_match(sorted(props, key=lambda p: p[3]), gts, 0.3)
    assert assign == [0, 0] and count == [2, 0] and pos == 1
    # sweep: {p1,p2} P=1/2 R=1/2; drop p2: g0 still hit, P=1 R=1/2 (+0); drop p1: +1 * 1/2.
    assert ev.official_ap(props, gts, 0.3) == pytest.approx(0.5)
    # VOC: p2's best GT is g0 (IoU 10/12 vs 7/15), already taken by p1 -> a false positive
    assert ev.voc_map(props, gts, 0.3)[0] == pytest.approx(0.5)
    # duplicates are false positives for VOC: the same proposal twice halves the precision step
    dup = [P(1, 0, 10, 0.9), P(1, 0, 10, 0.8)]
    assert ev.voc_map(dup, [P(1, 0, 10)], 0.5)[0] == pytest.approx(1.0)
    assert ev.official_ap(dup, [P(1, 0, 10)], 0.5) == pytest.approx(1.0)


def test_voc_map_a_takes_the_best_gt_among_all_not_the_best_unmatched():
    """Simple-Skeleton-Detection compute_metric_class: a detection's GT is the highest-IoU one of its
    class and video among ALL of them; when that one is taken the detection is a false positive,
    even if another GT it overlaps enough is still free."""
    # Inclusive frames (eval_detect_mAP's iou_ratio). GT a = [0, 19], b = [12, 31] (class 2, video v).
    # d1 [0, 19] conf .9: IoU(a) 1 -> TP, takes a.
    # d2 [4, 23] conf .8: IoU(a) = 16 / 24 = .667, IoU(b) = 12 / 28 = .429; best is a (taken) -> FP.
    #   (the best-still-unmatched rule would give d2 to b: a TP)
    # d3 [12, 31] conf .7: IoU(b) 1 -> TP.  At tIoU 0.4: TP FP TP, 2 GT.
    # Official: recall .5 .5 1, precision 1 .5 .667 -> envelope 1, .667, .667 ->
    #   AP = .5 * 1 + .5 * 2/3 = 5/6.   Best-unmatched rule: d2 TP, d3's best b taken -> TP TP FP ->
    #   recall .5 1 1, precision 1 1 .667 -> AP = 1.
    gts = [P(2, 0, 19), P(2, 12, 31)]
    dets = [P(2, 0, 19, 0.9), P(2, 4, 23, 0.8), P(2, 12, 31, 0.7)]
    m, aps = ev.voc_map(dets, gts, 0.4)
    assert m == pytest.approx(5 / 6) and aps == {2: pytest.approx(5 / 6)}
    assert ev.voc_map(dets, gts, 0.4)[0] == _voc_map_reference(dets, gts, 0.4)
    # equal confidences keep their input order (a stable sort): d2 before d1 -> d2 takes a, d1 FP
    tie = [P(2, 4, 23, 0.9), P(2, 0, 19, 0.9)]
    # TP FP: recall .5 .5, precision 1 .5 -> AP .5
    assert ev.voc_map(tie, gts, 0.4)[0] == pytest.approx(0.5)
    # classes absent from the ground truth are ignored; the mean runs over the classes present
    assert ev.voc_map(dets + [P(7, 0, 19, 0.99)], gts, 0.4)[0] == pytest.approx(5 / 6)


def _voc_map_reference(dets, gts, theta):
    """The official rule written out plainly, independently of evaluate.py: per class, detections by
    decreasing score; IoU on inclusive frames against every same-class GT of the video; the first
    maximum is the candidate; TP iff IoU >= theta and the candidate is free; AP = sum over recall
    steps of the best precision at that recall or beyond."""
    aps = []
    for c in sorted({g[0] for g in gts}):
        g_c = [g for g in gts if g[0] == c]
        d_c = sorted([d for d in dets if d[0] == c], key=lambda d: -d[3])
        free = [True] * len(g_c)
        flags = []
        for d in d_c:
            ious = []
            for g in g_c:
                inter = min(d[2], g[2]) - max(d[1], g[1]) + 1
                union = (d[2] - d[1] + 1) + (g[2] - g[1] + 1) - inter
                ious.append(inter / union if inter > 0 and g[4] == d[4] else 0.0)
            j = int(np.argmax(ious)) if ious else -1
            hit = j >= 0 and ious[j] > 0 and ious[j] >= theta and free[j]
            if hit:
                free[j] = False
            flags.append(hit)
        tp = np.cumsum(flags)
        rec = tp / len(g_c) if len(d_c) else np.zeros(0)
        prec = tp / np.arange(1, len(d_c) + 1) if len(d_c) else np.zeros(0)
        ap, prev_r = 0.0, 0.0
        for i in range(len(d_c)):
            if rec[i] > prev_r:
                ap += (rec[i] - prev_r) * prec[i:].max()
                prev_r = rec[i]
        aps.append(ap)
    return float(np.mean(aps)) if aps else 0.0


@pytest.mark.parametrize("seed", range(8))
def test_voc_map_a_equals_a_plain_implementation_of_the_official_rule(seed):
    """Random overlapping GT and detections over several videos and classes (distinct scores: no
    ties), every threshold: the same value as the plain reference."""
    rng = np.random.RandomState(seed)
    gts, dets = [], []
    for v in range(4):
        for _ in range(rng.randint(2, 8)):
            s = int(rng.randint(0, 200))
            gts.append((int(rng.randint(1, 4)), s, s + int(rng.randint(5, 60)), 1.0, f"v{v}"))
    scores = rng.permutation(1000)[:60] / 1000.0
    for k in range(60):
        g = gts[rng.randint(len(gts))]
        jitter = rng.randint(-15, 16, size=2)
        s, e = g[1] + int(jitter[0]), g[2] + int(jitter[1])
        label = g[0] if rng.uniform() < 0.8 else int(rng.randint(1, 4))
        dets.append((label, min(s, e), max(s, e), float(scores[k]), g[4]))
    for theta in (0.1, 0.3, 0.5, 0.7):
        assert ev.voc_map(dets, gts, theta)[0] == pytest.approx(_voc_map_reference(dets, gts, theta),
                                                               abs=1e-12)


def test_official_ap_tie_goes_to_later_gt_and_theta_is_inclusive():
    gts = [P(1, 0, 10), P(1, 0, 10)]
    assign, count, _ = ev.official_match([P(1, 0, 10, 0.5)], gts, 1.0)  # tIoU == theta counts
    assert assign == [1] and count == [0, 1]


def test_official_map_divides_by_all_classes_and_counts_videos_without_proposals():
    gts = [P(1, 0, 10, video="a"), P(2, 0, 10, video="b")]
    props = [P(1, 0, 10, 0.9, video="a")]  # video b has ground truth but no proposal
    o = ev.official_metrics(props, gts, ["a", "b", "c"], num_classes=3, theta=0.5)
    assert o["mAP_action"] == pytest.approx(1 / 3)   # class 1: AP 1; classes 2, 3: 0; divisor 3
    assert o["mAP_video"] == pytest.approx(1 / 3)    # a: 1, b: 0, c (nothing at all): 0
    assert o["ap_pooled"] == pytest.approx(0.5)      # one proposal, recall 1/2 at precision 1
    assert o["f1"] == pytest.approx(2 * 1 * 0.5 / 1.5)
    # VOC mAP_a: mean over the classes present in the ground truth only (1 and 2)
    assert ev.voc_map(props, gts, 0.5)[0] == pytest.approx(0.5)
    m = ev.detection_metrics(props, gts, ["a", "b", "c"], 3, [0.1, 0.5])
    assert m["official_mAP_action@0.5"] == pytest.approx(100 / 3)
    assert m["voc_mAP_a@0.1"] == pytest.approx(50.0) and "official_2DAP" in m


def test_get_segments_smoothing_threshold_and_last_frame_quirk():
    prob = np.zeros((10, 3))
    prob[:, 0] = 1.0
    prob[3:6] = [0.0, 1.0, 0.0]  # class 1 on frames 3, 4, 5
    # half width 2: frame t averages [max(t-2, 0), min(t+2, 9)) -> foreground
    # t=2: 1/4, t=3: 2/4, t=4: 3/4, t=5: 3/4, t=6: 2/4, t=7: 1/4 -> active (>= 0.4) frames 3..6
    sm = ev.smooth_probs(prob, 2)
    assert sm[:, 1] == pytest.approx([0, 0, .25, .5, .75, .75, .5, .25, 0, 0])
    assert ev.get_segments(prob, 2, 0.4) == [(1, 3, 7, pytest.approx(0.625))]
    assert ev.get_segments(prob, 2, 0.55) == [(1, 4, 6, pytest.approx(0.75))]
    last = np.zeros((10, 3))
    last[:, 0] = 1.0
    last[9] = [0.0, 0.0, 1.0]  # only the last frame: it never enters any window
    assert ev.get_segments(last, 2, 0.1) == []
    # two classes in one run: the class with the larger mean wins, confidence = its mean
    mix = np.zeros((6, 3))
    mix[:, :] = [0.0, 0.7, 0.3]
    segs = ev.get_segments(mix, 1, 0.4)
    assert segs == [(1, 0, 6, pytest.approx(0.7))]


# ------------------------------------------------------------------------------ sampling
def test_semi_subsets_sizes_and_determinism():
    labels = np.zeros(40091, np.int64)  # NTU-60 xsub train size
    assert len(ev.select_subset(labels, 0.01, 0, False)) == 400
    assert len(ev.select_subset(labels, 0.1, 0, False)) == 4009
    labels = np.repeat(np.arange(5), [10, 20, 30, 3, 40])
    a, b = ev.select_subset(labels, 0.1, 7, False), ev.select_subset(labels, 0.1, 7, False)
    assert np.array_equal(a, b) and not np.array_equal(a, ev.select_subset(labels, 0.1, 8, False))
    assert np.all(np.diff(a) > 0)
    bal = ev.select_subset(labels, 0.1, 0, True)
    counts = np.bincount(labels[bal], minlength=5)
    assert counts.tolist() == [1, 2, 3, 1, 4]  # round(0.1 n_c), at least 1
    assert np.array_equal(bal, ev.select_subset(labels, 0.1, 0, True))


def test_fewshot_episodes():
    labels = np.repeat(np.arange(12), 25)
    novel = [2, 3, 5, 7, 8, 9, 11]
    cls, sup, qry = ev.sample_episodes(labels, novel, 5, 5, 15, 40, seed=3)
    assert cls.shape == (40, 5) and sup.shape == (40, 5, 5) and qry.shape == (40, 5, 15)
    for e in range(40):
        assert len(set(cls[e])) == 5 and set(cls[e]) <= set(novel)
        for w in range(5):
            assert np.all(labels[sup[e, w]] == cls[e, w]) and np.all(labels[qry[e, w]] == cls[e, w])
            assert len(set(sup[e, w]) | set(qry[e, w])) == 20  # without replacement
    again = ev.sample_episodes(labels, novel, 5, 5, 15, 40, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip((cls, sup, qry), again))
    with pytest.raises(ev.UserError):
        ev.sample_episodes(labels, novel[:4], 5, 5, 15, 10, seed=0)


def test_fewshot_classifier_batched_equals_single_and_is_accurate():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g) * 3
    ys = torch.arange(5).repeat_interleave(2)[None].expand(3, -1)
    xs = centers[ys] + 0.3 * torch.randn(3, 10, 16, generator=g)
    yq = torch.arange(5).repeat_interleave(4)[None].expand(3, -1)
    xq = centers[yq] + 0.3 * torch.randn(3, 20, 16, generator=g)
    xs, xq = torch.nn.functional.normalize(xs, dim=-1), torch.nn.functional.normalize(xq, dim=-1)
    logits = ev.logistic_regression_episodes(xs, ys, xq)
    assert (logits.argmax(-1) == yq).float().mean() > 0.95
    single = ev.logistic_regression_episodes(xs[1:2], ys[1:2], xq[1:2])
    assert torch.allclose(single, logits[1:2], atol=1e-4)
    # the Gram-matrix solution equals the primal one (sklearn's objective, W in R^{D x way})
    noisy = xs + 0.5 * torch.randn(xs.shape, generator=g)
    W = torch.zeros(3, 16, 5, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, 1, 5, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=300, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy((noisy.double() @ W + b).reshape(-1, 5),
                                                 ys.reshape(-1), reduction="sum") + 0.5 * (W ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    xq2 = xq + 0.5 * torch.randn(xq.shape, generator=g)
    assert torch.allclose(ev.logistic_regression_episodes(noisy, ys, xq2),
                          xq2.double() @ W + b, atol=1e-4)
    feats = torch.cat([xs.reshape(-1, 16), xq.reshape(-1, 16)])
    m = ev.fewshot_eval(feats, _episodes_for(3), [1, 2], 1.0, True)
    assert set(m) == {"5way_1shot_acc", "5way_1shot_ci95", "5way_2shot_acc", "5way_2shot_ci95"}
    # separable classes: (nearly) every query right; the labels of the episode files line up
    assert m["5way_2shot_acc"] > 95 and m["5way_1shot_acc"] > 90
    # CI = 1.96 std / sqrt(E) over the per-episode accuracies: a query set whose episodes score
    # 100, 100 and 0 (episode 3's queries are another class's features)
    eps = _episodes_for(3)
    qry = eps[2].copy()
    qry[2] = np.roll(qry[2], 1, axis=0)
    m2 = ev.fewshot_eval(feats, (eps[0], eps[1], qry), [2], 1.0, True)
    accs = np.array([100.0, 100.0, 0.0])
    assert m2["5way_2shot_acc"] == pytest.approx(accs.mean(), abs=2)
    assert m2["5way_2shot_ci95"] == pytest.approx(1.96 * accs.std() / np.sqrt(3), abs=2)


def _episodes_for(E):
    # support = the first 30 rows (episode-major, way, 2 shots), queries after
    sup = np.arange(30).reshape(3, 5, 2)[:E]
    qry = (30 + np.arange(60)).reshape(3, 5, 4)[:E]
    return np.zeros((E, 5), np.int64), sup, qry


def test_occlusion_masks_fixed_and_in_range():
    nf = np.array([40, 64, 100, 120] * 25)
    m = ev.occlusion_masks(nf, seed=0)
    m2 = ev.occlusion_masks(nf, seed=0)
    assert all(np.array_equal(m[k], m2[k]) for k in m)
    assert m["ratio"].min() >= 0.3 and m["ratio"].max() <= 0.7
    assert set(m["parts"].sum(1)) <= {2, 3, 4}
    assert np.all(m["t_start"] >= 0) and np.all(m["t_start"] + m["t_len"] <= nf)
    assert np.all(np.abs(m["t_len"] / nf - m["ratio"]) <= 0.5 / nf + 1e-9)
    x = torch.ones(4, 3, 120, 25, 2)
    fns = ev.occluders(m, [10])
    y = fns["frames_k10"](x, None, np.arange(4))
    assert y[:, :, 45:55].abs().sum() == 0 and y[:, :, :45].min() == 1 and y[:, :, 55:].min() == 1
    y = fns["part_two_hands"](x, None, np.arange(4))
    assert y[:, :, :, [21, 22, 23, 24]].abs().sum() == 0 and y[:, :, :, :21].min() == 1
    y = fns["random_temporal"](x, None, np.arange(4))
    for i in range(4):
        s, L = m["t_start"][i], m["t_len"][i]
        assert y[i, :, s:s + L].abs().sum() == 0 and y[i].sum() == 3 * 50 * (120 - L)
    idx = np.array([7, 3, 12])  # rows of a batch are these samples: their own part masks apply
    y = fns["random_spatial"](x[:3], None, idx)
    parts = list(common.BODY_PARTS.values())
    for row, i in enumerate(idx):
        hidden = sorted(j for p in np.flatnonzero(m["parts"][i]) for j in parts[p])
        zero = [j for j in range(25) if y[row, :, :, j].abs().sum() == 0]
        assert zero == hidden and len(hidden) >= 2 and y[row, :, :, [j for j in range(25)
                                                                     if j not in hidden]].min() == 1


def test_prenormalize_matches_data_prep_without_padding():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 10, 25, 2, generator=g) + 2.0  # no empty frame: padding is a no-op
    x[1, :, :, :, 1] = 0                                  # a sample without second body
    ref = data_prep.pre_normalization(x.permute(0, 4, 2, 3, 1).numpy().copy(), z_align=True)
    assert torch.allclose(ev.prenormalize(x), torch.from_numpy(ref).permute(0, 4, 2, 3, 1),
                          atol=1e-5)
    ref = data_prep.pre_normalization(x.permute(0, 4, 2, 3, 1).numpy().copy(), z_align=False)
    assert torch.allclose(ev.prenormalize(x, z_align=False),
                          torch.from_numpy(ref).permute(0, 4, 2, 3, 1), atol=1e-5)
    # frames keep their positions (no compaction around an empty leading frame)
    x[0, :, 0] = 0
    y = ev.prenormalize(x)
    assert y[0, :, 0].abs().sum() == 0 and y[0, :, 1:].abs().sum() > 0


def test_prenormalize_is_rotation_invariant_for_an_upright_skeleton():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 8, 25, 2, generator=g)
    x[:, :, 0, 0, 0] = torch.tensor([0.0, -0.3, 0.0])   # spine base below spine mid ...
    x[:, :, 0, 1, 0] = torch.tensor([0.0, 0.0, 0.0])
    x[:, :, 0, 4, 0] = torch.tensor([0.0, 0.2, 0.2])    # ... shoulders perpendicular to the spine
    x[:, :, 0, 8, 0] = torch.tensor([0.0, 0.2, -0.2])
    x = x + torch.tensor([0.3, 0.1, 3.0]).view(1, 3, 1, 1, 1)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g))
    q = q * torch.sign(torch.det(q))
    a = ev.prenormalize(x)
    b = ev.prenormalize(torch.einsum("ij,njtvm->nitvm", q, x))
    assert torch.allclose(a, b, atol=1e-4)
    assert a[:, :, :, 1, 0].abs().max() < 1e-5                      # spine mid at the origin
    spine = a[0, :, 0, 1, 0] - a[0, :, 0, 0, 0]
    assert torch.allclose(spine / spine.norm(), torch.tensor([0.0, 0.0, 1.0]), atol=1e-5)
    sh = a[0, :, 0, 8, 0] - a[0, :, 0, 4, 0]
    assert torch.allclose(sh / sh.norm(), torch.tensor([1.0, 0.0, 0.0]), atol=1e-5)


def test_knn_exact_on_toy_features():
    ftr = torch.tensor([[1.0, 0], [0, 1], [0.9, 0.1], [0.1, 0.9]])
    ytr = torch.tensor([0, 1, 0, 1])
    fte = torch.tensor([[2.0, 0.1], [0.2, 3]])
    m = ev.knn_eval(ftr, ytr, fte, torch.tensor([0, 1]), [1, 3], 0.07, 2)
    assert m == {"k1_top1": 100.0, "k3_weighted_top1": 100.0}
    m = ev.knn_eval(ftr, ytr, fte, torch.tensor([1, 1]), [1], 0.07, 2)
    assert m == {"k1_top1": 50.0}


# ------------------------------------------------------------------------------ end to end
ROOT = Path(__file__).resolve().parents[1]
# The smallest configs of the four trainers (1 epoch), as in their own tests.
TRAIN = {
    "usdrl": ["--hidden", "16", "--proj_dim", "32", "--proj_inst_dim", "48", "--window", "16",
              "--batch_size", "8"],
    "scd_net": ["--gcn_channels", "8", "16", "8", "--hidden", "32", "--heads", "2", "--ffn", "32",
                "--window", "16", "--cubes", "4", "--masked_cubes", "2", "--queue_size", "24",
                "--proj_dim", "16", "--batch_size", "8", "--lr_steps", "1"],
    "mcc": ["--base_width", "4", "--clip_len", "8", "--batch_size", "4", "--queue_size", "16",
            "--proj_dim", "8", "--window", "16", "--lr_steps", "1", "--no_data_on_device"],
    "pcm3pp": ["--hidden", "16", "--prompt_dim", "8", "--dec_dim", "16", "--queue_size", "100",
               "--batch_size", "60", "--lr_steps", "5", "--post_distill_epochs", "0"],
}
METHODS = list(TRAIN)  # every method file; a missing one fails its tests instead of being skipped
TASKS = ["linear", "knn", "semi", "finetune", "transfer", "detection", "fewshot", "occlusion"]
EVAL = ["--epochs", "1", "--batch_size", "32", "--eval_batch", "64",
        "--seeds", "0", "1", "--ratios", "0.1", "--ratio", "0.05", "--shots", "1", "2",
        "--n_query", "2", "--episodes", "20", "--det_windows", "2", "--occ_k", "20"]
# Each method also exercises one option of its own.
EXTRA = {"usdrl": ["--det_protocol", "dense"], "scd_net": ["--balanced", "--det_protocol", "dense"],
         "mcc": ["--baseline", "random"], "pcm3pp": ["--no_cache"]}


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _parallel(cmds, timeout=600):
    """Run `python <args>` commands concurrently (the CI machine has 2 cores); -> CompletedProcess."""
    procs = [subprocess.Popen([sys.executable, *map(str, c)], cwd=ROOT, env=_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in cmds]
    out = []
    for c, p in zip(cmds, procs):
        so, se = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(c, p.returncode, so, se))
    return out


@pytest.fixture(scope="session")
def eval_data(tiny_data, tiny_data_ext, tmp_path_factory):
    """One data_dir with the tiny synthetic, synthetic_ext and untrimmed sets (symlinks)."""
    d = tmp_path_factory.mktemp("eval_data")
    for src, name in ((tiny_data, "synthetic"), (tiny_data, "synthetic_untrimmed"),
                      (tiny_data_ext, "synthetic_ext")):
        (d / name).symlink_to(Path(src) / name)
    return str(d)


@pytest.fixture(scope="session")
def ckpts(eval_data, tmp_path_factory):
    """A 1-epoch tiny checkpoint of every method file present, trained by the method's own script."""
    out = tmp_path_factory.mktemp("ckpts")
    cmds = [[f"{m}.py", "--dataset", "synthetic", "--data_dir", eval_data, "--epochs", "1",
             "--out_dir", out / m, "--log_every", "100", *TRAIN[m]] for m in METHODS]
    for c, p in zip(cmds, _parallel(cmds)):
        assert p.returncode == 0, f"{c[0]} failed:\n{p.stderr[-3000:]}"
    return {m: out / m / "last.pt" for m in METHODS}


def tree_hash(folder) -> str:
    """Names, sizes, modification times and contents of every file under `folder` (symlinks
    followed): any file written, replaced, added or removed changes it."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder, followlinks=True)):
        dirs.sort()
        for name in sorted(files):
            f = Path(root) / name
            st = f.stat()
            h.update(f"{f.relative_to(folder)}|{st.st_size}|{st.st_mtime_ns}|".encode())
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def runs(ckpts, eval_data):
    """Every task of every method's checkpoint, one evaluate.py process per method, plus an
    ensemble; the data folder's hash before and after all of them."""
    before = tree_hash(eval_data)
    cmds = [["evaluate.py", "--ckpt", ckpts[m], "--task", *TASKS, "--data_dir", eval_data, *EVAL,
             *EXTRA[m]] for m in METHODS]
    cmds.append(["evaluate.py", "--ckpt", ckpts[METHODS[0]], ckpts[METHODS[0]], "--task",
                 "ensemble", "--data_dir", eval_data, "--epochs", "1", "--results",
                 Path(ckpts[METHODS[0]]).parent.parent / "ensemble_results.jsonl"])
    procs = _parallel(cmds)
    return dict(zip(METHODS + ["ensemble"], procs), hashes=(before, tree_hash(eval_data)))


def _records(proc):
    """stdout holds JSON result lines only (messages and progress go to stderr)."""
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_every_task_leaves_the_data_folder_alone_and_prints_only_json(runs):
    before, after = runs["hashes"]
    assert before == after
    for name in METHODS + ["ensemble"]:
        proc = runs[name]
        assert proc.returncode == 0, proc.stderr[-4000:]
        recs = _records(proc)  # every line parses
        assert [r["task"] for r in recs] == (TASKS if name != "ensemble" else ["ensemble"])
        # printed numbers have at most 2 decimals
        for r in recs:
            floats = re.findall(r"-?\d+\.\d+(?:e-?\d+)?", json.dumps(r["metrics"]))
            assert all(len(f.split(".")[1]) <= 2 for f in floats if "e" not in f), name


@pytest.mark.parametrize("method", METHODS)
def test_every_task_end_to_end(method, runs, ckpts, eval_data):
    proc = runs[method]
    assert proc.returncode == 0, proc.stderr[-4000:]
    recs = {r["task"]: r for r in _records(proc)}
    assert list(recs) == TASKS
    for r in recs.values():
        assert r["method"] == method and r["ckpt"] == [str(ckpts[method])]
    lin = recs["linear"]["metrics"]
    assert 0 <= lin["top1_final"] <= 100 and lin["top1_best"] >= lin["top1_final"]
    assert lin["top5_final"] >= lin["top1_final"] and lin["n_train"] == 120
    assert lin["features_cached"] == (method in ("usdrl", "scd_net"))  # deterministic train crop
    assert set(recs["knn"]["metrics"]) >= {"k1_top1", "k10_weighted_top1", "k20_weighted_top1"}
    assert lin["top5_best"] >= lin["top5_final"] and lin["top5_best"] >= lin["top5_at_best_top1"]
    semi = recs["semi"]["metrics"]
    assert len(semi["ratio_0.05"]["runs"]) == 2 and semi["ratio_0.05"]["n_runs"] == 2
    assert semi["ratio_0.05"]["top1_final_std"] is not None
    # the headline is the first ratio's (--ratios before --ratio), and says so
    assert semi["headline_ratio"] == 0.1
    assert semi["top1_final_mean"] == semi["ratio_0.1"]["top1_final_mean"]
    assert semi["scheme"] == ("balanced" if method == "scd_net" else "global")
    # global: int(120 r); balanced: round(6 r) per class, at least 1 -> 20 for both ratios
    n = {"ratio_0.1": 12, "ratio_0.05": 6} if method != "scd_net" else \
        {"ratio_0.1": 20, "ratio_0.05": 20}
    assert {k: semi[k]["n_labelled"] for k in n} == n
    subset = Path(semi["subset_dir"]) / f"synthetic_xsub_{semi['scheme']}_0.1_seed1.txt"
    assert len(np.loadtxt(subset, dtype=int)) == n["ratio_0.1"]
    assert recs["finetune"]["metrics"]["n_labelled"] == 120
    assert recs["transfer"]["dataset"] == "synthetic_ext"
    assert recs["transfer"]["metrics"]["n_labelled"] == 180
    det = recs["detection"]["metrics"]
    for th in (0.1, 0.3, 0.5, 0.7):
        for k in ("official_mAP_action", "official_mAP_video", "voc_mAP_a"):
            assert 0 <= det["final"][f"{k}@{th:g}"] <= 100
            assert 0 <= det["best"][f"{k}@{th:g}"] <= 100
    assert det["final"]["epoch"] == 1 and det["best"]["selected_by"] == "voc_mAP_a@0.5 on the test set"
    assert det["mode"] == ("finetune" if method == "usdrl" else "frozen")  # each paper's table
    assert det["mode_from"].startswith("default of protocol")
    assert det["det_protocol"] == ("dense" if method in ("usdrl", "scd_net") else "ssd")
    assert Path(det["proposal_dir"]).name == f"proposals_synthetic_untrimmed_{det['det_protocol']}_" \
                                             f"{det['mode']}"
    videos = (Path(eval_data) / "synthetic_untrimmed/xsub/val_video_name.txt").read_text().split()
    files = sorted(Path(det["proposal_dir"]).glob("*.txt"))
    assert [f.stem for f in files] == sorted(videos)  # one file per test video, even if empty
    for f in files:
        for line in f.read_text().splitlines():
            lab, s, e, conf = line.split(",")
            assert 1 <= int(lab) <= 20 and int(s) < int(e) and 0 <= float(conf) <= 1
    fs = recs["fewshot"]["metrics"]
    assert recs["fewshot"]["dataset"] == "synthetic_ext" and fs["novel_classes"] == list(range(20, 30))
    assert {"5way_1shot_acc", "5way_2shot_acc", "5way_1shot_ci95"} <= set(fs)
    ep = np.load(fs["episode_file"])
    assert ep["support"].shape == (20, 5, 2) and np.all(ep["classes"] >= 20)
    occ = recs["occlusion"]["metrics"]
    assert {"clean_top1", "part_two_legs_top1", "frames_k20_top1", "random_spatial_top1",
            "random_temporal_top1"} <= set(occ)
    # the results file next to the checkpoint holds every record with its full config
    saved = [json.loads(l) for l in (ckpts[method].parent / "results.jsonl").read_text().splitlines()]
    assert [r["task"] for r in saved[-len(TASKS):]] == TASKS
    assert saved[-1]["config"]["protocol"]["epochs"] == 1
    assert saved[-1]["config"]["encoder_args"] == torch.load(ckpts[method], weights_only=True)["args"]
    if method == "mcc":  # --baseline random: the same protocol on a random encoder, side by side
        for r in recs.values():
            assert isinstance(r["pretraining_helps"], bool) and "baseline_random" in r
        assert Path(det["proposal_dir"] + "_random").is_dir()


def test_ensemble_and_cache_equivalence(ckpts, eval_data, tmp_path):
    ms = METHODS[:2]
    res = tmp_path / "r.jsonl"
    ev.main(["--ckpt", *(str(ckpts[m]) for m in ms), "--task", "ensemble", "--data_dir",
                   eval_data, "--epochs", "2", "--weights", "1", "0.5", "--results", str(res)])
    rec = json.loads(res.read_text().splitlines()[-1])
    assert [s["weight"] for s in rec["metrics"]["streams"]] == [1.0, 0.5]
    assert 0 <= rec["metrics"]["top1"] <= 100
    # the weights weight the streams' softmax scores: a weight of 0 leaves the other stream alone
    # (lr 0.5, 30 epochs: the tiny streams leave chance, with different accuracies)
    for keep, weights in ((0, ["1", "0"]), (1, ["0", "1"])):
        ev.main(["--ckpt", *(str(ckpts[m]) for m in ms), "--task", "ensemble", "--data_dir",
                 eval_data, "--epochs", "30", "--lr", "0.5", "--weights", *weights, "--results",
                 str(res)])
        m = json.loads(res.read_text().splitlines()[-1])["metrics"]
        assert m["streams"][0]["top1"] != m["streams"][1]["top1"]
        assert m["top1"] == m["streams"][keep]["top1"], weights
    # features cached once == re-encoded every epoch (deterministic crop): identical metrics
    base = ["--ckpt", str(ckpts[METHODS[0]]), "--task", "linear", "--data_dir", eval_data,
            "--epochs", "3", "--eval_every", "1", "--train_crop", "center:0.9", "--results", str(res)]
    ev.main(base)
    ev.main(base + ["--no_cache"])
    a, b = [json.loads(l)["metrics"] for l in res.read_text().splitlines()[-2:]]
    assert a["features_cached"] and not b["features_cached"]
    for k in ("top1_final", "top5_final", "top1_best", "best_epoch"):
        assert a[k] == b[k]


def test_detection_windows_take_the_modality_and_bad_untrimmed_files_fail(tiny_data, tmp_path):
    u = ev.load_untrimmed(tiny_data, "synthetic_untrimmed", "train")
    L = int(u.num_frame[0])
    joint = ev.gather_windows(u.data[0], [0, 5], 16, 1, L, True, "cpu")
    motion = ev.gather_windows(u.data[0], [0, 5], 16, 1, L, True, "cpu", "motion")
    assert torch.equal(motion, common.to_modality(joint, "motion")) and not torch.equal(motion, joint)
    import shutil
    src = Path(tiny_data) / "synthetic_untrimmed" / "xsub"
    bad = tmp_path / "synthetic_untrimmed" / "xsub"
    shutil.copytree(src, bad)
    gt = sorted((bad / "train_gt").iterdir())[0]
    gt.write_text(gt.read_text() + "3,x,40,1\n")
    with pytest.raises(common.UserError, match=rf"{gt.name}:\d+: expected label,start,end"):
        ev.load_untrimmed(tmp_path, "synthetic_untrimmed", "train")
    shutil.copy(src / "train_gt" / gt.name, gt)
    data = np.load(src / "train_data.npy")
    data[1, 3, 0, 0, 0] = np.nan
    np.save(bad / "train_data.npy", data)
    with pytest.raises(common.UserError, match="NaN or inf values .first in sample 1"):
        ev.load_untrimmed(tmp_path, "synthetic_untrimmed", "train")


def test_protocol_defaults_transfer_split_and_usdrl_pku2_crop():
    args = common.parse_args(ev.Args, ["--ckpt", "x.pt"])
    ld = ev.Loaded("x.pt", "usdrl", None, type("A", (), {"dataset": "ntu60", "split": "xview"})(),
                   {"dataset": "ntu60", "split": "xview"})
    assert ev.resolve_target(args, ld, "linear") == ("ntu60", "xview")
    assert ev.resolve_target(args, ld, "transfer") == ("pku2", "xsub")  # the papers' transfer
    assert ev.protocol(args, ld, "linear", "pku2", "xsub")["train_crop_parsed"] == ("center", 0.5)
    assert ev.protocol(args, ld, "linear", "ntu60", "xview")["train_crop_parsed"] == ("center", 1.0)
    assert args.dtype == "fp32"


# (lr, batch, epochs, milestones, train crop, test crop, eval_every, weight decay, nesterov) of the
# official evaluation scripts: USDRL scripts/recog.sh, SCD-Net's README and log, PCM3's linear and
# CMD's semi-supervised scripts (MCC: ST-GCN's recipe for fine-tuning, PCM3's linear protocol).
OFFICIAL_PROTOCOLS = {
    ("usdrl", "linear"):
        (0.006, 512, 160, [120, 140], ("center", 1.0), ("center", 1.0), 5, 0.0, False),
    ("scd_net", "linear"):
        (2.0, 1024, 80, [50, 70], ("center", 0.95), ("center", 0.95), 1, 0.0, False),
    ("pcm3pp", "linear"):
        (0.1, 1024, 100, [20, 50, 80], ("random", (0.5, 1.0)), ("center", 0.95), 5, 0.0, False),
    ("mcc", "linear"):
        (0.1, 1024, 100, [20, 50, 80], ("random", (0.5, 1.0)), ("center", 0.95), 5, 0.0, False),
    ("usdrl", "finetune"):
        (0.01, 64, 80, [50, 70], ("random", (0.5, 1.0)), ("center", 1.0), 5, 0.0, False),
    ("scd_net", "finetune"):
        (0.01, 64, 80, [50, 70], ("random", (0.5, 1.0)), ("center", 0.95), 5, 0.0, False),
    ("pcm3pp", "finetune"):
        (0.01, 64, 80, [50, 70], ("random", (0.5, 1.0)), ("center", 0.95), 5, 0.0, False),
    ("mcc", "finetune"):
        (0.1, 64, 80, [10, 50], ("random", (0.5, 1.0)), ("center", 0.95), 5, 1e-4, True),
}


@pytest.mark.parametrize("method,kind", sorted(OFFICIAL_PROTOCOLS))
def test_protocol_values_per_method(method, kind):
    args = common.parse_args(ev.Args, ["--ckpt", "x.pt"])
    ld = ev.Loaded("x.pt", method, None, None, {})
    p = ev.protocol(args, ld, kind, "ntu60", "xsub")
    got = (p["lr"], p["batch_size"], p["epochs"], list(p["milestones"]), p["train_crop_parsed"],
           p["test_crop_parsed"], p["eval_every"], p["weight_decay"], p["nesterov"])
    assert got == OFFICIAL_PROTOCOLS[method, kind] and p["momentum"] == 0.9
    assert ev.protocol(common.parse_args(ev.Args, ["--ckpt", "x.pt", "--lr", "0.5"]), ld, kind,
                       "ntu60", "xsub")["lr"] == 0.5  # a flag overrides the method's default


def test_detection_test_windows_cover_every_frame():
    """A hop larger than the window used to leave frames without any window: their probabilities
    stayed 0, so 1 - P(background) = 1 made them action frames (a false proposal)."""
    for L in (1, 7, 8, 9, 31, 100, 257):
        for W, d, hop in [(8, 1, 16), (8, 2, 16), (16, 1, 16), (16, 3, 5), (4, 1, 1), (32, 1, 64)]:
            starts = ev.window_starts(L, W, d, hop)
            covered = np.zeros(L, dtype=bool)
            for st in starts:
                covered[st:st + W * d] = True
            assert covered.all(), (L, W, d, hop)
            assert starts[0] == 0 and starts[-1] == max(L - W * d, 0)
            assert all(b - a <= min(hop, W) * d for a, b in zip(starts, starts[1:]))
    assert ev.window_starts(101, 8, 1, 4) == list(range(0, 93, 4)) + [93]
    assert ev.window_starts(100, 8, 1, 16) == list(range(0, 89, 8)) + [92]   # hop capped at 8


def test_detection_protocol_values():
    args = common.parse_args(ev.Args, ["--ckpt", "x.pt"])
    p = ev.detection_protocol(args)
    assert (p["lr"], p["batch_size"], p["epochs"], p["milestones"], p["nesterov"],
            p["weight_decay"], p["momentum"]) == (0.01, 64, 60, [40], True, 0.0, 0.9)
    assert p["eval_every"] == 5 and p["det_protocol"] == "ssd" and p["mode"] == "frozen"
    args.det_mode = "finetune"
    assert ev.detection_protocol(args)["milestones"] == [50]
    args.det_mode = None  # the default mode is each paper's: USDRL fine-tunes, PCM3++ is frozen
    for method, mode, steps in (("usdrl", "finetune", 32), ("pcm3pp", "frozen", 16),
                                ("scd_net", "frozen", 32), ("mcc", "frozen", 16)):
        ld = ev.Loaded("x.pt", method, None, type("A", (), {"window": 32})(), {})
        p = ev.detection_protocol(args, ld)
        assert (p["mode"], p["steps"]) == (mode, steps), method
        assert p["milestones"] == ([50] if mode == "finetune" else [40])


def test_detection_z_align_follows_the_training_data(tmp_path, tiny_data):
    def ld(data_dir, dataset="ntu60"):
        margs = type("A", (), {"data_dir": str(data_dir), "dataset": dataset, "split": "xsub"})()
        return ev.Loaded("x.pt", "usdrl", None, margs, {})
    folder = tmp_path / "NTU-RGB-D-60-AGCN"
    assert ev.training_z_align(ld(tmp_path)) is True  # unknown: on
    folder.mkdir()
    (folder / "prep_info.json").write_text(json.dumps({"dataset": "ntu60", "z_align": False}))
    assert ev.training_z_align(ld(tmp_path)) is False  # UmURL/USDRL data (--no_z_align)
    # producer -> consumer: data_prep records the choice where evaluate looks for it
    assert ev.training_z_align(ld(tiny_data, "synthetic")) is True
    data_prep.prepare_synthetic(tmp_path / "noz", "synthetic", size="tiny", quiet=True, z_align=False)
    assert ev.training_z_align(ld(tmp_path / "noz", "synthetic")) is False


def test_occluded_features_come_from_the_occluded_clips(ckpts, eval_data):
    """extract(occlude=fn) hands fn each raw batch with its sample indices and encodes what fn
    returns: an occlusion that is not applied would make every occluded top-1 equal the clean one."""
    ld = ev.load_ckpt(str(ckpts[METHODS[0]]))
    enc = ev.build_encoder(ld, False, 0, torch.device("cpu"))
    test = common.load_split(eval_data, "synthetic", "xsub", "val")
    args = common.parse_args(ev.Args, ["--ckpt", "x.pt", "--eval_batch", "7"])
    crop = ev.parse_crop("center:0.95", "test_crop")
    seen = []

    def hands_off(x, nf, idx):
        seen.append(np.asarray(idx).copy())
        y = x.clone()
        y[:, :, :, 12:20] = 0                                    # the legs, every frame
        return y
    idx = np.arange(5, 30)
    clean, y0 = ev.extract(enc, ld, test, crop, args, torch.device("cpu"), indices=idx)
    occl, y1 = ev.extract(enc, ld, test, crop, args, torch.device("cpu"), indices=idx,
                          occlude=hands_off)
    assert np.array_equal(np.concatenate(seen), idx) and [len(i) for i in seen] == [7, 7, 7, 4]
    assert torch.equal(y0, y1) and clean.shape == occl.shape
    assert (clean - occl).abs().amax(1).min() > 0               # every sample's feature moved
    again, _ = ev.extract(enc, ld, test, crop, args, torch.device("cpu"), indices=idx,
                          occlude=lambda x, nf, i: x)
    assert torch.equal(again, clean)                             # an identity occluder changes nothing


def test_semi_runs_restart_from_the_checkpoint_and_the_baseline_from_random(ckpts, eval_data,
                                                                           tmp_path, monkeypatch):
    ck = ckpts[METHODS[0]]
    pretrained = torch.load(ck, weights_only=True)["encoder"]
    starts, real = [], ev.finetune_eval

    def spy(enc, *a, **kw):
        starts.append({k: v.clone() for k, v in enc.state_dict().items()})
        return real(enc, *a, **kw)
    monkeypatch.setattr(ev, "finetune_eval", spy)
    ev.main(["--ckpt", str(ck), "--task", "semi", "--data_dir", eval_data, "--epochs", "1",
             "--batch_size", "32", "--eval_batch", "64", "--seeds", "0", "1", "--ratios", "0.1",
             "--baseline", "random", "--results", str(tmp_path / "r.jsonl")])
    assert len(starts) == 4  # 2 subsets x (pre-trained, random init)

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert same(starts[0], pretrained) and same(starts[1], pretrained)  # not the first fine-tune
    assert same(starts[2], starts[3]) and not same(starts[2], pretrained)


def test_bad_input_gives_one_clear_error(ckpts, eval_data, tmp_path):
    ck = torch.load(ckpts[METHODS[0]], weights_only=True)
    unknown = tmp_path / "unknown.pt"
    torch.save({**ck, "method": "resnet", "script": "resnet.py"}, unknown)
    with pytest.raises(common.UserError, match="written by 'resnet.py', not one of this repository's "
                                               "scripts .*; pass --script <path of resnet.py>"):
        ev.main(["--ckpt", str(unknown)])
    with pytest.raises(common.UserError, match="unknown task"):
        ev.main(["--ckpt", str(ckpts[METHODS[0]]), "--task", "lineer"])
    with pytest.raises(common.UserError, match="only accepted with --task ensemble"):
        ev.main(["--ckpt", str(unknown), str(unknown), "--task", "linear"])
    with pytest.raises(common.UserError, match="NTU-RGB-D-60-AGCN"):
        ev.main(["--ckpt", str(ckpts[METHODS[0]]), "--dataset", "ntu60", "--data_dir",
                       eval_data, "--results", str(tmp_path / "r.jsonl")])
    with pytest.raises(common.UserError, match="--test_crop 'random:0.5,1'"):
        ev.main(["--ckpt", str(unknown), "--test_crop", "random:0.5,1"])
    with pytest.raises(SystemExit):
        ev.main(["--ckpt", str(unknown), "--no_such_flag"])
    for flags, match in ((["--epochs", "0"], "--epochs 0: must be >= 1"),
                         (["--eval_every", "0"], "--eval_every 0: must be >= 1"),
                         (["--lr", "-1"], "--lr -1.0 must be > 0"),
                         (["--det_hop", "0"], "--det_hop 0: must be >= 1"),
                         (["--occ_ratio", "0.5"], "--occ_ratio .0.5.: expected two values")):
        with pytest.raises(common.UserError, match=match):  # before any data is read
            ev.main(["--ckpt", str(ckpts[METHODS[0]]), "--data_dir", str(tmp_path / "no_data"),
                     "--task", "knn", "semi", "--results", str(tmp_path / "r.jsonl"), *flags])
    assert not (tmp_path / "r.jsonl").exists()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpts[METHODS[0]].read_bytes()[:5000])
    p = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(truncated)], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0
    assert p.stderr.startswith("error: ") and "truncated" in p.stderr


def test_a_missing_synthetic_set_is_generated_beside_existing_ones(tmp_path, monkeypatch, capsys):
    """transfer / fewshot need synthetic_ext, detection synthetic_untrimmed: a missing set is
    written into its own new folder; the sets already there (here the tiny ones, which the
    default-size generation used to replace) stay byte for byte, and stdout stays empty."""
    monkeypatch.setitem(data_prep.SIZES, "default", data_prep.SIZES["tiny"])  # fast, meta differs
    data_prep.prepare_synthetic(tmp_path, "synthetic", size="tiny", quiet=True)
    before = {n: tree_hash(tmp_path / n) for n in ("synthetic", "synthetic_untrimmed")}
    capsys.readouterr()
    split = common.load_split(tmp_path, "synthetic_ext", "xsub", "train")
    assert split.num_classes == 30
    out = capsys.readouterr()
    assert out.out == "" and "generating the built-in synthetic_ext" in out.err
    assert {n: tree_hash(tmp_path / n) for n in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic", "synthetic_ext",
                                                           "synthetic_untrimmed"]
    # the untrimmed set alone missing: only it is written
    other = tmp_path / "other"
    other.mkdir()
    (other / "synthetic").symlink_to(tmp_path / "synthetic")
    u = ev.load_untrimmed(other, "synthetic_untrimmed", "val")
    assert len(u.videos) > 0 and tree_hash(tmp_path / "synthetic") == before["synthetic"]
    assert sorted(p.name for p in other.iterdir()) == ["synthetic", "synthetic_untrimmed"]
    # a folder that exists without the split is reported, never regenerated
    foreign = tmp_path / "foreign"
    (foreign / "synthetic_ext").mkdir(parents=True)
    (foreign / "synthetic_ext" / "notes.txt").write_text("mine")
    with pytest.raises(common.UserError, match="train_data_joint.npy: not found"):
        common.load_split(foreign, "synthetic_ext", "xsub", "train")
    assert [p.name for p in (foreign / "synthetic_ext").iterdir()] == ["notes.txt"]


def test_semi_with_one_seed_reports_one_run_and_no_std(ckpts, eval_data, tmp_path):
    res = tmp_path / "r.jsonl"
    ev.main(["--ckpt", str(ckpts["mcc"]), "--task", "semi", "--data_dir", eval_data, "--epochs", "1",
             "--batch_size", "32", "--eval_batch", "64", "--seeds", "0", "--results", str(res)])
    m = json.loads(res.read_text().splitlines()[-1])["metrics"]
    assert list(m)[:2] == ["ratio_0.05", "ratio_0.1"]  # MCC's paper: 5% and 10% labels
    for r in ("ratio_0.05", "ratio_0.1"):
        assert m[r]["n_runs"] == 1 and m[r]["top1_final_std"] is None
        assert m[r]["top1_best_std"] is None and m[r]["top1_final_mean"] == m[r]["runs"][0]
    assert m["headline_ratio"] == 0.05


def test_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "(default: None)" not in out and "(default: [])" not in out and "(default: )" not in out
    blocks = re.split(r"\n  (?=-)", out.split("options:")[1])
    assert len(blocks) > 50
    for b in blocks:  # one flag's text: its default named at most once
        assert " ".join(b.split()).count("default") <= 1, b
    assert "--det_protocol {ssd,dense}" in out and "--script SCRIPT" in out
    for k, v in ev.QUICK.items():  # the quick config is stated
        assert f"--{k} {v[0] if isinstance(v, list) else v}" in " ".join(out.split())


def test_quick_protocol_shortens_the_schedules_unless_given():
    quick = common.parse_args(ev.Args, ["--ckpt", "x.pt", "--quick"])
    for method, kind, epochs, milestones in (("usdrl", "finetune", 4, [2, 4]),
                                             ("mcc", "finetune", 4, [1, 2]),
                                             ("scd_net", "linear", 10, [6, 9]),
                                             ("pcm3pp", "linear", 10, [2, 5, 8])):
        ld = ev.Loaded("x.pt", method, None, None, {})
        p = ev.protocol(quick, ld, kind, "ntu60", "xsub")
        assert (p["epochs"], p["milestones"]) == (epochs, milestones), (method, kind)
        full = ev.protocol(common.parse_args(ev.Args, ["--ckpt", "x.pt"]), ld, kind, "ntu60", "xsub")
        assert full["epochs"] == OFFICIAL_PROTOCOLS[method, kind][2]
    p = ev.detection_protocol(quick)
    assert (p["epochs"], p["milestones"]) == (20, [13])
    given = common.parse_args(ev.Args, ["--ckpt", "x.pt", "--quick", "--epochs", "30"])
    ld = ev.Loaded("x.pt", "usdrl", None, None, {})
    assert ev.protocol(given, ld, "finetune", "ntu60", "xsub")["milestones"] == [50, 70]
