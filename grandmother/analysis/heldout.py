"""Held-out evaluation: choose on a selection half, report on an evaluation half, with intervals.

The paper's single-unit test (probe_protocol.py) chooses the best of thousands of units, and each unit's
threshold, on the very images it reports: that flatters trained units, random units and linear filters
alike. This module keeps the choosing and the measuring apart. Pure functions on arrays:

    split = split_halves(labels, groups, seed=0)           # stratified by label, grouped by identity
    table = unit_table(acts, labels, split)                 # per unit: choice on selection, score on eval
    u = table.best()                                        # chosen on the selection half only
    acc, (lo, hi) = table.evaluation_accuracy[u], bootstrap_ci(table.correct(acts[:, u], labels, split, u))
    rec = evaluate(acts, labels, split)                     # all of the above as one JSON-able record
    cues = trivial_cues(images)                             # image mean, contrast, centre-surround, gradients

Choices (settings, with the defaults named here and in docs/probing.md):
- **Split.** Images of one identity (an LFW person; whatever `grandmother testset` records as `identity`)
  are never divided between the halves; images without an identity are groups of one. Groups are taken
  largest first (equal sizes in a seeded random order) and each goes to the half whose share of that
  group's class is furthest below its target (`selection_fraction`, default 0.5; ties go to selection).
  So both halves keep the label ratio and no person is seen by both. A group's class is its majority
  label (ties: positive).
- **Thresholds.** A unit's threshold is chosen as in the paper, 20 equally spaced values between its
  minimum and maximum, but on the selection half only (`n_thresholds`).
- **Direction** (`direction`): `positive` is the paper's rule, "more response means positive". `either`
  also tries "less response means positive" and keeps whichever scores higher on the selection half.
  The default is `either`: trivial cues and random filters have no natural sign (faces may be darker or
  brighter than distractors), so scoring every row "positive only" would put some baselines at chance
  for a reason that has nothing to do with information, and would flatter the trained network; and the
  top-stage units that separate faces best were measured to respond *less* to faces (READING.md). The
  chosen direction is reported with every row, and the paper's same-set number (positive only) beside.
- **Unit choice.** The unit with the highest selection-half accuracy (ties: the positive direction, the
  lowest threshold, then the first unit). Its accuracy on the evaluation half is the honest number.
- **Intervals.** Percentile bootstrap (default 1,000 resamples, 95%) of the evaluation half, seeded; the
  same seed resamples the same images for every row, so rows can be compared pairwise
  (`bootstrap_difference`). With `groups`, whole identities are resampled (a cluster bootstrap), which
  respects that images of one person are not independent; records resample within each class and
  weight the classes by their shares (stratified), since the test set's class ratio is fixed by its
  design, not sampled: otherwise drawing one prolific person or not would move even the majority guess
  by several points. The interval covers the
  evaluation noise of a fixed choice, not the variability of the choice itself.
- **AUC.** Rank-based (Mann-Whitney), ties counted one half; the AUC of "more response means positive"
  (an inverted detector has AUC below 0.5).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from grandmother.errors import GrandmotherError

DIRECTIONS = ("positive", "either")
DEFAULT_DIRECTION = "either"
DEFAULT_SPLIT_SEED = 0
DEFAULT_BOOTSTRAP = 1000
DEFAULT_BOOTSTRAP_SEED = 0
CUES = ("mean", "contrast", "centre_minus_surround", "gradient_energy")
# Elements of one temporary (rows x thresholds x units) block: bounds memory whatever the unit count.
_BLOCK_ELEMENTS = 1 << 23


# ---------------------------------------------------------------- the split

@dataclass(frozen=True)
class Split:
    """Indices (sorted) of the selection and evaluation halves, and how they were made."""
    selection: np.ndarray
    evaluation: np.ndarray
    seed: int
    selection_fraction: float
    n_groups: int

    def protocol(self, labels) -> dict:
        """A JSON-able description of the split (for probe.json and the report)."""
        labels = np.asarray(labels).astype(bool)
        half = lambda idx: {"images": int(len(idx)), "positives": int(labels[idx].sum()),
                            "negatives": int(len(idx) - labels[idx].sum())}
        return {"rule": "stratified by label, grouped by identity (no identity in both halves); groups largest "
                        "first, each to the half furthest below its target share of the group's class",
                "seed": self.seed, "selection_fraction": self.selection_fraction, "groups": self.n_groups,
                "selection": half(self.selection), "evaluation": half(self.evaluation)}


def _group_codes(groups, n: int) -> np.ndarray:
    """(n,) int codes; None / "" / NaN mean "a group of its own"."""
    if groups is None:
        return np.arange(n)
    groups = list(groups)
    if len(groups) != n:
        raise GrandmotherError(f"{len(groups)} identities for {n} images")
    codes, table = np.empty(n, np.int64), {}
    for i, g in enumerate(groups):
        if g is None or g == "" or (isinstance(g, float) and np.isnan(g)):
            key = ("#own", i)
        else:
            key = ("id", str(g))
        codes[i] = table.setdefault(key, len(table))
    return codes


def split_halves(labels, groups=None, seed: int = DEFAULT_SPLIT_SEED, selection_fraction: float = 0.5) -> Split:
    """Split images into a selection and an evaluation half, stratified by label, grouped by identity."""
    labels = np.asarray(labels).astype(bool).ravel()
    n = len(labels)
    if not 0 < selection_fraction < 1:
        raise GrandmotherError(f"selection fraction {selection_fraction}: must be between 0 and 1")
    codes = _group_codes(groups, n)
    n_groups = int(codes.max()) + 1 if n else 0
    pos = np.bincount(codes, weights=labels, minlength=n_groups).astype(np.int64)
    size = np.bincount(codes, minlength=n_groups).astype(np.int64)
    neg = size - pos
    cls = (pos >= neg).astype(int)  # the group's class: its majority label (ties: positive)
    total = np.array([neg.sum(), pos.sum()], np.float64)
    target = np.stack([selection_fraction * total, (1 - selection_fraction) * total])  # (half, class)
    have = np.zeros((2, 2))
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_groups)
    order = order[np.argsort(-size[order], kind="stable")]  # largest first; equal sizes in seeded order
    half_of = np.empty(n_groups, np.int64)
    for g in order:
        c = cls[g]
        h = 0 if target[0, c] - have[0, c] >= target[1, c] - have[1, c] else 1
        half_of[g] = h
        have[h] += (neg[g], pos[g])
    in_sel = half_of[codes] == 0
    sel, ev = np.flatnonzero(in_sel), np.flatnonzero(~in_sel)
    for name, idx in (("selection", sel), ("evaluation", ev)):
        p = int(labels[idx].sum())
        if p == 0 or p == len(idx):
            raise GrandmotherError(f"the {name} half has one class only ({p} positives, {len(idx) - p} negatives): "
                                   f"the test set is too small or has too few identities to split")
    return Split(sel, ev, int(seed), float(selection_fraction), n_groups)


# ---------------------------------------------------------------- per-unit scores

def _check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise GrandmotherError(f"direction {direction!r}: choose {' or '.join(DIRECTIONS)}")
    return direction


def unit_auc(acts, labels) -> np.ndarray:
    """(U,) rank-based AUC of each column of acts (n, U): P(positive > negative) + P(tie) / 2."""
    acts = np.asarray(acts)
    if acts.ndim == 1:
        acts = acts[:, None]
    labels = np.asarray(labels).astype(bool).ravel()
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise GrandmotherError("AUC needs both classes")
    out = np.empty(acts.shape[1])
    n = len(labels)
    step = max(1, _BLOCK_ELEMENTS // max(1, n))
    idx = np.arange(n)[None, :]
    for c in range(0, acts.shape[1], step):
        a = np.ascontiguousarray(np.asarray(acts[:, c:c + step], np.float64).T)  # (units, n): rows sort fast
        order = np.argsort(a, axis=1)  # any order within a run of ties: they share one rank below
        v = np.take_along_axis(a, order, 1)
        differs = v[:, 1:] != v[:, :-1]
        first = np.ones(v.shape, bool)
        first[:, 1:] = differs
        last = np.ones(v.shape, bool)
        last[:, :-1] = differs
        start = np.maximum.accumulate(np.where(first, idx, 0), axis=1)  # where each run of ties begins
        end = np.minimum.accumulate(np.where(last, idx, n - 1)[:, ::-1], axis=1)[:, ::-1]  # and ends
        ranks = (start + end) / 2 + 1  # the average rank of a run of ties, as scipy's rankdata gives
        out[c:c + step] = ((ranks * labels[order]).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out


def paper_thresholds(acts, n_thresholds: int = 20) -> np.ndarray:
    """(n_thresholds, U): equally spaced from each column's min to its max, both included (paper 4.1).
    Each column's values are those of np.linspace on that column alone, whatever the other columns hold."""
    acts = np.asarray(acts, np.float64)
    lo, hi = acts.min(0), acts.max(0)
    t = np.arange(n_thresholds, dtype=np.float64)[:, None] * ((hi - lo) / max(1, n_thresholds - 1)) + lo
    t[-1] = hi
    return t


