"""`grandmother bench-downpour`: images/s and loss-at-equal-images of --engine local vs Downpour SGD.

    grandmother bench-downpour --preset small --data grandmother/sample/train --steps 300 --batch-size 32

One run trains the same config with `--engine local` and with Downpour at each replica count in
`--replicas` (default 1,2), each for the same number of minibatch steps (so the same images), and
prints one table: engine, replicas, steady images/s (from metrics.jsonl, start-up excluded), wall
time (start-up included), and the loss of each final checkpoint on the same evaluation images.
Replica counts above 1 also run with a warm start (`--warmstart-steps`: replica 0 trains alone first),
which removes most of the cost of stale gradients early in training (see the README).
Every engine gets the whole machine: local training uses all cores, each of R replicas cores/R.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from .errors import GrandmotherError


def evaluate_loss(net, dataset, batch_size: int = 100, max_images: int = 1024) -> float:
    """Mean training objective (the loss the trainer minimises) over the first `max_images` images."""
    from .train import loss_and_terms
    n = min(len(dataset), max_images)
    total, seen = 0.0, 0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            idx = list(range(start, min(n, start + batch_size)))
            batch = dataset.get_batch(idx).to(next(net.parameters()).device)
            loss, _ = loss_and_terms(net, batch)
            total += float(loss) * len(idx)
            seen += len(idx)
    return total / seen


def steady_images_per_s(run_dir: Path) -> float:
    """images/s between the first and the last metrics line (excludes start-up and the first step)."""
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    if len(lines) < 2:
        return float("nan")
    a, b = lines[0], lines[-1]
    return (b["images"] - a["images"]) / max(b["elapsed_s"] - a["elapsed_s"], 1e-9)


def run_bench(args) -> list[dict]:
    import ray

    from .checkpoint import load_run
    from .commands_model import config_from_args
    from .data import open_training_data
    from .downpour import connect_ray
    from .train import train
    from .downpour import train_downpour

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    replica_counts = [int(x) for x in args.replicas.split(",") if x.strip()]
    if not replica_counts or min(replica_counts) < 1:
        raise GrandmotherError(f"--replicas {args.replicas!r}: expected a comma-separated list of counts >= 1")
    flags = {"steps": "train.steps", "batch_size": "train.batch_size", "lr": "train.lr"}
    base = config_from_args(args, flags)
    log_every = max(1, base.train.steps // 20)
    dataset, _ = open_training_data(Path(args.data), base.model.image_size, base.model.channels)
    cores = os.cpu_count() or 1
    out_root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-downpour-"))
    rows = []

    def finish(engine, replicas, run_dir, wall, warm=0):
        _, net, meta = load_run(run_dir)
        rows.append({"engine": engine, "replicas": replicas, "warmstart": warm, "images": meta["images_seen"],
                     "images_per_s": steady_images_per_s(run_dir), "wall_s": wall,
                     "eval_loss": evaluate_loss(net, dataset, base.train.batch_size, args.eval_images)})

    cfg = config_from_args(args, flags)
    cfg.train.log_every, cfg.train.checkpoint_every = log_every, 10 ** 9
    t = time.perf_counter()
    train(cfg, Path(args.data), out_root / "local", progress=False, dataset=dataset)
    finish("local", "-", out_root / "local", time.perf_counter() - t)

    owns = connect_ray(base)
    try:
        # Replica counts above 1 run twice when --warmstart-steps is set: without and with a warm start.
        plan = [(r, 0) for r in replica_counts] + [(r, args.warmstart_steps) for r in replica_counts
                                                    if r > 1 and args.warmstart_steps > 0]
        for r, warm in plan:
            cfg = config_from_args(args, flags)
            cfg.engine = "downpour"
            cfg.train.log_every = log_every
            d = cfg.downpour
            d.replicas, d.ps_shards, d.fetch_every, d.push_every = r, args.ps_shards, 1, 1
            d.replica_cpus = cores / r
            d.ps_checkpoint_every, d.warmstart_steps = 10 ** 9, warm
            t = time.perf_counter()
            run_dir = out_root / f"downpour_{r}_warm{warm}"
            train_downpour(cfg, Path(args.data), run_dir, progress=False, dataset=dataset)
            finish("downpour", r, run_dir, time.perf_counter() - t, warm)
    finally:
        if owns:
            ray.shutdown()
    return rows


def cmd_bench_downpour(args):
    rows = run_bench(args)
    print(f"{'engine':<10}{'replicas':>9}{'warm start':>11}{'images':>9}{'images/s':>10}{'wall s':>8}{'eval loss':>11}")
    for row in rows:
        print(f"{row['engine']:<10}{row['replicas']!s:>9}{row['warmstart']:>11}{row['images']:>9}"
              f"{row['images_per_s']:>10.1f}{row['wall_s']:>8.1f}{row['eval_loss']:>11.2f}")
    print(f"(images/s: steady rate from metrics.jsonl; wall s: including start-up; eval loss: the training "
          f"objective of each final checkpoint on the first {args.eval_images} images; {os.cpu_count()} cores)")


def register(sub):
    from .commands_model import add_config_arguments
    p = sub.add_parser("bench-downpour", help="images/s and loss at equal images: --engine local vs Downpour SGD")
    add_config_arguments(p, "small")
    p.add_argument("--data", default=str(Path(__file__).parent / "sample" / "train"),
                   help="images to train on (default: the in-package sample)")
    p.add_argument("--steps", type=int, default=300, help="minibatch steps per engine (all replicas together)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float)
    p.add_argument("--replicas", default="1,2", help="comma-separated replica counts (default: %(default)s)")
    p.add_argument("--ps-shards", type=int, default=2)
    p.add_argument("--warmstart-steps", type=int, default=30,
                   help="also run each replica count > 1 with replica 0 training alone this many steps first "
                        "(DistBelief's warm start; 0: skip those rows)")
    p.add_argument("--eval-images", type=int, default=1024, help="images the final losses are measured on")
    p.add_argument("--out", help="keep the run directories here (default: a temporary folder)")
    p.set_defaults(func=cmd_bench_downpour)
