"""Images in, uint8 tensors out: the one place where pixels are decoded, colour-converted and resized.

Every consumer (training, ingest, test sets, probing, classification) calls `fit_image`, so positives
and negatives, training and test images all go through the same conversion.

`open_training_data(path, size, channels)` is what `grandmother train --data PATH` reads: a plain folder
of images (searched recursively, decoded once into memory; unreadable files skipped and counted) or a
sharded dataset written by `grandmother ingest` (see grandmother/dataset.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import GrandmotherError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def fit_image(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """Resize the short side to `size` (bicubic), centre-crop to size x size, convert colour.

    Returns uint8 (size, size, channels). Grayscale uses PIL's ITU-R 601-2 luma, for every image alike.
    """
    img = img.convert("L" if channels == 1 else "RGB")
    img = ImageOps.fit(img, (size, size), method=Image.BICUBIC, centering=(0.5, 0.5))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if channels == 1 else arr


def load_image(path: Path, size: int, channels: int) -> np.ndarray:
    """Decode one image file; raises OSError/ValueError (PIL's) for unreadable or truncated files."""
    with Image.open(path) as img:
        img.load()  # force the full decode now so a truncated file fails here
        return fit_image(img, size, channels)


def list_images(root: Path) -> list[Path]:
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


@dataclass
class Skipped:
    items: list[dict] = field(default_factory=list)

    def add(self, path, reason: str):
        self.items.append({"path": str(path), "reason": reason})

    def __len__(self):
        return len(self.items)


class ImageArrayDataset(torch.utils.data.Dataset):
    """uint8 images held in one (N, H, W, C) array; items are (C, H, W) uint8 tensors."""

    def __init__(self, array: np.ndarray, sources: list[str] | None = None):
        self.array = array
        self.sources = sources

    def __len__(self):
        return len(self.array)

    def __getitem__(self, i):
        return torch.from_numpy(np.ascontiguousarray(self.array[i].transpose(2, 0, 1)))

    def get_batch(self, indices) -> torch.Tensor:
        """(B, C, H, W) uint8 for a list of indices (faster than collating single items)."""
        return torch.from_numpy(np.ascontiguousarray(self.array[np.asarray(indices)].transpose(0, 3, 1, 2)))


def load_image_folder(root: Path, size: int, channels: int, progress: bool = False) -> tuple[ImageArrayDataset, Skipped]:
    """Decode every image under `root` (recursively) into memory. Unreadable files are skipped and counted."""
    root = Path(root)
    if not root.exists():
        raise GrandmotherError(f"data path does not exist: {root}")
    paths = list_images(root)
    if not paths:
        raise GrandmotherError(f"no images found under {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    skipped = Skipped()
    arrays, sources = [], []
    iterator = paths
    if progress:
        from tqdm import tqdm
        iterator = tqdm(paths, desc=f"decoding {root.name}", unit="img", disable=None)
    for p in iterator:
        try:
            arrays.append(load_image(p, size, channels))
            sources.append(str(p))
        except Exception as e:  # PIL raises many types for corrupt files; none is fatal here
            skipped.add(p, f"{type(e).__name__}: {e}")
    if not arrays:
        raise GrandmotherError(f"none of the {len(paths)} images under {root} could be read "
                               f"(first: {skipped.items[0]['path']}: {skipped.items[0]['reason']})")
    if skipped:
        log.warning("skipped %d unreadable image(s) under %s, e.g. %s", len(skipped), root, skipped.items[0]["path"])
    return ImageArrayDataset(np.stack(arrays), sources), skipped


def open_training_data(path: Path, size: int, channels: int, progress: bool = False):
    """A dataset of uint8 (C, size, size) images from a plain image folder or an ingested DATA_DIR.

    Returns (dataset, skipped). The dataset has `__len__` and `get_batch(indices) -> (B, C, H, W) uint8`.
    """
    path = Path(path)
    if (path / "index.json").is_file():
        from .dataset import open_dataset
        ds = open_dataset(path)
        ds.check_fits(size, channels)
        return ds, Skipped()
    return load_image_folder(path, size, channels, progress)
