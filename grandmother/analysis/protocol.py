"""The paper's single-unit test (Le et al. 2012, section 4.1), streamed over a test set.

For every unit: find its minimum and maximum activation on the test set, take 20 equally spaced
thresholds between them, and measure the accuracy of "activation > threshold means positive" at each;
the unit's score is the best of the 20 accuracies, and that threshold is its threshold.

Choices the paper leaves open (also in docs/probing.md):
- the 20 thresholds are np.linspace(min, max, 20): both endpoints included. At t = max nothing is
  above, so that threshold predicts "all negative"; a constant unit has 20 equal thresholds and scores
  the negative rate.
- ties between thresholds go to the lowest threshold; ties between units to the first unit in order.
- thresholds are float64 and activations are compared in float64.

Streaming: activations are never stored. Pass 1 keeps a running min/max per unit; pass 2 recomputes
the activations and counts, per unit and threshold, the positives and negatives above it. Memory is
O(20 x units). `batch_fn(indices) -> (B, U)` supplies activations for a list of test-image indices.
The state is saved to `cache_path` every `save_every` batches (atomically, with a fingerprint), so an
interrupted run resumes at the first unfinished batch.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from grandmother.errors import GrandmotherError
from grandmother.io import atomic_path

N_THRESHOLDS = 20
# Elements of one (images x thresholds x units) comparison block; bounds pass-2 temporary memory.
_BLOCK_ELEMENTS = 1 << 24


def thresholds_for(mins: np.ndarray, maxs: np.ndarray, n: int = N_THRESHOLDS) -> np.ndarray:
    """(n, U) float64: n equally spaced thresholds from each unit's min to its max, both included."""
    return np.linspace(np.asarray(mins, np.float64), np.asarray(maxs, np.float64), n, axis=0)


def check_labels(labels: np.ndarray, where: str = "test set") -> np.ndarray:
    labels = np.asarray(labels).astype(bool).ravel()
    if len(labels) == 0:
        raise GrandmotherError(f"{where} has no images")
    p = int(labels.sum())
    if p == 0 or p == len(labels):
        raise GrandmotherError(f"{where} has one class only ({p} positives, {len(labels) - p} negatives); "
                               f"the probe needs both")
    return labels


class ProtocolState:
    """Running min/max (pass 1) and counts above each threshold (pass 2) of U units."""

    def __init__(self, n_units: int):
        self.phase, self.next_batch = 1, 0
        self.mins = np.full(n_units, np.inf)
        self.maxs = np.full(n_units, -np.inf)
        self.pos_above = np.zeros((N_THRESHOLDS, n_units), np.int64)
        self.neg_above = np.zeros((N_THRESHOLDS, n_units), np.int64)
        self.thresholds = None

    def save(self, path: Path, fingerprint: str):
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, fingerprint=np.array(fingerprint), phase=self.phase, next_batch=self.next_batch,
                         mins=self.mins, maxs=self.maxs, pos_above=self.pos_above, neg_above=self.neg_above)

    @classmethod
    def load(cls, path: Path, fingerprint: str, n_units: int) -> "ProtocolState | None":
        """The saved state if it belongs to this very computation, else None (start over)."""
        try:
            with np.load(path, allow_pickle=False) as z:  # a cache: anything unreadable means start over
                if str(z["fingerprint"]) != fingerprint or len(z["mins"]) != n_units:
                    return None
                st = cls(n_units)
                st.phase, st.next_batch = int(z["phase"]), int(z["next_batch"])
                st.mins, st.maxs = z["mins"], z["maxs"]
                st.pos_above, st.neg_above = z["pos_above"], z["neg_above"]
        except (OSError, ValueError, KeyError):
            return None
        if st.phase >= 2:  # pass 1 is done: its min/max define the thresholds
            st.thresholds = thresholds_for(st.mins, st.maxs)
        return st


def count_above(acts: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(20, U) number of rows of acts (B, U) strictly above each threshold (20, U)."""
    acts = torch.as_tensor(acts, dtype=torch.float64)
    t = torch.as_tensor(thresholds, dtype=torch.float64)
    out = torch.zeros(t.shape, dtype=torch.int64)
    if acts.shape[0] == 0:
        return out.numpy()
    units = acts.shape[1]
    rows = max(1, _BLOCK_ELEMENTS // max(1, t.shape[0] * units))
    for r in range(0, acts.shape[0], rows):
        out += (acts[r:r + rows, None, :] > t[None]).sum(0)
    return out.numpy()


def run_protocol(batch_fn: Callable[[list[int]], torch.Tensor], labels: np.ndarray, n_units: int,
                 batch_size: int = 256, cache_path: Path | None = None, fingerprint: str = "",
                 save_every: int = 10, on_batch: Callable[[int, int], None] | None = None,
                 progress: str | None = None) -> dict:
    """Run both passes; returns {"accuracy": (20, U), "thresholds": (20, U), "best_accuracy": (U,),
    "best_threshold": (U,), "mins", "maxs"}. `on_batch(phase, batch)` is called after each batch."""
    labels = check_labels(labels)
    n = len(labels)
    batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    state = ProtocolState.load(cache_path, fingerprint, n_units) if cache_path and Path(cache_path).is_file() else None
    state = state or ProtocolState(n_units)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=2 * len(batches), initial=(state.phase - 1) * len(batches) + state.next_batch,
                   desc=progress, unit="batch", disable=None, leave=False)
    while state.phase <= 2:
        for b in range(state.next_batch, len(batches)):
            idx = batches[b]
            acts = batch_fn(idx)
            acts = acts.detach().cpu().numpy() if torch.is_tensor(acts) else np.asarray(acts)
            if acts.shape != (len(idx), n_units):
                raise RuntimeError(f"batch_fn returned {acts.shape}, expected {(len(idx), n_units)}")
            if state.phase == 1:
                np.minimum(state.mins, acts.min(0), out=state.mins)
                np.maximum(state.maxs, acts.max(0), out=state.maxs)
            else:
                pos = labels[idx]
                state.pos_above += count_above(acts[pos], state.thresholds)
                state.neg_above += count_above(acts[~pos], state.thresholds)
            state.next_batch = b + 1
            if bar is not None:
                bar.update(1)
            if on_batch is not None:
                on_batch(state.phase, b)
            if cache_path and (state.next_batch % save_every == 0):
                state.save(cache_path, fingerprint)
        state.phase, state.next_batch = state.phase + 1, 0
        if state.phase == 2:
            state.thresholds = thresholds_for(state.mins, state.maxs)
        if cache_path:
            state.save(cache_path, fingerprint)
    if bar is not None:
        bar.close()
    n_pos = int(labels.sum())
    n_neg = n - n_pos
    accuracy = (state.pos_above + (n_neg - state.neg_above)) / n  # (TP + TN) / N
    k = accuracy.argmax(0)  # first maximum: the lowest threshold among equals
    cols = np.arange(n_units)
    return {"accuracy": accuracy, "thresholds": state.thresholds, "best_accuracy": accuracy[k, cols],
            "best_threshold": state.thresholds[k, cols], "mins": state.mins, "maxs": state.maxs}


def fingerprint_of(**parts) -> str:
    return json.dumps(parts, sort_keys=True, default=str)
