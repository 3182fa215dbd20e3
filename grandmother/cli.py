"""The `grandmother` command. Each subcommand lives in its own module, which provides

    register(subparsers)   adds its parser(s), each with set_defaults(func=run_function)

so this file only lists the modules. Errors meant for the user (GrandmotherError) print as one line.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import GrandmotherError

# Modules providing subcommands, in the order `grandmother --help` lists them.
COMMAND_MODULES = [
    "grandmother.commands_model",  # model-info, train, demo
    "grandmother.commands_data",  # ingest, audit, filter-faces, testset, bench-data
    "grandmother.commands_downpour",  # bench-downpour
    "grandmother.commands_classify",  # classify
    "grandmother.probe",  # probe
    "grandmother.visualize",  # visualize
    "grandmother.invariance",  # invariance
    "grandmother.report",  # report
    "grandmother.bench",  # bench (locally connected kernels)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grandmother",
        description="Learn high-level feature detectors from unlabeled images (Le et al., ICML 2012).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except GrandmotherError as e:
        print(f"grandmother: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("grandmother: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
