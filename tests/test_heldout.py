"""Held-out evaluation (grandmother/heldout.py): split, per-unit choice and AUC, bootstrap, trivial cues."""
from __future__ import annotations


import numpy as np
import pytest

from grandmother.analysis import heldout as H
from grandmother.errors import GrandmotherError
from grandmother.analysis.protocol import run_protocol


# ---------------------------------------------------------------- the split

def _example():
    """Positives in identities A (4 images), B (3), C (2), D (1); six negatives without identity."""
    groups = ["A"] * 4 + ["B"] * 3 + ["C"] * 2 + ["D"] + [None] * 6
    labels = np.array([1] * 10 + [0] * 6)
    perm = np.random.default_rng(5).permutation(len(labels))  # the split must not depend on image order
    return labels[perm], [groups[i] for i in perm]


@pytest.mark.parametrize("seed", range(5))
def test_split_hand_computed(seed):
    # Largest group first, each to the half furthest below its target share (ties: selection):
    # A (4) -> selection (0 vs 0), B (3) -> evaluation (4 vs 0 taken), C (2) -> evaluation (4 vs 3),
    # D (1) -> selection (4 vs 5). Negatives (groups of one) alternate: 3 and 3. Whatever the seed.
    labels, groups = _example()
    sp = H.split_halves(labels, groups, seed=seed)
    ids = lambda idx: sorted({groups[i] for i in idx if groups[i] is not None})
    assert ids(sp.selection) == ["A", "D"] and ids(sp.evaluation) == ["B", "C"]
    assert labels[sp.selection].sum() == 5 and labels[sp.evaluation].sum() == 5
    assert (labels[sp.selection] == 0).sum() == 3 and (labels[sp.evaluation] == 0).sum() == 3
    assert sorted(np.concatenate([sp.selection, sp.evaluation]).tolist()) == list(range(len(labels)))
    assert sp.n_groups == 4 + 6
    p = sp.protocol(labels)
    assert p["selection"] == {"images": 8, "positives": 5, "negatives": 3} and p["seed"] == seed


def test_split_fraction_and_mixed_group():
    # selection_fraction 0.25 of 8 singleton negatives and 8 singleton positives: 2 + 2 in selection.
    labels = np.array([1] * 8 + [0] * 8)
    sp = H.split_halves(labels, None, seed=3, selection_fraction=0.25)
    assert labels[sp.selection].sum() == 2 and len(sp.selection) == 4
    # A mixed group (2 positives, 1 negative) counts as positive and is never divided.
    labels = np.array([1, 1, 0, 1, 0, 1, 0, 0])
    groups = ["m", "m", "m", "p", None, "q", None, None]
    sp = H.split_halves(labels, groups, seed=0)
    halves = [set(sp.selection.tolist()), set(sp.evaluation.tolist())]
    assert any({0, 1, 2} <= h for h in halves)


def test_split_random_sets_keep_ratio_and_identities():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 6, 40)
    groups = [f"p{g}" for g, s in enumerate(sizes) for _ in range(s)] + [None] * 150
    labels = np.array([1] * int(sizes.sum()) + [0] * 150)
    a = H.split_halves(labels, groups, seed=1)
    assert np.array_equal(a.selection, H.split_halves(labels, groups, seed=1).selection)  # seeded
    assert not np.array_equal(a.selection, H.split_halves(labels, groups, seed=2).selection)
    sel_ids = {groups[i] for i in a.selection} - {None}
    ev_ids = {groups[i] for i in a.evaluation} - {None}
    assert not sel_ids & ev_ids and len(sel_ids | ev_ids) == 40
    npos = labels.sum()
    assert abs(labels[a.selection].sum() - npos / 2) <= sizes.max() / 2 + 1
    assert abs((labels[a.selection] == 0).sum() - 75) <= 1


def test_split_refuses_what_cannot_be_split():
    with pytest.raises(GrandmotherError, match="one class only"):
        H.split_halves([1, 1, 1, 0, 0, 0], ["x", "x", "x", None, None, None])  # one identity
    with pytest.raises(GrandmotherError, match="selection fraction"):
        H.split_halves([1, 0, 1, 0], None, selection_fraction=1.0)
    with pytest.raises(GrandmotherError, match="identities"):
        H.split_halves([1, 0, 1, 0], ["a"])


