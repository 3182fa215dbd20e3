"""Subcommands that read a trained run: probe, visualize, invariance, report."""
from __future__ import annotations

from pathlib import Path

from grandmother.analysis.stimulus import PARAMETERIZATIONS, StimulusSettings
from grandmother.errors import GrandmotherError
from grandmother.commands.common import check_positive, command_line


def cmd_probe(args) -> int:
    from grandmother.analysis.probe import format_table, run_probe
    from grandmother.io import folder_lock
    from grandmother.analysis.probe_heldout import HeldoutSettings
    check_positive(bootstrap=args.bootstrap, random_seeds=args.random_seeds)
    heldout = None if args.no_heldout else HeldoutSettings(
        split_seed=args.split_seed, direction=args.direction, bootstrap=args.bootstrap,
        random_seeds=0 if args.no_random_weights else args.random_seeds)
    with folder_lock(Path(args.out), "probe"):
        res = run_probe(args.run_dir, args.testset, args.out, ablation=args.ablation, autoencoders=args.autoencoder,
                        linear_filters=args.linear_filters, train_data=args.train_data,
                        kmeans_train=args.kmeans_train, kmeans_centroids=args.kmeans_centroids,
                        random_weights=not args.no_random_weights, batch_size=args.batch_size, device=args.device,
                        concept=args.concept, progress=True, heldout=heldout, command=command_line())
    print(format_table(res))
    print(f"wrote {Path(args.out) / 'probe.json'}")
    return 0


def cmd_visualize(args):
    from grandmother.training.runtime import resolve_device
    from grandmother.analysis.visualize import run_visualize, unit_from_probe
    if (args.unit is None) == (args.probe is None):
        raise GrandmotherError("give exactly one of --unit UNIT or --probe PROBE_DIR (its best unit)")
    check_positive(restarts=args.restarts, iters=args.iters, top=args.top)
    if args.radius is not None and not args.radius > 0:
        raise GrandmotherError(f"--radius {args.radius}: must be positive")
    threshold, concept, unit = args.threshold, args.concept, args.unit
    if args.probe is not None:
        unit, probe_threshold, probe_concept = unit_from_probe(Path(args.probe))
        threshold = probe_threshold if threshold is None else threshold
        concept = concept or probe_concept
    from grandmother.analysis.stimulus import StimulusSettings
    stimulus = StimulusSettings(restarts=args.restarts, max_iters=args.iters, radius=args.radius, seed=args.seed,
                                parameterization=args.stimulus_parameterization, decay=args.stimulus_decay,
                                jitter=args.stimulus_jitter)
    res = run_visualize(Path(args.run_dir), Path(args.testset), unit, Path(args.out), threshold=threshold,
                        concept=concept, device=resolve_device(args.device), stimulus=stimulus, seed=args.seed,
                        top=args.top, command=command_line())
    st = res["optimal_stimulus"]
    c = st["correlation"]
    print(f"{res['unit']}: {res['top_images']['positives_among_top']} of the top {res['top_images']['count']} test "
          f"images are {res['concept']}; optimal stimulus f(x*) = {st['value']:.4g} (best test image "
          f"{st['best_test_activation']:.4g}), correlation with the mean of the top {c['top_count']} images "
          f"{c['top_images']:.2f}, with the mean negative image {c['mean_negative']:.2f}; wrote {args.out}")


def cmd_invariance(args):
    from grandmother.analysis.invariance import parse_range, run_invariance
    from grandmother.training.runtime import resolve_device
    from grandmother.analysis.visualize import unit_from_probe
    if (args.unit is None) == (args.probe is None):
        raise GrandmotherError("give exactly one of --unit UNIT or --probe PROBE_DIR (its best unit)")
    unit, threshold = args.unit, args.threshold
    if args.probe is not None:
        unit, probe_threshold, _ = unit_from_probe(Path(args.probe))
        threshold = probe_threshold if threshold is None else threshold
    scales = parse_range(args.scales, "--scales") if args.scales else None
    shifts = None
    if args.max_shift is not None:
        check_positive(max_shift=args.max_shift, shift_step=args.shift_step)
        shifts = list(range(-args.max_shift, args.max_shift + 1, args.shift_step))
    res = run_invariance(Path(args.run_dir), unit, Path(args.images), Path(args.out),
                         Path(args.rotations) if args.rotations else None, scales, shifts,
                         resolve_device(args.device), threshold, command_line())
    parts = []
    for name, curve in res["curves"].items():
        parts.append(f"{name} {min(curve['mean']):.3g}..{max(curve['mean']):.3g}")
    print(f"{res['unit']}: mean response ranges " + "; ".join(parts) + f"; wrote {args.out}")


def cmd_report(args):
    from grandmother.report.page import build_report
    res = build_report(Path(args.run_dir), Path(args.out), args.probe, args.visualize, args.invariance,
                       args.classify, command=command_line())
    found = ", ".join(f"{len(v)} {k}" for k, v in res["found"].items())
    print(f"wrote {Path(args.out).resolve()} ({found})")


