"""How a unit's response changes as its preferred images are scaled, shifted and rotated (paper Figure 4).

    grandmother invariance RUN_DIR --unit s2.lcn.m3.y10.x12 --images FACES_DIR --out DIR \\
        [--rotations SEQ_DIR] [--scales 0.4:1.6:13] [--max-shift 8]

writes into DIR: scale.png, shift_horizontal.png, shift_vertical.png, rotation.png (with --rotations) and
invariance.json (every curve: x values, mean and std over the images, per-image responses).

Choices (the paper says only "cubic interpolation", 10 faces, 10 rotation sequences up to 90 degrees):
- Each image is first fitted to the network's input (data.fit_image: short side resized, centre crop),
  then transformed at that size with one cubic affine warp (OpenCV INTER_CUBIC): scaling about the
  image centre, translation by whole or fractional pixels. Uncovered borders are filled by edge
  replication (BORDER_REPLICATE), so no artificial dark frame appears. Pixels stay floats in [0, 1]
  (cubic overshoot clipped) and go through Network.prepare like every other input.
- Sign convention: a positive horizontal shift moves the content right (+x), a positive vertical
  shift moves it down (+y, towards higher rows).
- Out-of-plane rotation needs real photographs of heads turning; it cannot be synthesised from one
  image. `--rotations DIR` takes one sub-folder per sequence, images in name order (natural sort,
  so rot_5 < rot_45). If every file name carries a number (e.g. rot_045.png, -30.jpg) the x axis is
  that number in degrees and responses are averaged per angle; otherwise it is the index in the sequence.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from grandmother.errors import GrandmotherError
from grandmother.io import atomic_write_json
from grandmother.report.results import result_fields
from grandmother.analysis.units import Unit, unit_responses
from grandmother.report.plots import plot_curve


# ---------------------------------------------------------------- transforms

def warp(image: np.ndarray, scale: float = 1.0, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """Scale `image` (C, H, W) floats about its centre, then shift it by (dx, dy) pixels; cubic, edges replicated."""
    import cv2
    c, h, w = image.shape
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    # Maps source (x, y) to destination: x' = scale * (x - cx) + cx + dx.
    m = np.array([[scale, 0.0, cx - scale * cx + dx], [0.0, scale, cy - scale * cy + dy]], np.float64)
    out = np.empty_like(image, dtype=np.float32)
    for ch in range(c):
        out[ch] = cv2.warpAffine(np.ascontiguousarray(image[ch], np.float32), m, (w, h), flags=cv2.INTER_CUBIC,
                                 borderMode=cv2.BORDER_REPLICATE)
    return np.clip(out, 0.0, 1.0)


def responses(net, unit: Unit, images: list[np.ndarray]) -> np.ndarray:
    """The unit's activation for each float (C, H, W) image in [0, 1]."""
    p = next(net.parameters())
    x = torch.from_numpy(np.stack(images)).to(p.device, p.dtype)
    return unit_responses(net, unit, (net.prepare(x[s:s + 256]) for s in range(0, len(x), 256)))


def transform_curve(net, unit: Unit, images: list[np.ndarray], values, make) -> dict:
    """Responses (images x values) where make(image, v) gives the transformed image; mean and std over images."""
    values = [float(v) for v in values]
    batch = [make(img, v) for img in images for v in values]
    r = responses(net, unit, batch).reshape(len(images), len(values))
    return {"x": values, "mean": r.mean(0).tolist(), "std": r.std(0).tolist(), "per_image": r.tolist()}


# ---------------------------------------------------------------- images and rotation sequences

def natural_key(path: Path):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def angle_of(path: Path) -> float | None:
    """The last number in the file name (without extension), e.g. rot_045 -> 45.0, pose-30 -> -30.0."""
    found = _NUMBER.findall(path.stem)
    if not found:
        return None
    text = found[-1]
    # "pose-30": a '-' glued to a word is a separator, not a sign, unless the name starts with it.
    if text.startswith("-") and path.stem.find(text) > 0 and path.stem[path.stem.find(text) - 1].isalnum():
        text = text[1:]
    return float(text)


def load_images(paths: list[Path], size: int, channels: int) -> list[np.ndarray]:
    """Float (C, H, W) images in [0, 1] at the network's input size; one-line error naming a bad file."""
    from grandmother.data.images import load_image
    out = []
    for p in paths:
        try:
            arr = load_image(p, size, channels)
        except Exception as e:  # PIL raises many types for corrupt files
            raise GrandmotherError(f"{p}: cannot read image ({type(e).__name__}: {e})") from None
        out.append(arr.transpose(2, 0, 1).astype(np.float32) / 255.0)
    return out


def image_files(folder: Path, flag: str) -> list[Path]:
    from grandmother.data.images import list_images
    folder = Path(folder)
    if not folder.is_dir():
        raise GrandmotherError(f"{flag} {folder}: not a folder")
    files = sorted(list_images(folder), key=natural_key)
    if not files:
        raise GrandmotherError(f"{flag} {folder}: no images in it")
    return files