# ---------------------------------------------------------------- AUC and the per-unit choice

def test_unit_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    acts = rng.integers(0, 4, (30, 5)).astype(np.float32)  # many ties
    labels = rng.random(30) < 0.4
    pos, neg = acts[labels], acts[~labels]
    naive = [np.mean([(p > q) + 0.5 * (p == q) for p in pos[:, u] for q in neg[:, u]]) for u in range(5)]
    np.testing.assert_allclose(H.unit_auc(acts, labels), naive)
    assert H.unit_auc(np.array([1.0, 2, 3, 4]), [0, 0, 1, 1])[0] == 1.0
    assert H.unit_auc(np.array([4.0, 3, 2, 1]), [0, 0, 1, 1])[0] == 0.0


def _table_example():
    """Unit 0: selection [0, 1, 2, 3] labels [0, 0, 1, 1]; evaluation [1.5, 0.5, 1, 2.5] labels [1, 0, 1, 0].
    Unit 1 = -unit 0. Unit 2 is constant."""
    u0 = np.array([0, 1, 2, 3, 1.5, 0.5, 1, 2.5])
    labels = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    split = H.Split(np.arange(4), np.arange(4, 8), 0, 0.5, 8)
    return np.stack([u0, -u0, np.zeros(8)], 1), labels, split


def test_unit_table_hand_computed():
    acts, labels, split = _table_example()
    t = H.unit_table(acts, labels, split, direction="either")
    # Unit 0: thresholds 3k/19; k = 7 (21/19 = 1.105) is the first to separate the selection half.
    assert t.sign[0] == 1 and t.threshold[0] == pytest.approx(21 / 19) and t.selection_accuracy[0] == 1
    # On evaluation: predictions [T, F, F, T] against [T, F, T, F]: 2 of 4.
    assert t.evaluation_accuracy[0] == 0.5
    # Unit 1 (= -unit 0): "less response means positive" with threshold -21/19, the same predictions.
    assert t.sign[1] == -1 and t.threshold[1] == pytest.approx(-21 / 19) and t.selection_accuracy[1] == 1
    assert t.evaluation_accuracy[1] == 0.5
    # Constant unit: every threshold equal, all predicted negative.
    assert t.selection_accuracy[2] == 0.5 and t.evaluation_accuracy[2] == 0.5
    assert t.auc_selection[0] == 1 and t.auc_selection[1] == 0 and t.auc_selection[2] == 0.5
    # Evaluation AUC of unit 0: positives {1.5, 1}, negatives {0.5, 2.5}: pairs won 1.5>0.5, 1>0.5 -> 2/4.
    assert t.auc_evaluation[0] == 0.5
    assert t.best() == 0  # tie between units 0 and 1 goes to the first
    assert t.best_by_auc(1) == 1  # |AUC - 0.5| counts in direction "either"
    # direction "positive": unit 1 can only say "more means positive"; best is t = max (all negative): 0.5
    p = H.unit_table(acts, labels, split, direction="positive")
    assert p.sign[1] == 1 and p.selection_accuracy[1] == 0.5
    with pytest.raises(GrandmotherError, match="direction"):
        H.unit_table(acts, labels, split, direction="both")


def plain_unit_table(acts, labels, split, direction="either", n_thresholds=20):
    """The protocol written as plainly as possible, unit by unit and threshold by threshold (the oracle)."""
    acts, labels = np.asarray(acts, np.float64), np.asarray(labels).astype(bool)
    sel, ev = split.selection, split.evaluation
    rows = []
    for u in range(acts.shape[1]):
        a = acts[:, u]
        cands = []  # (selection accuracy, sign, threshold) in the order the protocol prefers among ties
        for sign in ((1, -1) if direction == "either" else (1,)):
            b = sign * a[sel]
            for t in np.linspace(b.min(), b.max(), n_thresholds):
                cands.append((np.mean((b > t) == labels[sel]), sign, sign * t))
        best = cands[0]
        for c in cands[1:]:
            if c[0] > best[0]:
                best = c
        acc, sign, thr = best
        pred = a[ev] > thr if sign > 0 else a[ev] < thr
        whole = [np.mean((a > t) == labels) for t in np.linspace(a.min(), a.max(), n_thresholds)]
        rows.append((acc, sign, thr, np.mean(pred == labels[ev]), max(whole)))
    return [np.array(c) for c in zip(*rows)]


