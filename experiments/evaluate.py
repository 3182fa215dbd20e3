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
    """The library's held-out record (grandmother.analysis.heldout.evaluate): best unit chosen on selection,
    measured on evaluation, and the best-AUC unit's evaluation AUC."""
    return heldout.public(heldout.evaluate(acts, labels, split, groups=groups))


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