def threshold_accuracy(acts, labels, thresholds) -> np.ndarray:
    """(T, U) accuracy of "acts > threshold means positive" for every threshold (T, U) of every unit: the
    comparisons themselves, blocked over images so that memory stays bounded. (A counting version that
    placed each response among its unit's evenly spaced thresholds did O(n U) work instead of O(n T U),
    but its gathers made it 6x slower at 1,938 images x 20,000 units with T = 20: 7.2 s against 1.2 s.)"""
    acts = np.asarray(acts, np.float64)
    labels = np.asarray(labels).astype(bool).ravel()
    t = np.asarray(thresholds, np.float64)
    above_pos = np.zeros(t.shape, np.int64)
    above_neg = np.zeros(t.shape, np.int64)
    rows = max(1, _BLOCK_ELEMENTS // max(1, t.size))
    for r in range(0, len(acts), rows):
        a, lab = acts[r:r + rows], labels[r:r + rows]
        above = a[:, None, :] > t[None]
        above_pos += above[lab].sum(0)
        above_neg += above[~lab].sum(0)
    n_neg = len(labels) - int(labels.sum())
    return (above_pos + (n_neg - above_neg)) / len(labels)


def same_set_accuracy(acts, labels, n_thresholds: int = 20) -> np.ndarray:
    """(U,) the paper's number: best of 20 thresholds, chosen and scored on the same images, positive only."""
    acts = np.asarray(acts, np.float64)
    return threshold_accuracy(acts, labels, paper_thresholds(acts, n_thresholds)).max(0)


def predict(column, sign: int, threshold: float) -> np.ndarray:
    """Boolean predictions of one unit: sign +1: response > threshold; sign -1: response < threshold."""
    a = np.asarray(column, np.float64)
    return a > threshold if sign > 0 else a < threshold


@dataclass
class UnitTable:
    """Per-unit results (arrays of length U). sign/threshold/selection_accuracy are chosen on the selection
    half; evaluation_accuracy applies that choice to the evaluation half. AUCs are of "more response means
    positive" on each half; same_set_accuracy is the paper's protocol on all images (positive only)."""
    selection_accuracy: np.ndarray
    sign: np.ndarray
    threshold: np.ndarray
    evaluation_accuracy: np.ndarray
    auc_selection: np.ndarray
    auc_evaluation: np.ndarray
    same_set_accuracy: np.ndarray
    direction: str

    def __len__(self):
        return len(self.selection_accuracy)

    def best(self, start: int = 0, stop: int | None = None) -> int:
        """Index of the unit chosen on the selection half (among units start..stop); ties: the first."""
        stop = len(self) if stop is None else stop
        return start + int(np.argmax(self.selection_accuracy[start:stop]))

    def best_by_auc(self, start: int = 0, stop: int | None = None) -> int:
        """The unit with the highest selection-half AUC in the allowed direction(s)."""
        stop = len(self) if stop is None else stop
        a = self.auc_selection[start:stop]
        a = np.maximum(a, 1 - a) if self.direction == "either" else a
        return start + int(np.argmax(a))

    def correct(self, column, labels, split: Split, unit: int) -> np.ndarray:
        """(n_eval,) bool: which evaluation images unit `unit` (whose activations are `column`) gets right."""
        labels = np.asarray(labels).astype(bool).ravel()
        ev = split.evaluation
        return predict(np.asarray(column)[ev], int(self.sign[unit]), float(self.threshold[unit])) == labels[ev]

    @staticmethod
    def concat(tables: list["UnitTable"]) -> "UnitTable":
        f = lambda k: np.concatenate([getattr(t, k) for t in tables])
        return UnitTable(*(f(k) for k in ("selection_accuracy", "sign", "threshold", "evaluation_accuracy",
                                          "auc_selection", "auc_evaluation", "same_set_accuracy")),
                         direction=tables[0].direction)


def unit_table(acts, labels, split: Split, direction: str = DEFAULT_DIRECTION, n_thresholds: int = 20) -> UnitTable:
    """Choose each unit's direction and threshold on the selection half and score it on the evaluation half."""
    direction = _check_direction(direction)
    acts = np.asarray(acts)
    if acts.ndim == 1:
        acts = acts[:, None]
    labels = np.asarray(labels).astype(bool).ravel()
    if acts.shape[0] != len(labels):
        raise GrandmotherError(f"{acts.shape[0]} responses for {len(labels)} labels")
    sel, ev = split.selection, split.evaluation
    parts = []
    step = max(1, _BLOCK_ELEMENTS // max(1, len(labels)))
    for c in range(0, acts.shape[1], step):
        a = np.asarray(acts[:, c:c + step], np.float64)
        a_sel, l_sel = a[sel], labels[sel]
        thr = paper_thresholds(a_sel, n_thresholds)
        acc = threshold_accuracy(a_sel, l_sel, thr)
        k = acc.argmax(0)  # first maximum: the lowest threshold among equals
        cols = np.arange(a.shape[1])
        best_acc, best_thr, sign = acc[k, cols], thr[k, cols], np.ones(a.shape[1], np.int64)
        if direction == "either":
            nthr = paper_thresholds(-a_sel, n_thresholds)
            nacc = threshold_accuracy(-a_sel, l_sel, nthr)
            nk = nacc.argmax(0)
            flip = nacc[nk, cols] > best_acc  # strictly better: ties keep the positive direction
            best_acc = np.where(flip, nacc[nk, cols], best_acc)
            best_thr = np.where(flip, -nthr[nk, cols], best_thr)  # -a > t  <=>  a < -t
            sign = np.where(flip, -1, 1)
        a_ev, l_ev = a[ev], labels[ev]
        pred = np.where(sign > 0, a_ev > best_thr, a_ev < best_thr)
        parts.append(UnitTable(best_acc, sign, best_thr, (pred == l_ev[:, None]).mean(0),
                               unit_auc(a_sel, l_sel), unit_auc(a_ev, l_ev),
                               same_set_accuracy(a, labels, n_thresholds), direction))
    return UnitTable.concat(parts)


# ---------------------------------------------------------------- intervals

def _bootstrap_stats(values, groups, n_boot: int, seed: int, strata=None) -> np.ndarray:
    """(n_boot,) mean of `values` over resamples of whole groups, with replacement.

    Groups are numbered in order of first appearance; an image without a group (None, "") or without
    `groups` at all is a group of its own. Without `strata` all groups are one stratum and a resample's
    statistic is sum(values of the drawn groups' images) / number of images drawn. With `strata`
    (per-image labels) each group belongs to the stratum of its majority label (ties: the larger label),
    every stratum is resampled on its own, and the statistic is sum over strata of w_c x (that mean within
    stratum c), w_c the stratum's share of the images: the class make-up stays as designed even when
    groups differ in size (one LFW person has hundreds of images). The draws: rng =
    np.random.default_rng(seed); for each stratum in increasing order, rng.integers(0, G_c, (n_boot, G_c))
    indexes its G_c groups (in blocks of rows when n_boot x groups is large)."""
    values = np.asarray(values, np.float64).ravel()
    if len(values) == 0:
        raise GrandmotherError("bootstrap of an empty set")
    codes = _group_codes(groups, len(values))  # None / "" stand for a group of one
    n_groups = int(codes.max()) + 1
    sums = np.bincount(codes, weights=values, minlength=n_groups)
    sizes = np.bincount(codes, minlength=n_groups).astype(np.float64)
    if strata is None:
        members = [np.arange(n_groups)]
        weights = None
    else:
        strata = np.asarray(strata).astype(np.int64).ravel()
        if len(strata) != len(values):
            raise GrandmotherError(f"{len(strata)} strata labels for {len(values)} values")
        pos = np.bincount(codes, weights=strata, minlength=n_groups)
        cls = (pos >= sizes - pos).astype(np.int64) if strata.max() <= 1 else \
            np.array([np.bincount(strata[codes == g]).argmax() for g in range(n_groups)])
        members = [np.flatnonzero(cls == c) for c in np.unique(cls)]
        weights = [sizes[m].sum() / len(values) for m in members]
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    rows = max(1, _BLOCK_ELEMENTS // n_groups)
    for r in range(0, n_boot, rows):
        k = min(rows, n_boot - r)
        stat = np.zeros(k)
        for i, m in enumerate(members):
            idx = m[rng.integers(0, len(m), (k, len(m)))]
            mean = sums[idx].sum(1) / sizes[idx].sum(1)
            stat += mean if weights is None else weights[i] * mean
        out[r:r + k] = stat
    return out


def _interval(stats, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def bootstrap_ci(values, groups=None, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = DEFAULT_BOOTSTRAP_SEED,
                 level: float = 0.95, strata=None) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (e.g. 1 = correct, 0 = wrong per image),
    resampling whole `groups` (identities), within `strata` (labels) when given."""
    return _interval(_bootstrap_stats(values, groups, n_boot, seed, strata), level)


def bootstrap_difference(values_a, values_b, groups=None, n_boot: int = DEFAULT_BOOTSTRAP,
                         seed: int = DEFAULT_BOOTSTRAP_SEED, level: float = 0.95, strata=None) -> tuple[float, float]:
    """Paired interval of mean(a) - mean(b) over the same images (same resamples for both)."""
    d = np.asarray(values_a, np.float64) - np.asarray(values_b, np.float64)
    return _interval(_bootstrap_stats(d, groups, n_boot, seed, strata), level)


# ---------------------------------------------------------------- one matrix, one record

def evaluate(acts, labels, split: Split, *, direction: str = DEFAULT_DIRECTION, n_thresholds: int = 20,
             groups=None, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = DEFAULT_BOOTSTRAP_SEED,
             names=None, table: UnitTable | None = None) -> dict:
    """The held-out record of a response matrix (n, U): unit chosen on selection, accuracy on evaluation
    with a bootstrap interval, its evaluation-half AUC in the chosen direction, and the paper's same-set
    number (the best unit on all images, positive direction).
    `groups` (n,) are the identities used by the cluster bootstrap; `names` label the units. The record's
    "correct" (n_eval,) is for pairwise comparison and is not JSON: drop it before writing."""
    acts = np.asarray(acts)
    if acts.ndim == 1:
        acts = acts[:, None]
    labels = np.asarray(labels).astype(bool).ravel()
    table = table if table is not None else unit_table(acts, labels, split, direction, n_thresholds)
    u = table.best()
    correct = table.correct(acts[:, u], labels, split, u)
    ev_groups = None if groups is None else np.asarray(groups, dtype=object)[split.evaluation]
    lo, hi = bootstrap_ci(correct, ev_groups, n_boot, seed, strata=labels[split.evaluation])
    paper_u = int(np.argmax(table.same_set_accuracy))
    name = (lambda i: str(names[i])) if names is not None else (lambda i: i)
    return {"unit": name(u), "direction": "positive" if table.sign[u] > 0 else "negative",
            "threshold": float(table.threshold[u]), "selection_accuracy": float(table.selection_accuracy[u]),
            "evaluation_accuracy": float(table.evaluation_accuracy[u]), "ci95": [lo, hi],
            "auc_evaluation": float(table.auc_evaluation[u] if table.sign[u] > 0 else 1 - table.auc_evaluation[u]),
            "same_set_accuracy": float(table.same_set_accuracy[paper_u]), "same_set_unit": name(paper_u),
            "best_auc": best_auc_record(table, name), "units": len(table), "correct": correct}


def best_auc_record(table: UnitTable, name=lambda i: i) -> dict:
    """The unit with the best selection-half AUC (either direction when the table allows it), with its
    evaluation-half AUC in that direction: how well the best unit ranks, free of any threshold."""
    u = table.best_by_auc()
    positive = table.direction == "positive" or table.auc_selection[u] >= 0.5
    a = float(table.auc_evaluation[u])
    return {"unit": name(u), "evaluation_auc": a if positive else 1 - a,
            "direction": "positive" if positive else "negative"}


def majority_record(labels, split: Split, groups=None, n_boot: int = DEFAULT_BOOTSTRAP,
                    seed: int = DEFAULT_BOOTSTRAP_SEED) -> dict:
    """The "random guess" row: the selection half's majority class, predicted for every evaluation image."""
    labels = np.asarray(labels).astype(bool).ravel()
    guess = bool(labels[split.selection].mean() > 0.5)
    correct = labels[split.evaluation] == guess
    ev_groups = None if groups is None else np.asarray(groups, dtype=object)[split.evaluation]
    return {"unit": "always " + ("positive" if guess else "negative"), "evaluation_accuracy": float(correct.mean()),
            "ci95": list(bootstrap_ci(correct, ev_groups, n_boot, seed, strata=labels[split.evaluation])),
            "same_set_accuracy": float(max(labels.mean(), 1 - labels.mean())), "correct": correct}


def seeds_summary(records: list[dict]) -> dict:
    """Mean and best (evaluation accuracy) over records of several seeds, e.g. random weights."""
    accs = np.array([r["evaluation_accuracy"] for r in records])
    b = int(np.argmax(accs))
    return {"seeds": len(records), "mean": float(accs.mean()), "std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
            "best": float(accs[b]), "best_index": b}


def public(record: dict) -> dict:
    """The record without its per-image arrays (for JSON)."""
    return {k: v for k, v in record.items() if k != "correct"}


# ---------------------------------------------------------------- trivial cues

def trivial_cues(images) -> dict[str, np.ndarray]:
    """Per-image statistics (n,) float64 of images (n, C, H, W) or (n, H, W), any numeric type (colour is
    averaged to gray; pixel values as given):
      mean                   mean brightness
      contrast               standard deviation of brightness
      centre_minus_surround  mean of the central square (the middle half of rows and of columns) minus the
                             mean of the rest of the image
      gradient_energy        mean of squared horizontal plus mean of squared vertical neighbour differences
    """
    x = np.asarray(images.numpy() if hasattr(images, "numpy") else images, np.float64)
    if x.ndim == 4:
        x = x.mean(1)
    if x.ndim != 3 or x.shape[1] < 4 or x.shape[2] < 4:
        raise GrandmotherError(f"trivial cues need images (n, [C,] H, W) of at least 4x4, got shape {x.shape}")
    _, h, w = x.shape
    centre = np.zeros((h, w), bool)
    centre[h // 4:h - h // 4, w // 4:w - w // 4] = True
    return {"mean": x.mean((1, 2)),
            "contrast": x.std((1, 2)),
            "centre_minus_surround": x[:, centre].mean(1) - x[:, ~centre].mean(1),
            "gradient_energy": (np.diff(x, axis=2) ** 2).mean((1, 2)) + (np.diff(x, axis=1) ** 2).mean((1, 2))}


def cues_of_dataset(dataset, batch_size: int = 1024) -> dict[str, np.ndarray]:
    """trivial_cues over a dataset with get_batch(indices) -> (B, C, H, W) uint8, in batches."""
    n = len(dataset)
    parts = [trivial_cues(dataset.get_batch(list(range(s, min(s + batch_size, n))))) for s in range(0, n, batch_size)]
    return {k: np.concatenate([p[k] for p in parts]) for k in CUES}


def score_cues(cues: dict[str, np.ndarray], labels, split: Split, **kw) -> dict[str, dict]:
    """evaluate() of each cue on its own, with the same protocol as the units (kw: direction, groups, ...)."""
    return {k: evaluate(np.asarray(v)[:, None], labels, split, names=[k], **kw) for k, v in cues.items()}


def testset_cue_scores(images: np.ndarray, labels: np.ndarray, identities, seed: int = 0) -> dict:
    """Held-out scores of the trivial cues (for index.json of a test set) on images (N, H, W, C): {cue: record}."""
    try:
        split = split_halves(labels, identities, seed=seed)
    except GrandmotherError:  # too few identities to split: no held-out score
        return {}
    cues = trivial_cues(np.asarray(images).transpose(0, 3, 1, 2))
    return {k: public(r) for k, r in score_cues(cues, labels, split, groups=identities).items()}
