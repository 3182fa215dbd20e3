"""Every figure the project draws, in one place (matplotlib, files only, no display).

    save_histogram     Figure 2: a unit's activations on positives and negatives (grandmother visualize)
    plot_curve         Figure 4: a unit's response against scale, shift or rotation (grandmother invariance)
    training_curves    the objective and each stage's terms against images seen (grandmother report)
    health_curves      each stage's median encoder/decoder norms and dead units against images seen (report)
    plot_confusions    row-normalised confusion matrices (grandmother classify)
    image_grid         images tiled and framed (Figure 3's top images; first_stage_filters)
    first_stage_filters stage 0's encoder and decoder vectors at five locations (report)
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from grandmother.io import atomic_path

POSITIVE_COLOR, NEGATIVE_COLOR = "#d62728", "#1f77b4"  # red faces, blue no-faces (Figure 2)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Write a figure as a PNG file (atomically) and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)


def save_histogram(a: np.ndarray, lab: np.ndarray, path: Path, title: str, threshold: float | None = None,
                   concept: str = "positives") -> None:
    """Figure 2: histogram of the activations `a` of positives (lab 1) and negatives (lab 0)."""
    plt = pyplot()
    edges = np.histogram_bin_edges(a, bins=40)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(a[lab == 0], bins=edges, color=NEGATIVE_COLOR, alpha=0.6, label=f"no {concept} ({(lab == 0).sum()})")
    ax.hist(a[lab == 1], bins=edges, color=POSITIVE_COLOR, alpha=0.6, label=f"{concept} ({(lab == 1).sum()})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.3g}")
    ax.set_xlabel("activation")
    ax.set_ylabel("number of images")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_curve(curve: dict, xlabel: str, title: str, path: Path, threshold: float | None = None,
               reference: float | None = None) -> None:
    plt = pyplot()
    x, mean, std = np.array(curve["x"]), np.array(curve["mean"]), np.array(curve["std"])
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    ax.plot(x, mean, "o-", color="#d62728", markersize=3, label="mean response")
    ax.fill_between(x, mean - std, mean + std, color="#d62728", alpha=0.15, label="+- 1 std over images")
    if reference is not None:
        ax.axvline(reference, color="gray", linewidth=0.8)
    if threshold is not None:
        ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"probe threshold {threshold:.3g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("response")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def training_curves(records: list[dict]) -> bytes | None:
    """Total loss, and each stage's reconstruction and sparsity terms, against images seen."""
    if not records:
        return None
    plt = pyplot()
    x = np.array([r.get("images", r["step"]) for r in records], float)
    xlabel = "images seen" if "images" in records[0] else "step"
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    axes[0].plot(x, [r["loss"] for r in records], color="black")
    axes[0].set_title("training objective (all stages)")
    n_stages = max((len(r.get("stages") or []) for r in records), default=0)
    for s in range(n_stages):
        pts = [(xi, r["stages"][s]) for xi, r in zip(x, records) if len(r.get("stages") or []) > s]
        xs = [p[0] for p in pts]
        axes[1].plot(xs, [p[1].get("reconstruction", np.nan) for p in pts], label=f"stage {s}")
        axes[2].plot(xs, [p[1].get("sparsity", np.nan) for p in pts], label=f"stage {s}")
    axes[1].set_title("reconstruction ||W2 W1 x - x||^2")
    axes[2].set_title("sparsity lambda * sum sqrt(eps + H y^2)")
    for ax in axes:
        ax.set_xlabel(xlabel)
        if all(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
            ax.set_yscale("log")  # the terms fall over orders of magnitude early in training
        if ax is not axes[0] and n_stages:
            ax.legend(fontsize=8)
    return figure_png(fig)


def health_curves(records: list[dict]) -> bytes | None:
    """Per stage: median encoder and decoder norms, and the dead-unit fraction, against images seen."""
    keys = ("encoder_norm", "decoder_norm", "dead_fraction")
    recs = [r for r in records if r.get("stages") and "encoder_norm" in r["stages"][0]]
    recs = [r for r in recs if len(r["stages"]) == len(recs[0]["stages"])
            and all(all(k in st for k in keys) for st in r["stages"])]
    if not recs:
        return None
    plt = pyplot()
    x = [r.get("images", r["step"]) for r in recs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    for s in range(len(recs[0]["stages"])):
        for ax, key in zip(axes, ("encoder_norm", "decoder_norm", "dead_fraction")):
            ax.plot(x, [r["stages"][s][key] for r in recs], label=f"stage {s}")
    for ax, title in zip(axes, ("median encoder vector norm", "median decoder vector norm", "dead pooling units")):
        ax.set_title(title)
        ax.set_xlabel("images seen")
        ax.legend(fontsize=8)
    return figure_png(fig)


def figure_png(fig) -> bytes:
    """A figure as PNG bytes (for inlining into the report); closes it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()


def plot_confusions(panels: list[tuple[str, np.ndarray, np.ndarray]], classes: list[str], path: Path) -> None:
    """Row-normalised confusion matrices side by side, one per (title, truth, prediction)."""
    from sklearn.metrics import confusion_matrix

    plt = pyplot()

    n = len(classes)
    many = n > 20  # with ~100 classes, per-cell numbers and every tick label are unreadable
    side = 4 if n <= 5 else (6 if not many else 9)
    fig, axes = plt.subplots(1, len(panels), figsize=(side * len(panels) + 1, side), squeeze=False)
    for ax, (title, truth, pred) in zip(axes[0], panels):
        cm = confusion_matrix(truth, pred, labels=np.arange(n)).astype(float)
        cm /= np.maximum(cm.sum(1, keepdims=True), 1)
        im = ax.imshow(cm, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"{title}: {(truth == pred).mean():.1%}", fontsize=10)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if many:
            step = max(1, n // 25)
            ticks = np.arange(0, n, step)
            ax.set_xticks(ticks, [classes[i] for i in ticks], rotation=90, fontsize=5)
            ax.set_yticks(ticks, [classes[i] for i in ticks], fontsize=5)
        else:
            ax.set_xticks(np.arange(n), classes, rotation=45, ha="right", fontsize=8)
            ax.set_yticks(np.arange(n), classes, fontsize=8)
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{cm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if cm[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=list(axes[0]), fraction=0.03, label="fraction of the true class")
    save_figure(fig, path, dpi=130)


def image_grid(images: np.ndarray, frames: list[tuple[int, int, int]] | None, cols: int, tile: int) -> np.ndarray:
    """uint8 (N, C, H, W) images tiled `cols` wide, each upscaled to `tile` px and framed; RGB out."""
    from PIL import Image
    n = len(images)
    rows = max(1, math.ceil(n / cols))
    border, gap = 3, 2
    cell = tile + 2 * border + gap
    canvas = np.full((rows * cell + gap, cols * cell + gap, 3), 255, np.uint8)
    for i, img in enumerate(images):
        hwc = np.repeat(img.transpose(1, 2, 0), 3, axis=2) if img.shape[0] == 1 else img.transpose(1, 2, 0)
        big = np.asarray(Image.fromarray(np.ascontiguousarray(hwc)).resize((tile, tile), Image.NEAREST))
        r, c = divmod(i, cols)
        y, x = gap + r * cell, gap + c * cell
        canvas[y:y + tile + 2 * border, x:x + tile + 2 * border] = frames[i] if frames else (128, 128, 128)
        canvas[y + border:y + border + tile, x + border:x + border + tile] = big
    return canvas


def first_stage_filters(net, tile: int = 40) -> np.ndarray:
    """RGB picture of stage 0's filters at 5 locations (centre, then the quadrants' centres).

    Row pairs per location: the encoder vectors (W1 rows) of every map, then the decoder vectors (W2
    columns); each filter min-max scaled on its own, gray frame = encoder, black frame = decoder.
    """
    f = net.stages[0].filter
    ho, wo = f.out_hw
    spots = [(ho // 2, wo // 2), (ho // 4, wo // 4), (ho // 4, 3 * wo // 4), (3 * ho // 4, wo // 4),
             (3 * ho // 4, 3 * wo // 4)]
    tiles, frames = [], []
    for i, j in spots:
        for name, colour in (("encoder", (160, 160, 160)), ("decoder", (0, 0, 0))):
            w = getattr(f, name)[i, j].detach().float().cpu().numpy()  # (M, C, k, k)
            lo = w.min(axis=(1, 2, 3), keepdims=True)
            hi = w.max(axis=(1, 2, 3), keepdims=True)
            tiles.append(((w - lo) / np.maximum(hi - lo, 1e-12) * 255).round().astype(np.uint8))
            frames += [colour] * len(w)
    return image_grid(np.concatenate(tiles), frames, cols=f.maps, tile=tile)
