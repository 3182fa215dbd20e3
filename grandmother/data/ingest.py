"""`grandmother ingest SRC... --out DATA_DIR`: videos, images and folders in, a sharded dataset out.

    grandmother ingest ../shared/data/video ../shared/data/objects --out /tmp/d --size 200 --color rgb

The work plan is a pure function of the command: every file under every SRC (recursively; images and
videos by extension), sorted by path, minus `--exclude` files; one *unit* per file. Shard k holds the
images of units [k * shard_size, (k+1) * shard_size). A video unit yields `--frames-per-video` frames
chosen at random: the generator is seeded with (--seed, the file's path relative to its SRC), so the
choice does not depend on worker count, on where the data lives, or on an interruption.

Decoding runs in `--workers` processes; the main process receives units in plan order, drops exact
duplicates (the same decoded pixels after resizing, i.e. same BLAKE2 hash of the uint8 array; the
first occurrence in plan order is kept) and writes each shard when its units are complete. A re-run
after an interruption reads the finished shards (a prefix of the plan), rebuilds the set of seen
hashes from their metadata and continues, so the result equals an uninterrupted run's.
Unreadable inputs (corrupt, truncated, zero-byte) are skipped and listed, never fatal.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from pathlib import Path

import numpy as np

from grandmother.data.images import IMAGE_EXTENSIONS, decode_image, decode_pool, fit_image, unreadable_reason, walk_files
from grandmother.data.dataset import (COLORS, FORMAT, check_output_dir, finish_dataset, partial_dir, read_shard_meta, shard_name,
                      write_shard)
from grandmother.data.rebalance import DETECT_MAX_SIDE, Rebalance, choose, detect_face, is_face_path
from grandmother.errors import GrandmotherError
from grandmother.io import atomic_write_json, load_npy, make_dir, read_path_list

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ogv"}


# ---------------------------------------------------------------- the plan

def media_kind(path: Path) -> str:
    return "video" if path.suffix.lower() in VIDEO_EXTENSIONS else "image"


def expand_sources(sources: list[str]) -> tuple[list[tuple[int, Path, str]], list[dict]]:
    """[(source number, file, path relative to its SRC)], sorted by file path, and a per-SRC summary.

    A SRC that does not exist, or a folder with no images or videos, is an error naming it.
    """
    if not sources:
        raise GrandmotherError("no SRC given: name at least one video, image or folder")
    seen, units, summary = set(), [], []
    exts = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
    for i, src in enumerate(sources):
        root = Path(src)
        if not root.exists():
            raise GrandmotherError(f"SRC {src}: does not exist")
        if root.is_file():
            files = [(root, root.name)]
        else:
            # Links that cannot be followed (dangling, loops) are kept: decoding fails on them, and they
            # are listed among the skipped files with the reason, never dropped without a word.
            # Symbolic links to folders are followed (once per folder; a loop is listed as a skipped file).
            files = [(p, p.relative_to(root).as_posix()) for p in walk_files(root, exts)]
            if not files:
                raise GrandmotherError(f"SRC {src}: no images or videos found (looked for {', '.join(sorted(exts))})")
        summary.append({"src": str(src), "files": 0, "videos": 0})
        for p, rel in files:
            key = os.path.realpath(p)  # never raises, also for a symlink loop
            if key in seen:
                continue
            seen.add(key)
            units.append((i, p, rel))
            summary[i]["files"] += 1
            summary[i]["videos"] += media_kind(p) == "video"
    units.sort(key=lambda u: str(u[1]))
    return units, summary


def read_exclude_list(path: str | None) -> set[str]:
    """Resolved paths, one per line in the file (grandmother.io.read_path_list: plain lines or JSON strings;
    blank lines and # comments ignored)."""
    if not path:
        return set()
    p = Path(path)
    if not p.is_file():
        raise GrandmotherError(f"--exclude {path}: file does not exist")
    return {os.path.realpath(name) for name in read_path_list(p)}


# ---------------------------------------------------------------- decoding one unit (in a worker)

def pixel_hash(arr: np.ndarray) -> str:
    return hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()


def frame_choice(n_frames: int, k: int, seed: int, rel: str) -> list[int]:
    rng = np.random.default_rng([seed, zlib.crc32(rel.encode())])
    return sorted(rng.choice(n_frames, size=min(k, n_frames), replace=False).tolist())


def _decode_frames(path: Path, wanted: list[int], size: int, channels: int, detect: bool) -> tuple[dict, int]:
    """{frame index: (fitted array, face or None)} for the wanted indices, and how many frames were decoded."""
    import av
    got, n, last = {}, 0, max(wanted)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        try:
            for frame in container.decode(stream):
                if n in wanted:
                    # One scaling thread: PyAV 18's default (threads=0, automatic) leaves FFmpeg scaler
                    # threads behind, and a decoding worker forked after that waits on them for ever.
                    img = frame.reformat(format="rgb24", threads=1).to_image()
                    got[n] = (fit_image(img, size, channels), detect_face(img) if detect else None)
                n += 1
                if n > last:
                    break
        except av.error.FFmpegError:
            if not got and n == 0:
                raise
            # a truncated tail: keep the frames decoded before the damage
    return got, n


def decode_video(path: Path, rel: str, k: int, seed: int, size: int, channels: int,
                 detect: bool = False) -> list[tuple[np.ndarray, int, bool | None]]:
    """[(fitted frame, frame index, face or None)] of the frames chosen from one video."""
    import av
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        # Count frames by demuxing (cheap, no decoding): a container's own frame count can be wrong.
        n_frames = sum(1 for packet in container.demux(stream) if packet.size)
    if n_frames == 0:
        raise ValueError("no video frames")
    wanted = frame_choice(n_frames, k, seed, rel)
    got, decoded = _decode_frames(path, wanted, size, channels, detect)
    if len(got) < len(wanted) and decoded > 0:
        # Fewer decodable frames than packets (damaged file): choose again among those that decode.
        wanted = frame_choice(decoded, k, seed, rel)
        got, _ = _decode_frames(path, wanted, size, channels, detect)
    if not got:
        raise ValueError("no decodable frames")
    return [(got[i][0], i, got[i][1]) for i in sorted(got)]


def decode_unit(task) -> dict:
    """One file -> {"images": [...], "frames": [...] (videos), "faces": [...] (with detection), "error": None
    or a reason}. Never raises. task = (path, rel, kind, frames per video, seed, size, channels[, detect]):
    with `detect`, the face detector runs on each source image before it is shrunk (data/rebalance.py)."""
    path, rel, kind, k, seed, size, channels, *rest = task
    detect = bool(rest and rest[0])
    try:
        if kind == "video":
            triples = decode_video(Path(path), rel, k, seed, size, channels, detect)
            images, frames, faces = [a for a, _, _ in triples], [f for _, f, _ in triples], [x for *_, x in triples]
        else:
            with decode_image(Path(path), max(size, DETECT_MAX_SIDE) if detect else size) as img:
                images, frames, faces = [fit_image(img, size, channels)], [None], [detect_face(img) if detect else None]
        return {"images": images, "frames": frames, "faces": faces, "hashes": [pixel_hash(a) for a in images],
                "error": None}
    except Exception as e:  # any decoder failure is a skipped input, not a failed run
        return {"images": [], "frames": [], "faces": [], "hashes": [], "error": unreadable_reason(Path(path), e)[:300]}


# ---------------------------------------------------------------- the driver

def smallest_model_input() -> int:
    """The smallest image size of the shipped presets: a dataset smaller than that trains nothing."""
    from grandmother.config import PRESET_DIR, load_config
    return min(load_config(p.stem).model.image_size for p in PRESET_DIR.glob("*.yaml"))


def ingest(sources: list[str], out: Path, size: int = 200, color: str = "rgb", seed: int = 0,
           frames_per_video: int = 1, workers: int = 1, shard_size: int = 1000, exclude: str | None = None,
           overwrite: bool = False, progress: bool = True, rebalance: Rebalance | None = None,
           exclude_folders: set[str] | frozenset = frozenset()) -> dict:
    """Build (or finish) the dataset at `out`; returns its index dict. `rebalance` (data/rebalance.py) keeps
    faces to at most a fraction of the images. `exclude_folders`: folder names (a test set's persons) whose
    files are left out wherever they are, like --exclude's files: no image of a test person is trained on."""
    t0 = time.perf_counter()
    rebalance = rebalance or Rebalance()
    if color not in COLORS:
        raise GrandmotherError(f"--color {color!r}: choose rgb or gray")
    floor = smallest_model_input()
    if size < floor:
        raise GrandmotherError(f"--size {size}: smaller than the smallest model input ({floor} px, preset small)")
    for flag, value in (("--frames-per-video", frames_per_video), ("--workers", workers), ("--shard-size", shard_size)):
        if value < (0 if flag == "--workers" else 1):
            raise GrandmotherError(f"{flag} {value}: must be at least {0 if flag == '--workers' else 1}")
    channels = COLORS[color]
    out = Path(out)
    units, summary = expand_sources(sources)
    excluded = read_exclude_list(exclude)
    if excluded or exclude_folders:
        units = [u for u in units if os.path.realpath(u[1]) not in excluded
                 and Path(u[1]).parent.name not in exclude_folders]
    n_excluded = sum(s["files"] for s in summary) - len(units)
    if not units:
        raise GrandmotherError("every input file is in --exclude; nothing to ingest")

    plan = {"sources": [str(s) for s in sources], "files": [str(u[1]) for u in units], "size": size, "color": color,
            "seed": seed, "frames_per_video": frames_per_video, "shard_size": shard_size}
    if exclude_folders:  # only then, as for rebalancing below
        plan["exclude_folders"] = sorted(exclude_folders)
    if rebalance.active:  # only then: the fingerprint of every dataset made without it stays as it was
        plan["rebalance"] = rebalance.plan()
    fingerprint = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()

    # ============ an existing result or an unfinished run ============
    if (out / "index.json").is_file():
        old = json.loads((out / "index.json").read_text())
        if old.get("plan") == fingerprint:
            print(f"{out}: already complete ({old['images']} images); nothing to do")
            return old
    check_output_dir(out, overwrite)
    work = partial_dir(out)
    if work.is_dir():
        plan_file = work / "plan.json"
        same = plan_file.is_file() and json.loads(plan_file.read_text()).get("fingerprint") == fingerprint
        if not same:
            if not overwrite:
                raise GrandmotherError(f"{work}: an unfinished ingest of different inputs or options; re-run that "
                                       f"command to finish it, or pass --overwrite to discard it")
            shutil.rmtree(work)
    make_dir(work)
    atomic_write_json(work / "plan.json", {"fingerprint": fingerprint, **plan})

    n_shards = (len(units) + shard_size - 1) // shard_size
    metas: list[dict] = []
    for k in range(n_shards):  # finished shards form a prefix of the plan; anything after a gap is redone
        meta = read_shard_meta(work, k)
        if meta is None:
            break
        metas.append(meta)
    seen = {h for m in metas for h in m["hashes"]}
    first = len(metas)
    if first:
        print(f"resuming {out}: {first} of {n_shards} shards already written")

    # ============ decode the remaining units, in plan order ============
    todo = units[first * shard_size:]
    tasks = [(str(p), rel, media_kind(p), frames_per_video, seed, size, channels, rebalance.detect)
             for _, p, rel in todo]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(units), initial=first * shard_size, desc="ingest", unit="file", disable=None)
    pool = None
    if workers > 1:
        pool = decode_pool(workers)
        results = pool.imap(decode_unit, tasks, chunksize=4)
    else:
        results = map(decode_unit, tasks)
    try:
        k, buf = first, _ShardBuffer()
        for (src_i, p, rel), res in zip(todo, results):
            buf.add(src_i, p, res, seen)
            if bar is not None:
                bar.update(1)
            if buf.units == shard_size or (k == n_shards - 1 and buf.units == len(units) - k * shard_size):
                metas.append(buf.write(work, k, size, channels))
                k, buf = k + 1, _ShardBuffer()
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(metas)} of {n_shards} shards written in {work}; "
              f"re-run the same command to finish")
        raise
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()

    # ============ rebalancing, and the index ============
    final, extra = work, {}
    if rebalance.active:
        final, metas, extra["rebalance"] = write_rebalanced(work, out, metas, rebalance, size, channels)
    index = build_index(metas, summary, n_excluded, size, color, seed, frames_per_video, shard_size, fingerprint)
    index.update(extra)
    index["elapsed_s"] = round(time.perf_counter() - t0, 3)
    if final == work:
        (work / "plan.json").unlink()
    finish_dataset(final, out, {k: v for k, v in index.items() if k != "format"})
    if final != work:
        shutil.rmtree(work)
    return {"format": FORMAT, **index}


