"""Rebalancing: faces kept to at most a fraction of a training set, because the face unit appears when faces
are rare (issue 20: with 10% faces, not with 59%; a sparse unit cannot be "on" for most of its inputs).

    grandmother ingest SRC... --out DATA_DIR --max-face-fraction 0.1                  # faces by the detector
    grandmother ingest SRC... --out DATA_DIR --max-face-fraction 0.1 --face-paths '*/faces/*'   # by path
    grandmother run SRC... --out DIR                     # --max-face-fraction 0.1 by default; 1 turns it off

Every image that is not a face is kept, and a seeded subset of the faces. Which images are faces:
- **detector** (default): OpenCV's frontal-face Haar cascade with the settings of grandmother/data/faces.py
  (scaleFactor 1.1, minNeighbors 3, a 24 px minimum window), run by ingest on the *source* image before
  it is shrunk to the dataset's size: at 32x32 the cascade cannot see an LFW face. The source is
  converted to gray and, where its long side exceeds DETECT_MAX_SIDE (250 px, LFW's own size), reduced to
  it first, so that a large photo costs no more than an LFW image (a face smaller than 24 px at that
  size is not seen). A video frame is checked the same way. A face is an image with a detection.
- **paths**: `--face-paths GLOB` (repeatable) marks as faces the images whose path matches a GLOB, for
  labeled data; nothing is detected. A path is matched as ingest records it (the SRC as given, joined
  with the file's path inside it) and as an absolute path with links resolved; `*` also matches `/`
  (fnmatch), so `'*/faces/*'` takes every file under a folder named faces.

The subset, exactly (the experiments' data sets were built with it, experiments/data.sh): the face
images sorted by path as strings (a video's frames by frame number), `order =
numpy.random.default_rng(seed).permutation(n_faces)`, keep = floor(others * F / (1 - F) + 1e-9) faces,
namely faces[order[:keep]]. Where the data hold no more faces than that, nothing is removed. F = 1 turns
rebalancing off; F = 0 removes every face. The counts and fractions before and after, the method and the
seed are recorded in the dataset's index.json ("rebalance") and, by `run`, in run.json and the report.
"""
from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass

import numpy as np

from grandmother.errors import GrandmotherError

DETECT_MAX_SIDE = 250


@dataclass(frozen=True)
class Rebalance:
    """The rebalancing settings: `max_face_fraction` None (or 1) is off; `face_paths` empty means the detector."""
    max_face_fraction: float | None = None
    face_paths: tuple[str, ...] = ()
    seed: int = 0

    @classmethod
    def from_flags(cls, max_face_fraction, face_paths=(), seed=0) -> Rebalance:
        f = None if max_face_fraction is None else float(max_face_fraction)
        if f is not None and not 0 <= f <= 1:  # also refuses nan
            raise GrandmotherError(f"--max-face-fraction {max_face_fraction}: a fraction in [0, 1] (1 = no "
                                   f"rebalancing)")
        if face_paths and (f is None or f == 1):
            raise GrandmotherError(f"--face-paths {face_paths[0]}: marks faces for rebalancing, which needs "
                                   f"--max-face-fraction below 1")
        if int(seed) != seed or seed < 0:
            raise GrandmotherError(f"--rebalance-seed {seed}: a whole number, at least 0")
        return cls(f, tuple(str(g) for g in face_paths), int(seed))

    @property
    def active(self) -> bool:
        return self.max_face_fraction is not None and self.max_face_fraction < 1

    @property
    def method(self) -> str:
        return "paths" if self.face_paths else "detector"

    @property
    def detect(self) -> bool:
        """Whether ingest runs the detector on each source image."""
        return self.active and not self.face_paths

    def plan(self) -> dict | None:
        """What the dataset depends on (ingest's plan fingerprint); None when off."""
        if not self.active:
            return None
        how = {"face_paths": list(self.face_paths)} if self.face_paths else {"detect_max_side": DETECT_MAX_SIDE}
        return {"max_face_fraction": self.max_face_fraction, "method": self.method, "seed": self.seed, **how}

    def record(self) -> dict:
        """The settings as `run` records them among its ingest inputs."""
        return {"max_face_fraction": 1.0 if self.max_face_fraction is None else self.max_face_fraction,
                "face_paths": list(self.face_paths), "rebalance_seed": self.seed}

    def describe(self) -> str:
        if not self.active:
            return "no rebalancing"
        by = "by path" if self.face_paths else "found by the detector"
        return f"faces ({by}) cut to at most {_pct(self.max_face_fraction)} (seed {self.seed})"

    def flags(self) -> str:
        """The ingest flags that ask for these settings (with a leading space), for a reproduce command."""
        import shlex
        if not self.active:
            return ""
        return (f" --max-face-fraction {self.max_face_fraction:g}"
                + "".join(f" --face-paths {shlex.quote(g)}" for g in self.face_paths)
                + f" --rebalance-seed {self.seed}")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# ---------------------------------------------------------------- which images are faces

