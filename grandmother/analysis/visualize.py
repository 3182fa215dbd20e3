"""Pictures of one unit: its activation histogram, its top test images and its optimal stimulus.

    grandmother visualize RUN_DIR --testset TEST_DIR --unit s2.lcn.m3.y10.x12 --out DIR
    grandmother visualize RUN_DIR --testset TEST_DIR --probe PROBE_DIR --out DIR   # the probe's best unit

writes into DIR (each file atomically):
    histogram.png            Figure 2: activations of positives (red) and negatives (blue), the test set
                             subsampled to 1:1 (seeded), with the probe's threshold when known
    top_images.png           Figure 3 top: the 48 test images with the highest activation (6 x 8),
                             framed red for positives and blue for negatives
    optimal_stimulus.png     Figure 3 bottom: x* = argmax f(x) subject to ||x||_2 = const (analysis/stimulus.py)
    optimal_stimulus.npy     x* / ||x*|| as float32 (C, H, W), unit norm like the paper's constraint
    top_mean.png             the mean of the top test images (network input), what x* is compared with
    activations.npy          the unit's activation on every test image (aligned with the test set)
    visualize.json           numbers behind the figures and the command that made them

The optimal stimulus (paper section 4.3: "x* = argmax_x f(x; W, H) subject to ||x||_2 = 1") is found
in the network's input space, i.e. on standardized images (Network.prepare). The network is not scale
invariant, so the radius of the sphere matters; ours is sqrt(C*H*W), the norm of a standardized image
(zero mean, unit variance per image), so x* lives at the scale the network was trained on. Up to that
fixed factor this is the paper's ||x|| = 1 problem; we save and show x*/||x*||. Plain ascent on pixels finds
high-frequency noise no image resembles; by default the search is preconditioned by the natural-image
spectrum and averaged over one-pixel shifts (grandmother/analysis/stimulus.py says what that solves and why),
and visualize.json records how x* correlates with the mean of the unit's top test images and with the mean
negative image.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from grandmother.errors import GrandmotherError
from grandmother.io import atomic_path, atomic_write_json
from grandmother.report.plots import NEGATIVE_COLOR, POSITIVE_COLOR, image_grid, save_histogram
from grandmother.report.results import result_fields
from grandmother.analysis.stimulus import StimulusSettings, optimal_stimulus, stimulus_similarity
from grandmother.analysis.units import Unit, prepared_batches, unit_responses



# ---------------------------------------------------------------- test set and activations

def open_labeled_testset(path: Path, net):
    """(dataset, labels, index) of a TEST_DIR, checked to have both classes and to fit the network."""
    from grandmother.data.testset import open_testset
    ds, labels, index = open_testset(Path(path))
    labels = np.asarray(labels).astype(np.int64)
    if len(np.unique(labels)) < 2:
        only = "positives" if labels.size and labels[0] == 1 else "negatives"
        raise GrandmotherError(f"--testset {path}: has {only} only; a test set needs positives and negatives")
    c, h, w = net.input_shape
    ds.check_fits(h, c)  # one-line error for images smaller than the network input, or gray for rgb
    return ds, labels, index


def balanced_subsample(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Indices with as many positives as negatives (the larger class subsampled without replacement)."""
    labels = np.asarray(labels)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    n = min(len(pos), len(neg))
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)]))


# ---------------------------------------------------------------- writing pictures

def save_png(array: np.ndarray, path: Path) -> None:
    """uint8 (H, W) or (H, W, 3) array to a PNG file."""
    from PIL import Image
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def save_npy(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def _rgb(hex_color: str) -> tuple[int, int, int]:
    return tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5))


def save_top_images(dataset, acts: np.ndarray, labels: np.ndarray, path: Path, count: int = 48, cols: int = 8) -> dict:
    """Figure 3 top: the test images with the highest activation, best first, row by row."""
    order = np.argsort(-acts, kind="stable")[:count]
    images = dataset.get_batch(order.tolist()).numpy()
    frames = [_rgb(POSITIVE_COLOR) if labels[i] == 1 else _rgb(NEGATIVE_COLOR) for i in order]
    tile = max(64, images.shape[-1])
    save_png(image_grid(images, frames, cols, tile), path)
    return {"indices": order.tolist(), "positives_among_top": int(labels[order].sum()), "count": int(len(order))}


# ---------------------------------------------------------------- the optimal stimulus

def mean_prepared(net, ds, indices, batch_size: int = 256) -> np.ndarray:
    """The mean (C, H, W) of the prepared (network-input) images at `indices`."""
    total, n = None, 0
    for s in range(0, len(indices), batch_size):
        chunk = [int(i) for i in indices[s:s + batch_size]]
        x = net.prepare(ds.get_batch(chunk).to(next(net.parameters()).device)).double().sum(0).cpu().numpy()
        total, n = (x if total is None else total + x), n + len(chunk)
    return total / max(n, 1)


