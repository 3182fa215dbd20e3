"""The inputs of `grandmother run`'s stages: what each stage's fingerprint is made of, the phrase that
names a change between two fingerprints, and the measurements behind the budget and the ETAs.

Every function here is fast (stat calls, small digests, a few timed steps) and runs before any long
work, so that bad input is one line before anything is written.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from grandmother.errors import GrandmotherError

WARMUP_STEPS = 3


# ---------------------------------------------------------------- test sets

@dataclass
class Concept:
    name: str  # the concept: folder names probe_NAME, visualize_NAME, ... and the report's row
    path: Path
    builtin: bool  # the in-package face test set, built by this job into DIR/testset_faces


def name_test_sets(paths: list[str], out: Path) -> list[Concept]:
    if not paths:
        return [Concept("faces", out / "testset_faces", True)]
    sets, used = [], set()
    for p in paths:
        base = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(p).resolve().name) or "testset"
        name, k = base, 2
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        sets.append(Concept(name, Path(p).resolve(), False))
    return sets


def check_test_set(ts: Concept, size: int, channels: int, preset: str) -> dict:
    """One line for a test set that cannot be probed by this network; returns its digest part."""
    from grandmother.data.testset import open_testset
    ds, labels, index = open_testset(ts.path)
    have = (int(index.get("channels", 0)), int(index.get("size", 0)))
    if have != (channels, size):
        color = lambda c: "gray" if c == 1 else "rgb"
        raise GrandmotherError(
            f"--testset {ts.path}: {have[1]}x{have[1]} {color(have[0])} images, but preset {preset} takes "
            f"{size}x{size} {color(channels)}; rebuild it with `grandmother testset ... --size {size} "
            f"--color {color(channels)}`")
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == len(labels):
        raise GrandmotherError(f"--testset {ts.path}: one class only ({n_pos} positives of {len(labels)}); the "
                               f"probe needs positives and negatives")
    h = hashlib.sha256()
    for f in ("index.json", "labels.npy", "excluded.txt"):
        if (ts.path / f).is_file():
            h.update((ts.path / f).read_bytes())
    return {"path": str(ts.path), "digest": h.hexdigest()[:32], "images": len(labels), "positives": n_pos}


def builtin_test_set_part() -> dict:
    from grandmother.data.samples import SAMPLE_DIR
    root = SAMPLE_DIR / "faces_test"
    for needed in (root / "positive", root / "negative", SAMPLE_DIR / "invariance"):
        if not needed.is_dir():
            raise GrandmotherError(f"the in-package sample is missing {needed}; run scripts/build_sample.py")
    return {"builtin": str(root), "files": file_digest(sorted(p for p in root.rglob("*") if p.is_file()))}


def file_digest(files) -> str:
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------- the job's inputs and what changed

def source_part(sources: list[str]) -> tuple[dict, list]:
    """Every input file of every SRC with its size and modification time; and ingest's units. A link that
    cannot be followed (dangling, a loop) is fingerprinted by the link itself: ingest skips and lists it."""
    from grandmother.data.ingest import expand_sources
    units, _ = expand_sources(sources)
    files = {}
    for _, p, _ in units:
        try:
            st = p.stat()
        except OSError:
            st = p.lstat()
        files[os.path.realpath(p)] = [st.st_size, st.st_mtime_ns]
    return {"srcs": [str(Path(s).resolve()) for s in sources], "files": files}, units


def config_part(cfg) -> dict:
    d = cfg.to_dict()
    d["train"] = {k: v for k, v in d["train"].items() if k != "steps"}  # the budget part holds the length
    return d


def _flat(d, prefix="") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(d, list):
        out = {}
        for i, v in enumerate(d):
            out.update(_flat(v, f"{prefix}[{i}]"))
        return out or {prefix: []}
    return {prefix: d}


def describe_change(part: str, old, new) -> str | None:
    """None when equal, else one phrase naming what changed."""
    if old == new:
        return None
    if part == "sources" and isinstance(old, dict):
        if old.get("srcs") != new.get("srcs"):
            was = old.get("srcs") if isinstance(old.get("srcs"), list) else []
            return f"the SRC list changed ({' '.join(map(str, was))} -> {' '.join(new['srcs'])})"
        a, b = old.get("files") if isinstance(old.get("files"), dict) else {}, new["files"]
        added = sorted(set(b) - set(a))
        removed = sorted(set(a) - set(b))
        modified = sorted(k for k in set(a) & set(b) if a[k] != b[k])
        bits = [f"{len(x)} file(s) {what} (first: {x[0]})" for x, what in
                ((added, "added"), (removed, "removed"), (modified, "modified")) if x]
        return "input files changed: " + "; ".join(bits)
    fa, fb = _flat(old), _flat(new)
    for key in sorted(set(fa) | set(fb)):
        if fa.get(key, "<unset>") != fb.get(key, "<unset>"):
            if part == "budget":
                return f"--{key}: {fa.get(key, '<unset>')} -> {fb.get(key, '<unset>')}"
            label = {"config": "setting", "ingest": "ingest setting",
                     "format": "input format", "testsets": "test set", "probe": "probe setting"}.get(part, part)
            return f"{label} {key}: {fa.get(key, '<unset>')} -> {fb.get(key, '<unset>')}"
    return f"{part} changed"


# ---------------------------------------------------------------- measurements for the budget and the ETAs

def measure_step_seconds(cfg, steps: int = WARMUP_STEPS) -> dict:
    """Seconds per training step of `cfg`: the median of `steps` timed steps after one untimed one, on
    random pixels (the step's arithmetic does not depend on them); and of a forward and backward pass on
    4 images (the optimal stimulus's 4 restarts), for the ETAs. Touches no global RNG."""
    import torch

    from grandmother.nn.model import build_network
    from grandmother.training.optim import build_optimizer
    from grandmother.training.runtime import resolve_device
    from grandmother.training.loop import loss_and_terms
    device = resolve_device(cfg.train.device)
    net = build_network(cfg, device)
    opt = build_optimizer(net.parameters(), cfg.train)
    m = cfg.model
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (cfg.train.batch_size, m.channels, m.image_size, m.image_size),
                          dtype=torch.uint8, generator=g).to(device)

    def timed(images, update):
        t = time.perf_counter()
        loss, _ = loss_and_terms(net, images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if update:
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    step = [timed(batch, True) for _ in range(steps + 1)][1:]
    small = [timed(batch[:4], False) for _ in range(3)][1:]
    return {"seconds_per_step": float(np.median(step)), "timed_steps": steps, "device": str(device),
            "batch_size": cfg.train.batch_size, "seconds_per_4_image_pass": float(np.median(small))}


def ingest_eta(units, frames_per_video: int, size: int, channels: int, workers: int, detect: bool = False) -> float:
    """Seconds to ingest, from decoding a few of the files now (images: whole files; videos: 10 frames), and,
    where faces are rebalanced by the detector, detecting on them (most of the time: 4.7 min, not the 15 s
    that decoding alone predicted, for ../shared/data on 2 cores)."""
    from PIL import Image

    from grandmother.data.images import load_image
    from grandmother.data.ingest import media_kind
    from grandmother.data.rebalance import detect_face
    images = [p for _, p, _ in units if media_kind(p) == "image"]
    videos = [p for _, p, _ in units if media_kind(p) == "video"]
    per_image = per_frame = per_detect = 0.0
    sample = images[:: max(1, len(images) // 3)][:3]
    if sample:
        t = time.perf_counter()
        for p in sample:
            try:
                load_image(p, size, channels)
            except Exception:  # unreadable files are ingest's to count
                pass
        per_image = (time.perf_counter() - t) / len(sample)
        if detect:
            def detect_one(path):
                try:
                    with Image.open(path) as img:
                        detect_face(img)
                except Exception:
                    pass
            detect_one(sample[0])  # loads the cascade once, as each worker does
            t = time.perf_counter()
            for p in sample:
                detect_one(p)
            per_detect = (time.perf_counter() - t) / len(sample)
            per_image += per_detect
    frames = 0
    if videos:
        import av
        for p in videos[:20]:
            try:
                with av.open(str(p)) as c:
                    s = c.streams.video[0]
                    frames += int(s.frames or (float(s.duration * s.time_base) * float(s.average_rate)
                                               if s.duration and s.average_rate else frames_per_video))
            except Exception:
                frames += frames_per_video
        frames = frames * len(videos) / min(20, len(videos))
        try:
            t = time.perf_counter()
            with av.open(str(videos[0])) as c:
                for i, _ in enumerate(c.decode(c.streams.video[0])):
                    if i == 9:
                        break
            per_frame = (time.perf_counter() - t) / 10 + per_detect
        except Exception:
            per_frame = per_detect
    return (len(images) * per_image + frames * per_frame) / max(1, min(workers, len(units)))