def write_rebalanced(work: Path, out: Path, metas: list[dict], rebalance: Rebalance, size: int,
                     channels: int) -> tuple[Path, list[dict], dict]:
    """The finished shards of `work` without the faces that rebalancing leaves out, written into a second
    folder (OUT.rebalanced.partial), shard by shard: (that folder, its shards' metadata, the summary).
    `work` stays whole until the result is in place, so a killed run redoes only this step."""
    items = [it for m in metas for it in m["items"]]
    if rebalance.face_paths:
        faces = [is_face_path(it["path"], rebalance.face_paths) for it in items]
    else:
        faces = [bool(it.get("face")) for it in items]
    keep, summary = choose(items, faces, rebalance)
    final = out.with_name(out.name + ".rebalanced.partial")
    if final.exists():
        shutil.rmtree(final)
    make_dir(final)
    kept_metas, start = [], 0
    for k, m in enumerate(metas):
        n = len(m["items"])
        mask = np.array(keep[start:start + n], bool)
        flags = faces[start:start + n]
        start += n
        arr = load_npy(work / shard_name(k)) if n else np.zeros((0, size, size, channels), np.uint8)
        new = dict(m, items=[dict(it, face=f) for it, f, x in zip(m["items"], flags, mask) if x],
                   hashes=[h for h, x in zip(m["hashes"], mask) if x],
                   rebalanced_out=[it for it, x in zip(m["items"], mask) if not x])
        new.pop("file", None)
        new.pop("images", None)
        write_shard(final, k, np.ascontiguousarray(arr[mask]), new)
        kept_metas.append(dict(new, file=shard_name(k), images=int(mask.sum())))
    return final, kept_metas, summary


