"""`grandmother bench-downpour`: images/s and loss-at-equal-images of --engine local vs Downpour SGD.

    grandmother bench-downpour --preset small --data grandmother/sample/train --steps 300 --batch-size 32

One run trains the same config with `--engine local` and with Downpour at each replica count in
`--replicas` (default 1,2), each for the same number of minibatch steps (so the same images), and
prints one table: engine, replicas, steady images/s (from metrics.jsonl, start-up excluded), wall
time (start-up included), and the loss of each final checkpoint on the same evaluation images.
Replica counts above 1 also run with a warm start (`--warmstart-steps`: replica 0 trains alone first),
which removes most of the cost of stale gradients early in training (docs/downpour.md, docs/results.md).
Every engine gets the whole machine: local training uses all cores, each of R replicas cores/R.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from grandmother.errors import GrandmotherError
from grandmother.training.loop import loss_and_terms


def evaluate_loss(net, dataset, batch_size: int = 100, max_images: int = 1024) -> float:
    """Mean training objective (the loss the trainer minimises) over the first `max_images` images."""
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


def run_bench_downpour(base, data: Path, replica_counts: list[int], ps_shards: int = 2, warmstart_steps: int = 30,
                       eval_images: int = 1024, out: Path | None = None) -> list[dict]:
    """Train config `base` with --engine local, then Downpour at each replica count; one row per run."""
    import ray

    from grandmother.training.runs import load_run
    from grandmother.data.dataset import open_training_data
    from grandmother.distributed.downpour import connect_ray, train_downpour
    from grandmother.training.loop import train

    if not replica_counts or min(replica_counts) < 1:
        raise GrandmotherError(f"--replicas {','.join(map(str, replica_counts))!r}: expected a comma-separated "
                               f"list of counts >= 1")
    log_every = max(1, base.train.steps // 20)
    # Downpour does not project norms (train.norm_control): every engine of the table runs without it.
    base.train.norm_control = "none"
    dataset, _ = open_training_data(Path(data), base.model.image_size, base.model.channels)
    cores = os.cpu_count() or 1
    out_root = Path(out) if out else Path(tempfile.mkdtemp(prefix="bench-downpour-"))
    rows = []

    def finish(engine, replicas, run_dir, wall, warm=0):
        _, net, meta = load_run(run_dir)
        rows.append({"engine": engine, "replicas": replicas, "warmstart": warm, "images": meta["images_seen"],
                     "images_per_s": steady_images_per_s(run_dir), "wall_s": wall,
                     "eval_loss": evaluate_loss(net, dataset, base.train.batch_size, eval_images)})

    cfg = copy.deepcopy(base)
    cfg.train.log_every, cfg.train.checkpoint_every = log_every, 10 ** 9
    t = time.perf_counter()
    train(cfg, Path(data), out_root / "local", progress=False, dataset=dataset)
    finish("local", "-", out_root / "local", time.perf_counter() - t)

    owns = connect_ray(base)
    try:
        # Replica counts above 1 run twice when warmstart_steps > 0: without and with a warm start.
        plan = [(r, 0) for r in replica_counts] + [(r, warmstart_steps) for r in replica_counts
                                                    if r > 1 and warmstart_steps > 0]
        for r, warm in plan:
            cfg = copy.deepcopy(base)
            cfg.engine = "downpour"
            cfg.train.log_every = log_every
            d = cfg.downpour
            d.replicas, d.ps_shards, d.fetch_every, d.push_every = r, ps_shards, 1, 1
            d.replica_cpus = cores / r
            d.ps_checkpoint_every, d.warmstart_steps = 10 ** 9, warm
            t = time.perf_counter()
            run_dir = out_root / f"downpour_{r}_warm{warm}"
            train_downpour(cfg, Path(data), run_dir, progress=False, dataset=dataset)
            finish("downpour", r, run_dir, time.perf_counter() - t, warm)
    finally:
        if owns:
            ray.shutdown()
    return rows


def format_table(rows: list[dict], eval_images: int) -> str:
    lines = [f"{'engine':<10}{'replicas':>9}{'warm start':>11}{'images':>9}{'images/s':>10}{'wall s':>8}{'eval loss':>11}"]
    for row in rows:
        lines.append(f"{row['engine']:<10}{row['replicas']!s:>9}{row['warmstart']:>11}{row['images']:>9}"
                     f"{row['images_per_s']:>10.1f}{row['wall_s']:>8.1f}{row['eval_loss']:>11.2f}")
    lines.append(f"(images/s: steady rate from metrics.jsonl; wall s: including start-up; eval loss: the training "
                 f"objective of each final checkpoint on the first {eval_images} images; {os.cpu_count()} cores)")
    return "\n".join(lines)