def rotation_curve(net, unit: Unit, root: Path) -> dict:
    """Mean response along the sequences in `root` (one sub-folder each), by angle or by index."""
    root = Path(root)
    if not root.is_dir():
        raise GrandmotherError(f"--rotations {root}: not a folder")
    seq_dirs = sorted((d for d in root.iterdir() if d.is_dir()), key=natural_key)
    if not seq_dirs:
        raise GrandmotherError(f"--rotations {root}: no sub-folders; expected one folder of images per sequence")
    c, size, _ = net.input_shape
    sequences = []
    for d in seq_dirs:
        files = image_files(d, "--rotations")
        sequences.append((d.name, files, responses(net, unit, load_images(files, size, c))))
    angles = [[angle_of(f) for f in files] for _, files, _ in sequences]
    by_degrees = all(a is not None for seq in angles for a in seq)
    groups: dict[float, list[float]] = {}
    per_sequence = []
    for (name, files, r), seq_angles in zip(sequences, angles):
        xs = seq_angles if by_degrees else list(range(len(files)))
        per_sequence.append({"name": name, "x": [float(v) for v in xs], "response": r.tolist(),
                             "files": [f.name for f in files]})
        for v, resp in zip(xs, r):
            groups.setdefault(float(v), []).append(float(resp))
    xs = sorted(groups)
    return {"x": xs, "mean": [float(np.mean(groups[v])) for v in xs], "std": [float(np.std(groups[v])) for v in xs],
            "count": [len(groups[v]) for v in xs], "axis": "degrees" if by_degrees else "sequence index",
            "sequences": per_sequence}


# ---------------------------------------------------------------- ranges and the whole run

def parse_range(text: str, flag: str) -> list[float]:
    """'START:STOP:COUNT' (inclusive, evenly spaced) or a comma list."""
    try:
        if ":" in text:
            a, b, n = text.split(":")
            values = np.linspace(float(a), float(b), int(n)).tolist()
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise GrandmotherError(f"{flag} {text!r}: expected START:STOP:COUNT or a comma-separated list of numbers")
    return values


def run_invariance(run_dir: Path, unit_text: str, images_dir: Path, out_dir: Path, rotations: Path | None = None,
                   scales: list[float] | None = None, shifts: list[float] | None = None, device: str = "cpu",
                   threshold: float | None = None, command: str | None = None) -> dict:
    from grandmother.training.runs import load_run
    unit = Unit.parse(unit_text)
    _, net, meta = load_run(Path(run_dir), device)
    unit.check(net)
    c, size, _ = net.input_shape
    files = image_files(Path(images_dir), "--images")
    images = load_images(files, size, c)
    scales = scales or np.round(np.linspace(0.4, 1.6, 13), 3).tolist()
    if any(s <= 0 for s in scales):
        raise GrandmotherError("--scales: scale factors must be positive")
    if shifts is None:
        m = max(1, round(0.25 * size))  # a quarter of the input, e.g. 8 px at 32, 50 px at 200
        shifts = np.round(np.linspace(-m, m, 2 * min(m, 8) + 1), 3).tolist()  # fractional above 8 px: cubic
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    curves = {
        "scale": transform_curve(net, unit, images, scales, lambda im, s: warp(im, scale=s)),
        "shift_horizontal": transform_curve(net, unit, images, shifts, lambda im, d: warp(im, dx=d)),
        "shift_vertical": transform_curve(net, unit, images, shifts, lambda im, d: warp(im, dy=d)),
    }
    n = len(images)
    plot_curve(curves["scale"], "scale factor", f"{unit}: scale ({n} images)", out_dir / "scale.png", threshold, 1.0)
    plot_curve(curves["shift_horizontal"], "horizontal shift (pixels at the network input)",
               f"{unit}: horizontal translation ({n} images)", out_dir / "shift_horizontal.png", threshold, 0.0)
    plot_curve(curves["shift_vertical"], "vertical shift (pixels at the network input)",
               f"{unit}: vertical translation ({n} images)", out_dir / "shift_vertical.png", threshold, 0.0)
    files_out = {name: f"{name}.png" for name in ("scale", "shift_horizontal", "shift_vertical")}
    if rotations is not None:
        rot = rotation_curve(net, unit, Path(rotations))
        curves["rotation"] = rot
        plot_curve(rot, "out-of-plane rotation (degrees)" if rot["axis"] == "degrees" else "sequence index",
                   f"{unit}: out-of-plane rotation ({len(rot['sequences'])} sequences)", out_dir / "rotation.png",
                   threshold)
        files_out["rotation"] = "rotation.png"
    result = {**result_fields(run_dir, meta, command), "unit": str(unit),
              "images": [str(f) for f in files], "input_size": size, "interpolation": "cubic (cv2.INTER_CUBIC)",
              "border": "edge replication", "threshold": threshold, "curves": curves, "files": files_out,
              "rotations": str(rotations) if rotations else None}
    atomic_write_json(out_dir / "invariance.json", result)
    return result
