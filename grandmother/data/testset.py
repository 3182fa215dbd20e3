"""Labeled test sets: positives (faces, cats, bodies) against distractors, split by identity.

    grandmother testset --positive ../shared/data/faces/lfw --negative ../shared/data/objects \\
        --out /tmp/faces_test --color gray --size 200

TEST_DIR is a dataset (grandmother/dataset.py: index.json + shard_*.npy) plus
    labels.npy      uint8 (N,), 1 = positive, 0 = negative, aligned with the dataset's images
    excluded.txt    one absolute path a line (a JSON string where the name holds a newline or another
                    control character; grandmother.io.path_line): every file the test set uses and, for
                    positives, every file of every identity it uses (`grandmother ingest --exclude TEST_DIR/excluded.txt`
                    keeps all of them out of training)
and index.json has "kind": "testset", "positives", "negatives", "test_identities", ...
Each image's provenance (path, label, identity, and "pixels": the digest of the image as `ingest` would
decode it, before histogram matching, for leak checks) is in the shard .json files (`ds.items()`).
Read it with `open_testset(TEST_DIR) -> (dataset, labels, index)`.

Choices (the paper gives only the ratio, 13,026 faces among 37,000 images):
- Identity = the positive file's folder relative to its SRC (LFW: folder = person), or the file itself
  for files directly in SRC; `--group-by file` makes every file its own identity. Identities are taken
  whole, in a seeded random order, until the positive count is reached (the last one may be partial:
  all its files are still excluded from training).
- Size: `--count` images in all; by default the largest set the sources allow at `--positive-fraction`
  (the larger side is subsampled to keep the ratio).
- Positives and negatives go through the same decoding, colour conversion and resize (data.fit_image);
  images are shuffled together (seeded).
- Trivial cues. LFW against object photos leaves low-level cues (brightness, contrast, a bright centre,
  edge density) that a single threshold exploits. Two options reduce them; the cue scores of the set
  (heldout.trivial_cues, scored with the held-out protocol) are stored in index.json ("trivial_cues") and
  printed. `--histogram-match` (default on; `--no-histogram-match` turns it off) gives every image the
  same grey-level histogram: the mean, over all images of the set, of each image's sorted pixel values
  (per channel; tied pixels share the mean of their ranks' target values). Mean brightness and contrast
  then carry no label, and the network (which standardises each image anyway) loses nothing else.
  `--negative-crop F` makes each distractor a square crop of side F x its shorter side at a seeded random
  position (default: off, the whole photo), so that distractors show scenes at a closer scale than
  their whole frame, as a face fills the middle of an LFW frame. docs/probing.md gives the measured cue
  scores behind these defaults. A one-line warning is printed when every positive is gray but
  --color rgb was asked: a neuron could then win by detecting "no colour".
"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from grandmother.data.images import decode_pool
from grandmother.data.dataset import COLORS, open_dataset, write_dataset
from grandmother.errors import GrandmotherError
from grandmother.io import path_line, read_path_list
from grandmother.data.ingest import decode_unit, expand_sources, media_kind

PAPER_POSITIVE_FRACTION = 13026 / 37000


def identity_of(src_i: int, rel: str, group_by: str) -> str:
    parent = str(Path(rel).parent)
    if group_by == "file" or parent == ".":
        return f"{src_i}:{rel}"
    return f"{src_i}:{parent}"


def plan_testset(positive: list[str], negative: list[str], positive_fraction: float, count: int | None,
                 seed: int, group_by: str):
    """Which files become positives and negatives, and which files training must leave out."""
    if not 0 < positive_fraction < 1:
        raise GrandmotherError(f"--positive-fraction {positive_fraction}: must be between 0 and 1")
    if group_by not in ("folder", "file"):
        raise GrandmotherError(f"--group-by {group_by!r}: choose folder or file")
    if not positive:
        raise GrandmotherError("--positive: name at least one folder or file")
    if not negative:
        raise GrandmotherError("--negative: name at least one folder or file")
    pos_units, _ = expand_sources(positive)
    neg_units, _ = expand_sources(negative)
    both = {os.path.realpath(p) for _, p, _ in pos_units} & {os.path.realpath(p) for _, p, _ in neg_units}
    if both:
        raise GrandmotherError(f"{sorted(both)[0]}: given as both --positive and --negative")
    P, N = len(pos_units), len(neg_units)
    total = count if count is not None else int(min(P / positive_fraction, N / (1 - positive_fraction)))
    n_pos = int(round(total * positive_fraction))
    n_neg = total - n_pos
    if count is not None and (count < 2 or n_pos > P or n_neg > N):
        raise GrandmotherError(f"--count {count}: needs {n_pos} positives and {n_neg} negatives; the sources have "
                               f"{P} and {N}")
    if n_pos < 1 or n_neg < 1:
        raise GrandmotherError(f"too few images for a test set ({P} positives, {N} negatives)")

    rng = np.random.default_rng(seed)
    groups = defaultdict(list)
    for src_i, p, rel in pos_units:
        groups[identity_of(src_i, rel, group_by)].append(p)
    names = sorted(groups)
    chosen_pos, test_ids, excluded = [], [], set()
    for gi in rng.permutation(len(names)):
        if len(chosen_pos) >= n_pos:
            break
        name = names[gi]
        files = groups[name]
        take = min(len(files), n_pos - len(chosen_pos))
        picked = files if take == len(files) else [files[i] for i in sorted(rng.choice(len(files), take, replace=False))]
        chosen_pos.extend(picked)
        test_ids.append(name)
        excluded.update(os.path.realpath(p) for p in files)  # the whole identity, not only the files used
    neg_pick = sorted(rng.choice(N, n_neg, replace=False))
    chosen_neg = [neg_units[i][1] for i in neg_pick]
    excluded.update(os.path.realpath(p) for p in chosen_neg)
    identity = {str(p): identity_of(s, r, group_by) for s, p, r in pos_units}
    return chosen_pos, chosen_neg, sorted(test_ids), sorted(excluded), identity


def histogram_target(images: np.ndarray) -> np.ndarray:
    """(H*W, C) float64: the mean over images (N, H, W, C) of each image's sorted pixel values, per channel."""
    x = np.asarray(images).reshape(len(images), -1, images.shape[-1])
    return np.sort(x, axis=1).mean(0)


