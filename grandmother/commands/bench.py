"""Subcommands: bench (locally connected kernels), bench-data (ingest and loader), bench-downpour (engines)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from grandmother.config import ConfigError
from grandmother.errors import GrandmotherError
from grandmother.data.samples import SAMPLE_DIR
from grandmother.commands.common import add_config_arguments, config_from_args


def cmd_bench(args) -> int:
    import torch

    from grandmother.bench.kernels import format_table, run_bench
    from grandmother.nn.kernels import kernel_names

    if args.device == "cuda" and not torch.cuda.is_available():
        raise GrandmotherError("--device cuda: no CUDA device is available here")
    device = torch.device(args.device)
    try:
        cfg = config_from_args(args, {})
    except (ConfigError, FileNotFoundError) as e:
        raise GrandmotherError(f"--preset {args.preset}: {e}")
    if args.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    batch = args.batch_size if args.batch_size is not None else cfg.train.batch_size
    if batch < 1:
        raise GrandmotherError(f"--batch-size {batch}: must be at least 1")
    kernels = None
    if args.kernel:
        known = kernel_names(device.type)
        bad = [k for k in args.kernel if k not in known]
        if bad:
            raise GrandmotherError(f"--kernel {bad[0]}: not available on {device.type} "
                                   f"(available: {', '.join(known)})")
        kernels = args.kernel
    result = run_bench(cfg, device, batch, kernels, repeats=args.repeats, peers=args.peers)
    if args.json:
        if "skipped" in result.get("keras_peer", {}):  # the table says it; with --json, one line on stderr
            from grandmother.bench.peers import keras_line
            print(f"grandmother: {keras_line(result['keras_peer'])}", file=sys.stderr)
        print(json.dumps(result))
    else:
        print(format_table(result))
    return 0


def cmd_bench_data(args):
    from grandmother.bench.data import run_bench_data
    run_bench_data(Path(args.src), limit=args.limit, workers=args.workers, batches=args.batches)
    return 0


def cmd_bench_downpour(args):
    from grandmother.bench.downpour import format_table, run_bench_downpour
    try:
        replica_counts = [int(x) for x in args.replicas.split(",") if x.strip()]
    except ValueError:
        replica_counts = []
    if not replica_counts or min(replica_counts) < 1:
        raise GrandmotherError(f"--replicas {args.replicas!r}: expected a comma-separated list of counts >= 1")
    base = config_from_args(args, {"steps": "train.steps", "batch_size": "train.batch_size", "lr": "train.lr"})
    rows = run_bench_downpour(base, Path(args.data), replica_counts, ps_shards=args.ps_shards,
                              warmstart_steps=args.warmstart_steps, eval_images=args.eval_images, out=args.out)
    print(format_table(rows, args.eval_images))


def register(sub):
    p = sub.add_parser("bench", help="time the locally connected kernels and a training step",
                       description="Time each locally connected kernel inside the network (forward, "
                                   "forward+backward, training step) against a float32 matmul.")
    add_config_arguments(p, "small")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's train.batch_size")
    p.add_argument("--kernel", action="append", help="only this kernel (repeatable); default: all")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tf32", action="store_true", help="allow tf32 matmuls on CUDA")
    p.add_argument("--peers", action="store_true",
                   help="also time one locally connected layer per stage shape against a plain PyTorch unfold "
                        "layer, conv2d of the same shape and (where scripts/keras_peer.sh built its environment) "
                        "Keras 2's LocallyConnected2D")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("bench-data", help="ingest and loader throughput vs the small preset's training rate")
    p.add_argument("--src", default="../shared/data/objects", help="images to ingest (default: %(default)s)")
    p.add_argument("--limit", type=int, default=600, help="files to ingest per configuration (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="worker count for the parallel rows (default: %(default)s)")
    p.add_argument("--batches", type=int, default=40, help="loader batches of 100 to time (default: %(default)s)")
    p.set_defaults(func=cmd_bench_data)

    p = sub.add_parser("bench-downpour", help="images/s and loss at equal images: --engine local vs Downpour SGD")
    add_config_arguments(p, "small")
    p.add_argument("--data", default=str(SAMPLE_DIR / "train"),
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
