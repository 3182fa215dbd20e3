"""Subcommands: ingest, audit, filter-faces, testset."""
from __future__ import annotations

import json
from pathlib import Path

from grandmother.commands.common import add_rebalance_arguments


def print_json(obj) -> int:
    print(json.dumps(obj, indent=2))
    return 0


# ---------------------------------------------------------------- ingest

def cmd_ingest(args):
    from grandmother.data.ingest import ingest
    from grandmother.data.rebalance import Rebalance, summary_line
    from grandmother.io import folder_lock
    rebalance = Rebalance.from_flags(args.max_face_fraction, args.face_paths, args.rebalance_seed)
    with folder_lock(Path(args.out), "ingest", beside=True):  # OUT is built as OUT.partial, then renamed
        index = ingest(args.sources, Path(args.out), size=args.size, color=args.color, seed=args.seed,
                       frames_per_video=args.frames_per_video, workers=args.workers, shard_size=args.shard_size,
                       exclude=args.exclude, overwrite=args.overwrite, progress=not args.quiet, rebalance=rebalance)
    if args.json:
        return print_json(index)
    print(f"{args.out}: {index['images']} images of {index['size']}x{index['size']} {index['color']} in "
          f"{len(index['shards'])} shard(s); {len(index['skipped'])} skipped, {index['duplicates']} duplicate(s) "
          f"dropped, {index['excluded']} excluded")
    if index.get("rebalance"):
        print(f"  {summary_line(index['rebalance'])}")
    for s in index["sources"]:
        print(f"  {s['src']}: {s['files']} files ({s['videos']} videos) -> {s['images']} images, "
              f"{s['skipped']} skipped, {s['duplicates']} duplicates")
    for s in index["skipped"][:10]:
        print(f"  skipped {s['path']}: {s['reason']}")
    if len(index["skipped"]) > 10:
        print(f"  ... {len(index['skipped']) - 10} more in {args.out}/index.json")
    return 0


# ---------------------------------------------------------------- audit / filter-faces

def cmd_audit(args):
    from grandmother.data.faces import audit
    report = audit(Path(args.data_dir), patches=args.patches, patch_size=args.patch_size, seed=args.seed,
                   cascade=args.cascade, per_image=args.per_image, min_neighbors=args.min_neighbors,
                   progress=not args.json)
    if args.json:
        return print_json(report)
    print(f"{report['dataset']}: {report['patches_with_detection']} of {report['patches']} random "
          f"{report['patch_size']}x{report['patch_size']} patches detected by {report['cascade']} "
          f"= {100 * report['fraction']:.2f}%  (paper, Appendix A: under 3% on its YouTube frames)")
    if args.per_image:
        print(f"whole images with at least one detection: {report['images_with_faces']} of {report['images']}; "
              f"detections per image: {report['histogram']}")
    return 0


def cmd_filter_faces(args):
    from grandmother.data.faces import filter_faces
    report = filter_faces(Path(args.data_dir), Path(args.out), cascade=args.cascade, min_neighbors=args.min_neighbors,
                          overwrite=args.overwrite, progress=not args.quiet)
    print(f"{args.out}: removed {report['removed']} of {report['images_in']} images in which {report['cascade']} "
          f"found a face; {report['images']} remain")
    return 0


# ---------------------------------------------------------------- testset

def cmd_testset(args):
    from grandmother.analysis.heldout import testset_cue_scores
    from grandmother.data.testset import build_testset
    index = build_testset(args.positive, args.negative, Path(args.out), positive_fraction=args.positive_fraction,
                          size=args.size, color=args.color, seed=args.seed, count=args.count, group_by=args.group_by,
                          workers=args.workers, overwrite=args.overwrite, progress=not args.quiet,
                          histogram_match=not args.no_histogram_match, negative_crop=args.negative_crop,
                          cue_scorer=testset_cue_scores)
    print(f"{args.out}: {index['images']} images ({index['positives']} positive from "
          f"{len(index['test_identities'])} identities, {index['negatives']} negative), "
          f"{index['size']}x{index['size']} {index['color']}; {len(index['skipped'])} skipped; "
          f"{index['excluded_count']} files listed in {args.out}/excluded.txt (pass it to ingest --exclude)")
    print(format_cues(index))
    return 0


