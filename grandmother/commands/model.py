"""Subcommands: model-info, train."""
from __future__ import annotations

import json
from pathlib import Path

from grandmother.config import CHOICES
from grandmother.errors import GrandmotherError
from grandmother.commands.common import add_config_arguments, check_positive, config_from_args


# ---------------------------------------------------------------- model-info

def partition_flag(args) -> None:
    """--model-parallel P is --partition Px1; both set train.partition."""
    if args.model_parallel is not None:
        check_positive(model_parallel=args.model_parallel)
        if args.partition is not None:
            raise GrandmotherError("--model-parallel and --partition: give one of them (P is the same as Px1)")
        args.partition = f"{args.model_parallel}x1"


def add_partition_arguments(p):
    g = p.add_argument_group("Model parallelism: one replica split spatially over several processes")
    g.add_argument("--model-parallel", type=int, metavar="P", help="P workers, each a block of rows of every layer")
    g.add_argument("--partition", metavar="RxC", help="an R x C grid of workers, e.g. 2x2; RxC:w1,..:v1,.. for "
                                                      "unequal blocks (relative row and column sizes)")


def cmd_model_info(args):
    from grandmother.nn.shapes import format_model_info, model_info
    partition_flag(args)
    cfg = config_from_args(args, {"partition": "train.partition", "batch_size": "train.batch_size"})
    info = model_info(cfg)
    text = format_model_info(info)
    if cfg.train.partition:
        from grandmother.distributed.parallel.costs import format_worker_costs, worker_costs
        from grandmother.distributed.parallel.partition import Partition
        part = Partition.parse(cfg.train.partition)
        info["model_parallel"] = {"partition": str(part), "batch_size": cfg.train.batch_size,
                                  "workers": worker_costs(cfg, part)}
        text += "\n\n" + format_worker_costs(info["model_parallel"]["workers"], part, cfg.train.batch_size)
    print(json.dumps(info, indent=2) if args.json else text)


# ---------------------------------------------------------------- train

TRAIN_FLAGS = {
    "steps": "train.steps", "batch_size": "train.batch_size", "lr": "train.lr", "optimizer": "train.optimizer",
    "device": "train.device", "seed": "train.seed", "kernel": "model.kernel", "engine": "engine",
    "checkpoint_every": "train.checkpoint_every", "log_every": "train.log_every", "workers": "train.num_workers",
    "replicas": "downpour.replicas", "ps_shards": "downpour.ps_shards", "fetch_every": "downpour.fetch_every",
    "push_every": "downpour.push_every", "ray_address": "downpour.ray_address",
    "replica_device": "downpour.replica_device", "replica_cpus": "downpour.replica_cpus",
    "replica_gpus": "downpour.replica_gpus", "partition": "train.partition",
}


def cmd_train(args):
    if args.no_lcn:
        args.overrides.append("model.lcn=false")
    partition_flag(args)
    cfg = config_from_args(args, TRAIN_FLAGS)
    if not args.data:
        raise GrandmotherError("--data is required: a folder of images or a dataset made by `grandmother ingest`")
    if cfg.engine == "downpour":
        ignored = [flag for flag, value in (("--checkpoint-every", args.checkpoint_every), ("--workers", args.workers))
                   if value is not None]
        if ignored:
            raise GrandmotherError(f"{' and '.join(ignored)}: only for --engine local; Downpour checkpoints every "
                                   f"--set downpour.ps_checkpoint_every=N parameter-server updates and its replicas "
                                   f"load their own batches")
    if cfg.train.partition and cfg.engine != "downpour":
        from grandmother.distributed.parallel.engine import train_model_parallel
        summary = train_model_parallel(cfg, Path(args.data), Path(args.out), resume=args.resume,
                                       force_resume=args.force_resume)
    elif cfg.engine == "downpour":
        from grandmother.distributed.downpour import train_downpour
        summary = train_downpour(cfg, Path(args.data), Path(args.out), resume=args.resume,
                                 force_resume=args.force_resume)
    else:
        from grandmother.training.loop import train
        summary = train(cfg, Path(args.data), Path(args.out), resume=args.resume, force_resume=args.force_resume)
    print(train_summary(summary))


def train_summary(summary: dict) -> str:
    """The last line of `train`: what was trained, or that there was nothing to train."""
    steps, at = summary["steps"], summary.get("start_step", 0)
    if at >= steps:
        where = f"at step {at} of {steps}" if at == steps else f"at step {at}, past --steps {steps}"
        return f"nothing to train: the run is {where}; run directory {summary['run_dir']}"
    final = summary.get("final") or {}
    loss = f"final loss {final['loss']:.4g}" if "loss" in final else "no loss logged"
    return f"trained {steps} steps ({summary['images_seen']} images); {loss}; run directory {summary['run_dir']}"


def register(sub):
    p = sub.add_parser("model-info", help="shapes, parameter counts and FLOPs of a preset (no memory needed)")
    add_config_arguments(p, "paper")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--batch-size", type=int, help="images per step for the per-worker figures (default: the preset's)")
    add_partition_arguments(p)
    p.set_defaults(func=cmd_model_info)

    p = sub.add_parser("train", help="train a network on unlabeled images")
    add_config_arguments(p)
    p.add_argument("--data", help="a folder of images (recursive) or a DATA_DIR from `grandmother ingest`")
    p.add_argument("--out", required=True, help="run directory (config, metrics.jsonl, checkpoints)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="images per step (paper: 100)")
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=CHOICES["train.optimizer"])
    p.add_argument("--device", choices=CHOICES["train.device"])
    p.add_argument("--seed", type=int)
    p.add_argument("--kernel", help="locally connected kernel: auto (fastest for the device) or a registered name")
    p.add_argument("--no-lcn", action="store_true", help="remove local contrast normalization (Table 1 ablation)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--force-resume", action="store_true",
                   help="with --resume: accept settings or --data that differ from the run's (refused otherwise)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    p.add_argument("--log-every", type=int, help="steps between metrics.jsonl lines")
    p.add_argument("--workers", type=int, help="background data-loading workers")
    g = p.add_argument_group("Downpour SGD on Ray (--engine downpour)")
    g.add_argument("--engine", choices=CHOICES["engine"], help="local (one device, default) or downpour")
    g.add_argument("--replicas", type=int, help="model replicas, each on its own portion of the data")
    g.add_argument("--ps-shards", type=int, help="parameter-server shards")
    g.add_argument("--fetch-every", type=int, help="P: fetch parameters every P steps")
    g.add_argument("--push-every", type=int, help="G: push accumulated gradients every G steps")
    g.add_argument("--ray-address", help="'' starts an embedded local Ray; 'auto' or HOST:PORT joins a cluster")
    g.add_argument("--replica-device", choices=("cpu", "cuda"))
    g.add_argument("--replica-cpus", type=float)
    g.add_argument("--replica-gpus", type=float)
    add_partition_arguments(p)
    p.set_defaults(func=cmd_train)
