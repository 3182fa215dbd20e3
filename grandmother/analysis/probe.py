"""`grandmother probe`: score every unit of a trained network on a labeled test set, with Table 1's baselines.

    grandmother probe RUN_DIR --testset TEST_DIR --out PROBE_DIR [--ablation NO_LCN_RUN]
        [--autoencoder AE3_RUN --autoencoder AE6_RUN] [--kmeans-train DATA --kmeans-centroids N]
        [--linear-filters N] [--train-data PATH]

Every unit of every sublayer (filter, pool, LCN of each stage) is scored with the paper's protocol
(grandmother/probe_protocol.py). Writes PROBE_DIR/probe.json (best unit, top 20, best per sublayer and
stage, baselines), PROBE_DIR/best_unit_activations.npy and labels.npy (for the histogram), and caches
partial results under PROBE_DIR/cache/ so an interrupted probe resumes.

Baselines (each scored with the same protocol on the same test set):
  random_guess      the majority class rate
  random_weights    the same architecture at its seeded initialisation (the run's train.seed), untrained
  linear_filter     N training images (prepared like network input) used as templates: <x, template>
  first_stage       the best unit of stage 0 of the trained network
  no_lcn            the best unit of `--ablation RUN_DIR` (trained with `grandmother train --no-lcn`)
  deep_autoencoder_L  the best unit of `--autoencoder RUN_DIR` (kind sigmoid_ae, L stages)
  kmeans            MiniBatchKMeans centroids of training images at 40x40; unit = cosine similarity
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from grandmother.errors import GrandmotherError
from grandmother.io import atomic_path, atomic_write_json, make_dir
from grandmother.analysis.probe_heldout import HeldoutSettings, heldout_probe
from grandmother.analysis.protocol import check_labels, fingerprint_of, run_protocol
from grandmother.report.results import result_fields
from grandmother.analysis.units import Unit, network_batch_fn, prepared_batches, unit_at, unit_responses

TOP_UNITS = 20
KMEANS_SIZE = 40


# ---------------------------------------------------------------- network units

def check_fits(net, dataset, where) -> None:
    have = tuple(dataset.get_batch([0]).shape[1:])
    want = tuple(net.input_shape)
    if have != want:
        raise GrandmotherError(f"test set {where} has {'x'.join(map(str, have))} images (channels x height x "
                               f"width) but the network takes {'x'.join(map(str, want))}; build the test set "
                               f"with the run's --size/--color")


def probe_network(net, dataset, labels, device, cache_path, fingerprint, batch_size=256, on_batch=None,
                  progress=None) -> dict:
    """Protocol results of every unit of `net`, plus its layout."""
    fn, layout = network_batch_fn(net, dataset, device)
    n_units = layout[-1][3] + int(np.prod(layout[-1][2]))
    res = run_protocol(fn, labels, n_units, batch_size, cache_path, fingerprint, on_batch=on_batch,
                       progress=progress)
    res["layout"] = layout
    return res


def unit_record(layout, res, flat: int) -> dict:
    u = unit_at(layout, flat)
    return {"unit": str(u), "stage": u.stage, "sublayer": u.sublayer, "map": u.map, "y": u.y, "x": u.x,
            "accuracy": float(res["best_accuracy"][flat]), "threshold": float(res["best_threshold"][flat])}


def summarize(res) -> dict:
    """best, top 20, best per sublayer and per stage of one network's protocol results."""
    layout, acc = res["layout"], res["best_accuracy"]
    order = np.argsort(-acc, kind="stable")  # stable: ties go to the first unit in layout order
    summary = {"best": unit_record(layout, res, int(order[0])),
               "top": [unit_record(layout, res, int(i)) for i in order[:TOP_UNITS]],
               "per_sublayer": {}, "per_stage": {}}
    for s, name, shape, off in layout:
        size = int(np.prod(shape))
        rec = unit_record(layout, res, off + int(acc[off:off + size].argmax()))
        summary["per_sublayer"][f"s{s}.{name}"] = rec
        best_s = summary["per_stage"].get(str(s))
        if best_s is None or rec["accuracy"] > best_s["accuracy"]:
            summary["per_stage"][str(s)] = rec
    return summary


