"""Held-out scoring of one network on one labeled test set, for the experiments table.

The protocol (grandmother.heldout when it is present, else the same steps here):
- split the test set into a selection half and an evaluation half, positives by identity (a person
  never straddles the halves), negatives by file, stratified, seeded;
- every unit's AUC; the unit, its threshold (20 levels between min and max, as in the paper) and its
  direction ("more means positive" or "less means positive") are chosen on the selection half;
- accuracy of that rule on the evaluation half, with a bootstrap 95% interval over evaluation images.
The same is done for random weights (5 seeds), trivial image cues and linear filters (training images
as templates), so every row compares numbers measured on the same evaluation images.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata

N_THRESHOLDS = 20


def load_test(test_dir):
    from grandmother.testset import open_testset
    ds, labels, index = open_testset(test_dir)
    images = ds.get_batch(range(len(ds)))
    groups = [it.get("identity", "file:" + it["path"]) for it in ds.items()]
    return images, labels.astype(bool), groups


def split_halves(labels, groups, seed=0):
    """Boolean mask of the selection half: whole groups, about half of each class, seeded."""
    rng = np.random.default_rng(seed)
    sel = np.zeros(len(labels), bool)
    for cls in (True, False):
        names = sorted({g for g, lab in zip(groups, labels) if lab == cls})
        # whole groups in a seeded random order until half the class's images are on the selection side
        count = {g: 0 for g in names}
        for g, lab in zip(groups, labels):
            if lab == cls:
                count[g] += 1
        target, have, chosen = (labels == cls).sum() / 2, 0, set()
        for i in rng.permutation(len(names)):
            if have >= target:
                break
            chosen.add(names[i])
            have += count[names[i]]
        sel |= np.array([lab == cls and g in chosen for g, lab in zip(groups, labels)])
    return sel


def aucs(acts: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUC of every column, P(positive > negative); ties get their average rank (scipy.stats.rankdata)."""
    n_pos, n_neg = labels.sum(), (~labels).sum()
    out = np.empty(acts.shape[1])
    for s in range(0, acts.shape[1], 4096):
        ranks = rankdata(acts[:, s:s + 4096], axis=0)
        out[s:s + 4096] = (ranks[labels].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out


def best_rule(acts: np.ndarray, labels: np.ndarray):
    """On the selection images: per unit and direction, the best of 20 thresholds between min and max.

    Threshold t_k = min + k (max - min) / 19. An activation a is above t_k for k < ceil((a - min) / step),
    so one histogram per unit of that count gives every threshold's confusion counts.
    Returns (unit, direction +1/-1, threshold, selection accuracy); ties go to the first unit.
    """
    acts = np.asarray(acts, np.float64)
    n, u = acts.shape
    lo, hi = acts.min(0), acts.max(0)
    step = (hi - lo) / (N_THRESHOLDS - 1)
    k = np.ceil((acts - lo) / np.where(step > 0, step, 1.0)).astype(np.int64)  # thresholds below a
    k = np.clip(k, 0, N_THRESHOLDS)
    k[:, step == 0] = 0
    cols = np.arange(u) * (N_THRESHOLDS + 1)
    hist_all = np.bincount((k + cols).ravel(), minlength=u * (N_THRESHOLDS + 1)).reshape(u, -1)
    hist_pos = np.bincount((k[labels] + cols).ravel(), minlength=u * (N_THRESHOLDS + 1)).reshape(u, -1)
    # above threshold t_j: activations with k > j
    above_all = hist_all[:, ::-1].cumsum(1)[:, ::-1][:, 1:]  # (U, 20): count with k >= j + 1
    above_pos = hist_pos[:, ::-1].cumsum(1)[:, ::-1][:, 1:]
    n_pos = labels.sum()
    n_neg = n - n_pos
    neg_above = above_all - above_pos
    acc_up = (above_pos + (n_neg - neg_above)) / n
    acc_down = ((n_pos - above_pos) + neg_above) / n
    best_up, best_down = acc_up.max(1), acc_down.max(1)
    score = np.maximum(best_up, best_down)
    unit = int(np.argmax(score))
    d = 1 if best_up[unit] >= best_down[unit] else -1
    j = int(np.argmax(acc_up[unit] if d > 0 else acc_down[unit]))
    return unit, d, float(lo[unit] + j * step[unit]), float(score[unit])


def apply_rule(values: np.ndarray, direction: int, threshold: float) -> np.ndarray:
    return (values > threshold) if direction > 0 else (values <= threshold)


def bootstrap_ci(correct: np.ndarray, n=1000, seed=0):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(correct), (n, len(correct)))
    means = correct[idx].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def score_matrix(acts: np.ndarray, labels: np.ndarray, sel: np.ndarray) -> dict:
    """Choose on selection, measure on evaluation: the best unit of a (N, U) activation matrix."""
    ev = ~sel
    unit, d, th, sel_acc = best_rule(acts[sel], labels[sel])
    correct = apply_rule(acts[ev, unit].astype(np.float64), d, th) == labels[ev]
    return {"unit": unit, "direction": d, "threshold": th, "selection_accuracy": sel_acc,
            "evaluation_accuracy": float(correct.mean()), "ci95": bootstrap_ci(correct)}


def auc_summary(acts: np.ndarray, labels: np.ndarray, sel: np.ndarray) -> dict:
    """Best |AUC| unit chosen on selection; its AUC on evaluation (in the chosen direction)."""
    a_sel = aucs(acts[sel], labels[sel])
    u = int(np.argmax(np.abs(a_sel - 0.5)))
    a_ev = float(aucs(acts[~sel][:, [u]], labels[~sel])[0])
    up = a_sel[u] >= 0.5
    return {"unit": u, "selection_auc": float(a_sel[u] if up else 1 - a_sel[u]),
            "evaluation_auc": a_ev if up else 1 - a_ev, "direction": 1 if up else -1,
            "best_up_auc_selection": float(a_sel.max())}


# ---------------------------------------------------------------- feature matrices

@torch.no_grad()
def network_units(net, images, batch=500):
    """{(stage, sublayer): (N, units) float32 array} of every unit of the network on the images."""
    net.eval()
    parts = {}
    for s in range(0, len(images), batch):
        out = net(net.prepare(images[s:s + batch]), objective=False)
        for st, acts in enumerate(out.stages):
            for name, a in acts.items():
                parts.setdefault((st, name), []).append(a.flatten(1).float().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def trivial_cues(images) -> dict[str, np.ndarray]:
    x = images.float().mean(1) / 255.0  # (N, H, W) brightness
    n, h, w = x.shape
    cy, cx = slice(h // 4, h - h // 4), slice(w // 4, w - w // 4)
    gy, gx = x[:, 1:, :] - x[:, :-1, :], x[:, :, 1:] - x[:, :, :-1]
    return {"mean": x.mean((1, 2)).numpy(), "contrast": x.flatten(1).std(1).numpy(),
            "centre_minus_surround": (x[:, cy, cx].mean((1, 2)) - x.mean((1, 2))).numpy(),
            "gradient_energy": ((gy ** 2).mean((1, 2)) + (gx ** 2).mean((1, 2))).numpy()}


def linear_filters(net, images, train_data, n=10_000, seed=0):
    """Responses <x, t> of n training images (prepared like network input) used as templates."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train_data), generator=g)[:n].tolist()
    t = net.prepare(train_data.get_batch(sorted(idx))).flatten(1)
    x = net.prepare(images).flatten(1)
    return (x @ t.T).numpy()
