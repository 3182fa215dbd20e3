"""The sections of the HTML report: training, Table 1, the held-out table, figures, invariance, classifiers."""
from __future__ import annotations

import html
import json
from pathlib import Path

from grandmother.report.html import (
    _dict,
    _is_number,
    _list,
    concept_name,
    embed,
    esc,
    fmt,
    kv_table,
    num,
    percent,
    png_tag,
    section_filters,
    table_html,
    table_row,
)
from grandmother.report.plots import health_curves, training_curves

# Table 1 columns: key in probe.json ("best" or a "baselines" entry) and the paper's column name.
TABLE_COLUMNS = [
    ("random_guess", "Random guess"),
    ("random_weights", "Same architecture, random weights"),
    ("linear_filter", "Best linear filter"),
    ("first_stage", "Best first-layer neuron"),
    ("best", "Best neuron"),
    ("no_lcn", "Best neuron without contrast normalization"),
    ("deep_autoencoder_3", "Deep autoencoder, 3 layers"),
    ("deep_autoencoder_6", "Deep autoencoder, 6 layers"),
    ("kmeans", "K-means on 40x40 images"),
]


ALWAYS_SHOWN = {"random_guess", "random_weights", "linear_filter", "first_stage", "best"}


# Le et al., ICML 2012, Table 1 (accuracy %, test sets of 37,000 images, 64.8% negatives). Collected in
# docs/paper-notes.md; the best-neuron cells are the paper's text, the others are recalled (secondary).
PAPER_TABLE1 = {
    "faces": {"random_guess": 64.8, "random_weights": 67.0, "linear_filter": 74.0, "first_stage": 71.0,
              "best": 81.7, "no_lcn": 78.5, "deep_autoencoder_3": 72.3, "deep_autoencoder_6": 70.9, "kmeans": 72.5},
    "human bodies": {"random_guess": 64.8, "random_weights": 66.5, "linear_filter": 68.1, "first_stage": 67.2,
                     "best": 76.7, "no_lcn": 71.8, "deep_autoencoder_3": 71.2, "deep_autoencoder_6": 69.8,
                     "kmeans": 69.3},
    "cat faces": {"random_guess": 64.8, "random_weights": 66.0, "linear_filter": 67.2, "first_stage": 67.1,
                  "best": 74.8, "no_lcn": 69.3, "deep_autoencoder_3": 67.5, "deep_autoencoder_6": 68.3,
                  "kmeans": 68.5},
}


def section_training(run_dir: Path, records: list[dict]) -> tuple[str, dict]:
    from grandmother.training.checkpoint import read_meta
    from grandmother.training.runs import read_run
    cfg, ckpt = read_run(run_dir)
    meta = read_meta(ckpt)
    cfg_path = run_dir / "config.yaml"
    m = cfg.model
    stages = ", ".join(f"{s.maps} maps of {s.receptive_field}x{s.receptive_field} stride {s.stride}, "
                       f"pool {s.pool_size}" for s in m.stages)
    scale = {"preset": cfg.preset, "steps": meta.get("step"), "images_seen": meta.get("images_seen"),
             "training_images": meta.get("dataset_size"), "batch_size": cfg.train.batch_size,
             "engine": meta.get("engine", cfg.engine)}
    pairs = [("preset", cfg.preset), ("input", f"{m.image_size}x{m.image_size}x{m.channels}"),
             ("stages", stages), ("contrast normalization", "yes" if m.lcn else "no (ablation)"),
             ("training data", meta.get("data", "?")), ("training images", meta.get("dataset_size", "?")),
             ("steps", meta.get("step")), ("images seen", meta.get("images_seen")),
             ("optimizer", f"{cfg.train.optimizer}, lr {cfg.train.lr}, batch {cfg.train.batch_size}"),
             ("engine", scale["engine"])]
    faces = training_faces(meta.get("data"))
    if faces:
        pairs.insert(6, ("faces in training data", faces))
    if records and _is_number(records[-1].get("elapsed_s")):
        pairs.append(("training time of the last session", f"{records[-1]['elapsed_s']:.0f} s"))
    parts = ["<h2>Training</h2>",
             f'<p class="note">Scale: {esc(scale["steps"])} steps, {esc(scale["images_seen"])} images seen '
             f'(paper: 10 million 200x200 frames, 1,000 machines for three days). Numbers below reflect this '
             f'scale only.</p>', kv_table(pairs)]
    png = training_curves(records)
    parts.append(png_tag(png, "training curves") if png else "<p>(no metrics.jsonl lines)</p>")
    png = health_curves(records)
    if png:
        parts.append(f'<p class="note">Training health (train.norm_control={cfg.train.norm_control}): median '
                     f'encoder and decoder vector norms per stage, and the fraction of dead pooling units.</p>')
        parts.append(png_tag(png, "training health"))
    parts.append(section_filters(run_dir))
    parts.append(f"<details><summary>config.yaml</summary><pre>{html.escape(cfg_path.read_text())}</pre></details>")
    return "\n".join(parts), scale


