"""Run one experiment of the table in docs/experiments.md: train, then score on held-out test sets.

    .venv/bin/python experiments/run.py NAME [--concepts faces catfaces bodiespad] [--retrain]
    .venv/bin/python experiments/run.py --list

Needs the data sets of `bash experiments/data.sh`. Every recipe (experiments/recipes.py) is seeded
(train.seed=0; test-set split seed 0; random-weights seeds 0-4), trains into runs/exp/NAME (kept: a
second call only re-scores) and writes its row to experiments/results/NAME.json. The run folder is locked
while this runs (grandmother.io.folder_lock): a second run.py of the same NAME stops with one line naming
the first one's PID, so a run still training is never deleted or trained twice.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import evaluate as ev  # noqa: E402
from grandmother.analysis import heldout  # noqa: E402
from grandmother.errors import GrandmotherError  # noqa: E402
from grandmother.io import LOCK_FILE, folder_lock  # noqa: E402
from recipes import RECIPES, config_for  # noqa: E402

DATA = ROOT / "runs" / "data"
RUNS = ROOT / "runs" / "exp"
RESULTS = ROOT / "experiments" / "results"
RANDOM_SEEDS = range(5)
PROTOCOL = "heldout-v1"  # grandmother.analysis.heldout with its defaults (split seed 0, direction either)


def _network(cfg, tensors=None):
    from grandmother.nn.model import build_network
    net = build_network(cfg, __import__("torch").device("cpu"))
    if tensors is not None:
        net.load_state_dict(tensors)
    return net


def _score_network(units: dict, labels, split, groups) -> dict:
    """Per stage (all its sublayers): the held-out record; "best" = the stage whose unit won on selection."""
    stages = sorted({s for s, _ in units})
    out = {"stages": []}
    for s in stages:
        acts = np.concatenate([units[k] for k in sorted(units) if k[0] == s], 1)
        out["stages"].append({"stage": s, **ev.score_matrix(acts, labels, split, groups)})
    best = max(out["stages"], key=lambda r: r["selection_accuracy"])  # chosen on selection, not evaluation
    out["best"] = {k: best[k] for k in ("stage", "unit", "direction", "selection_accuracy", "evaluation_accuracy", "ci95")}
    return out


def _cached(path: Path, make):
    if path.is_file():
        return json.loads(path.read_text())
    res = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res))
    return res


def _random_baseline(cfg, images, labels, split, groups, concept) -> dict:
    """The same architecture at 5 seeded initialisations; cached per architecture and test set."""
    model = {k: v for k, v in cfg.to_dict()["model"].items() if k not in ("sparsity", "tied", "stage_gradients", "kernel")}
    key = hashlib.sha1(json.dumps([model, concept, PROTOCOL], sort_keys=True).encode()).hexdigest()[:12]

    def make():
        seeds = []
        for seed in RANDOM_SEEDS:
            c = copy.deepcopy(cfg)
            c.train.seed = seed
            seeds.append(_score_network(ev.network_units(_network(c), images), labels, split, groups))
        return {"seeds": seeds}
    return _cached(RUNS / "_random" / f"{key}.json", make)


def _baselines(cfg, images, labels, split, groups, concept) -> dict:
    """Trivial cues, and 10,000 linear filters drawn from the main training set (the same for every row)."""
    def make():
        from grandmother.data.dataset import open_dataset
        cues = {name: ev.score_matrix(v[:, None], labels, split, groups) for name, v in ev.trivial_cues(images).items()}
        lin = ev.score_matrix(ev.linear_filters(_network(cfg), images, open_dataset(DATA / "train")), labels, split, groups)
        chance = heldout.public(heldout.majority_record(labels, split, groups))
        return {"trivial": cues, "linear_filter_10000": lin, "majority": chance}
    return _cached(RUNS / "_baselines" / f"{concept}_{cfg.model.input_norm}_{PROTOCOL}.json", make)


def score(name: str, cfg, ckpt: Path, concept: str) -> dict:
    from grandmother.training.checkpoint import load_checkpoint
    images, labels, groups, split = ev.load_test(DATA / f"test_{concept}")
    tensors, _, _ = load_checkpoint(ckpt)
    trained = _score_network(ev.network_units(_network(cfg, tensors), images), labels, split, groups)
    random = _random_baseline(cfg, images, labels, split, groups, concept)
    return {"test": f"test_{concept}", "images": int(len(labels)), "positives": int(labels.sum()),
            "protocol": split.protocol(labels), "trained": trained, "random": random,
            **_baselines(cfg, images, labels, split, groups, concept)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?")
    ap.add_argument("--concepts", nargs="+", help="test sets to score on (default: the recipe's concepts, or faces)")
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--train-only", action="store_true", help="train (if not trained yet), do not score")
    ap.add_argument("--images", type=int, help="override the recipe's images seen (smoke tests; row not kept)")
    ap.add_argument("--step", type=int, help="score the run's kept checkpoint of this step (a part-way row, "
                    "NAME@IMAGES, e.g. adam_decnorm_1.5M@1000k) instead of the last one")
    args = ap.parse_args(argv)
    if args.list or not args.name:
        for n, r in RECIPES.items():
            print(f"{n:28s} {r['what']}")
        return
    if args.name not in RECIPES:
        sys.exit(f"run.py: unknown experiment {args.name!r} (see --list)")
    import torch
    torch.set_num_threads(1)  # on a loaded 2-core machine one thread was 5x faster than two (89 vs 16 img/s)
    run_dir = RUNS / (args.name + ("_smoke" if args.images else ""))
    try:
        with folder_lock(run_dir, f"experiments/run.py {args.name}"):
            run_experiment(args, run_dir)
    except GrandmotherError as e:
        sys.exit(f"run.py: {e}")


def clear_run(run_dir: Path) -> None:
    """Delete a run folder's contents, all but the lock this process holds on it."""
    import shutil
    for p in run_dir.iterdir():
        if p.name == LOCK_FILE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def run_experiment(args, run_dir: Path) -> None:
    from grandmother.training.checkpoint import latest_checkpoint
    from grandmother.training.loop import train
    recipe = RECIPES[args.name]
    cfg = config_for(args.name, args.images)
    train_path = DATA / recipe.get("data", "train")
    timing_file = run_dir / "timing.json"
    if args.step and not timing_file.is_file():
        sys.exit(f"run.py: --step: {run_dir} has not finished training (no timing.json); nothing retrained")
    if args.retrain or latest_checkpoint(run_dir) is None or not timing_file.is_file():
        clear_run(run_dir)  # this process holds its lock: no other run.py is training it
        t0 = time.time()
        summary = train(cfg, train_path, run_dir, progress=False)
        timing_file.write_text(json.dumps({"wall_s": time.time() - t0, "images_seen": summary["images_seen"]}))
    if args.train_only:
        return
    timing = json.loads(timing_file.read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    name, ckpt, last = args.name, latest_checkpoint(run_dir), metrics[-1]
    if args.step:  # a part-way row: the kept checkpoint of that step, its metrics line, a pro-rata time
        ckpt = run_dir / "checkpoints" / f"step_{args.step:08d}"
        if not ckpt.is_dir():
            sys.exit(f"run.py: --step {args.step}: {ckpt} is not kept (the run keeps its newest two checkpoints)")
        last = next(m for m in metrics if m["step"] == args.step)
        timing = {"images_seen": last["images"], "wall_s": timing["wall_s"] * last["images"] / timing["images_seen"]}
        name = f"{args.name}@{last['images'] // 1000}k"
    row = {"name": name, "order": list(RECIPES).index(args.name), "what": recipe["what"], "sets": recipe["sets"],
           "data": recipe.get("data", "train"), "images_seen": timing["images_seen"],
           "train_wall_s": round(timing["wall_s"], 1), "final_metrics": last, "scores": {}}
    t0 = time.time()
    for concept in args.concepts or recipe.get("concepts", ["faces"]):
        row["scores"][concept] = score(name, cfg, ckpt, concept)
    row["score_wall_s"] = round(time.time() - t0, 1)
    if not args.images:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(row, indent=1))
    f = row["scores"]["faces"] if "faces" in row["scores"] else next(iter(row["scores"].values()))
    rnd = max(s["best"]["evaluation_accuracy"] for s in f["random"]["seeds"])
    top = f["trained"]["stages"][-1]
    top_r = max(s["stages"][-1]["evaluation_accuracy"] for s in f["random"]["seeds"])
    print(f"{name}: {timing['images_seen']} images in {timing['wall_s']:.0f} s; best unit "
          f"{f['trained']['best']['evaluation_accuracy']:.3f} (stage {f['trained']['best']['stage']}) vs random "
          f"{rnd:.3f}; top stage {top['evaluation_accuracy']:.3f} vs random {top_r:.3f}; "
          f"AUC/stage " + " ".join(f"{s['best_auc']['evaluation_auc']:.2f}" for s in f["trained"]["stages"]))


if __name__ == "__main__":
    main()
