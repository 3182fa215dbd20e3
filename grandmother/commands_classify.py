"""Subcommand: classify (object recognition on learned features; see grandmother/classify.py)."""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import numpy as np

from .errors import GrandmotherError


def plot_confusions(panels: list[tuple[str, np.ndarray, np.ndarray]], classes: list[str], path: Path) -> None:
    """Row-normalised confusion matrices side by side, one per (title, truth, prediction)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    from .io import atomic_path

    n = len(classes)
    many = n > 20  # with ~100 classes, per-cell numbers and every tick label are unreadable
    side = 4 if n <= 5 else (6 if not many else 9)
    fig, axes = plt.subplots(1, len(panels), figsize=(side * len(panels) + 1, side), squeeze=False)
    for ax, (title, truth, pred) in zip(axes[0], panels):
        cm = confusion_matrix(truth, pred, labels=np.arange(n)).astype(float)
        cm /= np.maximum(cm.sum(1, keepdims=True), 1)
        im = ax.imshow(cm, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"{title}: {(truth == pred).mean():.1%}", fontsize=10)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if many:
            step = max(1, n // 25)
            ticks = np.arange(0, n, step)
            ax.set_xticks(ticks, [classes[i] for i in ticks], rotation=90, fontsize=5)
            ax.set_yticks(ticks, [classes[i] for i in ticks], fontsize=5)
        else:
            ax.set_xticks(np.arange(n), classes, rotation=45, ha="right", fontsize=8)
            ax.set_yticks(np.arange(n), classes, fontsize=8)
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{cm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if cm[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=list(axes[0]), fraction=0.03, label="fraction of the true class")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)


def command_line(args) -> str:
    """The command that reproduces this run: every option spelled out (defaults included)."""
    words = ["grandmother", "classify", str(args.run_dir), "--data", str(args.data), "--out", str(args.out)]
    if args.split:
        words += ["--split", str(args.split)]
    words += ["--seed", str(args.seed), "--features", args.features, "--l2", str(args.l2),
              "--max-iter", str(args.max_iter), "--batch-size", str(args.batch_size), "--device", args.device]
    if args.finetune:
        words += ["--finetune", "--finetune-epochs", str(args.finetune_epochs), "--finetune-lr", str(args.finetune_lr)]
    return shlex.join(words)


def cmd_classify(args):
    from . import classify as C
    from .checkpoint import load_run
    from .io import atomic_write_json
    from .train import build_network, resolve_device

    t_start = time.perf_counter()
    if args.finetune_epochs < 1 or args.batch_size < 1 or args.max_iter < 1:
        raise GrandmotherError("--finetune-epochs, --batch-size and --max-iter must be at least 1")
    if args.l2 < 0:
        raise GrandmotherError(f"--l2 {args.l2}: must be >= 0")
    device = resolve_device(args.device)
    cfg, net, meta = load_run(Path(args.run_dir), device)
    layers = C.resolve_features(args.features, net)
    c, size, _ = net.input_shape
    data = C.load_labeled_folder(Path(args.data), size, c, progress=not args.quiet)
    warning = C.size_warning(data, size)
    if warning:
        print(warning, file=sys.stderr)
    if data.skipped:
        print(f"warning: skipped {len(data.skipped)} unreadable image(s), e.g. {data.skipped.items[0]['path']} "
              f"(all listed in classify.json)", file=sys.stderr)
    if args.split:
        train_idx, val_idx = C.read_split(Path(args.split), data.paths)
    else:
        train_idx, val_idx = C.random_split(data.labels, args.seed)
    setup = C.Setup(data.images, data.labels, train_idx, val_idx, data.classes, device, args.batch_size,
                    args.l2, args.max_iter, args.seed)
    feature_names = [f"s{s}.{name}" for s, name in layers]
    print(f"{len(data.classes)} classes, {len(train_idx)} train / {len(val_idx)} validation images; "
          f"features {'+'.join(feature_names)} of {args.run_dir} (step {meta.get('step')})", flush=True)

    random_net = build_network(cfg, device).eval()  # same architecture, the run's seeded initialisation
    models = {"learned": C.FeatureNet(net, layers), "random_weights": C.FeatureNet(random_net, layers),
              "raw_pixels": C.FeatureNet(net, None)}
    results, classifiers = {}, {}
    for name, model in models.items():
        t0 = time.perf_counter()
        results[name], classifiers[name] = C.evaluate(model, setup)
        print(f"{name:>16}: validation accuracy {results[name].accuracy:.4f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)

    tuned = {}
    if args.finetune:
        for name in ("learned", "random_weights"):
            t0 = time.perf_counter()
            print(f"fine-tuning {name} for {args.finetune_epochs} epoch(s)", flush=True)
            model, clf = C.copy_for_finetuning(models[name], classifiers[name], device)
            tuned[name] = C.finetune(model, clf, setup, args.finetune_epochs, args.finetune_lr, progress=not args.quiet)
            print(f"{name + ' fine-tuned':>16}: validation accuracy {tuned[name].accuracy:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

    out = Path(args.out)
    truth = data.labels[val_idx]
    report = {
        "run": str(args.run_dir), "run_step": meta.get("step"), "run_images_seen": meta.get("images_seen"),
        "preset": cfg.preset, "data": str(args.data), "classes": data.classes,
        "n_train": int(len(train_idx)), "n_val": int(len(val_idx)),
        "split": args.split or f"random stratified 50/50, seed {args.seed}",
        "features": args.features, "feature_layers": feature_names,
        "classifier": {"kind": "one-vs-all logistic regression", "l2": args.l2, "max_iter": args.max_iter},
        "accuracy": results["learned"].accuracy, "per_class": results["learned"].per_class,
        "chance": float(np.bincount(truth).max() / len(truth)),
        "baselines": {"raw_pixels": results["raw_pixels"].accuracy,
                      "random_weights": results["random_weights"].accuracy},
        "baselines_per_class": {k: results[k].per_class for k in ("raw_pixels", "random_weights")},
    }
    if args.finetune:
        report["finetune"] = {"epochs": args.finetune_epochs, "lr": args.finetune_lr, "batch_size": args.batch_size}
        report["finetuned"] = tuned["learned"].summary()
        report["baselines"]["random_weights_finetuned"] = tuned["random_weights"].accuracy
    report.update({"skipped": data.skipped.items, "resized_images": data.resized, "upscaled_images": data.upscaled,
                   "elapsed_s": round(time.perf_counter() - t_start, 1),
                   "commands": [command_line(args)]})
    atomic_write_json(out / "classify.json", report)
    panels = [("learned features", truth, results["learned"].predictions)]
    if args.finetune:
        panels.append(("learned, fine-tuned", truth, tuned["learned"].predictions))
    plot_confusions(panels, data.classes, out / "confusion.png")
    print(f"wrote {out / 'classify.json'} and {out / 'confusion.png'}")
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