def training_faces(data) -> str | None:
    """'before X%, after Y%' from the rebalancing record of the training data's index.json (the run's
    meta.json names the folder; grandmother/data/rebalance.py), or None where there is none."""
    from grandmother.data.rebalance import describe_for_report
    if not isinstance(data, str):
        return None
    try:
        index = json.loads((Path(data) / "index.json").read_text())
    except (OSError, ValueError):
        return None
    return describe_for_report(index.get("rebalance")) if isinstance(index, dict) else None


def section_table1(probes: list[tuple[Path, dict]]) -> str:
    rows = [(concept_name(p, d), table_row(p)) for d, p in probes]
    present = {k for _, row in rows for k, v in row.items() if v is not None}
    columns = [(k, label) for k, label in TABLE_COLUMNS if k in ALWAYS_SHOWN or k in present]
    parts = ["<h2>Table 1: accuracy of the best neuron against the baselines</h2>"]
    if rows:
        parts.append(table_html(rows, columns))
        parts.append('<p class="note">Accuracy (%) of "activation &gt; threshold means positive" on each test set, '
                     'best of 20 equally spaced thresholds per unit (paper protocol); random guess = majority '
                     'class. &mdash; = not computed.</p>')
    else:
        parts.append("<p>No probe results found (run <code>grandmother probe</code>).</p>")
    parts.append("<h3>The paper's Table 1, for reference</h3>")
    parts.append(table_html(list(PAPER_TABLE1.items()), TABLE_COLUMNS, bold_best=True))
    parts.append('<p class="note">Le et al., ICML 2012, Table 1; 37,000-image test sets. Best-neuron cells from the '
                 "paper's text; the other cells as collected in the project's paper notes. Their network saw 10 "
                 "million frames; compare margins over the baselines, not absolute numbers.</p>")
    for d, p in probes:
        best = _dict(p.get("best"))
        parts.append(f"<h3>Probe: {html.escape(concept_name(p, d))}</h3>")
        pairs = [("best unit", best.get("unit")), ("accuracy", fmt(percent(best))),
                 ("threshold", best.get("threshold")), ("test set", p.get("testset", "?"))]
        parts.append(kv_table([(k, v) for k, v in pairs if v is not None]))
        top = [t for t in _list(p.get("top")) if isinstance(t, dict)]
        if top:
            rows_top = "".join(f"<tr><td>{i + 1}</td><td>{html.escape(str(t.get('unit')))}</td>"
                               f"<td>{fmt(percent(t))}</td></tr>" for i, t in enumerate(top[:10]))
            parts.append(f"<details><summary>top {min(10, len(top))} of {len(top)} units</summary><table>"
                         f"<tr><th>#</th><th>unit</th><th>accuracy</th></tr>{rows_top}</table></details>")
        per = _dict(p.get("per_sublayer"))
        if per:
            rows_sub = "".join(f"<tr><th>{esc(k)}</th>"
                               f"<td>{html.escape(str(v.get('unit', '')) if isinstance(v, dict) else '')}</td>"
                               f"<td>{fmt(percent(v))}</td></tr>" for k, v in per.items())
            parts.append(f"<details><summary>best unit of each sublayer</summary><table><tr><th>sublayer</th>"
                         f"<th>unit</th><th>accuracy</th></tr>{rows_sub}</table></details>")
    return "\n".join(parts)