def stimulus_picture(x: np.ndarray, min_px: int = 192) -> np.ndarray:
    """(C, H, W) float -> uint8 image, min-max scaled over all channels, upscaled for viewing."""
    from PIL import Image
    lo, hi = float(x.min()), float(x.max())
    scaled = np.zeros_like(x) if hi <= lo else (x - lo) / (hi - lo)
    img = (scaled * 255).round().astype(np.uint8)
    img = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
    factor = max(1, math.ceil(min_px / img.shape[0]))
    size = (img.shape[1] * factor, img.shape[0] * factor)
    return np.asarray(Image.fromarray(img).resize(size, Image.NEAREST))


# ---------------------------------------------------------------- the whole run (grandmother visualize)

def unit_from_probe(probe_dir: Path) -> tuple[str, float | None, str | None]:
    """(best unit id, its threshold, concept) from PROBE_DIR/probe.json: the held-out best unit (chosen on the
    selection half) when the probe has one, else the best unit of the paper's same-set protocol."""
    path = Path(probe_dir) / "probe.json"
    if not path.is_file():
        raise GrandmotherError(f"--probe {probe_dir}: no probe.json there; run `grandmother probe` first")
    try:
        data = json.loads(path.read_text())
        best = data["heldout"]["best"] if isinstance(data.get("heldout"), dict) else data["best"]
        return str(best["unit"]), best.get("threshold"), data.get("concept")
    except (ValueError, KeyError, TypeError) as e:
        raise GrandmotherError(f"{path}: not a probe result ({e})") from None


def run_visualize(run_dir: Path, testset_dir: Path, unit_text: str, out_dir: Path, threshold: float | None = None,
                  concept: str | None = None, device: str = "cpu", stimulus: StimulusSettings | None = None,
                  seed: int = 0, top: int = 48, batch_size: int = 256, command: str | None = None) -> dict:
    """Figures 2 and 3 for one unit; `stimulus` (analysis/stimulus.py) sets the optimal-stimulus search."""
    stimulus = stimulus or StimulusSettings(seed=seed)
    stimulus.check()
    from grandmother.training.runs import load_run
    unit = Unit.parse(unit_text)  # a malformed id fails before any loading
    _, net, meta = load_run(Path(run_dir), device)
    unit.check(net)
    for prm in net.parameters():
        prm.requires_grad_(False)
    ds, labels, index = open_labeled_testset(Path(testset_dir), net)
    concept = concept or "positives"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    acts = unit_responses(net, unit, prepared_batches(net, ds, batch_size))
    save_npy(acts.astype(np.float32), out_dir / "activations.npy")
    idx = balanced_subsample(labels, seed)
    save_histogram(acts[idx], labels[idx], out_dir / "histogram.png", f"{unit}: {concept} vs distractors (1:1)",
                   threshold, concept)
    hist = {"images_per_class": int(len(idx) // 2), "seed": seed}
    top_info = save_top_images(ds, acts, labels, out_dir / "top_images.png", count=top)

    x, value, info = optimal_stimulus(net, unit, stimulus)
    order = np.argsort(-acts, kind="stable")[:top]
    top_mean = net.prepare(ds.get_batch(order.tolist()).to(x.device)).double().mean(0).cpu().numpy()
    neg_mean = mean_prepared(net, ds, np.flatnonzero(labels == 0), batch_size)
    similarity = stimulus_similarity(net, unit, x, top_mean, neg_mean)
    shown = similarity.pop("stimulus")
    x_unit = shown / np.linalg.norm(shown)
    save_npy(x_unit.astype(np.float32), out_dir / "optimal_stimulus.npy")
    save_png(stimulus_picture(x_unit), out_dir / "optimal_stimulus.png")
    save_png(stimulus_picture(top_mean), out_dir / "top_mean.png")

    result = {
        **result_fields(run_dir, meta, command), "unit": str(unit), "testset": str(Path(testset_dir).resolve()),
        "concept": concept, "threshold": threshold,
        "test_images": int(len(labels)), "positives": int(labels.sum()),
        "activation": {"min": float(acts.min()), "max": float(acts.max()),
                       "mean_positive": float(acts[labels == 1].mean()),
                       "mean_negative": float(acts[labels == 0].mean())},
        "histogram": hist, "top_images": top_info,
        # f(x*) should be at least the best test image's activation (both on spheres of about this radius).
        "optimal_stimulus": {"value": value, "best_test_activation": float(acts.max()), **info,
                             "correlation": {**similarity, "top_count": int(len(order))}},
        "files": {"histogram": "histogram.png", "top_images": "top_images.png",
                  "optimal_stimulus": "optimal_stimulus.png", "optimal_stimulus_array": "optimal_stimulus.npy",
                  "top_mean": "top_mean.png", "activations": "activations.npy"},
    }
    atomic_write_json(out_dir / "visualize.json", result)
    return result
