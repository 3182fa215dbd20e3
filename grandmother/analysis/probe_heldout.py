"""The held-out probe: every unit of a network and every baseline, chosen on the selection half and scored
on the evaluation half (the protocol of grandmother/heldout.py), for probe.json's "heldout" entry.

What it measures, all on the same split of the same test images:
- every unit of the trained network (per-unit accuracy and AUC), its best unit, and the best unit of each
  stage and of each sublayer;
- the same architecture with random weights at `random_seeds` seeds (the run's own seed first): mean and
  best, per stage and sublayer too;
- the best linear filter (training images as templates), chosen on selection like a unit;
- trivial cues (image mean, contrast, centre minus surround, gradient energy);
- the majority guess; and the paired bootstrap differences between the best unit and each baseline.

Activations are held in memory a block of units at a time (`memory_mb`), never all at once.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from grandmother.analysis import heldout as H
from grandmother.errors import GrandmotherError
from grandmother.analysis.units import network_batch_fn, unit_at


@dataclass(frozen=True)
class HeldoutSettings:
    """The held-out probe's settings (probe flags default to these)."""
    split_seed: int = H.DEFAULT_SPLIT_SEED
    selection_fraction: float = 0.5
    direction: str = H.DEFAULT_DIRECTION
    n_thresholds: int = 20
    bootstrap: int = H.DEFAULT_BOOTSTRAP
    bootstrap_seed: int = H.DEFAULT_BOOTSTRAP_SEED
    random_seeds: int = 5  # random-weight networks: the run's train.seed, then seed + 1, ...
    memory_mb: int = 512  # activations held at once (images x units x 4 bytes)


def identities(dataset, n: int):
    """Per-image identity recorded by `grandmother testset` (None where there is none)."""
    items = getattr(dataset, "items", None)
    if items is None:
        return None
    try:
        its = items()
    except (OSError, ValueError, KeyError):
        return None
    if len(its) != n:
        return None
    ids = [it.get("identity") for it in its]
    return ids if any(ids) else None


# ---------------------------------------------------------------- response matrices, a block at a time