def format_cues(index: dict) -> str:
    """The trivial-cue scores of a test set (index.json "trivial_cues"), one line each."""
    cues = index.get("trivial_cues") or {}
    if not cues:
        return "trivial cues: not scored (one class only, or too few identities to split)"
    chance = max(index["positives"], index["negatives"]) / max(1, index["images"])
    lines = [f"trivial cues, one threshold chosen on a selection half, accuracy on the evaluation half (majority "
             f"{100 * chance:.1f}%; histogram matching {'on' if index.get('histogram_match') else 'off'}, "
             f"negative crop {index.get('negative_crop') or 'off'}):"]
    for k, r in cues.items():
        lo, hi = r["ci95"]
        lines.append(f"  {k:22s} {100 * r['evaluation_accuracy']:5.1f}%  [{100 * lo:.1f}, {100 * hi:.1f}]  "
                     f"({r['direction']})")
    return "\n".join(lines)


def register(sub):
    from grandmother.data.faces import DEFAULT_CASCADE
    from grandmother.data.testset import PAPER_POSITIVE_FRACTION

    p = sub.add_parser("ingest", help="videos, images and folders in, a sharded dataset (DATA_DIR) out")
    p.add_argument("sources", nargs="*", metavar="SRC", help="video file, image file or folder (recursive)")
    p.add_argument("--out", required=True, help="DATA_DIR to write")
    p.add_argument("--size", type=int, default=200, help="square image size in pixels (default: %(default)s)")
    p.add_argument("--color", choices=("rgb", "gray"), default="rgb", help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="chooses the video frames (default: %(default)s)")
    p.add_argument("--frames-per-video", type=int, default=1, help="random frames per video (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="decoding processes (default: %(default)s)")
    p.add_argument("--shard-size", type=int, default=1000, help="input files per shard (default: %(default)s)")
    p.add_argument("--exclude", metavar="FILE", help="file listing paths to leave out (e.g. TEST_DIR/excluded.txt)")
    add_rebalance_arguments(p, None)
    p.add_argument("--overwrite", action="store_true", help="replace a finished dataset in --out (atomically)")
    p.add_argument("--json", action="store_true", help="print index.json")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_ingest)

    def detector_args(p):
        p.add_argument("--cascade", default=DEFAULT_CASCADE,
                       help="OpenCV Haar cascade file name or path (default: %(default)s; e.g. "
                            "haarcascade_frontalcatface.xml, haarcascade_fullbody.xml)")
        p.add_argument("--min-neighbors", type=int, default=3, help="detector minNeighbors (default: %(default)s)")

    p = sub.add_parser("audit", help="fraction of random patches an OpenCV face detector fires on (paper, App. A)")
    p.add_argument("data_dir", metavar="DATA_DIR")
    p.add_argument("--patches", type=int, default=100000, help="default: %(default)s")
    p.add_argument("--patch-size", type=int, default=60, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-image", action="store_true", help="also count detections on every whole image")
    p.add_argument("--json", action="store_true", help="print the report as JSON (with per-image counts)")
    detector_args(p)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("filter-faces", help="copy a dataset without every image in which a face is detected")
    p.add_argument("data_dir", metavar="DATA_DIR")
    p.add_argument("--out", required=True, help="NEW_DIR to write")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    detector_args(p)
    p.set_defaults(func=cmd_filter_faces)

    p = sub.add_parser("testset", help="a labeled test set: positives vs distractors, split by identity")
    p.add_argument("--positive", nargs="+", default=[], metavar="SRC", required=True)
    p.add_argument("--negative", nargs="+", default=[], metavar="SRC", required=True)
    p.add_argument("--out", required=True, help="TEST_DIR to write")
    p.add_argument("--positive-fraction", type=float, default=PAPER_POSITIVE_FRACTION,
                   help="default: the paper's 13026/37000 = %(default).4f")
    p.add_argument("--count", type=int, help="images in all (default: as many as the sources allow at the fraction)")
    p.add_argument("--size", type=int, default=200, help="default: %(default)s")
    p.add_argument("--color", choices=("rgb", "gray"), default="rgb",
                   help="default: %(default)s; use gray whenever the positives are gray (LFW)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-by", choices=("folder", "file"), default="folder",
                   help="identity of a positive: its folder (LFW: person) or the file (default: %(default)s)")
    p.add_argument("--no-histogram-match", action="store_true",
                   help="keep each image's own grey levels (default: every image gets the set's mean histogram, "
                        "which removes the brightness and contrast cues; docs/probing.md)")
    p.add_argument("--negative-crop", type=float, metavar="F",
                   help="each distractor becomes a random square crop of side F x its shorter side (default: off, "
                        "the whole photo)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_testset)