def register(sub):
    p = sub.add_parser("probe", help="score every unit on a labeled test set, with Table 1's baselines")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--testset", required=True, metavar="TEST_DIR", help="made by `grandmother testset`")
    p.add_argument("--out", required=True, metavar="PROBE_DIR")
    p.add_argument("--ablation", metavar="RUN_DIR", help="a run trained with --no-lcn: baseline no_lcn")
    p.add_argument("--autoencoder", action="append", default=[], metavar="RUN_DIR",
                   help="a run of preset autoencoder3/autoencoder6 (repeatable): deep_autoencoder_<layers>")
    p.add_argument("--linear-filters", type=int, default=100_000, metavar="N",
                   help="training images used as linear templates (paper 100000, capped by the data; 0 = skip)")
    p.add_argument("--train-data", metavar="PATH", help="training images for the linear filters (default: the run's)")
    p.add_argument("--kmeans-train", metavar="DATA", help="training images for the K-means baseline (40x40)")
    p.add_argument("--kmeans-centroids", type=int, default=100, metavar="N")
    p.add_argument("--no-random-weights", action="store_true", help="skip the random-weights baseline")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--concept", help="name of the positive class (e.g. faces), for the report")
    from grandmother.analysis.heldout import DIRECTIONS
    from grandmother.analysis.probe_heldout import HeldoutSettings
    d = HeldoutSettings()
    p.add_argument("--split-seed", type=int, default=d.split_seed,
                   help="held out: seed of the selection/evaluation split (default: %(default)s)")
    p.add_argument("--direction", choices=DIRECTIONS, default=d.direction,
                   help="held out: 'positive' = more response means positive (the paper's rule); 'either' also "
                        "tries 'less means positive', chosen on the selection half (default: %(default)s)")
    p.add_argument("--random-seeds", type=int, default=d.random_seeds, metavar="N",
                   help="held out: random-weight networks, seeds train.seed .. +N-1 (default: %(default)s)")
    p.add_argument("--bootstrap", type=int, default=d.bootstrap, metavar="N",
                   help="held out: bootstrap resamples for the 95%% intervals (default: %(default)s)")
    p.add_argument("--no-heldout", action="store_true", help="skip the held-out evaluation (paper protocol only)")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("visualize", help="histogram, top test images and optimal stimulus of one unit")
    p.add_argument("run_dir", metavar="RUN_DIR", help="training run directory (with checkpoints)")
    p.add_argument("--testset", required=True, metavar="TEST_DIR", help="labeled test set (`grandmother testset`)")
    p.add_argument("--unit", help="unit id s<stage>.<filter|pool|lcn>.m<map>.y<row>.x<col>")
    p.add_argument("--probe", metavar="PROBE_DIR", help="take the best unit (and its threshold) of this probe: the held-out choice when it has one")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--threshold", type=float, help="draw this threshold on the histogram")
    p.add_argument("--concept", help="name of the positive class in the plots (default: from the probe)")
    p.add_argument("--restarts", type=int, default=4, help="random starts of the optimal-stimulus search (default 4)")
    p.add_argument("--iters", type=int, default=300, help="max ascent iterations per start (default 300)")
    p.add_argument("--radius", type=float, help="norm of x* in input space (default sqrt(C*H*W))")
    sd = StimulusSettings()
    p.add_argument("--stimulus-parameterization", choices=PARAMETERIZATIONS, default=sd.parameterization,
                   help="fourier: ascent preconditioned by the 1/f spectrum of natural images; pixel: plain ascent "
                        "(the paper's problem exactly); data: preconditioned by the training images' covariance "
                        "(default: %(default)s; docs/probing.md)")
    p.add_argument("--stimulus-decay", type=float, default=sd.decay,
                   help="spectrum exponent of the fourier parameterization (default: %(default)s)")
    p.add_argument("--stimulus-jitter", type=int, default=sd.jitter,
                   help="average the response over shifts of up to this many pixels (default: %(default)s)")
    p.add_argument("--top", type=int, default=48, help="how many top test images to show (default 48)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser("invariance", help="a unit's response to scaled, shifted and rotated images (Figure 4)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="training run directory (with checkpoints)")
    p.add_argument("--unit", help="unit id s<stage>.<filter|pool|lcn>.m<map>.y<row>.x<col>")
    p.add_argument("--probe", metavar="PROBE_DIR", help="take the best unit (and its threshold) of this probe: the held-out choice when it has one")
    p.add_argument("--images", required=True, metavar="DIR", help="a few images of the concept (paper: 10 faces)")
    p.add_argument("--rotations", metavar="DIR", help="one sub-folder per out-of-plane rotation sequence, "
                                                      "images in angle order (names like rot_045.png give degrees)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--scales", help="scale factors, START:STOP:COUNT or a list (default 0.4:1.6:13)")
    p.add_argument("--max-shift", type=int, help="largest shift in pixels at the network input "
                                                 "(default: a quarter of the input size)")
    p.add_argument("--shift-step", type=int, default=1, help="pixels between shifts with --max-shift (default 1)")
    p.add_argument("--threshold", type=float, help="draw this response threshold on the plots")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.set_defaults(func=cmd_invariance)

    p = sub.add_parser("report", help="one self-contained HTML report: training, Table 1, figures, commands")
    p.add_argument("run_dir", metavar="RUN_DIR", help="training run directory")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--probe", action="append", type=Path, metavar="DIR", help="a probe folder (repeatable)")
    p.add_argument("--visualize", action="append", type=Path, metavar="DIR", help="a visualize folder (repeatable)")
    p.add_argument("--invariance", action="append", type=Path, metavar="DIR", help="an invariance folder (repeatable)")
    p.add_argument("--classify", action="append", type=Path, metavar="DIR", help="a classify folder (repeatable)")
    p.set_defaults(func=cmd_report)