def _blocks(n_units: int, n_images: int, memory_mb: int) -> list[tuple[int, int]]:
    per = max(1, int(memory_mb * 2 ** 20 // (4 * max(1, n_images))))
    return [(a, min(a + per, n_units)) for a in range(0, n_units, per)]


def _columns(batch_fn, n: int, batch_size: int, a: int, b: int | None = None, cols=None) -> np.ndarray:
    """(n, b - a) float32 (or the given flat columns) of batch_fn over all images."""
    parts = []
    for s in range(0, n, batch_size):
        acts = batch_fn(list(range(s, min(s + batch_size, n))))
        acts = acts.detach().cpu().numpy() if torch.is_tensor(acts) else np.asarray(acts)
        parts.append(np.asarray(acts[:, cols] if cols is not None else acts[:, a:b], np.float32))
    return np.concatenate(parts)


def table_of(batch_fn, n_units: int, labels, split: H.Split, st: HeldoutSettings, batch_size: int = 256) -> H.UnitTable:
    """The per-unit table of every unit batch_fn produces, a block of units at a time."""
    n = len(labels)
    return H.UnitTable.concat([H.unit_table(_columns(batch_fn, n, batch_size, a, b), labels, split, st.direction,
                                            st.n_thresholds) for a, b in _blocks(n_units, n, st.memory_mb)])


def _record(table: H.UnitTable, u: int, column, labels, split, groups, st, name) -> tuple[dict, np.ndarray]:
    correct = table.correct(column, labels, split, u)
    lo, hi = H.bootstrap_ci(correct, groups, st.bootstrap, st.bootstrap_seed, strata=labels[split.evaluation])
    auc = float(table.auc_evaluation[u] if table.sign[u] > 0 else 1 - table.auc_evaluation[u])  # chosen direction
    return {"unit": name, "direction": "positive" if table.sign[u] > 0 else "negative",
            "threshold": float(table.threshold[u]), "selection_accuracy": float(table.selection_accuracy[u]),
            "evaluation_accuracy": float(table.evaluation_accuracy[u]), "ci95": [lo, hi],
            "auc_evaluation": auc, "same_set_accuracy": float(table.same_set_accuracy[u])}, correct


def network_records(batch_fn, layout, labels, split, groups, st: HeldoutSettings, batch_size: int = 256) -> dict:
    """Best unit overall, per stage and per sublayer (chosen on selection), with intervals and AUC summary.
    Returns {"best", "per_stage", "per_sublayer", "auc"} plus "_correct" (best unit, per image)."""
    n_units = layout[-1][3] + int(np.prod(layout[-1][2]))
    table = table_of(batch_fn, n_units, labels, split, st, batch_size)
    picks = {"best": table.best()}
    stage_of = {}
    for s, name, shape, off in layout:
        size = int(np.prod(shape))
        picks[f"s{s}.{name}"] = u = table.best(off, off + size)
        stage_of[f"s{s}.{name}"] = s
        k = str(s)
        if k not in picks or table.selection_accuracy[u] > table.selection_accuracy[picks[k]]:
            picks[k] = u
    flat = sorted(set(picks.values()))
    cols = _columns(batch_fn, len(labels), batch_size, 0, cols=flat)
    col_of = {u: cols[:, i] for i, u in enumerate(flat)}
    recs, correct = {}, {}
    for key, u in picks.items():
        recs[key], correct[key] = _record(table, u, col_of[u], labels, split, groups, st, str(unit_at(layout, u)))
    auc = {}
    for s, name, shape, off in layout:
        size = int(np.prod(shape))
        a_sel, a_ev = table.auc_selection[off:off + size], table.auc_evaluation[off:off + size]
        ua = table.best_by_auc(off, off + size) - off
        flip = st.direction == "either" and a_sel[ua] < 0.5
        auc[f"s{s}.{name}"] = {
            "chosen_on_selection": str(unit_at(layout, off + ua)), "direction": "negative" if flip else "positive",
            "auc_evaluation": float(1 - a_ev[ua] if flip else a_ev[ua]),
            "max_auc_evaluation_positive": float(a_ev.max()), "max_auc_evaluation_negative": float(1 - a_ev.min()),
            "median_auc_evaluation": float(np.median(a_ev)), "units": size}
    return {"best": recs["best"],
            "per_stage": {k: recs[k] for k in sorted((k for k in picks if k.isdigit()), key=int)},
            "per_sublayer": {k: recs[k] for k in picks if k.startswith("s")},
            "auc": auc, "_correct": correct}


# ---------------------------------------------------------------- the whole held-out entry

def _strip(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if not k.startswith("_") and k != "correct"}


def heldout_probe(net, dataset, labels, device, *, cfg=None, templates=None, st: HeldoutSettings = HeldoutSettings(),
                  batch_size: int = 256, progress=None) -> dict:
    """probe.json's "heldout" entry for `net` on (dataset, labels); `templates` (T, D) are linear filters
    on the prepared input (None: skip), `cfg` the run's config (None: no random weights)."""
    say = progress or (lambda msg: None)
    labels = np.asarray(labels).astype(bool)
    n = len(labels)
    ids = identities(dataset, n)
    try:
        split = H.split_halves(labels, ids, st.split_seed, st.selection_fraction)
    except GrandmotherError as e:  # e.g. every positive is one person: no honest split exists
        say(f"held-out evaluation skipped: {e}")
        return {"skipped": str(e)}
    groups = None if ids is None else np.asarray(ids, dtype=object)[split.evaluation]  # for bootstrap_* calls
    boot = dict(n_boot=st.bootstrap, seed=st.bootstrap_seed)
    sboot = dict(boot, strata=labels[split.evaluation])  # direct bootstrap_* calls: within each class

    say("held-out: trained network")
    fn, layout = network_batch_fn(net, dataset, device)
    trained = network_records(fn, layout, labels, split, groups, st, batch_size)
    best_correct = trained["_correct"]["best"]
    baselines, correct = {}, {}

    m = H.majority_record(labels, split, ids, **boot)  # record functions take every image's identity
    correct["random_guess"] = m.pop("correct")
    baselines["random_guess"] = m
    baselines["first_stage"] = trained["per_stage"]["0"]
    correct["first_stage"] = trained["_correct"]["0"]

    random_per_sublayer = {}
    if cfg is not None and st.random_seeds > 0:
        from grandmother.nn.model import Network
        seeds, recs = [cfg.train.seed + k for k in range(st.random_seeds)], []
        for seed in seeds:
            say(f"held-out: random weights, seed {seed}")
            rnet = Network(cfg.model, generator=torch.Generator().manual_seed(seed)).to(device).eval()
            rfn, rlayout = network_batch_fn(rnet, dataset, device)
            recs.append(network_records(rfn, rlayout, labels, split, groups, st, batch_size))
        best_recs = [r["best"] for r in recs]
        summ = H.seeds_summary(best_recs)
        mean_correct = np.mean([r["_correct"]["best"] for r in recs], 0)
        bi = summ["best_index"]
        baselines["random_weights"] = {
            "seeds": seeds, "per_seed": best_recs, "mean": summ["mean"], "std": summ["std"],
            "ci95_mean": list(H.bootstrap_ci(mean_correct, groups, **sboot)),
            "best": summ["best"], "best_seed": seeds[bi], "ci95_best": best_recs[bi]["ci95"],
            "evaluation_accuracy": summ["best"], "ci95": best_recs[bi]["ci95"], "unit": best_recs[bi]["unit"]}
        correct["random_weights_best"] = recs[bi]["_correct"]["best"]
        correct["random_weights_mean"] = mean_correct
        for key in list(trained["per_stage"]) + list(trained["per_sublayer"]):
            where = "per_stage" if key.isdigit() else "per_sublayer"
            accs = [r[where][key]["evaluation_accuracy"] for r in recs]
            aucs = [r["auc"][key]["auc_evaluation"] for r in recs] if where == "per_sublayer" else None
            random_per_sublayer[key] = {"mean": float(np.mean(accs)), "best": float(np.max(accs)),
                                        "per_seed": accs, "ci95_best": recs[int(np.argmax(accs))][where][key]["ci95"],
                                        **({"auc_mean": float(np.mean(aucs)), "auc_best": float(np.max(aucs))}
                                           if aucs else {})}

    if templates is not None and len(templates):
        say(f"held-out: {len(templates)} linear filters")
        t = torch.as_tensor(templates, dtype=torch.float32)
        lfn = lambda idx: (net.prepare(dataset.get_batch(idx).to(device)).flatten(1).float() @ t.T.to(device)).cpu()
        ltable = table_of(lfn, len(t), labels, split, st, batch_size)
        u = ltable.best()
        rec, c = _record(ltable, u, _columns(lfn, n, batch_size, 0, cols=[u])[:, 0], labels, split, groups, st,
                         f"template {u}")
        rec["templates"] = len(t)
        baselines["linear_filter"], correct["linear_filter"] = rec, c

    say("held-out: trivial cues")
    cue_recs = H.score_cues(H.cues_of_dataset(dataset), labels, split, direction=st.direction,
                            n_thresholds=st.n_thresholds, groups=ids, **boot)
    cues = {}
    for k, r in cue_recs.items():
        correct[f"cue_{k}"] = r["correct"]
        cues[k] = _strip(r)
    # The cue a reader would pick without peeking: the highest selection-half accuracy.
    chosen_cue = max(cues, key=lambda k: (cues[k]["selection_accuracy"], -H.CUES.index(k)))
    baselines["trivial_cues"] = cues
    baselines["best_trivial_cue"] = {"cue": chosen_cue, **cues[chosen_cue]}
    correct["best_trivial_cue"] = correct[f"cue_{chosen_cue}"]

    diffs = {k: list(H.bootstrap_difference(best_correct, c, groups, **sboot))
             for k, c in correct.items() if not k.startswith("cue_")}
    top = str(max(int(k) for k in trained["per_stage"]))
    top_correct = trained["_correct"][top]
    top_diffs = {k: list(H.bootstrap_difference(top_correct, c, groups, **sboot))
                 for k, c in correct.items() if not k.startswith("cue_")}

    per_stage = []
    for key in list(trained["per_stage"]) + list(trained["per_sublayer"]):
        where = "per_stage" if key.isdigit() else "per_sublayer"
        row = {"stage": int(key) if key.isdigit() else int(key[1:key.index(".")]),
               "sublayer": None if key.isdigit() else key.split(".", 1)[1], "trained": trained[where][key]}
        if where == "per_sublayer":
            row["trained_auc"] = trained["auc"][key]
        if key in random_per_sublayer:
            row["random"] = random_per_sublayer[key]
        per_stage.append(row)

    protocol = split.protocol(labels)
    protocol.update({"identities": "testset identity (positives: LFW person folder)" if ids else "none (image = group)",
                     "direction": st.direction, "thresholds": f"{st.n_thresholds} = linspace(min, max) of the "
                     f"selection half", "unit_choice": "highest selection-half accuracy",
                     "bootstrap": {"resamples": st.bootstrap, "seed": st.bootstrap_seed, "level": 0.95,
                                   "resampled": ("identities" if ids else "images") + " of the evaluation half, within each class"},
                     "settings": asdict(st)})
    return {"protocol": protocol, "best": trained["best"], "top_stage": trained["per_stage"][top],
            "baselines": baselines, "differences": {"best_minus": diffs, "top_stage_minus": top_diffs},
            "per_stage": per_stage, "auc": trained["auc"]}
