"""Flag helpers shared by the subcommands: config arguments, the reproduce-command string, count checks."""
from __future__ import annotations

import json
import shlex
import sys

from grandmother.config import load_config
from grandmother.errors import GrandmotherError


def add_config_arguments(p, preset_default="small"):
    """--preset / --set, shared by every command that builds a config."""
    p.add_argument("--preset", default=preset_default,
                   help="preset name (grandmother/presets/*.yaml) or a path to a YAML config (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting, e.g. --set model.sparsity=0.2 --set model.stages.*.maps=4")


def add_rebalance_arguments(p, default: float | None):
    """--max-face-fraction / --face-paths / --rebalance-seed (grandmother/data/rebalance.py), for ingest and run."""
    from grandmother.data.rebalance import DETECT_MAX_SIDE
    p.add_argument("--max-face-fraction", type=float, default=default, metavar="F",
                   help=f"keep every non-face image and a seeded subset of the faces, so that faces are at most F "
                        f"of the images (faces found by OpenCV's face detector on each source image, its long "
                        f"side reduced to at most {DETECT_MAX_SIDE} px; 1 = off; default: "
                        + ("off" if default is None else "%(default)s") + ")")
    p.add_argument("--face-paths", action="append", default=[], metavar="GLOB",
                   help="the images whose path matches GLOB are the faces, no detector (repeatable; `*` also "
                        "matches /, e.g. '*/faces/*')")
    p.add_argument("--rebalance-seed", type=int, default=0, help="chooses the faces kept (default: %(default)s)")


def config_from_args(args, flag_map: dict[str, str]):
    """Load the preset, apply --set overrides, then the explicit flags (which win)."""
    overrides = list(args.overrides)
    for attr, key in flag_map.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    return checked(load_config(args.preset, overrides))


def checked(cfg):
    """Every check of a config, including those of the layers above config.py (kernel, shapes, partition)."""
    from grandmother.distributed.parallel.partition import check_partition
    from grandmother.nn.shapes import check_network
    check_network(cfg.model)
    check_partition(cfg)
    return cfg


def command_line() -> str:
    """The command that reproduces this invocation, as typed (written into every results file)."""
    return "grandmother " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def check_positive(**flags) -> None:
    """One-line error naming the first flag whose value is below 1 (None means "not given")."""
    for name, value in flags.items():
        if value is not None and value < 1:
            raise GrandmotherError(f"--{name.replace('_', '-')} {value}: must be at least 1")


def device_argument(p, default="auto"):
    p.add_argument("--device", default=default, choices=("auto", "cpu", "cuda"))