@pytest.mark.parametrize("seed", range(4))
def test_unit_table_equals_the_plain_protocol(seed):
    """Random responses with ties (values on a coarse grid, so responses fall exactly on thresholds),
    constant units and a unit with one odd value: every choice and score the same as the plain loops."""
    rng = np.random.default_rng(seed)
    n, units = 90, 40
    labels = rng.random(n) < 0.35
    acts = rng.normal(size=(n, units)) + labels[:, None] * rng.normal(size=units)
    acts[:, :10] = np.round(acts[:, :10] * 2) / 2  # heavy ties
    acts[:, 10:13] = rng.integers(0, 20, (n, 3)) * (19 / 19)  # integers 0..19: responses equal to thresholds
    acts[:, 13] = 0.7  # constant
    acts[:, 14] = 0.0
    acts[:, 15] = 0.0
    acts[5, 15] = 1.0  # one odd value
    acts = acts.astype(np.float32)
    split = H.split_halves(labels, None, seed=seed)
    for direction in ("either", "positive"):
        table = H.unit_table(acts, labels, split, direction=direction)
        acc, sign, thr, ev_acc, same = plain_unit_table(acts, labels, split, direction)
        np.testing.assert_array_equal(table.selection_accuracy, acc)
        np.testing.assert_array_equal(table.sign, sign)
        np.testing.assert_array_equal(table.threshold, thr)
        np.testing.assert_array_equal(table.evaluation_accuracy, ev_acc)
        np.testing.assert_array_equal(table.same_set_accuracy, same)
        np.testing.assert_array_equal(table.auc_selection, H.unit_auc(acts[split.selection], labels[split.selection]))
        np.testing.assert_array_equal(table.auc_evaluation,
                                      H.unit_auc(acts[split.evaluation], labels[split.evaluation]))


def test_choice_never_looks_at_the_evaluation_half():
    rng = np.random.default_rng(1)
    acts = rng.normal(size=(60, 7))
    labels = rng.random(60) < 0.5
    split = H.split_halves(labels, None, seed=0)
    before = H.unit_table(acts, labels, split)
    changed = acts.copy()
    changed[split.evaluation] = rng.normal(size=(len(split.evaluation), 7)) * 100
    changed[split.evaluation, 3] = labels[split.evaluation] * 1000.0  # unit 3 perfect on evaluation only
    after = H.unit_table(changed, labels, split)
    assert after.best() == before.best()
    np.testing.assert_array_equal(after.threshold, before.threshold)
    np.testing.assert_array_equal(after.sign, before.sign)


def test_same_set_accuracy_is_the_paper_protocol():
    rng = np.random.default_rng(2)
    acts = rng.normal(size=(50, 9)).astype(np.float32)
    labels = rng.random(50) < 0.3
    ref = run_protocol(lambda idx: acts[idx], labels, 9, batch_size=16)["best_accuracy"]
    np.testing.assert_allclose(H.same_set_accuracy(acts, labels), ref)
    rec = H.evaluate(acts, labels, H.split_halves(labels, None, seed=0), n_boot=200)
    assert rec["same_set_accuracy"] == pytest.approx(ref.max())


# ---------------------------------------------------------------- bootstrap