# ---------------------------------------------------------------- template baselines

def _prepared_flat(net, images, device):
    return net.prepare(images.to(device)).flatten(1).float()


def probe_templates(templates: torch.Tensor, features_fn, labels, cache_dir: Path, name: str, fingerprint: dict,
                    batch_size=256, chunk=2048, progress=None) -> float:
    """Best accuracy over template units (response = <features(test image), template>), in chunks of
    `chunk` templates so templates x test images never need one giant matrix."""
    best = 0.0
    for c in range(0, len(templates), chunk):
        t = templates[c:c + chunk]
        res = run_protocol(lambda idx: features_fn(idx) @ t.T, labels, len(t), batch_size,
                           cache_dir / f"{name}_{c // chunk:05d}.npz", fingerprint_of(**fingerprint, chunk=c),
                           progress=progress)
        best = max(best, float(res["best_accuracy"].max()))
    return best


def linear_filter_templates(net, train_data, n, device, seed=0) -> torch.Tensor:
    from grandmother.data.dataset import open_training_data
    c, h, _ = net.input_shape
    ds, _ = open_training_data(Path(train_data), h, c)
    n = min(int(n), len(ds))
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), n, replace=False))
    parts = [_prepared_flat(net, ds.get_batch(idx[s:s + 1024].tolist()), device) for s in range(0, n, 1024)]
    return torch.cat(parts)


def _downsample(images: torch.Tensor, size: int) -> np.ndarray:
    """uint8 (B, C, H, W) -> float (B, size*size*C), resized by data.fit_image (the project's one resizer)."""
    from PIL import Image
    from grandmother.data.images import fit_image
    c = images.shape[1]
    out = []
    for im in images.numpy().transpose(0, 2, 3, 1):
        pil = Image.fromarray(im[:, :, 0] if c == 1 else im)
        out.append(fit_image(pil, size, c).astype(np.float32).ravel())
    return np.stack(out)


def _unit_vectors(x: np.ndarray) -> np.ndarray:
    """Per-image standardise then L2-normalise: dot products become cosine similarities."""
    x = x - x.mean(1, keepdims=True)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-6)


def fit_kmeans_centroids(train_data, channels, n_centroids, max_images=100_000, seed=0) -> np.ndarray:
    from sklearn.cluster import MiniBatchKMeans
    from grandmother.data.dataset import open_training_data
    ds, _ = open_training_data(Path(train_data), KMEANS_SIZE, channels)
    n = min(max_images, len(ds))
    if n < n_centroids:
        raise GrandmotherError(f"--kmeans-centroids {n_centroids} needs at least that many images; "
                               f"{train_data} has {len(ds)}")
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), n, replace=False))
    x = np.concatenate([_unit_vectors(ds.get_batch(idx[s:s + 4096].tolist()).numpy()
                                      .transpose(0, 2, 3, 1).reshape(-1, KMEANS_SIZE ** 2 * channels)
                                      .astype(np.float32)) for s in range(0, n, 4096)])
    km = MiniBatchKMeans(n_clusters=n_centroids, random_state=seed, batch_size=1024, n_init=3).fit(x)
    return _unit_vectors(km.cluster_centers_.astype(np.float32))


# ---------------------------------------------------------------- the command

def _open_testset(path):
    from grandmother.data.testset import open_testset
    return open_testset(Path(path))


def _best_of_run(run_dir, dataset, labels, testset, device, cache_dir, name, batch_size, progress):
    from grandmother.training.runs import load_run
    cfg, net, meta = load_run(Path(run_dir), device)
    check_fits(net, dataset, testset)
    res = probe_network(net, dataset, labels, device, cache_dir / f"{name}.npz",
                        fingerprint_of(run=str(Path(run_dir).resolve()), step=meta.get("step"), testset=str(testset),
                                       n=len(labels), batch=batch_size), batch_size, progress=progress)
    return cfg, summarize(res)


