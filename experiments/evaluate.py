"""Held-out scoring of one network on one labeled test set, for the experiments table.

The protocol is grandmother.analysis.heldout's (its defaults): the test set is split once (seed 0) into a
selection half and an evaluation half, stratified by label and grouped by identity (no person in both);
every unit's threshold (the paper's 20 levels) and direction are chosen on the selection half, the best
unit is chosen on the selection half, and its accuracy on the evaluation half is reported with a
cluster-bootstrap 95% interval. The same is done for random weights (5 seeds), trivial image cues and
linear filters (training images as templates), so every row compares numbers measured on the same
evaluation images. This module only supplies the response matrices.
"""
from __future__ import annotations

import numpy as np
import torch

from grandmother.analysis import heldout


def load_test(test_dir):
    """(uint8 images (N, C, H, W), bool labels, identities (None for distractors), split)."""
    from grandmother.data.testset import open_testset
    ds, labels, _ = open_testset(test_dir)
    images = ds.get_batch(range(len(ds)))
    groups = [it.get("identity") for it in ds.items()]
    labels = labels.astype(bool)
    return images, labels, groups, heldout.split_halves(labels, groups, seed=0)


def score_matrix(acts: np.ndarray, labels, split, groups) -> dict:
    """Best unit chosen on selection, measured on evaluation; and the best-AUC unit's evaluation AUC."""
    table = fast_unit_table(acts, labels, split)
    rec = heldout.public(heldout.evaluate(acts, labels, split, groups=groups, table=table))
    u = table.best_by_auc()
    a = float(table.auc_evaluation[u])
    rec["best_auc"] = {"unit": u, "evaluation_auc": a if table.auc_selection[u] >= 0.5 else 1 - a,
                       "direction": "positive" if table.auc_selection[u] >= 0.5 else "negative"}
    return rec


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
    return heldout.trivial_cues(images)


@torch.no_grad()
def linear_filters(net, images, train_data, n=10_000, seed=0):
    """Responses <x, t> of n training images (prepared like network input) used as templates."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train_data), generator=g)[:n].tolist()
    t = net.prepare(train_data.get_batch(sorted(idx))).flatten(1)
    x = net.prepare(images).flatten(1)
    return (x @ t.T).numpy()


# ---------------------------------------------------------------- a faster unit table

def _counts(a, labels, lo, step, floor):
    """Per unit (U, 21): histogram over the 20 thresholds' bins, all images and positives.

    ceil((a - lo) / step) = how many thresholds lie strictly below a (for "a > t");
    floor((a - lo) / step) + 1 = how many thresholds lie at or below a (for "a < t")."""
    n, u = a.shape
    z = (a - lo) / np.where(step > 0, step, 1.0)
    k = (np.floor(z) + 1 if floor else np.ceil(z)).astype(np.int64)
    k = np.clip(k, 0, 20)
    k[:, step == 0] = 0 if not floor else 20
    cols = np.arange(u) * 21
    h_all = np.bincount((k + cols).ravel(), minlength=u * 21).reshape(u, 21)
    h_pos = np.bincount((k[labels] + cols).ravel(), minlength=u * 21).reshape(u, 21)
    return h_all, h_pos


def _up_accuracy(a, labels, lo, step):
    """(20, U): accuracy of "a > t_j" for the 20 thresholds t_j = lo + j step."""
    h_all, h_pos = _counts(a, labels, lo, step, floor=False)
    above_all = h_all[:, ::-1].cumsum(1)[:, ::-1][:, 1:]  # k > j
    above_pos = h_pos[:, ::-1].cumsum(1)[:, ::-1][:, 1:]
    n, n_pos = len(labels), labels.sum()
    return ((above_pos + (n - n_pos) - (above_all - above_pos)) / n).T


def _down_accuracy(a, labels, lo, step):
    """(20, U): accuracy of "a < t_i"; a < t_i holds when floor((a - lo) / step) + 1 <= i."""
    h_all, h_pos = _counts(a, labels, lo, step, floor=True)
    below_all = h_all.cumsum(1)[:, :20]  # k <= i
    below_pos = h_pos.cumsum(1)[:, :20]
    n, n_pos = len(labels), labels.sum()
    return ((below_pos + (n - n_pos) - (below_all - below_pos)) / n).T


def fast_unit_table(acts, labels, split, block=4096) -> "heldout.UnitTable":
    """heldout.unit_table's choices (direction either, 20 paper thresholds on the selection half, ties
    to the positive direction and the lowest threshold; for "less", the highest) by histogram counting
    instead of a (rows x thresholds x units) comparison. AUCs: every unit's on the selection half (for
    best_by_auc); on the evaluation half only for the two units a record reads (others NaN)."""
    labels = np.asarray(labels).astype(bool)
    sel, ev = split.selection, split.evaluation
    parts = {k: [] for k in ("sa", "sign", "thr", "ea", "auc_s", "same")}
    for c in range(0, acts.shape[1], block):
        a = np.asarray(acts[:, c:c + block], np.float64)
        a_sel, l_sel = a[sel], labels[sel]
        lo, hi = a_sel.min(0), a_sel.max(0)
        step = (hi - lo) / 19
        up, down = _up_accuracy(a_sel, l_sel, lo, step), _down_accuracy(a_sel, l_sel, lo, step)
        cols = np.arange(a.shape[1])
        ku = up.argmax(0)
        kd = 19 - down[::-1].argmax(0)  # the highest threshold among equals (heldout scans -a upwards)
        flip = down[kd, cols] > up[ku, cols]
        sign = np.where(flip, -1, 1)
        thr = lo + np.where(flip, kd, ku) * step
        a_ev = a[ev]
        pred = np.where(sign > 0, a_ev > thr, a_ev < thr)
        parts["sa"].append(np.where(flip, down[kd, cols], up[ku, cols]))
        parts["sign"].append(sign)
        parts["thr"].append(thr)
        parts["ea"].append((pred == labels[ev][:, None]).mean(0))
        parts["auc_s"].append(heldout.unit_auc(a_sel, l_sel))
        alo, ahi = a.min(0), a.max(0)
        parts["same"].append(_up_accuracy(a, labels, alo, (ahi - alo) / 19).max(0))
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    auc_e = np.full(len(cat["sa"]), np.nan)
    table = heldout.UnitTable(cat["sa"], cat["sign"], cat["thr"], cat["ea"], cat["auc_s"], auc_e, cat["same"],
                              "either")
    for u in {table.best(), table.best_by_auc()}:
        auc_e[u] = heldout.unit_auc(np.asarray(acts[ev, u], np.float64)[:, None], labels[ev])[0]
    return table
