"""The `grandmother` command: the only code that knows argparse.

One module per group of subcommands; each provides

    register(sub)   adds its parser(s), each with set_defaults(func=cmd_function)

and its cmd_ functions turn parsed flags into calls of the library (grandmother/*.py), which never
imports this package. Errors meant for the user (GrandmotherError), flags argparse refuses, and OS errors
that reach this far (an output that cannot be written) print as one line, `grandmother: error: ...`, and
exit with status 2 (1 for a JobFailed: a worker or an actor of a running job was lost).
"""
from __future__ import annotations

import argparse
import sys

from grandmother.errors import GrandmotherError
from grandmother.io import describe_os_error
from grandmother.commands import analysis, bench, classify, data, model, run

# In the order `grandmother --help` lists them.
GROUPS = [
    run,  # run (the whole job, resumable)
    model,  # model-info, train
    data,  # ingest, audit, filter-faces, testset
    classify,  # classify
    analysis,  # probe, visualize, invariance, report
    bench,  # bench, bench-data, bench-downpour
]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a refused flag is one line (naming the command and the flag), like every other error."""

    def error(self, message):
        self.exit(2, f"grandmother: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="grandmother",
        description="Learn high-level feature detectors from unlabeled images (Le et al., ICML 2012).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from grandmother.training.runtime import Terminated
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except GrandmotherError as e:
        print(f"grandmother: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a file the library did not wrap (outputs are, by io.writing): name it, one line
        where = f"{e.filename}: " if e.filename is not None else ""
        print(f"grandmother: error: {where}{describe_os_error(e)}", file=sys.stderr)
        return 2
    except Terminated:
        print("grandmother: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("grandmother: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
