"""Image files in, uint8 arrays out: the one place where pixels are decoded, colour-converted and resized.

Every consumer (training, ingest, test sets, probing, classification) calls `fit_image`, so positives
and negatives, training and test images all go through the same conversion. This module decodes, fits
and lists; the datasets built from the images live in grandmother/dataset.py.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

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


def is_listed(path: Path) -> bool:
    """A file to read: a regular file, or a symbolic link that cannot be followed (dangling, a loop),
    which is then skipped with its reason (`unreadable_reason`) instead of vanishing from the listing."""
    return path.is_file() or (path.is_symlink() and not path.exists())


def list_images(root: Path) -> list[Path]:
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and is_listed(p))


def unreadable_reason(path: Path, e: Exception) -> str:
    """Why a file could not be used, in words: a link that cannot be followed, a read that failed, an
    empty file, or the decoder's complaint."""
    if path.is_symlink() and not path.exists():
        try:
            os.stat(path)
        except OSError as err:
            if err.errno == errno.ELOOP:
                return "symbolic link loop"
        return f"dangling symbolic link (to {os.readlink(path)})"
    if isinstance(e, OSError) and e.errno is not None:  # the read itself failed (EIO, EACCES, ...)
        return f"read failed: {e.strerror or os.strerror(e.errno)}"
    try:
        if path.stat().st_size == 0:
            with open(path, "rb") as f:
                if not f.read(1):
                    return "empty file (0 bytes)"
    except OSError as err:
        return f"read failed: {err.strerror or err}"
    return f"{type(e).__name__}: {e}".strip()


@dataclass
class Skipped:
    items: list[dict] = field(default_factory=list)

    def add(self, path, reason: str):
        self.items.append({"path": str(path), "reason": reason})

    def __len__(self):
        return len(self.items)
