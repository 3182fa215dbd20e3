"""Object recognition on learned features (paper section 4.5, Table 2).

    grandmother classify RUN_DIR --data LABELED_DIR --out DIR [--finetune --finetune-epochs 3]

LABELED_DIR holds one folder per class; images are found recursively in each. The labeled images are
split 50/50 into train and validation (seeded, stratified), or as a `--split` file says. Then, on the
same split:

  learned         one-vs-all logistic regression on the frozen features of the trained network
  random_weights  the same classifier on the same architecture at its seeded initialisation
  raw_pixels      the same classifier on the network's prepared input (per-image standardised pixels)

and with `--finetune` the classifier and the network are then trained together (learned and random
weights alike). Choices the paper leaves open, and ours:

- Features: the output of one stage (LCN if the model has it, else pooling), flattened; `--features
  top` (default, the last stage, as the paper's classifiers sit on the top layer), `sN`, `sN.SUBLAYER`
  or `all` (every stage's output, concatenated).
- Every feature is standardised with the mean and std of the training split (logistic regression
  without regularisation is otherwise very sensitive to the features' scales).
- One-vs-all: one linear layer with C outputs, each output trained with binary cross-entropy against
  "this class or not"; the prediction is the argmax. No regularisation by default (the paper uses none);
  `--l2 L` adds L * ||W||^2. Full-batch L-BFGS with zero initial weights, at most `--max-iter`
  iterations: with separable training data unregularised weights grow without bound, so the iteration
  cap is what stops them.
- Fine-tuning minimises the same one-vs-all loss through the whole network with Adam (`--finetune-lr`,
  minibatches of `--batch-size`), starting from the frozen classifier; the standardisation is kept fixed.
"""
from __future__ import annotations

import copy
import csv
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from grandmother.errors import GrandmotherError
from grandmother.data.images import Skipped, fit_image, list_images
from grandmother.report.plots import plot_confusions
from grandmother.report.results import result_fields


# ---------------------------------------------------------------- labeled images

@dataclass
class LabeledImages:
    images: np.ndarray  # (N, C, H, W) uint8
    labels: np.ndarray  # (N,) int64
    paths: list[str]  # relative to the labeled folder
    classes: list[str]
    skipped: Skipped
    resized: int  # images whose source size differed from the network input
    upscaled: int  # ... of which smaller than the input on their short side


def load_labeled_folder(root: Path, size: int, channels: int, progress: bool = False) -> LabeledImages:
    """Decode LABELED_DIR/<class>/** to (size, size) through data.fit_image. Unreadable files are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise GrandmotherError(f"--data {root}: not a folder (expected one sub-folder of images per class)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = {f.name: list_images(f) for f in folders}
    for name, paths in per_class.items():
        if len(paths) < 2:
            # An error, not a silent drop: a class cannot be in both train and validation with < 2 images,
            # and quietly changing the set of classes would change what "accuracy" means.
            raise GrandmotherError(f"class folder {root / name} has {len(paths)} image(s); every class needs "
                                   f"at least 2 (one for training, one for validation): add images or remove it")
    if len(per_class) < 2:
        raise GrandmotherError(f"--data {root}: found {len(per_class)} class folder(s); classification needs at "
                               f"least 2 (one sub-folder of images per class)")
    classes = sorted(per_class)
    items = [(p, ci) for ci, c in enumerate(classes) for p in per_class[c]]
    iterator = items
    if progress:
        from tqdm import tqdm
        iterator = tqdm(items, desc=f"decoding {root.name}", unit="img", disable=None)
    skipped, arrays, labels, paths = Skipped(), [], [], []
    resized = upscaled = 0
    for p, ci in iterator:
        try:
            with Image.open(p) as img:
                img.load()  # full decode now, so a truncated file fails here
                w, h = img.size
                arr = fit_image(img, size, channels)
        except Exception as e:  # PIL raises many types for corrupt files; none is fatal here
            skipped.add(p, f"{type(e).__name__}: {e}")
            continue
        resized += (w, h) != (size, size)
        upscaled += min(w, h) < size
        arrays.append(arr.transpose(2, 0, 1))
        labels.append(ci)
        paths.append(str(p.relative_to(root)))
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    for ci, c in enumerate(classes):
        if counts[ci] < 2:
            raise GrandmotherError(f"class folder {root / c} has {counts[ci]} readable image(s) "
                                   f"({len(per_class[c]) - counts[ci]} unreadable); every class needs at least 2")
    return LabeledImages(np.stack(arrays), np.asarray(labels, dtype=np.int64), paths, classes, skipped,
                         resized, upscaled)


def size_warning(data: LabeledImages, size: int) -> str | None:
    """One line about resizing, or None when every image already had the network's input size."""
    if data.resized == 0:
        return None
    msg = (f"warning: {data.resized} of {len(data.labels)} images are not {size}x{size}; each was resized "
           f"(short side) and centre-cropped to the network's input")
    if data.upscaled:
        msg += f"; {data.upscaled} were smaller than {size} px and were upscaled"
    return msg


