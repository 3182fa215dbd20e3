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


def selection_rows() -> list[str]:
    """The numbers the defaults are chosen by: selection-half accuracies only (faces)."""
    rows = []
    for p in sorted(RESULTS.glob("*.json"), key=_order):
        res = json.loads(p.read_text())
        if res.get("data", "train") != "train" or "faces" not in res["scores"]:
            continue  # the control and the few-faces runs change the data, not the recipe
        tr = res["scores"]["faces"]["trained"]
        rows.append((tr["stages"][-1]["selection_accuracy"], tr["best"]["selection_accuracy"], res["name"]))
    rows.sort(reverse=True)
    return ["| run | top stage, selection half | best unit, selection half |", "|---|---|---|"] + [
        f"| `{n}` | {pct(t)} | {pct(b)} |" for t, b, n in rows]


def main():
    parts = [BEGIN, "", "**Faces** (test_faces: LFW persons held out of training vs Caltech-101 objects)", "",
             HEADER, *concept_rows("faces")]
    for concept, what in (("cats", "Kaggle cats vs dogs and objects"), ("bodies", "INRIA pedestrians vs objects")):
        rows = concept_rows(concept)
        if rows:
            parts += ["", f"**{concept.capitalize()}** (test_{concept}: {what})", "", HEADER, *rows]
    parts += ["", "Selection-half accuracies (faces; what the defaults are chosen by, best top stage first):", "",
              *selection_rows(), "", END]
    text = DOC.read_text()
    text = re.sub(re.escape(BEGIN) + ".*" + re.escape(END), lambda _: "\n".join(parts), text, flags=re.S)
    DOC.write_text(text)
    print(f"{DOC}: {len(concept_rows('faces'))} face rows")


if __name__ == "__main__":
    main()
