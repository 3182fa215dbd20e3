"""The face audit of the paper's Appendix A, and the face-free control set.

    grandmother audit DATA_DIR [--patches 100000] [--patch-size 60] [--json] [--per-image]
    grandmother filter-faces DATA_DIR --out NEW_DIR

Appendix A: "we ran an OpenCV face detector on 60x60 randomly-sampled patches from the dataset ...
fewer than 3% of the 100,000 sampled patches contain faces". We do the same: a patch is an image chosen
uniformly at random and a position chosen uniformly within it (seeded), scanned by OpenCV's
Haar cascade (`haarcascade_frontalface_default.xml` by default; `--cascade` takes any cascade shipped
in cv2.data.haarcascades, e.g. haarcascade_frontalcatface.xml or haarcascade_fullbody.xml). Patches of
an rgb dataset are converted to gray with OpenCV's own conversion, as the detector expects.
Detector settings (not given by the paper): OpenCV's defaults, scaleFactor 1.1, minNeighbors 3, and a
minimum window of 24 px (the frontal-face cascade's training size) so a 60 px patch can hold a face.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from grandmother.data.dataset import open_dataset, write_dataset
from grandmother.errors import GrandmotherError

DEFAULT_CASCADE = "haarcascade_frontalface_default.xml"


def load_cascade(name: str = DEFAULT_CASCADE):
    import cv2
    path = Path(name) if Path(name).is_file() else Path(cv2.data.haarcascades) / name
    if not path.is_file():
        known = sorted(p.name for p in Path(cv2.data.haarcascades).glob("*.xml"))
        raise GrandmotherError(f"--cascade {name}: not a file and not one of OpenCV's cascades ({', '.join(known)})")
    cascade = cv2.CascadeClassifier(str(path))
    if cascade.empty():
        raise GrandmotherError(f"--cascade {name}: OpenCV could not load it")
    return cascade


def _gray(img: np.ndarray) -> np.ndarray:
    import cv2
    return img[:, :, 0] if img.shape[2] == 1 else cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)


def count_faces(cascade, img: np.ndarray, min_neighbors: int = 3, min_size: int = 24) -> int:
    """Detections in one (H, W, C) uint8 image."""
    found = cascade.detectMultiScale(np.ascontiguousarray(_gray(img)), scaleFactor=1.1, minNeighbors=min_neighbors,
                                     minSize=(min_size, min_size))
    return int(len(found))


def audit(data_dir: Path, patches: int = 100000, patch_size: int = 60, seed: int = 0, cascade: str = DEFAULT_CASCADE,
          per_image: bool = False, min_neighbors: int = 3, progress: bool = True) -> dict:
    """Fraction of random patches in which the detector fires; optionally face counts per whole image."""
    ds = open_dataset(data_dir)
    n = len(ds)
    if n == 0:
        raise GrandmotherError(f"{data_dir}: the dataset has no images")
    if patches < 1:
        raise GrandmotherError(f"--patches {patches}: must be at least 1")
    if not 24 <= patch_size <= ds.size:
        raise GrandmotherError(f"--patch-size {patch_size}: must be between 24 (the detector's window) and the "
                               f"dataset's image size {ds.size}")
    det = load_cascade(cascade)
    rng = np.random.default_rng(seed)
    which = np.sort(rng.integers(0, n, patches))  # sorted: the memory map is read in order
    ys = rng.integers(0, ds.size - patch_size + 1, patches)
    xs = rng.integers(0, ds.size - patch_size + 1, patches)
    bar = _bar(patches, "audit patches", progress)
    hits = 0
    for start in range(0, patches, 1024):
        block = ds.get_array(which[start:start + 1024])
        for j, img in enumerate(block):
            y, x = ys[start + j], xs[start + j]
            hits += count_faces(det, img[y:y + patch_size, x:x + patch_size], min_neighbors) > 0
        bar.update(len(block))
    bar.close()
    report = {"dataset": str(data_dir), "images": n, "patches": patches, "patch_size": patch_size,
              "cascade": cascade, "patches_with_detection": int(hits), "fraction": hits / patches, "seed": seed}
    if per_image:
        counts = face_counts(ds, det, min_neighbors, progress)
        report["per_image"] = counts.tolist()
        report["images_with_faces"] = int((counts > 0).sum())
        report["histogram"] = {str(k): int(v) for k, v in zip(*np.unique(counts, return_counts=True))}
    return report


def face_counts(ds, det, min_neighbors: int = 3, progress: bool = True) -> np.ndarray:
    counts = np.zeros(len(ds), np.int32)
    bar = _bar(len(ds), "faces per image", progress)
    for start in range(0, len(ds), 1024):
        block = ds.get_array(np.arange(start, min(start + 1024, len(ds))))
        for j, img in enumerate(block):
            counts[start + j] = count_faces(det, img, min_neighbors)
        bar.update(len(block))
    bar.close()
    return counts


def filter_faces(data_dir: Path, out: Path, cascade: str = DEFAULT_CASCADE, min_neighbors: int = 3,
                 overwrite: bool = False, progress: bool = True) -> dict:
    """Copy the dataset without every image in which the detector finds at least one face."""
    ds = open_dataset(data_dir)
    det = load_cascade(cascade)
    counts = face_counts(ds, det, min_neighbors, progress)
    items = ds.items()
    removed = [items[i] for i in np.nonzero(counts > 0)[0]]
    report = {"source_dataset": str(data_dir), "images_in": len(ds), "removed": len(removed),
              "images": int((counts == 0).sum()), "cascade": cascade, "min_neighbors": min_neighbors}

    def blocks():  # one output shard per input shard, so memory stays at one shard
        for k in range(len(ds.offsets) - 1):
            ids = np.arange(ds.offsets[k], ds.offsets[k + 1])
            keep = ids[counts[ids] == 0]
            yield ds.get_array(keep), [items[i] for i in keep]

    write_dataset(out, blocks(), ds.size, ds.channels,
                  {"skipped": [], "duplicates": 0, "filter": {**report, "removed_items": removed}},
                  overwrite=overwrite)
    return report


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _bar(total, desc, progress):
    if not progress:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", disable=None)
