"""The tables of docs/scaling.md: halo volume against P, a time-per-step model, measured throughput.

    .venv/bin/python scripts/scaling.py                 # volume and model tables (seconds, no training)
    .venv/bin/python scripts/scaling.py --measure       # also trains the small preset with P = 1 and 2
    .venv/bin/python scripts/scaling.py --device-tflops 20 --nvlink-gbs 300 --net-gbs 25

Volumes come from grandmother/parallel/costs.py (the partition alone), which tests/test_model_parallel.py
checks against the bytes counted in the tensors the workers actually exchange; `--measure` also reads
the bytes the training workers counted (metrics.jsonl: halo_bytes_per_step). The time model's device
rate, link bandwidths and latency are ASSUMPTIONS given on the command line, printed with the table.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from grandmother.config import load_config
from grandmother.distributed.parallel.costs import halo_traffic, step_time, worker_costs
from grandmother.distributed.parallel.partition import Partition

GRIDS = ["1x1", "2x1", "2x2", "4x2", "8x1", "4x4", "8x8"]
NETWORKS = [("paper", []), ("paper, 24 maps (7.7x params)", ["model.stages.*.maps=24"]),
            ("paper, 64 maps (52x params)", ["model.stages.*.maps=64"])]


def volume_table(preset: str, batch: int) -> list[str]:
    cfg = load_config(preset, [f"train.batch_size={batch}"])
    rows = [f"{preset} preset, batch {batch}, float32: halo bytes per training step",
            f"{'partition':>9}  {'workers':>7}  {'total MiB':>10}  {'max/worker MiB':>14}  {'params/worker M':>15}  "
            f"{'halo / param bytes':>18}"]
    for g in GRIDS:
        part = Partition.parse(g)
        sent, _ = halo_traffic(cfg.model, part, batch)
        costs = worker_costs(cfg, part, batch)
        total = sum(sum(r.values()) for r in sent)
        worst = max(sum(r.values()) for r in sent)
        params = max(c["parameters"] for c in costs)
        rows.append(f"{g:>9}  {part.size:>7}  {total / 2**20:>10.1f}  {worst / 2**20:>14.1f}  {params / 1e6:>15.1f}  "
                    f"{worst / (4 * params):>18.4f}")
    return rows


def model_table(args) -> list[str]:
    rows = [f"time-per-step model, batch 100: device {args.device_tflops:g} TFLOP/s (assumed), 8 GPUs on one node "
            f"over NVLink {args.nvlink_gbs:g} GB/s, 64 GPUs = 8 nodes over a {args.net_gbs:g} GB/s network "
            f"(every exchange charged at the slower link), latency {args.latency_us:g} us per exchange",
            f"{'network':>30}  {'GPUs':>4}  {'grid':>5}  {'GiB/GPU':>7}  {'compute ms':>10}  {'exchange ms':>11}  "
            f"{'step ms':>8}  {'images/s':>9}  {'vs 1 GPU':>8}"]
    for name, over in NETWORKS:
        cfg = load_config("paper", over + ["train.batch_size=100"])
        one = step_time(cfg, Partition(1, 1), args.device_tflops * 1e12, 1.0, 0.0)
        for gpus, grid, link in ((1, "1x1", 1.0), (8, "4x2", args.nvlink_gbs), (64, "8x8", args.net_gbs)):
            part = Partition.parse(grid)
            t = step_time(cfg, part, args.device_tflops * 1e12, link * 1e9, args.latency_us * 1e-6)
            c = max(worker_costs(cfg, part), key=lambda r: r["parameter_bytes"])
            gib = (c["parameter_bytes"] + c["gradient_bytes"] + c["optimizer_bytes"] + c["activation_bytes"]) / 2**30
            rows.append(f"{name:>30}  {gpus:>4}  {grid:>5}  {gib:>7.1f}  {1e3 * t['compute_s']:>10.2f}  "
                        f"{1e3 * t['exchange_s']:>11.2f}  {1e3 * t['step_s']:>8.2f}  {t['images_per_s']:>9.0f}  "
                        f"{one['step_s'] / t['step_s']:>7.1f}x")
    return rows


def measure(steps: int, batch: int) -> list[str]:
    from grandmother.distributed.parallel.engine import train_model_parallel
    from grandmother.data.samples import SAMPLE_DIR
    from grandmother.training.loop import train

    data = SAMPLE_DIR / "train"
    rows = [f"measured: small preset, batch {batch}, {steps} steps on {data} (in-package sample), CPU, "
            f"{os.cpu_count()} cores; images/s over the steps after the first "]
    rows.append(f"{'P':>3}  {'partition':>9}  {'images/s':>9}  {'halo MiB/step':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        for part in ("", "2x1"):
            cfg = load_config("small", [f"train.steps={steps}", f"train.batch_size={batch}", "train.log_every=1",
                                        f"train.checkpoint_every={steps}", "train.device=cpu"]
                              + ([f"train.partition={part}"] if part else []))
            out = Path(tmp) / (part or "local")
            t0 = time.perf_counter()
            if part:
                train_model_parallel(cfg, data, out, progress=False)
            else:
                train(cfg, data, out, progress=False)
            lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            rate = sum(x["images"] - y["images"] for x, y in zip(lines[1:], lines)) / sum(
                x["elapsed_s"] - y["elapsed_s"] for x, y in zip(lines[1:], lines))
            halo = lines[-1].get("halo_bytes_per_step", 0) / 2**20
            rows.append(f"{(Partition.parse(part).size if part else 1):>3}  {part or '-':>9}  {rate:>9.1f}  "
                        f"{halo:>13.2f}   (wall {time.perf_counter() - t0:.1f} s with start-up)")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure", action="store_true", help="train the small preset with P = 1 and 2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--device-tflops", type=float, default=20.0)
    ap.add_argument("--nvlink-gbs", type=float, default=300.0)
    ap.add_argument("--net-gbs", type=float, default=25.0)
    ap.add_argument("--latency-us", type=float, default=20.0)
    args = ap.parse_args()
    out = volume_table("small", args.batch_size) + [""] + volume_table("paper", args.batch_size) + [""]
    out += model_table(args)
    if args.measure:
        out += [""] + measure(args.steps, args.batch_size)
    print("\n".join(out))


if __name__ == "__main__":
    main()
