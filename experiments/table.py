"""Write the results table of docs/experiments.md from experiments/results/*.json.

    .venv/bin/python experiments/table.py        # rewrites the part between the table markers

Per row, all on the evaluation half of the face test set (unit, threshold and direction chosen on the
selection half): per-stage AUC of the unit with the best selection-half AUC, trained then random
(best of the 5 seeds); accuracy of the best unit of any stage and of the best top-stage unit, with
bootstrap 95% intervals; random weights' best (best of 5 seeds, any stage / top stage); the best
trivial cue; the best of 10,000 linear filters.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
DOC = ROOT / "docs" / "experiments.md"
BEGIN, END = "<!-- table:begin -->", "<!-- table:end -->"


def pct(x):
    return f"{100 * x:.1f}"


def ci(r):
    return f"{pct(r['evaluation_accuracy'])} [{pct(r['ci95'][0])}, {pct(r['ci95'][1])}]"


def row(res: dict, concept: str = "faces") -> str:
    f = res["scores"][concept]
    tr, seeds = f["trained"], f["random"]["seeds"]
    n_st = len(tr["stages"])
    aucs = " / ".join(f"{s['best_auc']['evaluation_auc']:.2f}" for s in tr["stages"])
    raucs = " / ".join(f"{max(sd['stages'][i]['best_auc']['evaluation_auc'] for sd in seeds):.2f}" for i in range(n_st))
    top = tr["stages"][-1]
    rnd_best = max((sd["best"] for sd in seeds), key=lambda b: b["evaluation_accuracy"])
    rnd_top = max((sd["stages"][-1] for sd in seeds), key=lambda b: b["evaluation_accuracy"])
    cue_name, cue = max(f["trivial"].items(), key=lambda kv: kv[1]["evaluation_accuracy"])
    lin = f["linear_filter_10000"]
    direction = "" if top["direction"] == "positive" else " (inverted)"
    return (f"| `{res['name']}` | {res['what']} | {res['images_seen']:,} | {res['train_wall_s'] / 60:.1f} | "
            f"{aucs} | {raucs} | {ci(tr['best'])} (s{tr['best']['stage']}) | {ci(top)}{direction} | "
            f"{ci(rnd_best)} / {ci(rnd_top)} | {ci(cue)} {cue_name.replace('_', ' ')} | {ci(lin)} |")


HEADER = ("| run | setting | images seen | train min | AUC per stage, trained | AUC per stage, random (best of 5) "
          "| best unit, any stage | best top-stage unit | random weights: any stage / top stage (best of 5) "
          "| best trivial cue | linear filter (10,000) |\n|---|---|---|---|---|---|---|---|---|---|---|")


def _order(p: Path):
    res = json.loads(p.read_text())
    return res.get("order", 0), res["images_seen"]  # a part-way row (NAME@...k) before its run's last


def concept_rows(concept: str) -> list[str]:
    out = []
    for p in sorted(RESULTS.glob("*.json"), key=_order):
        res = json.loads(p.read_text())
        if concept in res["scores"]:
            out.append(row(res, concept))
    return out


# The rows of issue 20 (Science III), in groups; every other row is an earlier one (59% faces and the control).
FRACTIONS = [("faces01_1.5M", "1%"), ("faces03_1.5M", "3%"), ("fewfaces_curve_3M@1500k", "10%"),
             ("faces20_1.5M", "20%"), ("faces30_1.5M", "30%"), ("adam_decnorm_1.5M", "59%"),
             ("control_nofaces_1.5M", "0% (control)")]
SEEDS = ["fewfaces_curve_3M@1500k", "fewfaces_seed1_1.5M", "fewfaces_seed2_1.5M"]
RECIPE = ["fewfaces_adagrad_1.5M", "fewfaces_tied_1.5M", "fewfaces_nonorm_1.5M", "fewfaces_nolcn_1.5M",
          "fewfaces64_1.5M"]
CURVE_RUNS = ["fewfaces_curve_3M", "fewfaces_lr3e-3_curve_1.5M", "faces20_lr3e-3_curve_1.5M"]
RARE = ["rare3_1.5M"]
DOWNPOUR = ["downpour_r2_fewfaces_1.5M", "downpour_r2p2_fewfaces_1.5M"]


def load_all() -> dict[str, dict]:
    return {r["name"]: r for r in (json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"), key=_order))}


def named_rows(rows: dict, names: list[str], concept: str = "faces") -> list[str]:
    return [row(rows[n], concept) for n in names if n in rows and concept in rows[n]["scores"]]


def curve_names(rows: dict) -> list[str]:
    out = []
    for run in CURVE_RUNS:
        out += sorted((n for n in rows if n == run or re.fullmatch(re.escape(run) + r"@\d+k", n)),
                      key=lambda n: rows[n]["images_seen"])
    return out


def seeds_summary(rows: dict) -> list[str]:
    present = [n for n in SEEDS if n in rows]
    if not present:
        return []
    tops = [rows[n]["scores"]["faces"]["trained"]["stages"][-1]["evaluation_accuracy"] for n in present]
    bests = [rows[n]["scores"]["faces"]["trained"]["best"]["evaluation_accuracy"] for n in present]
    f = rows[present[0]]["scores"]["faces"]
    rnd = max(sd["stages"][-1]["evaluation_accuracy"] for sd in f["random"]["seeds"])
    lin = f["linear_filter_10000"]["evaluation_accuracy"]
    cue = max(c["evaluation_accuracy"] for c in f["trivial"].values())
    mean = sum(tops) / len(tops)
    return [f"{len(present)} training seeds at 10% faces, 1.5 million images: best top-stage unit **{pct(mean)}** "
            f"on average (range {pct(min(tops))}-{pct(max(tops))}); best unit of any stage {pct(sum(bests) / len(bests))} "
            f"(range {pct(min(bests))}-{pct(max(bests))}). Margins of the mean top stage: "
            f"{100 * (mean - rnd):+.1f} over random weights' top stage (best of 5), {100 * (mean - lin):+.1f} over "
            f"the best linear filter, {100 * (mean - cue):+.1f} over the best trivial cue."]


def selection_rows() -> list[str]:
    """The numbers the defaults are chosen by: selection-half accuracies only (faces)."""
    rows = []
    for p in sorted(RESULTS.glob("*.json"), key=_order):
        res = json.loads(p.read_text())
        if res.get("data", "train") not in ("train", "train_fewfaces") or "faces" not in res["scores"]:
            continue  # the control, the sweep and the cat and body runs change the data, not the recipe
        tr = res["scores"]["faces"]["trained"]
        rows.append((tr["stages"][-1]["selection_accuracy"], tr["best"]["selection_accuracy"], res["name"],
                     res.get("data", "train")))
    rows.sort(reverse=True)
    return ["| run | data | top stage, selection half | best unit, selection half |", "|---|---|---|---|"] + [
        f"| `{n}` | {d} | {pct(t)} | {pct(b)} |" for t, b, n, d in rows]


def science_parts(rows: dict) -> list[str]:
    fr = [row(rows[n], "faces").replace(f"| `{n}` |", f"| `{n}` ({label}) |", 1) for n, label in FRACTIONS if n in rows]
    parts = ["**The face fraction**, 1.5 million images each (the same non-face images; the faces a seeded "
             "nested subset)", "", HEADER, *fr,
             "", "**Learning curves** at 10% and 20% faces: every kept checkpoint (250,000 images apart)", "", HEADER,
             *named_rows(rows, curve_names(rows)),
             "", "**Seeds** at 10% faces, 1.5 million images", "", HEADER, *named_rows(rows, SEEDS), "",
             *seeds_summary(rows),
             "", "**The recipe at 10% faces**, 1.5 million images each (one lever changed per row)", "", HEADER,
             *named_rows(rows, ["fewfaces_curve_3M@1500k"] + RECIPE)]
    for concept, what in (("faces", "faces"), ("catfaces", "cat faces (test_catfaces: cat faces cropped by OpenCV's "
                                                 "cat-face cascade vs dogs and objects)"),
                          ("bodiespad", "bodies (test_bodiespad: INRIA pedestrians padded to a square vs objects "
                                        "cropped to their aspect and padded alike)")):
        r = named_rows(rows, RARE, concept)
        if r:
            parts += ["", f"**Cats and bodies**, training data with faces, cat faces and bodies each 7%: {what}", "",
                      HEADER, *r]
    dp = named_rows(rows, ["fewfaces_curve_3M@1500k"] + DOWNPOUR)
    if len(dp) > 1:
        parts += ["", "**Engines**: the 10% faces recipe under Downpour, against the local engine", "", HEADER, *dp]
    return parts


def main():
    rows = load_all()
    science = set(n for n, _ in FRACTIONS) | set(SEEDS) | set(RECIPE) | set(RARE) | set(DOWNPOUR) | set(curve_names(rows))
    earlier = [row(r, "faces") for n, r in rows.items() if n not in science and "faces" in r["scores"]]
    parts = [BEGIN, "", *science_parts(rows), "",
             "**Earlier rows, faces** (59% faces unless the row says otherwise; test_faces: LFW persons held out "
             "of training vs Caltech-101 objects)", "", HEADER, *earlier]
    for concept, what in (("cats", "Kaggle cats vs dogs and objects"), ("bodies", "INRIA pedestrians vs objects")):
        rows = concept_rows(concept)
        if rows:
            parts += ["", f"**{concept.capitalize()}** (test_{concept}: {what})", "", HEADER, *rows]
    parts += ["", "Selection-half accuracies (faces; what the defaults are chosen by, best top stage first):", "",
              *selection_rows(), "", END]
    text = DOC.read_text()
    text = re.sub(re.escape(BEGIN) + ".*" + re.escape(END), lambda _: "\n".join(parts), text, flags=re.S)
    DOC.write_text(text)
    print(f"{DOC}: {len(rows)} rows")


if __name__ == "__main__":
    main()