def run_probe(run_dir, testset_dir, out_dir, *, ablation=None, autoencoders=(), linear_filters=100_000,
              train_data=None, kmeans_train=None, kmeans_centroids=100, random_weights=True, batch_size=256,
              device="cpu", concept=None, command=None, progress=False, dataset=None, labels=None,
              on_batch=None, heldout=HeldoutSettings()) -> dict:
    """Probe RUN_DIR on TEST_DIR (or on `dataset`/`labels` given directly) and write OUT_DIR/probe.json.
    `heldout` (None: skip) are the settings of the held-out entry (probe_heldout.py)."""
    from grandmother.training.runs import load_run
    from grandmother.nn.model import build_network
    from grandmother.training.runtime import resolve_device
    out_dir, run_dir = Path(out_dir), Path(run_dir)
    if batch_size < 1:
        raise GrandmotherError(f"--batch-size {batch_size}: must be >= 1")
    device = resolve_device(device)
    cfg, net, meta = load_run(run_dir, device)
    if dataset is None:
        dataset, labels, _ = _open_testset(testset_dir)
    labels = check_labels(labels, f"test set {testset_dir}")
    check_fits(net, dataset, testset_dir)
    # K-means first: its data is checked (>= 40x40 images) before the long work below
    cents = (torch.from_numpy(fit_kmeans_centroids(kmeans_train, net.input_shape[0], int(kmeans_centroids)))
             if kmeans_train else None)
    cache = make_dir(out_dir / "cache")
    base = dict(testset=str(Path(testset_dir).resolve()), n=len(labels), n_pos=int(labels.sum()), batch=batch_size)
    show = (lambda s: s) if progress else (lambda s: None)

    # ============ every unit of the trained network ============
    res = probe_network(net, dataset, labels, device, cache / "network.npz",
                        fingerprint_of(run=str(run_dir.resolve()), step=meta.get("step"), **base), batch_size,
                        on_batch=on_batch, progress=show("units"))
    summary = summarize(res)
    n, n_pos = len(labels), int(labels.sum())
    baselines = {"random_guess": max(n_pos, n - n_pos) / n,
                 "first_stage": summary["per_stage"]["0"]["accuracy"]}

    # ============ baselines ============
    if random_weights:
        rnet = build_network(cfg, device).eval()
        rres = probe_network(rnet, dataset, labels, device, cache / "random_weights.npz",
                             fingerprint_of(random_seed=cfg.train.seed, model=repr(cfg.model), **base), batch_size,
                             progress=show("random weights"))
        baselines["random_weights"] = float(rres["best_accuracy"].max())
    templates = None
    if linear_filters:
        data = train_data or meta.get("data")
        if not data or not Path(data).exists():
            raise GrandmotherError(f"linear-filter baseline: training data {data!r} not found; give --train-data PATH "
                                   f"or --linear-filters 0")
        templates = linear_filter_templates(net, data, linear_filters, device)
        feats = lambda idx: _prepared_flat(net, dataset.get_batch(idx), device)
        baselines["linear_filter"] = probe_templates(
            templates, feats, labels, cache, "linear_filter",
            dict(data=str(Path(data).resolve()), templates=len(templates), **base), batch_size,
            progress=show("linear filters"))
    if ablation:
        _, s = _best_of_run(ablation, dataset, labels, testset_dir, device, cache, "no_lcn", batch_size, show("no LCN"))
        baselines["no_lcn"] = s["best"]["accuracy"]
    for i, ae in enumerate(autoencoders or ()):
        ae_cfg, s = _best_of_run(ae, dataset, labels, testset_dir, device, cache, f"autoencoder_{i}", batch_size,
                                 show("autoencoder"))
        baselines[f"deep_autoencoder_{len(ae_cfg.model.stages)}"] = s["best"]["accuracy"]
    if kmeans_train:
        feats = lambda idx: torch.from_numpy(_unit_vectors(_downsample(dataset.get_batch(idx), KMEANS_SIZE)))
        baselines["kmeans"] = probe_templates(
            cents, feats, labels, cache, "kmeans",
            dict(data=str(Path(kmeans_train).resolve()), centroids=len(cents), **base), batch_size,
            progress=show("k-means"))

    # ============ held out: chosen on the selection half, scored on the evaluation half ============
    held = None
    if heldout is not None:
        held = heldout_probe(net, dataset, labels, device, cfg=cfg if random_weights else None, templates=templates,
                             st=heldout, batch_size=batch_size, progress=(print if progress else None))

    # ============ the best unit's activations, for the histogram ============
    best = Unit.parse(summary["best"]["unit"])
    acts = unit_responses(net, best, prepared_batches(net, dataset, batch_size)).astype(np.float32)
    for name, array in (("best_unit_activations.npy", acts), ("labels.npy", labels.astype(np.uint8))):
        with atomic_path(out_dir / name) as tmp, open(tmp, "wb") as f:
            np.save(f, array)

    result = {**result_fields(run_dir, meta, command), "testset": str(Path(testset_dir).resolve()),
              "concept": concept, "n_images": n, "n_positive": n_pos,
              "thresholds": "20 = linspace(min, max), both included", **summary, "baselines": baselines,
              **({"heldout": held} if held is not None else {})}
    atomic_write_json(out_dir / "probe.json", result)
    return result


