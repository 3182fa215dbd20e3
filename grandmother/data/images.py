"""Image files in, uint8 arrays out: the one place where pixels are decoded, colour-converted and resized.

Every consumer (training, ingest, test sets, probing, classification) calls `fit_image`, so positives
and negatives, training and test images all go through the same conversion. This module decodes, fits
and lists; the datasets built from the images live in grandmother/dataset.py.
"""
from __future__ import annotations

import errno
import multiprocessing
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
# Above this many pixels PIL warns of a decompression bomb; decode_image decodes a JPEG reduced, and
# refuses any other format (PIL itself refuses anything above twice this).
LARGE_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS


class LargeImageError(ValueError):
    """An image too large to decode whole (decode_image); its message is the skip reason."""


def decode_pool(workers: int):
    """A pool of `workers` decoding processes, started fresh (spawn), never forked.

    A forked child inherits the parent's threads' locks but not the threads: after the parent has run
    OpenCV's face detector (its parallel_for pool), FFmpeg's scaler or Ray's client, a forked worker can
    wait for ever on a lock no thread will release. CI hung that way on `run`'s ingest after the ETA
    probe had run the detector in the parent. A spawned worker costs about a second of imports."""
    return multiprocessing.get_context("spawn").Pool(workers)


def fit_image(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """Resize the short side to `size` (bicubic), centre-crop to size x size, convert colour.

    Returns uint8 (size, size, channels). Grayscale uses PIL's ITU-R 601-2 luma, for every image alike.
    """
    img = img.convert("L" if channels == 1 else "RGB")
    img = ImageOps.fit(img, (size, size), method=Image.BICUBIC, centering=(0.5, 0.5))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if channels == 1 else arr


def decode_image(path: Path, least: int) -> Image.Image:
    """Decode one image file completely (a truncated file fails here, with PIL's OSError or ValueError).

    Very large images: PIL warns above Image.MAX_IMAGE_PIXELS (89.5 megapixels) and refuses above twice
    that (179 megapixels, DecompressionBombError: a skipped file). Between the two, a JPEG is decoded
    reduced (DCT scaling, `draft`) to the smallest size whose sides are still at least `least` pixels,
    so a 179-megapixel photo takes a few MB instead of about 0.9 GB; any other format is refused with a
    one-line reason (LargeImageError). PIL's warning is never printed. Images up to the limit decode
    exactly as before."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(path)
    try:
        w, h = img.size
        if w * h > LARGE_IMAGE_PIXELS:
            if img.format != "JPEG":
                raise LargeImageError(f"{w}x{h} = {w * h / 1e6:.0f} megapixels, over the "
                                      f"{LARGE_IMAGE_PIXELS / 1e6:.0f}-megapixel limit for a {img.format} image "
                                      f"(only a JPEG that large is decoded, reduced)")
            img.draft(img.mode, (least, least))
        img.load()
        return img
    except BaseException:
        img.close()
        raise


def load_image(path: Path, size: int, channels: int) -> np.ndarray:
    """Decode one image file (`decode_image`) and fit it; raises OSError/ValueError for unreadable files."""
    with decode_image(path, size) as img:
        return fit_image(img, size, channels)


def is_listed(path: Path) -> bool:
    """A file to read: a regular file, or a symbolic link that cannot be followed (dangling, a loop),
    which is then skipped with its reason (`unreadable_reason`) instead of vanishing from the listing."""
    return path.is_file() or (path.is_symlink() and not path.exists())


def walk_files(root: Path, extensions) -> list[Path]:
    """The files under folder `root` with one of `extensions` (lower case, with the dot), and the links that
    cannot be followed, sorted. Symbolic links to folders are followed, once per folder: a link back to a
    folder it lies in (a loop) is returned itself, without extension check, so that the reader skips it
    and lists it ("symbolic link loop"); a second link to a folder already searched adds nothing (its files
    would be the same files)."""
    root = Path(root)
    out, seen = [], set()

    def visit(folder: Path, ancestors: frozenset):
        st = os.stat(folder)
        key = (st.st_dev, st.st_ino)
        seen.add(key)
        ancestors = ancestors | {key}
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return  # an unreadable folder: nothing to list
        for e in entries:
            p = folder / e.name
            try:
                is_dir = e.is_dir()  # follows links
            except OSError:
                is_dir = False
            if is_dir:
                target = os.stat(p)
                tkey = (target.st_dev, target.st_ino)
                if tkey in ancestors:
                    out.append(p)  # a folder link back into its own ancestry
                elif tkey not in seen:
                    visit(p, ancestors)
            elif p.suffix.lower() in extensions and is_listed(p):
                out.append(p)

    visit(root, frozenset())
    return sorted(out)


def list_images(root: Path) -> list[Path]:
    root = Path(root)
    if root.is_file():
        return [root]
    return walk_files(root, IMAGE_EXTENSIONS)


def unreadable_reason(path: Path, e: Exception) -> str:
    """Why a file could not be used, in words: a link that cannot be followed, a read that failed, an
    empty file, or the decoder's complaint."""
    if path.is_symlink() and path.is_dir():
        return "symbolic link loop (a link to a folder that holds it)"
    if isinstance(e, LargeImageError):
        return str(e)
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