def test_bootstrap_hand_computed():
    assert H.bootstrap_ci(np.ones(20), n_boot=100) == (1.0, 1.0)
    # Stratified by label, single images: every resample keeps 3 negatives and 2 positives, so "always
    # negative" is right 3 times in 5 in every resample; unstratified it is not.
    assert H.bootstrap_ci([1, 1, 1, 0, 0], n_boot=500, strata=[0, 0, 0, 1, 1]) == pytest.approx((0.6, 0.6))
    assert H.bootstrap_ci([1, 1, 1, 0, 0], n_boot=500) != pytest.approx((0.6, 0.6))
    # Two images, one right: resampled means are 0, 1/2, 1 with probability 1/4, 1/2, 1/4.
    assert H.bootstrap_ci([1, 0], n_boot=20000, level=0.95) == (0.0, 1.0)
    assert H.bootstrap_ci([1, 0], n_boot=20000, level=0.4) == (0.5, 0.5)
    # 400 images, half right: about 0.5 +- 1.96 * sqrt(0.25 / 400) = [0.451, 0.549].
    lo, hi = H.bootstrap_ci(np.tile([1, 0], 200), n_boot=4000, seed=3)
    assert lo == pytest.approx(0.451, abs=0.01) and hi == pytest.approx(0.549, abs=0.01)


def test_bootstrap_follows_its_documented_draws():
    rng = np.random.default_rng(4)
    values = (rng.random(13) < 0.6).astype(float)
    groups = ["g%d" % g for g in rng.integers(0, 5, 13)]
    groups[3] = groups[8] = None  # no identity: each a group of its own
    for gr in (None, groups):
        keys = list(range(13)) if gr is None else [g if g is not None else ("own", i) for i, g in enumerate(gr)]
        codes = [list(dict.fromkeys(keys)).index(k) for k in keys]
        G = max(codes) + 1
        draws = np.random.default_rng(7).integers(0, G, (50, G))
        stats = []
        for row in draws:
            picked = [i for g in row for i in range(13) if codes[i] == g]
            stats.append(np.mean(values[picked]))
        np.testing.assert_allclose(H._bootstrap_stats(values, gr, 50, 7), stats)
        assert H.bootstrap_ci(values, gr, n_boot=50, seed=7) == pytest.approx(np.quantile(stats, [0.025, 0.975]))
    # stratified: each stratum's groups drawn on their own, stratum 0 first
    strata = (rng.random(13) < 0.5).astype(int)
    keys = [g if g is not None else ("own", i) for i, g in enumerate(groups)]
    order = list(dict.fromkeys(keys))
    members = {k: [i for i in range(13) if keys[i] == k] for k in order}
    cls = {k: int(sum(strata[i] for i in members[k]) * 2 >= len(members[k])) for k in order}
    rng7 = np.random.default_rng(7)
    by = {c: [k for k in order if cls[k] == c] for c in (0, 1)}
    draws = {c: rng7.integers(0, len(by[c]), (40, len(by[c]))) for c in (0, 1)}
    share = {c: sum(len(members[k]) for k in by[c]) / 13 for c in (0, 1)}
    stats = []
    for r in range(40):
        stats.append(sum(share[c] * np.mean(values[[i for j in draws[c][r] for i in members[by[c][j]]]])
                         for c in (0, 1)))
    np.testing.assert_allclose(H._bootstrap_stats(values, groups, 40, 7, strata), stats)
    # a group of 6 images and six of 1 in one class: "always negative" stays at its designed rate
    v = np.array([0] * 6 + [0] * 6 + [1] * 8, float)
    lab = np.array([1] * 12 + [0] * 8)
    assert H.bootstrap_ci(v, ["big"] * 6 + [None] * 14, n_boot=300, strata=lab) == pytest.approx((0.4, 0.4))
    # each image its own group is the plain bootstrap
    np.testing.assert_allclose(H._bootstrap_stats(values, [str(i) for i in range(13)], 30, 1),
                               H._bootstrap_stats(values, None, 30, 1))


def test_bootstrap_difference_is_paired():
    a = np.array([1, 0, 1, 1, 0, 1, 0, 1] * 10, float)
    assert H.bootstrap_difference(a, a, n_boot=300) == (0.0, 0.0)
    lo, hi = H.bootstrap_difference(a, np.roll(a, 1) * 0, n_boot=300)
    assert 0 < lo <= a.mean() <= hi


