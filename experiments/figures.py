"""The figures of docs/experiments.md, drawn from experiments/results/*.json (nothing is re-measured).

    .venv/bin/python experiments/figures.py        # writes docs/figures/learning_curve.png, face_fraction.png

learning_curve.png   held-out accuracy against images seen: the best top-stage unit and the best unit of
                     any stage, for 10% faces (every 250,000 images), 59% faces and no faces (where part-way
                     rows exist), beside random weights (best of 5) and the best linear filter.
face_fraction.png    the best top-stage unit after 1.5 million images against the face fraction.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "experiments" / "results"
FIGURES = ROOT / "docs" / "figures"

# (label, the rows of one training run: its part-way rows NAME@...k and its last row NAME)
CURVES = [("10% faces, seed 0", ["fewfaces_curve_3M"]),
          ("10% faces, Adam 3e-3", ["fewfaces_lr3e-3_curve_1.5M"]),
          ("20% faces, Adam 3e-3", ["faces20_lr3e-3_curve_1.5M"]),
          ("59% faces", ["adam_decnorm_1.5M"]),
          ("no faces (control)", ["control_nofaces_1.5M"])]
SWEEP = [(1, "faces01_1.5M"), (3, "faces03_1.5M"), (10, "fewfaces_curve_3M@1500k"), (20, "faces20_1.5M"),
         (30, "faces30_1.5M"), (59, "adam_decnorm_1.5M")]
SEEDS_AT_10 = ["fewfaces_seed1_1.5M", "fewfaces_seed2_1.5M"]


def load_rows() -> dict[str, dict]:
    return {json.loads(p.read_text())["name"]: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}


def points(rows: dict, names: list[str]) -> list[tuple[int, dict]]:
    """(images seen, faces score block) of every row of the runs `names`, part-way rows included, in order."""
    out = []
    for name in names:
        for key, row in rows.items():
            if key == name or re.fullmatch(re.escape(name) + r"@\d+k", key):
                if "faces" in row["scores"]:
                    out.append((row["images_seen"], row["scores"]["faces"]))
    return sorted(out, key=lambda t: t[0])


def top(f: dict) -> dict:
    return f["trained"]["stages"][-1]


def best(f: dict) -> dict:
    return f["trained"]["best"]


def random_top(f: dict) -> dict:
    return max((s["stages"][-1] for s in f["random"]["seeds"]), key=lambda r: r["evaluation_accuracy"])


def random_best(f: dict) -> dict:
    return max((s["best"] for s in f["random"]["seeds"]), key=lambda r: r["evaluation_accuracy"])


def _band(ax, rec: dict, color: str, label: str):
    lo, hi = rec["ci95"]
    ax.axhspan(100 * lo, 100 * hi, color=color, alpha=0.15, lw=0)
    ax.axhline(100 * rec["evaluation_accuracy"], color=color, ls="--", lw=1, label=label)


def learning_curve(rows: dict, out: Path) -> None:
    from grandmother.report.plots import pyplot, save_figure
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = ["#d62728", "#ff7f0e", "#1f77b4", "#9467bd", "#7f7f7f"]
    ref = None
    for (label, names), color in zip(CURVES, colors):
        pts = points(rows, names)
        if not pts:
            continue
        ref = ref or pts[-1][1]
        x = [n / 1e6 for n, _ in pts]
        for ax, pick in zip(axes, (top, best)):
            y = [100 * pick(f)["evaluation_accuracy"] for _, f in pts]
            lo = [100 * pick(f)["ci95"][0] for _, f in pts]
            hi = [100 * pick(f)["ci95"][1] for _, f in pts]
            ax.plot(x, y, "o-", color=color, label=label, ms=4)
            ax.fill_between(x, lo, hi, color=color, alpha=0.12, lw=0)
    if ref is not None:
        _band(axes[0], random_top(ref), "k", "random weights (best of 5)")
        _band(axes[1], random_best(ref), "k", "random weights (best of 5)")
        for ax in axes:
            _band(ax, ref["linear_filter_10000"], "#2ca02c", "best of 10,000 linear filters")
    axes[0].set_title("best top-stage unit")
    axes[1].set_title("best unit, any stage")
    for ax in axes:
        ax.set_xlabel("images seen (millions)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out faces: accuracy on the evaluation half (%)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle("The face unit forms after 0.75-1.25 million images when faces are 10-20% of the data")
    save_figure(fig, out)


def face_fraction(rows: dict, out: Path) -> None:
    from grandmother.report.plots import pyplot, save_figure
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs, ys, lo, hi = [], [], [], []
    for pct, name in SWEEP:
        if name in rows:
            t = top(rows[name]["scores"]["faces"])
            xs.append(pct)
            ys.append(100 * t["evaluation_accuracy"])
            lo.append(100 * (t["evaluation_accuracy"] - t["ci95"][0]))
            hi.append(100 * (t["ci95"][1] - t["evaluation_accuracy"]))
    ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", color="#d62728", capsize=3, label="trained, seed 0")
    seeds = [100 * top(rows[n]["scores"]["faces"])["evaluation_accuracy"] for n in SEEDS_AT_10 if n in rows]
    if seeds:
        ax.plot([10] * len(seeds), seeds, "s", color="#ff7f0e", label="trained, seeds 1 and 2")
    if xs:
        _band(ax, random_top(rows[SWEEP[-1][1]]["scores"]["faces"]), "k", "random weights (best of 5)")
    ax.set_xscale("log")
    ax.set_xticks([1, 3, 10, 20, 30, 59], ["1", "3", "10", "20", "30", "59"])
    ax.set_xlabel("faces in the training data (%)")
    ax.set_ylabel("best top-stage unit, held out (%)")
    ax.set_title("After 1.5 million images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, out)


def main():
    rows = load_rows()
    FIGURES.mkdir(parents=True, exist_ok=True)
    learning_curve(rows, FIGURES / "learning_curve.png")
    face_fraction(rows, FIGURES / "face_fraction.png")
    print(f"wrote {FIGURES / 'learning_curve.png'} and {FIGURES / 'face_fraction.png'}")


if __name__ == "__main__":
    main()