class _ShardBuffer:
    """The decoded images of one shard's units, deduplicated in plan order."""

    def __init__(self):
        self.units, self.images, self.items, self.hashes, self.skipped, self.duplicates = 0, [], [], [], [], []

    def add(self, src_i: int, path: Path, res: dict, seen: set):
        self.units += 1
        if res["error"] is not None:
            self.skipped.append({"path": str(path), "reason": res["error"], "source": src_i})
            return
        for arr, frame, h, face in zip(res["images"], res["frames"], res["hashes"], res["faces"]):
            item = {"path": str(path), "source": src_i}
            if frame is not None:
                item["frame"] = frame
            if face is not None:
                item["face"] = face
            if h in seen:
                self.duplicates.append(item)
                continue
            seen.add(h)
            self.images.append(arr)
            self.items.append(item)
            self.hashes.append(h)

    def write(self, work: Path, k: int, size: int, channels: int) -> dict:
        arr = np.stack(self.images) if self.images else np.zeros((0, size, size, channels), np.uint8)
        meta = {"units": self.units, "items": self.items, "hashes": self.hashes, "skipped": self.skipped,
                "duplicates": self.duplicates}
        write_shard(work, k, arr, meta)
        meta["file"], meta["images"] = shard_name(k), len(arr)
        return meta


def build_index(metas, summary, n_excluded, size, color, seed, frames_per_video, shard_size, fingerprint) -> dict:
    per_source = [dict(s, images=0, skipped=0, duplicates=0) for s in summary]
    for m in metas:
        for item in m["items"]:
            per_source[item["source"]]["images"] += 1
        for item in m["skipped"]:
            per_source[item["source"]]["skipped"] += 1
        for item in m["duplicates"]:
            per_source[item["source"]]["duplicates"] += 1
    skipped = [{"path": s["path"], "reason": s["reason"]} for m in metas for s in m["skipped"]]
    return {
        "images": sum(len(m["items"]) for m in metas),
        "size": size, "channels": COLORS[color], "color": color,
        "shards": [{"file": m.get("file", shard_name(i)), "images": len(m["items"])} for i, m in enumerate(metas)],
        "skipped": skipped,
        "duplicates": sum(len(m["duplicates"]) for m in metas),
        "excluded": n_excluded,
        "sources": per_source,
        "seed": seed, "frames_per_video": frames_per_video, "shard_size": shard_size,
        "plan": fingerprint,
    }
