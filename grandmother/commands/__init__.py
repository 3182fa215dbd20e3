"""The `grandmother` command: the only code that knows argparse.

One module per group of subcommands; each provides

    register(sub)   adds its parser(s), each with set_defaults(func=cmd_function)

and its cmd_ functions turn parsed flags into calls of the library (grandmother/*.py), which never
imports this package. Errors meant for the user (GrandmotherError) print as one line.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import GrandmotherError
from . import analysis, bench, classify, data, model, run

# In the order `grandmother --help` lists them.
GROUPS = [
    run,  # run (the whole job, resumable)
    model,  # model-info, train
    data,  # ingest, audit, filter-faces, testset
    classify,  # classify
    analysis,  # probe, visualize, invariance, report
    bench,  # bench, bench-data, bench-downpour
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grandmother",
        description="Learn high-level feature detectors from unlabeled images (Le et al., ICML 2012).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
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