def match_histogram(image: np.ndarray, target: np.ndarray) -> np.ndarray:
    """One uint8 image (H, W, C) given the grey-level distribution `target` (H*W, C), per channel: the
    pixel of rank r gets target[r]; tied pixels share the mean of their ranks' target values."""
    h, w, c = image.shape
    out = np.empty((h * w, c), np.float64)
    flat = image.reshape(-1, c)
    for ch in range(c):
        vals, inv, counts = np.unique(flat[:, ch], return_inverse=True, return_counts=True)
        ends = np.cumsum(counts)
        cs = np.concatenate([[0.0], np.cumsum(target[:, ch])])
        out[:, ch] = ((cs[ends] - cs[ends - counts]) / counts)[inv.ravel()]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(h, w, c)


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A size x size window of image (H, W, C) at a uniformly random position."""
    y = int(rng.integers(0, image.shape[0] - size + 1))
    x = int(rng.integers(0, image.shape[1] - size + 1))
    return image[y:y + size, x:x + size]


def build_testset(positive: list[str], negative: list[str], out: Path, positive_fraction: float = PAPER_POSITIVE_FRACTION,
                  size: int = 200, color: str = "rgb", seed: int = 0, count: int | None = None,
                  group_by: str = "folder", workers: int = 1, overwrite: bool = False, progress: bool = True,
                  histogram_match: bool = True, negative_crop: float | None = None, cue_scorer=None) -> dict:
    """Write a labeled test set to `out`. `cue_scorer(images NHWC, labels, identities) -> {cue: record}`
    (grandmother.analysis.heldout.testset_cue_scores) scores the trivial cues into index.json; None skips it."""
    if color not in COLORS:
        raise GrandmotherError(f"--color {color!r}: choose rgb or gray")
    if size < 8:
        raise GrandmotherError(f"--size {size}: too small")
    if negative_crop is not None and not 0 < negative_crop <= 1:
        raise GrandmotherError(f"--negative-crop {negative_crop}: a fraction of the photo's shorter side, in (0, 1]")
    channels = COLORS[color]
    pos, neg, _, excluded, identity = plan_testset(positive, negative, positive_fraction, count, seed, group_by)

    # ============ decode everything the same way ============
    files = [(p, 1) for p in pos] + [(p, 0) for p in neg]
    # A crop of side F x the shorter side, at `size` pixels: decode at size / F, then cut a size x size window.
    neg_size = size if negative_crop is None else max(size, int(round(size / negative_crop)))
    tasks = [(str(p), p.name, media_kind(p), 1, seed, size if label else neg_size, channels) for p, label in files]
    if workers > 1:
        with decode_pool(workers) as pool:
            results = list(_progress(pool.imap(decode_unit, tasks, chunksize=8), len(tasks), progress))
    else:
        results = list(_progress(map(decode_unit, tasks), len(tasks), progress))
    images, items, skipped = [], [], []
    crop_rng = np.random.default_rng([seed, 2])
    for (p, label), res in zip(files, results):
        if res["error"] is not None:
            skipped.append({"path": str(p), "reason": res["error"]})
            continue
        img = res["images"][0]
        images.append(random_crop(img, size, crop_rng) if img.shape[0] != size else img)
        item = {"path": str(p), "label": label}
        if img.shape[0] == size:  # the image as ingest would decode it, before histogram matching
            item["pixels"] = res["hashes"][0]
        if res["frames"][0] is not None:
            item["frame"] = res["frames"][0]
        if label:
            item["identity"] = identity[str(p)]
        items.append(item)
    if not images:
        raise GrandmotherError("no test image could be read")
    # an identity counts only where one of its images was read: a skipped file is not a test person
    test_ids = sorted({it["identity"] for it in items if it["label"]})
    labels = np.array([it["label"] for it in items], np.uint8)
    if color == "rgb":
        pos_arr = [a for a, lab in zip(images, labels) if lab]
        if pos_arr and all(np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2]) for a in pos_arr):
            print("warning: every positive image is gray but --color rgb was asked; a neuron can win by "
                  "detecting 'no colour' (use --color gray)")

    # ============ fewer trivial cues; shuffle together ============
    images = np.stack(images)
    if histogram_match:
        target = histogram_target(images)
        images = np.stack([match_histogram(a, target) for a in images])
    order = np.random.default_rng(seed + 1).permutation(len(images))
    images = images[order]
    items = [items[i] for i in order]
    labels = labels[order]
    cues = {}
    if cue_scorer is not None and 0 < labels.sum() < len(labels):
        cues = cue_scorer(images, labels, [it.get("identity") for it in items])

    def extra(work: Path):
        np.save(work / "labels.npy", labels)
        # one name a line (grandmother.io.path_line): a name's own bytes, or a JSON string for a name with a
        # newline or another control character, so that no test file can slip past `ingest --exclude`
        (work / "excluded.txt").write_bytes(b"".join(path_line(p) for p in excluded))

    blocks = ((images[s:s + 4096], items[s:s + 4096]) for s in range(0, len(images), 4096))
    index = {"kind": "testset", "positives": int(labels.sum()), "negatives": int(len(labels) - labels.sum()),
             "positive_fraction_asked": positive_fraction, "seed": seed, "group_by": group_by,
             "positive_sources": [str(s) for s in positive], "negative_sources": [str(s) for s in negative],
             "test_identities": test_ids, "excluded_file": "excluded.txt", "excluded_count": len(excluded),
             "skipped": skipped, "duplicates": 0, "histogram_match": bool(histogram_match),
             "negative_crop": negative_crop, "trivial_cues": cues}
    return write_dataset(out, blocks, size, channels, index, overwrite=overwrite, extra_files=extra)


def open_testset(path: Path):
    """(dataset, labels uint8 (N,), index dict) of a TEST_DIR written by `grandmother testset`."""
    ds = open_dataset(path)
    if ds.index.get("kind") != "testset" or not (Path(path) / "labels.npy").is_file():
        raise GrandmotherError(f"{path}: a dataset but not a test set (no labels); make one with `grandmother testset`")
    try:
        labels = np.load(Path(path) / "labels.npy", allow_pickle=False)
    except (ValueError, OSError) as e:  # an object array (a pickle), a damaged file
        raise GrandmotherError(f"{Path(path) / 'labels.npy'}: not a label array ({str(e).splitlines()[0]})") from None
    if not isinstance(labels, np.ndarray) or labels.ndim != 1 or labels.dtype.kind not in "biu":
        raise GrandmotherError(f"{Path(path) / 'labels.npy'}: not a label array (want 0/1 integers of shape (N,), "
                               f"found {getattr(labels, 'dtype', '?')} {getattr(labels, 'shape', '?')})")
    if len(labels) != len(ds):
        raise GrandmotherError(f"{path}: labels.npy has {len(labels)} labels for {len(ds)} images")
    return ds, labels, ds.index


def _progress(it, total, progress):
    if not progress:
        return it
    from tqdm import tqdm
    return tqdm(it, total=total, desc="testset", unit="img", disable=None)


def read_excluded(path: Path) -> list[str]:
    """The paths listed in a test set's excluded.txt (grandmother.data.leakage checks training sets against it);
    grandmother.io.read_path_list reads both the JSON-string lines and plain lines (older test sets)."""
    return read_path_list(path)


__all__ = ["build_testset", "open_testset", "plan_testset", "PAPER_POSITIVE_FRACTION", "read_excluded"]