def is_face_path(path: str, globs) -> bool:
    """Whether `path` (as recorded, or absolute with links resolved) matches one of the GLOBs."""
    candidates = (path, os.path.realpath(path))
    return any(fnmatch.fnmatchcase(c, g) for g in globs for c in candidates)


_CASCADE = []


def detect_face(img) -> bool:
    """Whether OpenCV's frontal-face cascade finds a face in PIL image `img` (a source image before it is
    shrunk), at most DETECT_MAX_SIDE px on its long side. The cascade is loaded once per process."""
    from PIL import Image

    from grandmother.data.faces import count_faces, load_cascade
    if not _CASCADE:
        _CASCADE.append(load_cascade())
    gray = img.convert("L")
    if max(gray.size) > DETECT_MAX_SIDE:
        scale = DETECT_MAX_SIDE / max(gray.size)
        gray = gray.resize((max(1, round(gray.size[0] * scale)), max(1, round(gray.size[1] * scale))),
                           Image.BICUBIC)
    return count_faces(_CASCADE[0], np.asarray(gray)[:, :, None]) > 0


# ---------------------------------------------------------------- the subset

def faces_to_keep(n_faces: int, n_others: int, fraction: float) -> int:
    """How many faces may stay beside n_others other images so that faces are at most `fraction`."""
    if fraction >= 1:
        return n_faces
    return min(n_faces, math.floor(n_others * fraction / (1 - fraction) + 1e-9))


def choose(items: list[dict], is_face: list[bool], settings: Rebalance) -> tuple[list[bool], dict]:
    """(keep: one flag per item, summary) for the dataset's items (`path`, `frame`?) in order."""
    faces = sorted((i for i, f in enumerate(is_face) if f),
                   key=lambda i: (items[i]["path"], items[i].get("frame", -1)))
    n, n_faces = len(items), len(faces)
    others = n - n_faces
    target = faces_to_keep(n_faces, others, settings.max_face_fraction)
    keep = [True] * n
    if target < n_faces:
        order = np.random.default_rng(settings.seed).permutation(n_faces)
        for j in order[target:]:
            keep[faces[j]] = False
    kept = min(target, n_faces)
    summary = {"method": settings.method, "max_face_fraction": settings.max_face_fraction, "seed": settings.seed,
               **({"face_paths": list(settings.face_paths)} if settings.face_paths
                  else {"detector": "haarcascade_frontalface_default.xml", "detect_max_side": DETECT_MAX_SIDE}),
               "before": _counts(n_faces, n), "after": _counts(kept, others + kept),
               "removed": n_faces - kept, "fewer_faces_than_target": n_faces <= target}
    return keep, summary


def _counts(faces: int, images: int) -> dict:
    return {"images": images, "faces": faces, "fraction": faces / images if images else 0.0}


def summary_line(summary: dict) -> str:
    """One line for the fraction before and after (printed by ingest and run)."""
    b, a = summary["before"], summary["after"]
    by = "by path" if summary.get("method") == "paths" else "found by the detector"
    head = f"faces ({by}): {b['faces']} of {b['images']} images ({_pct(b['fraction'])})"
    if summary.get("fewer_faces_than_target"):
        return (f"{head}, no more than --max-face-fraction {summary['max_face_fraction']:g} allows: nothing "
                f"removed")
    return (f"{head} before, {a['faces']} of {a['images']} ({_pct(a['fraction'])}) after: kept a seeded subset "
            f"(seed {summary['seed']}) so that faces are at most {_pct(summary['max_face_fraction'])}")


def describe_for_report(summary) -> str | None:
    """'before X%, after Y%' (or that nothing was removed) from an index.json "rebalance" entry; None where it
    is not one (the report reads it from files it does not trust)."""
    try:
        b, a = float(summary["before"]["fraction"]), float(summary["after"]["fraction"])
        target = float(summary["max_face_fraction"])
    except (TypeError, KeyError, ValueError):
        return None
    if summary.get("fewer_faces_than_target") is True:
        return (f"before {_pct(b)}, after {_pct(a)}: nothing removed, the data hold fewer faces than the target "
                f"{_pct(target)}")
    return f"before {_pct(b)}, after {_pct(a)} (target: at most {_pct(target)})"

