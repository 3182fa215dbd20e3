"""`grandmother bench-data`: ingest and loader throughput, against the small preset's training rate.

    grandmother bench-data --src ../shared/data/objects --limit 600 --workers 2

Prints one table. Ingest: `--limit` files from --src decoded into a temporary dataset, in-process
(workers 1) and with --workers processes, at the small preset's input (32x32 gray) and the paper's
(200x200 rgb). Loader: batches of 100 from a seeded permutation over all shards, through
`load_batches` with 0 and --workers background workers; "200 rgb -> 32 gray" is a 200x200 rgb
dataset converted on the fly for the small preset. Training: the trainer's own step (train.train_step) on the small
preset with its optimizer, on random batches of 100 (the rate the loader has to sustain).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from grandmother.config import load_config
from grandmother.data.dataset import BatchOrder, load_batches, open_dataset
from grandmother.errors import GrandmotherError
from grandmother.data.ingest import expand_sources, ingest


def time_ingest(files: list[str], out: Path, size: int, color: str, workers: int) -> tuple[float, int]:
    t = time.perf_counter()
    index = ingest(files, out, size=size, color=color, workers=workers, shard_size=200, progress=False)
    return time.perf_counter() - t, index["images"]


def time_loader(ds, batches: int, workers: int) -> float:
    order = BatchOrder(len(ds), 100, seed=0)  # the trainer's own access pattern
    it = load_batches(ds, (order.indices(step) for step in range(batches + 1)), workers=workers)
    next(it)  # worker start-up is not throughput
    t, n = time.perf_counter(), 0
    for _, batch in zip(range(batches), it):
        n += batch.shape[0]
    rate = n / (time.perf_counter() - t)
    del it
    return rate


def small_training_rate(steps: int = 5) -> float:
    """Images/s of the trainer's own step (train.train_step) on the small preset, batch 100."""
    from grandmother.nn.model import Network
    from grandmother.training.optim import build_optimizer
    from grandmother.training.loop import train_step
    cfg = load_config("small")
    net = Network(cfg.model, generator=torch.Generator().manual_seed(0))
    opt = build_optimizer(net.parameters(), cfg.train)
    x = torch.randint(0, 256, (100, cfg.model.channels, cfg.model.image_size, cfg.model.image_size), dtype=torch.uint8)

    def step():
        train_step(net, opt, x, cfg.train)
    step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * 100 / (time.perf_counter() - t)


def run_bench_data(src: Path, limit: int = 600, workers: int = 2, batches: int = 40) -> list[dict]:
    if not Path(src).exists():
        raise GrandmotherError(f"--src {src}: does not exist")
    units, _ = expand_sources([str(src)])
    files = [str(p) for _, p, _ in units[:limit]]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        for size, color in ((32, "gray"), (200, "rgb")):
            for w in (1, workers):
                out = Path(tmp) / f"d{size}{color}w{w}"
                secs, n = time_ingest(files, out, size, color, w)
                rows.append({"what": "ingest", "config": f"{size}x{size} {color}", "workers": w, "images_per_s": n / secs})
        for size, color, target in ((32, "gray", None), (200, "rgb", None), (200, "rgb", (32, 1))):
            for w in (0, workers):
                ds = open_dataset(Path(tmp) / f"d{size}{color}w1")
                label = f"{size}x{size} {color}"
                if target is not None:
                    ds.check_fits(*target)
                    label += " -> 32 gray"
                rows.append({"what": "loader", "config": label, "workers": w, "images_per_s": time_loader(ds, batches, w)})
    train_rate = small_training_rate()
    rows.append({"what": "train", "config": f"small preset, batch 100, {load_config('small').train.optimizer}",
                 "workers": 0, "images_per_s": train_rate})
    print(f"{'what':<8} {'configuration':<34} {'workers':>7} {'images/s':>10} {'x train':>8}")
    for r in rows:
        print(f"{r['what']:<8} {r['config']:<34} {r['workers']:>7} {r['images_per_s']:>10.0f} "
              f"{r['images_per_s'] / train_rate:>8.1f}")
    print(f"({len(files)} files from {src}; 'x train' = rate / the small preset's training rate)")
    return rows
