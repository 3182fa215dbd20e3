"""Derived image folders for the cat and body experiments (issue 20): cat faces cropped from the Kaggle cat
photos with OpenCV's cat-face cascade, and pedestrians kept at their aspect ratio (padded, not cropped).

    .venv/bin/python experiments/crops.py            (writes runs/data/src/; about a minute)

- catfaces/     the largest cat face OpenCV's haarcascade_frontalcatface.xml finds in each photo of
                ../shared/data/cats/kaggle, cropped square around the detection with side 2 x its width
                (the framing of an LFW face: the face about half the image), clipped to the photo.
                Photos without a detection are left out (counted).
- bodies_pad/   every INRIA pedestrian (96x160) padded left and right to a square with its own mean colour,
                in one folder per source photo (crop001001a.jpg -> crop001001/a.png): the crops of one photo,
                mirrored copies among them, share an identity (`testset --group-by folder`).
- objects_pad/  every Caltech-101 object photo centre-cropped to the pedestrians' aspect (3:5) and padded
                the same way: the body test's distractors carry the same side bands, so bands are no cue.
Deterministic (no randomness). Names follow the source paths, so identities and exclusions carry over.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "runs" / "data" / "src"
ASPECT = 96 / 160


def _face_module():
    from grandmother.data import faces
    return faces


def pad_square(img: Image.Image) -> Image.Image:
    w, h = img.size
    side = max(w, h)
    fill = tuple(int(round(v)) for v in np.asarray(img, np.float64).reshape(-1, len(img.getbands())).mean(0))
    out = Image.new(img.mode, (side, side), fill if len(fill) > 1 else fill[0])
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def crop_aspect(img: Image.Image, aspect: float) -> Image.Image:
    """Centre crop to width / height = aspect."""
    w, h = img.size
    if w / h > aspect:
        nw = max(1, int(round(h * aspect)))
        x = (w - nw) // 2
        return img.crop((x, 0, x + nw, h))
    nh = max(1, int(round(w / aspect)))
    y = (h - nh) // 2
    return img.crop((0, y, w, y + nh))


def cat_face(img: Image.Image, cascade) -> Image.Image | None:
    import cv2
    gray = np.asarray(img.convert("L"))
    found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=3, minSize=(24, 24))
    if len(found) == 0:
        return None
    x, y, w, h = max(found, key=lambda b: b[2] * b[3])
    side = min(2 * w, gray.shape[0], gray.shape[1])
    cx, cy = x + w / 2, y + h / 2
    x0 = int(round(min(max(cx - side / 2, 0), gray.shape[1] - side)))
    y0 = int(round(min(max(cy - side / 2, 0), gray.shape[0] - side)))
    del cv2
    return img.crop((x0, y0, x0 + side, y0 + side))


def write(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp, format="PNG")
    tmp.rename(path)


def main():
    cascade = _face_module().load_cascade("haarcascade_frontalcatface.xml")
    counts = {}
    jobs = [("catfaces", SHARED / "cats" / "kaggle", lambda im: cat_face(im, cascade)),
            ("bodies_pad", SHARED / "bodies" / "inria", pad_square),
            ("objects_pad", SHARED / "objects", lambda im: pad_square(crop_aspect(im, ASPECT)))]
    for name, src, fn in jobs:
        kept = missed = 0
        for p in sorted(q for q in src.rglob("*") if q.suffix.lower() in {".jpg", ".jpeg", ".png"}):
            dst = OUT / name / p.relative_to(src).with_suffix(".png")
            if name == "bodies_pad":
                m = re.match(r"(.*?\d+)([a-z]?)$", p.stem)
                dst = OUT / name / m.group(1) / f"{m.group(2) or 'x'}.png"
            if dst.is_file():
                kept += 1
                continue
            with Image.open(p) as im:
                im.load()
                out = fn(im.convert("RGB"))
            if out is None:
                missed += 1
                continue
            write(out, dst)
            kept += 1
        counts[name] = (kept, missed)
        print(f"{name}: {kept} images from {src}" + (f" ({missed} photos without a detection left out)" if missed else ""))


if __name__ == "__main__":
    main()