# ---------------------------------------------------------------- the split

def random_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified 50/50 (train, validation) indices; each class has at least one image on each side."""
    from sklearn.model_selection import train_test_split
    idx = np.arange(len(labels))
    train, val = train_test_split(idx, test_size=0.5, random_state=seed, stratify=labels)
    return np.sort(train), np.sort(val)


def read_split(path: Path, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Indices from a split file: JSON {"train": [...], "val": [...]} or CSV rows `path,train|val`.

    Paths are relative to LABELED_DIR (e.g. `cat/001.jpg`). Images the file does not list are left out.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise GrandmotherError(f"--split {path}: cannot read it ({e.strerror or e})") from None
    assign: dict[str, str] = {}
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
            for subset in ("train", "val"):
                for p in obj[subset]:
                    assign[str(p)] = subset
        except (ValueError, KeyError, TypeError) as e:
            raise GrandmotherError(f"--split {path}: expected JSON {{\"train\": [paths], \"val\": [paths]}} ({e})") from None
    else:
        for n, row in enumerate(csv.reader(text.splitlines()), 1):
            if not row or row[0].startswith("#") or (n == 1 and row[0].strip() == "path"):
                continue
            if len(row) != 2 or row[1].strip() not in ("train", "val"):
                raise GrandmotherError(f"--split {path} line {n}: expected `relative/path,train` or `...,val`")
            assign[row[0].strip()] = row[1].strip()
    index = {p: i for i, p in enumerate(paths)}
    unknown = [p for p in assign if p not in index]
    if unknown:
        raise GrandmotherError(f"--split {path}: {len(unknown)} listed image(s) are not readable images of the "
                               f"labeled folder, e.g. {unknown[0]!r}")
    train = np.array(sorted(index[p] for p, s in assign.items() if s == "train"), dtype=np.int64)
    val = np.array(sorted(index[p] for p, s in assign.items() if s == "val"), dtype=np.int64)
    if len(train) == 0 or len(val) == 0:
        raise GrandmotherError(f"--split {path}: needs at least one train and one val image")
    return train, val


# ---------------------------------------------------------------- features

def resolve_features(spec: str, net) -> list[tuple[int, str]]:
    """`top`, `all`, `sN` or `sN.SUBLAYER` -> [(stage, sublayer)] of the network."""
    available = {}
    for s, name, _ in net.sublayers():
        available.setdefault(s, []).append(name)
    n = len(available)

    def output_of(s):  # a stage's output: LCN if present, else pooling, else the filter (sigmoid_ae)
        return (s, available[s][-1])

    if spec == "top":
        return [output_of(n - 1)]
    if spec == "all":
        return [output_of(s) for s in range(n)]
    head, _, sub = spec.partition(".")
    if head.startswith("s") and head[1:].isdigit() and int(head[1:]) < n:
        s = int(head[1:])
        if not sub:
            return [output_of(s)]
        if sub in available[s]:
            return [(s, sub)]
    choices = ["top", "all"] + [f"s{s}" for s in range(n)] + [f"s{s}.{x}" for s in range(n) for x in available[s]]
    raise GrandmotherError(f"--features {spec!r}: choose one of {', '.join(choices)}")


class FeatureNet(nn.Module):
    """uint8 images -> flattened chosen features of `net` (or the prepared pixels when layers is None)."""

    def __init__(self, net, layers: list[tuple[int, str]] | None):
        super().__init__()
        self.net, self.layers = net, layers

    def forward(self, images):
        x = self.net.prepare(images)
        if self.layers is None:
            return x.flatten(1)
        upto = max(s for s, _ in self.layers) + 1
        out = self.net(x, objective=False, upto=upto)
        return torch.cat([out.stages[s][name].flatten(1) for s, name in self.layers], dim=1)


def extract(model: nn.Module, images: np.ndarray, device, batch_size: int) -> torch.Tensor:
    """Features of every image, on the CPU, in float32."""
    model.eval()
    chunks = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[i:i + batch_size]).to(device)
            chunks.append(model(batch).float().cpu())
    return torch.cat(chunks)


# ---------------------------------------------------------------- one-vs-all logistic regression

class Standardize(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x):
        return (x - self.mean) / self.std

    @classmethod
    def fit(cls, feats: torch.Tensor) -> "Standardize":
        # Constant features (std 0) are only centred: dividing by a tiny number would blow up noise.
        std = feats.std(0)
        return cls(feats.mean(0), torch.where(std > 1e-6, std, torch.ones_like(std)))


def one_vs_all_loss(logits: torch.Tensor, labels: torch.Tensor, head: nn.Linear, l2: float) -> torch.Tensor:
    """Sum over the C binary "class c or not" cross-entropies, averaged over the examples."""
    targets = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(labels)
    if l2 > 0:
        loss = loss + l2 * (head.weight ** 2).sum()
    return loss


def fit_one_vs_all(feats: torch.Tensor, labels: torch.Tensor, n_classes: int, l2: float = 0.0,
                   max_iter: int = 300) -> nn.Linear:
    """Full-batch L-BFGS from zero weights on standardised features (on the CPU)."""
    head = nn.Linear(feats.shape[1], n_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = one_vs_all_loss(head(feats), labels, head, l2)
        loss.backward()
        return loss

    opt.step(closure)
    return head


def predict(logits: torch.Tensor) -> np.ndarray:
    return logits.argmax(1).cpu().numpy()


@dataclass
class Result:
    accuracy: float
    per_class: dict[str, float]
    predictions: np.ndarray

    def summary(self) -> dict:
        return {"accuracy": self.accuracy, "per_class": self.per_class}


def score(pred: np.ndarray, truth: np.ndarray, classes: list[str]) -> Result:
    per_class = {}
    for ci, c in enumerate(classes):
        mask = truth == ci
        per_class[c] = float((pred[mask] == ci).mean()) if mask.any() else None
    return Result(float((pred == truth).mean()), per_class, pred)


# ---------------------------------------------------------------- a whole evaluation

@dataclass
class Setup:
    images: np.ndarray
    labels: np.ndarray
    train: np.ndarray
    val: np.ndarray
    classes: list[str]
    device: torch.device
    batch_size: int = 100
    l2: float = 0.0
    max_iter: int = 300
    seed: int = 0


def evaluate(model: FeatureNet, setup: Setup) -> tuple[Result, nn.Module]:
    """Frozen features -> standardise -> one-vs-all classifier. Returns (validation result, classifier)."""
    feats = extract(model, setup.images, setup.device, setup.batch_size)
    y = torch.from_numpy(setup.labels)
    norm = Standardize.fit(feats[setup.train])
    torch.manual_seed(setup.seed)
    head = fit_one_vs_all(norm(feats[setup.train]), y[setup.train], len(setup.classes), setup.l2, setup.max_iter)
    with torch.no_grad():
        pred = predict(head(norm(feats[setup.val])))
    return score(pred, setup.labels[setup.val], setup.classes), nn.Sequential(norm, head)


def finetune(model: FeatureNet, classifier: nn.Sequential, setup: Setup, epochs: int, lr: float,
             progress: bool = False) -> Result:
    """Train network and classifier together on the train split; return the validation result.

    `model` and `classifier` are changed in place (the caller passes copies it may lose).
    """
    full = nn.Sequential(model, classifier).to(setup.device)
    head = classifier[1]
    opt = torch.optim.Adam([p for p in full.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(setup.seed)
    labels = torch.from_numpy(setup.labels)
    for epoch in range(epochs):
        full.train()
        order = setup.train[torch.randperm(len(setup.train), generator=gen).numpy()]
        total, t0 = 0.0, time.perf_counter()
        for i in range(0, len(order), setup.batch_size):
            idx = order[i:i + setup.batch_size]
            x = torch.from_numpy(setup.images[idx]).to(setup.device)
            loss = one_vs_all_loss(full(x), labels[idx].to(setup.device), head, setup.l2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        if progress:
            print(f"  fine-tune epoch {epoch + 1}/{epochs}: train loss {total / len(order):.4g} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    logits = extract(full, setup.images[setup.val], setup.device, setup.batch_size)
    return score(predict(logits), setup.labels[setup.val], setup.classes)


def copy_for_finetuning(model: FeatureNet, classifier: nn.Module, device) -> tuple[FeatureNet, nn.Sequential]:
    return copy.deepcopy(model).to(device), copy.deepcopy(classifier).to(device)


# ---------------------------------------------------------------- the whole protocol (grandmother classify)

def run_classify(run_dir: Path, data_dir: Path, out: Path, *, split: Path | None = None, seed: int = 0,
                 features: str = "top", l2: float = 0.0, max_iter: int = 300, fine_tune: bool = False,
                 finetune_epochs: int = 3, finetune_lr: float = 1e-4, batch_size: int = 100, device: str = "auto",
                 progress: bool = True, command: str | None = None) -> dict:
    """Classifiers on a run's features against raw-pixel and random-weight baselines; writes classify.json
    and confusion.png into `out` and returns the report."""
    from grandmother.training.runs import load_run
    from grandmother.io import atomic_write_json
    from grandmother.nn.model import build_network
    from grandmother.training.runtime import resolve_device

    t_start = time.perf_counter()
    if finetune_epochs < 1 or batch_size < 1 or max_iter < 1:
        raise GrandmotherError("--finetune-epochs, --batch-size and --max-iter must be at least 1")
    if l2 < 0:
        raise GrandmotherError(f"--l2 {l2}: must be >= 0")
    device = resolve_device(device)
    cfg, net, meta = load_run(Path(run_dir), device)
    layers = resolve_features(features, net)
    c, size, _ = net.input_shape
    data = load_labeled_folder(Path(data_dir), size, c, progress=progress)
    warning = size_warning(data, size)
    if warning:
        print(warning, file=sys.stderr)
    if data.skipped:
        print(f"warning: skipped {len(data.skipped)} unreadable image(s), e.g. {data.skipped.items[0]['path']} "
              f"(all listed in classify.json)", file=sys.stderr)
    if split:
        train_idx, val_idx = read_split(Path(split), data.paths)
    else:
        train_idx, val_idx = random_split(data.labels, seed)
    setup = Setup(data.images, data.labels, train_idx, val_idx, data.classes, device, batch_size, l2, max_iter, seed)
    feature_names = [f"s{s}.{name}" for s, name in layers]
    print(f"{len(data.classes)} classes, {len(train_idx)} train / {len(val_idx)} validation images; "
          f"features {'+'.join(feature_names)} of {run_dir} (step {meta.get('step')})", flush=True)

    random_net = build_network(cfg, device).eval()  # same architecture, the run's seeded initialisation
    models = {"learned": FeatureNet(net, layers), "random_weights": FeatureNet(random_net, layers),
              "raw_pixels": FeatureNet(net, None)}
    results, classifiers = {}, {}
    for name, model in models.items():
        t0 = time.perf_counter()
        results[name], classifiers[name] = evaluate(model, setup)
        print(f"{name:>16}: validation accuracy {results[name].accuracy:.4f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)

    tuned = {}
    if fine_tune:
        for name in ("learned", "random_weights"):
            t0 = time.perf_counter()
            print(f"fine-tuning {name} for {finetune_epochs} epoch(s)", flush=True)
            model, clf = copy_for_finetuning(models[name], classifiers[name], device)
            tuned[name] = finetune(model, clf, setup, finetune_epochs, finetune_lr, progress=progress)
            print(f"{name + ' fine-tuned':>16}: validation accuracy {tuned[name].accuracy:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

    out = Path(out)
    truth = data.labels[val_idx]
    report = {
        **result_fields(run_dir, meta, command), "preset": cfg.preset, "data": str(data_dir), "classes": data.classes,
        "n_train": int(len(train_idx)), "n_val": int(len(val_idx)),
        "split": str(split) if split else f"random stratified 50/50, seed {seed}",
        "features": features, "feature_layers": feature_names,
        "classifier": {"kind": "one-vs-all logistic regression", "l2": l2, "max_iter": max_iter},
        "accuracy": results["learned"].accuracy, "per_class": results["learned"].per_class,
        "chance": float(np.bincount(truth).max() / len(truth)),
        "baselines": {"raw_pixels": results["raw_pixels"].accuracy,
                      "random_weights": results["random_weights"].accuracy},
        "baselines_per_class": {k: results[k].per_class for k in ("raw_pixels", "random_weights")},
    }
    if fine_tune:
        report["finetune"] = {"epochs": finetune_epochs, "lr": finetune_lr, "batch_size": batch_size}
        report["finetuned"] = tuned["learned"].summary()
        report["baselines"]["random_weights_finetuned"] = tuned["random_weights"].accuracy
    report.update({"skipped": data.skipped.items, "resized_images": data.resized, "upscaled_images": data.upscaled,
                   "elapsed_s": round(time.perf_counter() - t_start, 1)})
    atomic_write_json(out / "classify.json", report)
    panels = [("learned features", truth, results["learned"].predictions)]
    if fine_tune:
        panels.append(("learned, fine-tuned", truth, tuned["learned"].predictions))
    plot_confusions(panels, data.classes, out / "confusion.png")
    print(f"wrote {out / 'classify.json'} and {out / 'confusion.png'}")
    return report