def format_table(result: dict) -> str:
    rows = [("best unit " + result["best"]["unit"], result["best"]["accuracy"])]
    rows += [(k, v) for k, v in result["baselines"].items()]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  accuracy"] + [f"{k:{width}}  {100 * v:6.1f}%" for k, v in rows]
    lines.append(f"threshold of the best unit: {result['best']['threshold']:.4g}  "
                 f"({result['n_images']} images, {result['n_positive']} positive)")
    ho = result.get("heldout")
    if ho and "skipped" in ho:
        lines.append(f"held-out evaluation skipped: {ho['skipped']}")
    elif ho:
        lines.append("")
        lines.append(heldout_table(ho))
    return "\n".join(lines)


def heldout_table(ho: dict) -> str:
    """Plain-text table of the held-out entry: evaluation-half accuracy and 95% interval of each row."""
    pr, base = ho["protocol"], ho["baselines"]
    rows = [(f"best unit {ho['best']['unit']}", ho["best"]), (f"top stage {ho['top_stage']['unit']}", ho["top_stage"])]
    rw = base.get("random_weights")
    if rw:
        rows.append((f"random weights, mean of {len(rw['seeds'])}", {"evaluation_accuracy": rw["mean"], "ci95": rw["ci95_mean"]}))
        rows.append((f"random weights, best of {len(rw['seeds'])}", {"evaluation_accuracy": rw["best"], "ci95": rw["ci95_best"]}))
    for key in ("linear_filter", "first_stage"):
        if key in base:
            rows.append((key.replace("_", " "), base[key]))
    rows += [(f"cue: {k}", v) for k, v in base["trivial_cues"].items()]
    rows.append(("majority guess", base["random_guess"]))
    width = max(len(r[0]) for r in rows)
    head = (f"held out: chosen on {pr['selection']['images']} images, scored on {pr['evaluation']['images']} "
            f"(direction {pr['direction']}, split seed {pr['seed']})")
    lines = [head, f"{'':{width}}  evaluation  95% interval"]
    for name, r in rows:
        lo, hi = r["ci95"]
        lines.append(f"{name:{width}}  {100 * r['evaluation_accuracy']:9.1f}%  [{100 * lo:.1f}, {100 * hi:.1f}]")
    return "\n".join(lines)