# ---------------------------------------------------------------- trivial cues

def test_trivial_cues_hand_computed():
    im = np.zeros((1, 1, 4, 4))
    im[0, 0, 1:3, 1:3] = 10
    c = H.trivial_cues(im)
    assert c["mean"][0] == 2.5
    assert c["contrast"][0] == pytest.approx(np.sqrt(25 - 6.25))
    assert c["centre_minus_surround"][0] == 10
    # rows 1 and 2 each have horizontal differences 10, 0, -10: 4 * 100 over 12 differences; same vertically
    assert c["gradient_energy"][0] == pytest.approx(2 * 400 / 12)
    rgb = np.repeat(im, 3, axis=1)
    assert all(np.allclose(H.trivial_cues(rgb)[k], c[k]) for k in H.CUES)
    with pytest.raises(GrandmotherError, match="at least 4x4"):
        H.trivial_cues(np.zeros((2, 3, 3)))


def _cue_set(cue, n=240, seed=0):
    """Synthetic 16x16 test set whose label is decided by one cue (identities of 3 images each)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2 == 0
    x = rng.normal(0, 20, (n, 16, 16)) + 128
    if cue == "mean":
        x += np.where(labels, 30, -30)[:, None, None]
    elif cue == "centre_minus_surround":  # positives have a DARK centre: only "either" finds the direction
        x[:, 4:12, 4:12] -= np.where(labels, 40, 0)[:, None, None]
        x += np.where(labels, 10, 0)[:, None, None]  # the centre is a quarter of the image: same mean
    elif cue in ("contrast", "gradient_energy"):
        x = (x - 128) * np.where(labels, 2.0, 1.0)[:, None, None] + 128
    groups = [f"id{i // 6}" if lab else None for i, lab in enumerate(labels)]  # 3 positives an identity
    return x, labels, groups


@pytest.mark.parametrize("cue", H.CUES)
def test_trivial_cue_decides_a_synthetic_set(cue):
    x, labels, groups = _cue_set(cue)
    split = H.split_halves(labels, groups, seed=0)
    scores = H.score_cues(H.trivial_cues(x), labels, split, groups=groups, n_boot=300)
    r = scores[cue]
    assert r["evaluation_accuracy"] >= 0.95 and r["ci95"][0] >= 0.9
    assert r["ci95"][0] <= r["evaluation_accuracy"] <= r["ci95"][1]
    assert r["auc_evaluation"] >= 0.95  # in the chosen direction, also for a "less means positive" cue
    if cue == "mean":  # a brightness shift leaves contrast and gradients uninformative
        assert scores["contrast"]["evaluation_accuracy"] < 0.75
        assert scores["gradient_energy"]["evaluation_accuracy"] < 0.75
    if cue == "centre_minus_surround":
        assert r["direction"] == "negative"
        pos_only = H.score_cues(H.trivial_cues(x), labels, split, direction="positive", n_boot=100)[cue]
        assert pos_only["evaluation_accuracy"] < 0.75  # the paper's direction misses a darker-centre cue


def test_evaluate_record_and_seed_summary():
    x, labels, groups = _cue_set("mean")
    split = H.split_halves(labels, groups, seed=0)
    cues = H.trivial_cues(x)
    acts = np.stack([cues[k] for k in H.CUES], 1)
    rec = H.evaluate(acts, labels, split, groups=groups, names=list(H.CUES), n_boot=200)
    assert rec["unit"] == "mean" and rec["units"] == 4 and len(rec["correct"]) == len(split.evaluation)
    assert rec["evaluation_accuracy"] == pytest.approx(rec["correct"].mean())
    assert "correct" not in H.public(rec)
    m = H.majority_record(labels, split, groups, n_boot=100)
    assert m["evaluation_accuracy"] == pytest.approx(0.5, abs=0.05)
    s = H.seeds_summary([{"evaluation_accuracy": a} for a in (0.6, 0.7, 0.65, 0.62, 0.61)])
    assert s["seeds"] == 5 and s["best"] == 0.7 and s["best_index"] == 1 and s["mean"] == pytest.approx(0.636)
