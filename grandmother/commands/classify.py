"""Subcommand: classify (object recognition on learned features; see grandmother/classify.py)."""
from __future__ import annotations

from pathlib import Path

from grandmother.commands.common import command_line


def cmd_classify(args):
    from grandmother.analysis.classify import run_classify
    run_classify(Path(args.run_dir), Path(args.data), Path(args.out), split=Path(args.split) if args.split else None,
                 seed=args.seed, features=args.features, l2=args.l2, max_iter=args.max_iter, fine_tune=args.finetune,
                 finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr, batch_size=args.batch_size,
                 device=args.device, progress=not args.quiet, command=command_line())
    return 0


def register(sub):
    p = sub.add_parser("classify", help="object recognition on a run's features: logistic classifiers, "
                                        "fine-tuning, raw-pixel and random-weight baselines")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (from `grandmother train`)")
    p.add_argument("--data", required=True, help="labeled folder: one sub-folder of images per class")
    p.add_argument("--out", required=True, help="output folder for classify.json and confusion.png")
    p.add_argument("--split", help="split file: JSON {\"train\": [paths], \"val\": [paths]} or CSV rows "
                                   "`path,train|val` (paths relative to --data); default: random stratified 50/50")
    p.add_argument("--seed", type=int, default=0, help="seed of the random split and the classifiers (default: 0)")
    p.add_argument("--features", default="top",
                   help="which outputs feed the classifier: top (default), all, sN (stage N's output) or sN.SUBLAYER")
    p.add_argument("--l2", type=float, default=0.0, help="L2 penalty on the classifier weights (default 0, as the paper)")
    p.add_argument("--max-iter", type=int, default=300, help="L-BFGS iterations of the classifier (default: %(default)s)")
    p.add_argument("--finetune", action="store_true", help="then train the classifiers and the network together")
    p.add_argument("--finetune-epochs", type=int, default=3, help="fine-tuning epochs (default: %(default)s)")
    p.add_argument("--finetune-lr", type=float, default=1e-4, help="Adam learning rate for fine-tuning (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=100, help="images per feature/fine-tuning batch (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_classify)
