"""Subcommand: run, the whole job on the user's videos and images (grandmother/pipeline/); `make demo` runs it
on the in-package sample."""
from __future__ import annotations

from pathlib import Path

from grandmother.commands.common import add_config_arguments, add_rebalance_arguments, command_line


def cmd_run(args):
    from grandmother.io import folder_lock
    from grandmother.pipeline.job import run_pipeline
    with folder_lock(Path(args.out), "run", beside=True):  # beside DIR: `run` wants DIR empty or its own
        run_pipeline(args.sources, Path(args.out), preset=args.preset, overrides=args.overrides, steps=args.steps,
                     minutes=args.minutes, testsets=args.testset, frames_per_video=args.frames_per_video,
                     workers=args.workers, restart_from=args.restart_from, max_face_fraction=args.max_face_fraction,
                     face_paths=args.face_paths, rebalance_seed=args.rebalance_seed, command=command_line())


def register(sub):
    from grandmother.pipeline.job import FRAMES_PER_VIDEO, MAX_FACE_FRACTION, STAGE_NAMES
    p = sub.add_parser("run", help="the whole job on your videos and images: ingest, train, probe, visualize, "
                                   "report (resumable)")
    p.add_argument("sources", nargs="+", metavar="SRC", help="videos, images or folders of them (recursive)")
    p.add_argument("--out", required=True, metavar="DIR", help="the job's folder (run.json, data, run, report.html)")
    add_config_arguments(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    g.add_argument("--minutes", type=float, help="training budget in minutes; steps from a measured warm-up")
    p.add_argument("--testset", action="append", default=[], metavar="TEST_DIR",
                   help="a test set from `grandmother testset` (repeatable; default: the face test set in the package)")
    p.add_argument("--frames-per-video", type=int, default=FRAMES_PER_VIDEO,
                   help="distinct frames taken from each video (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="decoding processes for ingest (default: %(default)s)")
    add_rebalance_arguments(p, MAX_FACE_FRACTION)
    p.add_argument("--restart-from", choices=STAGE_NAMES, metavar="STAGE",
                   help=f"redo this stage and the later ones ({', '.join(STAGE_NAMES)}); --restart-from "
                        f"{STAGE_NAMES[0]} starts the job over, also after a damaged run.json")
    p.set_defaults(func=cmd_run)
