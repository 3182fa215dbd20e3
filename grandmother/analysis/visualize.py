"""Pictures of one unit: its activation histogram, its top test images and its optimal stimulus.

    grandmother visualize RUN_DIR --testset TEST_DIR --unit s2.lcn.m3.y10.x12 --out DIR
    grandmother visualize RUN_DIR --testset TEST_DIR --probe PROBE_DIR --out DIR   # the probe's best unit

writes into DIR (each file atomically):
    histogram.png            Figure 2: activations of positives (red) and negatives (blue), the test set
                             subsampled to 1:1 (seeded), with the probe's threshold when known
    top_images.png           Figure 3 top: the 48 test images with the highest activation (6 x 8),
                             framed red for positives and blue for negatives
    optimal_stimulus.png     Figure 3 bottom: x* = argmax f(x) subject to ||x||_2 = const
    optimal_stimulus.npy     x* / ||x*|| as float32 (C, H, W), unit norm like the paper's constraint
    activations.npy          the unit's activation on every test image (aligned with the test set)
    visualize.json           numbers behind the figures and the command that made them

The optimal stimulus (paper section 4.3: "x* = argmax_x f(x; W, H) subject to ||x||_2 = 1") is found
in the network's input space, i.e. on standardized images (Network.prepare). The network is not scale
invariant, so the radius of the sphere matters; ours is sqrt(C*H*W), the norm of a standardized image
(zero mean, unit variance per image), so x* lives at the scale the network was trained on. Up to that
fixed factor this is the paper's ||x|| = 1 problem; we save and show x*/||x*||. No zero-mean constraint
is added (the paper has none). Solver: projected gradient ascent (step along the gradient, project back
onto the sphere) with a backtracking Armijo line search, from several random starts; the best is kept.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from grandmother.errors import GrandmotherError
from grandmother.io import atomic_path, atomic_write_json
from grandmother.report.plots import NEGATIVE_COLOR, POSITIVE_COLOR, image_grid, save_histogram
from grandmother.report.results import result_fields
from grandmother.analysis.units import Unit, prepared_batches, unit_activation, unit_responses



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

def optimal_stimulus(net, unit: Unit, radius: float | None = None, restarts: int = 4, max_iters: int = 300,
                     seed: int = 0, tol: float = 1e-6, patience: int = 10) -> tuple[torch.Tensor, float, dict]:
    """argmax_x f(x) subject to ||x||_2 = radius, by projected gradient ascent with Armijo backtracking.

    Returns (x* of shape (C, H, W) on the sphere, f(x*), info). `radius` defaults to sqrt(C*H*W), the
    norm of a standardized image. Each iteration: g = grad f(x); trial x(t) = radius * (x + t g) /
    ||x + t g||; accept the largest t (tried from twice the last accepted step, halving) with
    f(x(t)) >= f(x) + sigma * <g, x(t) - x>  (Armijo rule along the projection arc, Bertsekas 1976).
    The random starts run side by side as one batch (images do not interact in the network), each
    with its own step size; a start stops when no ascent step exists, or when it gained less than
    tol * max(1, |f|) for `patience` iterations in a row.
    """
    c, h, w = net.input_shape
    radius = float(radius) if radius else math.sqrt(c * h * w)
    p = next(net.parameters())
    gen = torch.Generator().manual_seed(seed)
    sigma = 1e-4
    dims = (1, 2, 3)

    def values(x):
        with torch.no_grad():
            return unit_activation(net, x, unit).double()

    def values_and_grads(x):
        x = x.detach().requires_grad_(True)
        v = unit_activation(net, x, unit)
        (g,) = torch.autograd.grad(v.sum(), x)  # per-start gradients: the starts are independent
        return v.detach().double(), g.detach()

    def project(x):
        return x * (radius / x.flatten(1).norm(dim=1).clamp_min(1e-30)).view(-1, 1, 1, 1)

    x = project(torch.randn((restarts, c, h, w), generator=gen, dtype=torch.float64).to(p.device, p.dtype))
    v, g = values_and_grads(x)
    step = torch.zeros(restarts, dtype=torch.float64, device=p.device)  # 0 = no step accepted yet
    active = torch.ones(restarts, dtype=torch.bool, device=p.device)
    stalled = torch.zeros(restarts, dtype=torch.long, device=p.device)
    iterations = torch.zeros(restarts, dtype=torch.long, device=p.device)
    x_prev = g_prev = None
    for _ in range(max_iters):
        gnorm = g.flatten(1).norm(dim=1).double()
        active &= gnorm > 0
        if not active.any():
            break
        # Trial step: Barzilai-Borwein <s,s>/<s,y> from the last move (s = x - x_prev, y = g_prev - g) where
        # it is positive, else twice the last accepted step; the very first moves a tenth of the radius.
        t = torch.where(step > 0, 2.0 * step, 0.1 * radius / gnorm.clamp_min(1e-30))
        if x_prev is not None:
            s_, y_ = (x - x_prev).flatten(1).double(), (g_prev - g).flatten(1).double()
            sy = (s_ * y_).sum(1)
            t = torch.where(sy > 0, (s_ * s_).sum(1) / sy.clamp_min(1e-300), t)
        accepted = ~active
        x_new, v_new = x.clone(), v.clone()
        while not accepted.all():
            trial = project(x + t.to(x.dtype).view(-1, 1, 1, 1) * g)
            vt = values(trial)
            ok = (vt >= v + sigma * (g * (trial - x)).sum(dims).double()) & ~accepted
            x_new[ok], v_new[ok], step[ok] = trial[ok], vt[ok], t[ok]
            accepted |= ok
            t = torch.where(accepted, t, 0.5 * t)
            tiny = ~accepted & (t * gnorm < 1e-12 * radius)
            active &= ~tiny  # no ascent step at this precision: a stationary point, stop this start
            accepted |= tiny
        gain = v_new - v
        iterations += active.long()
        x_prev, g_prev = x, g
        x = torch.where(active.view(-1, 1, 1, 1), x_new, x)
        stalled = torch.where(active & (gain <= tol * v_new.abs().clamp_min(1.0)), stalled + 1, 0)
        active &= stalled < patience
        if not active.any():
            break
        v, g = values_and_grads(x)
    v = values(x)
    best = int(torch.argmax(v))
    runs = [{"restart": i, "value": float(v[i]), "iterations": int(iterations[i])} for i in range(restarts)]
    info = {"radius": radius, "restarts": restarts, "max_iters": max_iters, "seed": seed, "runs": runs}
    return x[best].detach().clone(), float(v[best]), info


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
                  concept: str | None = None, device: str = "cpu", restarts: int = 4, max_iters: int = 300,
                  radius: float | None = None, seed: int = 0, top: int = 48, batch_size: int = 256,
                  command: str | None = None) -> dict:
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

    x, value, info = optimal_stimulus(net, unit, radius, restarts, max_iters, seed)
    x_unit = (x / x.norm()).double().cpu().numpy()
    save_npy(x_unit.astype(np.float32), out_dir / "optimal_stimulus.npy")
    save_png(stimulus_picture(x_unit), out_dir / "optimal_stimulus.png")

    result = {
        **result_fields(run_dir, meta, command), "unit": str(unit), "testset": str(Path(testset_dir).resolve()),
        "concept": concept, "threshold": threshold,
        "test_images": int(len(labels)), "positives": int(labels.sum()),
        "activation": {"min": float(acts.min()), "max": float(acts.max()),
                       "mean_positive": float(acts[labels == 1].mean()),
                       "mean_negative": float(acts[labels == 0].mean())},
        "histogram": hist, "top_images": top_info,
        # f(x*) should be at least the best test image's activation (both on spheres of about this radius).
        "optimal_stimulus": {"value": value, "best_test_activation": float(acts.max()), **info},
        "files": {"histogram": "histogram.png", "top_images": "top_images.png",
                  "optimal_stimulus": "optimal_stimulus.png", "optimal_stimulus_array": "optimal_stimulus.npy",
                  "activations": "activations.npy"},
    }
    atomic_write_json(out_dir / "visualize.json", result)
    return result