def _pct(v) -> str:
    """A fraction from a results file as a percentage with one decimal; anything else escaped."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "&mdash;" if v is None else html.escape(str(v))
    return f"{100 * v:.1f}"


def _ci(ci) -> str:
    if not (isinstance(ci, (list, tuple)) and len(ci) == 2):
        return ""
    return f" [{_pct(ci[0])}, {_pct(ci[1])}]"


def _auc(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "&mdash;"


def _heldout_rows(ho: dict) -> list[tuple[str, dict, list | None]]:
    """(label, record, paired difference "best unit minus this row") of the held-out table."""
    base = ho.get("baselines") if isinstance(ho.get("baselines"), dict) else {}
    diff = (ho.get("differences") or {}).get("best_minus") or {}
    rows = [("best unit (chosen on selection)", ho.get("best") or {}, None),
             ("best top-stage unit", ho.get("top_stage") or {}, None)]
    rw = base.get("random_weights")
    if isinstance(rw, dict):
        n = len(rw.get("seeds") or [])
        rows.append((f"random weights, mean of {n} seeds", {"evaluation_accuracy": rw.get("mean"),
                                                           "ci95": rw.get("ci95_mean")}, diff.get("random_weights_mean")))
        rows.append((f"random weights, best of {n} seeds (seed {rw.get('best_seed')})",
                     {"evaluation_accuracy": rw.get("best"), "ci95": rw.get("ci95_best"), "unit": rw.get("unit")},
                     diff.get("random_weights_best")))
    for key, label in (("linear_filter", "best linear filter"), ("first_stage", "best first-stage unit")):
        if isinstance(base.get(key), dict):
            rows.append((label, base[key], diff.get(key)))
    cues = base.get("trivial_cues") if isinstance(base.get("trivial_cues"), dict) else {}
    chosen = (base.get("best_trivial_cue") or {}).get("cue")
    for k, rec in cues.items():
        if isinstance(rec, dict):
            rows.append((f"trivial cue: {k}" + (" (chosen on selection)" if k == chosen else ""), rec,
                         diff.get("best_trivial_cue") if k == chosen else None))
    if isinstance(base.get("random_guess"), dict):
        rows.append(("majority guess", base["random_guess"], diff.get("random_guess")))
    return rows


def section_heldout(probes: list[tuple[Path, dict]]) -> str:
    """The honest numbers: chosen on the selection half, scored on the evaluation half, with intervals."""
    parts = []
    for d, p in probes:
        ho = p.get("heldout")
        if not isinstance(ho, dict):
            continue
        if "skipped" in ho:
            parts.append(f"<h2>Held-out evaluation: {html.escape(concept_name(p, d))}</h2><p>Skipped: "
                         f"{html.escape(str(ho['skipped']))}</p>")
            continue
        pr = ho.get("protocol") if isinstance(ho.get("protocol"), dict) else {}
        sel, ev = pr.get("selection") or {}, pr.get("evaluation") or {}
        boot = pr.get("bootstrap") or {}
        parts.append(f"<h2>Held-out evaluation: {html.escape(concept_name(p, d))}</h2>")
        parts.append(
            f'<p class="note">Units, thresholds and directions are chosen on the selection half '
            f'({html.escape(str(sel.get("images", "?")))} images, {html.escape(str(sel.get("positives", "?")))} '
            f'positive) and scored on the evaluation half ({html.escape(str(ev.get("images", "?")))} images, '
            f'{html.escape(str(ev.get("positives", "?")))} positive); split seed {html.escape(str(pr.get("seed")))}, '
            f'{html.escape(str(pr.get("rule", "")))}; identities: {html.escape(str(pr.get("identities", "?")))}. '
            f'Direction: {html.escape(str(pr.get("direction", "?")))}; thresholds: '
            f'{html.escape(str(pr.get("thresholds", "?")))}. Intervals: 95% percentile bootstrap, '
            f'{html.escape(str(boot.get("resamples", "?")))} resamples of the '
            f'{html.escape(str(boot.get("resampled", "evaluation half")))}; the difference column is paired '
            f'(the same resamples). "Same set" is the paper\'s protocol: every unit and threshold chosen and '
            f'scored on all images, positive direction only.</p>')
        body = []
        for label, rec, dif in _heldout_rows(ho):
            rec = rec if isinstance(rec, dict) else {}
            unit = rec.get("unit")
            body.append(f"<tr><th>{html.escape(label)}</th><td>{html.escape(str(unit)) if unit is not None else ''}</td>"
                        f"<td><b>{_pct(rec.get('evaluation_accuracy'))}</b>{_ci(rec.get('ci95'))}</td>"
                        f"<td>{_pct(rec.get('selection_accuracy'))}</td><td>{_auc(rec.get('auc_evaluation'))}</td>"
                        f"<td>{html.escape(str(rec.get('direction', '')))}</td>"
                        f"<td>{_pct(rec.get('same_set_accuracy'))}</td>"
                        f"<td>{(_pct(dif[0]) + ' to ' + _pct(dif[1])) if isinstance(dif, list) and len(dif) == 2 else ''}</td></tr>")
        parts.append("<table><tr><th>row</th><th>unit</th><th>evaluation accuracy % [95% CI]</th>"
                     "<th>selection %</th><th>AUC (evaluation)</th><th>direction</th><th>same set % (paper)</th>"
                     "<th>best unit minus row, 95% CI (points)</th></tr>" + "".join(body) + "</table>")
        stages = [r for r in (ho.get("per_stage") or []) if isinstance(r, dict)]
        if stages:
            rows = []
            for r in stages:
                t = r.get("trained") if isinstance(r.get("trained"), dict) else {}
                rnd = r.get("random") if isinstance(r.get("random"), dict) else {}
                ta = r.get("trained_auc") if isinstance(r.get("trained_auc"), dict) else {}
                where = f"stage {r.get('stage')}" + (f" {r['sublayer']}" if r.get("sublayer") else " (all)")
                rows.append(f"<tr><th>{html.escape(where)}</th><td>{html.escape(str(t.get('unit', '')))}</td>"
                            f"<td><b>{_pct(t.get('evaluation_accuracy'))}</b>{_ci(t.get('ci95'))}</td>"
                            f"<td>{_pct(rnd.get('mean'))}</td><td>{_pct(rnd.get('best'))}{_ci(rnd.get('ci95_best'))}</td>"
                            f"<td>{_auc(ta.get('auc_evaluation'))} {html.escape(str(ta.get('direction', '')))}</td>"
                            f"<td>{_auc(rnd.get('auc_mean'))} / {_auc(rnd.get('auc_best'))}</td>"
                            f"<td>{_pct(t.get('same_set_accuracy'))}</td></tr>")
            parts.append("<h3>Where information is gained or lost: best unit per stage and sublayer</h3>"
                         "<table><tr><th>stage, sublayer</th><th>trained: unit</th><th>trained: evaluation % [CI]</th>"
                         "<th>random: mean %</th><th>random: best % [CI]</th><th>trained: AUC (unit chosen on "
                         "selection)</th><th>random AUC: mean / best</th><th>trained: same set %</th></tr>"
                         + "".join(rows) + "</table>")
            parts.append('<p class="note">Each row\'s unit is chosen on the selection half among that stage\'s '
                         '(or sublayer\'s) units; random weights: the same choice in each random network. AUC is '
                         'the evaluation-half AUC of the unit with the best selection-half AUC, in its direction.</p>')
    return "\n".join(parts)


def section_visualize(items: list[tuple[Path, dict]]) -> str:
    parts = []
    for d, v in items:
        files = _dict(v.get("files"))
        st = _dict(v.get("optimal_stimulus"))
        top = _dict(v.get("top_images"))
        parts.append(f"<h2>Unit {esc(v.get('unit'))}: {esc(v.get('concept', ''))}</h2>")
        parts.append("<h3>Histogram of activations (Figure 2)</h3>")
        parts.append(embed(d, files.get("histogram", "histogram.png"), "histogram"))
        parts.append(f'<p class="note">Test set subsampled to as many negatives as positives '
                     f'({num(_dict(v.get("histogram")).get("images_per_class"), "d")} each). Red: positives, '
                     f'blue: negatives.</p>')
        parts.append("<h3>Top test images (Figure 3, top)</h3>")
        parts.append(embed(d, files.get("top_images", "top_images.png"), "top images"))
        parts.append(f'<p class="note">{num(top.get("positives_among_top"), "d")} of the top '
                     f'{num(top.get("count"), "d")} are positives (red frame); blue frames are negatives.</p>')
        parts.append("<h3>Optimal stimulus (Figure 3, bottom)</h3>")
        parts.append(embed(d, files.get("optimal_stimulus", "optimal_stimulus.png"), "optimal stimulus"))
        if files.get("top_mean"):
            parts.append(embed(d, files.get("top_mean"), "mean of the top test images"))
        if st:
            corr = _dict(st.get("correlation"))
            search = (f'ascent preconditioned by the 1/f^{num(st.get("decay"))} spectrum of natural images'
                      if st.get("parameterization") == "fourier" else f'{esc(st.get("parameterization", "pixel"))} '
                      f'ascent')
            parts.append(f'<p class="note">x* = argmax f(x) on the sphere ||x|| = {num(st.get("radius"))} in the '
                         f'network\'s input space (shown as x*/||x*||, min-max scaled), projected gradient ascent '
                         f'with Armijo line search: {search}, response averaged over shifts of up to '
                         f'{num(st.get("jitter"), "d")} pixel(s), {num(st.get("restarts"), "d")} random starts. '
                         f'f(x*) = {num(st.get("value"))}; best test image: {num(st.get("best_test_activation"))}. '
                         + (f'Correlation of x* with the mean of the top {num(corr.get("top_count"), "d")} test '
                            f'images (beside it): {num(corr.get("top_images"), ".2f")}; with the mean negative '
                            f'image: {num(corr.get("mean_negative"), ".2f")}'
                            + (' (absolute values: the unit cannot tell x from -x)' if corr.get("sign_free") else '')
                            + '.' if corr else '') + '</p>')
    return "\n".join(parts)


def section_invariance(items: list[tuple[Path, dict]]) -> str:
    parts = []
    for d, inv in items:
        files = _dict(inv.get("files"))
        parts.append(f"<h2>Invariance of unit {esc(inv.get('unit'))} (Figure 4)</h2>")
        for name, f in files.items():
            parts.append(embed(d, f, str(name)))
        images = inv.get("images")
        parts.append(f'<p class="note">Mean response over {len(images) if isinstance(images, list) else "?"} images; '
                     f'{esc(inv.get("interpolation"))} interpolation, borders by '
                     f'{esc(inv.get("border"))}; shifts in pixels at the {num(inv.get("input_size"), "d")}-pixel '
                     f'network input. ' + ("No rotation sequences were given." if "rotation" not in files
                                           else "") + "</p>")
    return "\n".join(parts)


def section_classify(items: list[tuple[Path, dict]]) -> str:
    parts = []
    for d, c in items:
        parts.append(f"<h2>Classification: {html.escape(d.name)}</h2>")
        pairs = [("accuracy", fmt(percent(c.get("accuracy"))))]
        if c.get("finetuned") is not None:
            pairs.append(("accuracy after fine-tuning", fmt(percent(c["finetuned"]))))
        if c.get("chance") is not None:
            pairs.append(("chance (majority class)", fmt(percent(c["chance"]))))
        for k, v in _dict(c.get("baselines")).items():
            pairs.append((f"baseline: {k}", fmt(percent(v))))
        parts.append(kv_table(pairs))
        per = c.get("per_class")
        if isinstance(per, dict) and per:
            body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{fmt(percent(v))}</td></tr>" for k, v in per.items())
            parts.append(f"<details><summary>per class</summary><table>{body}</table></details>")
        for png in sorted(d.glob("*.png")):
            parts.append(embed(d, png.name, png.stem))
    return "\n".join(parts)
