"""The datasets training and probing read, the order of their batches, and a fast batch loader.

Every dataset here follows one small protocol: `len(ds)` and `ds.get_batch(indices)` -> (B, C, H, W)
uint8 tensor. Two kinds: `ShardedDataset`, a DATA_DIR on disk (below), and `ImageArrayDataset`, a
folder of image files decoded into memory. `open_training_data(path, size, channels)` opens either,
which is what `grandmother train --data PATH` reads.

Layout of a DATA_DIR (written by `grandmother ingest`, `filter-faces` and `testset`):

    index.json          {"format": "grandmother-dataset", "images": N, "size": S, "channels": C,
                         "color": "rgb"|"gray", "shards": [{"file": "shard_00000.npy", "images": n}, ...],
                         "skipped": [{"path", "reason"}], "duplicates": D, "sources": [...], ...}
    shard_00000.npy     uint8 (n, S, S, C), plain NumPy .npy, memory-mapped (io.load_npy: never a pickle)
    shard_00000.json    per-shard provenance: {"items": [{"path", "frame"?}, ...], "hashes": [...], ...}

Every file is written to a temporary name and renamed (grandmother/io.py); a shard counts as finished
once its .json exists (written after its .npy). A dataset is built in `OUT.partial/` and renamed to
`OUT` only after index.json is written, so `OUT` is either absent or complete, never half overwritten.

Reading: `open_dataset(path)` -> ShardedDataset (`len`, `ds[i]` -> (C,S,S) uint8 tensor,
`ds.get_batch(indices)` -> (B,C,S,S) uint8 tensor). Shards are memory-mapped lazily in each process,
so the dataset pickles cheaply into DataLoader workers. `load_batches` feeds training from background
worker processes, in the order the trainer's `BatchOrder` gives.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from grandmother.errors import GrandmotherError
from grandmother.data.images import IMAGE_EXTENSIONS, Skipped, fit_image, list_images, load_image, unreadable_reason
from grandmother.io import atomic_path, atomic_write_json, load_npy, make_dir, writing

log = logging.getLogger(__name__)

FORMAT = "grandmother-dataset"
COLORS = {"rgb": 3, "gray": 1}


def shard_name(k: int) -> str:
    return f"shard_{k:05d}.npy"


def partial_dir(out: Path) -> Path:
    """Where a dataset is built before it is renamed to `out`."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


class _PythonWrites:
    """A file that NumPy does not recognise as one, so that it writes through `write` (errors with errno)."""

    def __init__(self, f):
        self.write = f.write


def write_shard(folder: Path, k: int, images: np.ndarray, meta: dict) -> None:
    """Shard k: the .npy first, then its .json (the .json's presence marks the shard finished)."""
    folder = Path(folder)
    assert images.dtype == np.uint8 and images.ndim == 4, images.shape
    with atomic_path(folder / shard_name(k)) as tmp, open(tmp, "wb") as f:
        # through Python's own write (a plain file object would make NumPy call fwrite, whose short write on a
        # full disk says "N requested and M written" instead of "No space left on device")
        np.lib.format.write_array(_PythonWrites(f), np.ascontiguousarray(images), allow_pickle=False)
    atomic_write_json(folder / shard_name(k).replace(".npy", ".json"), meta, indent=None)


def read_shard_meta(folder: Path, k: int) -> dict | None:
    path = Path(folder) / shard_name(k).replace(".npy", ".json")
    if not path.is_file() or not (Path(folder) / shard_name(k)).is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a torn metadata file counts as unfinished; the shard is redone


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to clobber something that is not ours; a finished dataset needs --overwrite."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GrandmotherError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "index.json").is_file():
            raise GrandmotherError(f"--out {out}: folder exists, is not empty and is not a dataset; choose another --out")
        if not overwrite:
            raise GrandmotherError(f"--out {out}: already holds a finished dataset; pass --overwrite to replace it "
                                   f"or choose another --out")


def finish_dataset(work: Path, out: Path, index: dict) -> None:
    """Write index.json into the work folder, then swap it into place as `out`.

    The old dataset (if --overwrite) is moved aside first and deleted only after the new one is in place.
    """
    work, out = Path(work), Path(out)
    index = {"format": FORMAT, **index}
    atomic_write_json(work / "index.json", index)
    old = None
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    work.rename(out)
    if old is not None:
        shutil.rmtree(old)


def write_dataset(out: Path, blocks: Iterable[tuple[np.ndarray, list[dict]]], size: int, channels: int,
                  index: dict, overwrite: bool = False, extra_files=None) -> dict:
    """Write blocks of (uint8 (n,S,S,C) images, n provenance items), one shard each, as a finished dataset.

    Used by filter-faces and testset; streams, so a dataset larger than memory can be rewritten.
    `extra_files(work_dir)` may write more files (labels, lists) before the dataset is put in place.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    work = partial_dir(out)
    if work.exists():
        shutil.rmtree(work)
    make_dir(work)
    try:
        shards, total = [], 0
        for k, (images, items) in enumerate(blocks):
            assert len(images) == len(items) and images.shape[1:] == (size, size, channels), images.shape
            write_shard(work, k, images, {"items": items})
            shards.append({"file": shard_name(k), "images": int(len(images))})
            total += len(images)
        index = {"images": int(total), "size": int(size), "channels": int(channels),
                 "color": "rgb" if channels == 3 else "gray", "shards": shards, **index}
        if extra_files is not None:
            with writing(work):
                extra_files(work)
        finish_dataset(work, out, index)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # nothing half-written stays behind
        raise
    return {"format": FORMAT, **index}


# ---------------------------------------------------------------- reading

class ShardedDataset(torch.utils.data.Dataset):
    """The images of a DATA_DIR, memory-mapped. Items are (C, S, S) uint8 tensors.

    After `check_fits(size, channels)` each image is converted on the fly with
    grandmother.data.images.fit_image (the same PIL conversion ingest uses), for a model whose input is
    smaller than the dataset's images or gray where the dataset is rgb.
    """

    def __init__(self, root: Path, index: dict):
        self.root = Path(root)
        self.index = index
        self.size, self.channels = int(index["size"]), int(index["channels"])
        counts = [int(s["images"]) for s in index["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._arrays = None
        self.target = None  # (size, channels) when converting on the fly

    def __getstate__(self):  # memmaps are reopened in each worker process, not pickled
        state = dict(self.__dict__)
        state["_arrays"] = None
        return state

    def _shards(self) -> list[np.ndarray]:
        if self._arrays is None:
            arrays = []
            for s in self.index["shards"]:
                if int(s["images"]) == 0:
                    arrays.append(np.zeros((0, self.size, self.size, self.channels), np.uint8))
                    continue
                a = load_npy(self.root / s["file"], mmap=True)
                if a.shape != (int(s["images"]), self.size, self.size, self.channels) or a.dtype != np.uint8:
                    raise GrandmotherError(f"{self.root / s['file']}: shape {a.shape} {a.dtype} does not match "
                                           f"index.json; the dataset is damaged, re-run ingest into a new --out")
                arrays.append(a)
            self._arrays = arrays
        return self._arrays

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def items(self) -> list[dict]:
        """Provenance of every image, in order ({"path": ..., "frame": ...})."""
        out = []
        for s in self.index["shards"]:
            meta = json.loads((self.root / s["file"].replace(".npy", ".json")).read_text())
            out.extend(meta["items"])
        return out

    def get_array(self, indices) -> np.ndarray:
        """(B, S, S, C) uint8 numpy array at the dataset's own size."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for a dataset of {n} images")
        idx = np.where(idx < 0, idx + n, idx)
        out = np.empty((len(idx), self.size, self.size, self.channels), np.uint8)
        shard_of = np.searchsorted(self.offsets, idx, side="right") - 1
        shards = self._shards()
        for k in np.unique(shard_of):
            where = np.nonzero(shard_of == k)[0]
            local = idx[where] - self.offsets[k]
            order = np.argsort(local, kind="stable")  # ascending reads are kinder to the page cache
            out[where[order]] = shards[k][local[order]]
        return out

    def _convert(self, arr: np.ndarray) -> np.ndarray:
        if self.target is None:
            return arr
        from PIL import Image
        size, channels = self.target
        mode = "L" if self.channels == 1 else "RGB"
        return np.stack([fit_image(Image.fromarray(a[:, :, 0] if self.channels == 1 else a, mode), size, channels)
                         for a in arr]) if len(arr) else np.zeros((0, size, size, channels), np.uint8)

    def get_batch(self, indices) -> torch.Tensor:
        """(B, C, H, W) uint8 tensor for a list of indices."""
        arr = self._convert(self.get_array(indices))
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))

    def __getitem__(self, i):
        if isinstance(i, (list, tuple, np.ndarray, torch.Tensor)):
            return self.get_batch(i)
        return self.get_batch([int(i)])[0]

    def check_fits(self, size: int, channels: int) -> None:
        """Accept a model input of `size` x `size` x `channels`, converting on the fly if needed.

        Smaller dataset images than the model input, or gray images for an rgb model, are errors:
        upsampling or inventing colour would train on made-up pixels.
        """
        if self.size < size:
            raise GrandmotherError(f"{self.root}: images are {self.size}x{self.size} but the model input is "
                                   f"{size}x{size}; re-run ingest with --size {size} or larger")
        if self.channels < channels:
            raise GrandmotherError(f"{self.root}: images are gray but the model wants rgb; re-run ingest with --color rgb")
        self.target = None if (self.size, self.channels) == (size, channels) else (size, channels)


def open_dataset(path: Path) -> ShardedDataset:
    """Open a DATA_DIR; a clear one-line error if it is not one."""
    path = Path(path)
    unfinished = " (an unfinished ingest; re-run the same ingest command to finish it)" if partial_dir(path).is_dir() else ""
    if not path.exists():
        raise GrandmotherError(f"{path}: does not exist{unfinished}")
    index_path = path / "index.json"
    if not index_path.is_file():
        raise GrandmotherError(f"{path}: not a dataset (no index.json){unfinished}")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise GrandmotherError(f"{index_path}: unreadable ({e})") from None
    if index.get("format") != FORMAT or not isinstance(index.get("shards"), list):
        raise GrandmotherError(f"{path}: index.json is not a grandmother dataset index")
    missing = [s["file"] for s in index["shards"] if not (path / s["file"]).is_file()]
    if missing:
        raise GrandmotherError(f"{path}: shard {missing[0]} listed in index.json is missing")
    return ShardedDataset(path, index)


# ---------------------------------------------------------------- a folder of images, decoded into memory

class ImageArrayDataset(torch.utils.data.Dataset):
    """uint8 images held in one (N, H, W, C) array; items are (C, H, W) uint8 tensors."""

    def __init__(self, array: np.ndarray):
        self.array = array

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
    arrays = []
    iterator = paths
    if progress:
        from tqdm import tqdm
        iterator = tqdm(paths, desc=f"decoding {root.name}", unit="img", disable=None)
    for p in iterator:
        try:
            arrays.append(load_image(p, size, channels))
        except Exception as e:  # PIL raises many types for corrupt files; none is fatal here
            skipped.add(p, unreadable_reason(p, e))
    if not arrays:
        raise GrandmotherError(f"none of the {len(paths)} images under {root} could be read "
                               f"(first: {skipped.items[0]['path']}: {skipped.items[0]['reason']})")
    if skipped:
        log.warning("skipped %d unreadable image(s) under %s, e.g. %s", len(skipped), root, skipped.items[0]["path"])
    return ImageArrayDataset(np.stack(arrays)), skipped


def open_training_data(path: Path, size: int, channels: int, progress: bool = False):
    """A dataset of uint8 (C, size, size) images from a plain image folder or an ingested DATA_DIR.

    Returns (dataset, skipped). The dataset has `__len__` and `get_batch(indices) -> (B, C, H, W) uint8`.
    """
    path = Path(path)
    if (path / "index.json").is_file():
        ds = open_dataset(path)
        ds.check_fits(size, channels)
        return ds, Skipped()
    return load_image_folder(path, size, channels, progress)


# ---------------------------------------------------------------- loading batches for training

class BatchOrder:
    """Which images make up the batch of each step: a fresh seeded permutation per epoch.

    A pure function of (seed, step), so a resumed run, or a Downpour replica, sees exactly the batches
    an uninterrupted run would. `subset` restricts the order to a portion of the data (a replica's).
    """

    def __init__(self, n: int, batch_size: int, seed: int, subset: torch.Tensor | None = None):
        self.items = subset if subset is not None else torch.arange(n)
        self.batch_size, self.seed = batch_size, seed
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = self.items[torch.randperm(len(self.items), generator=g)]
            self._perm_epoch = epoch
        return self._perm

    def indices(self, step: int) -> list[int]:
        n, out = len(self.items), []
        start = step * self.batch_size
        for pos in range(start, start + self.batch_size):
            out.append(int(self._permutation(pos // n)[pos % n]))
        return out



class _BatchFetcher(torch.utils.data.Dataset):
    """Map-style wrapper whose 'index' is a whole list of indices, so a worker returns a whole batch."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, indices):
        return self.dataset.get_batch(indices)

    def __len__(self):
        return len(self.dataset)


def load_batches(dataset, index_batches: Iterable[list[int]], workers: int = 0, prefetch: int = 4,
                 pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """Yield dataset.get_batch(b) for each index list b, decoded by `workers` background processes.

    The batches come in the order given, so a trainer that derives them from (seed, step) keeps exact
    resume. With workers=0 the batches are fetched in the calling process.
    """
    loader = torch.utils.data.DataLoader(
        _BatchFetcher(dataset), sampler=index_batches, batch_size=None, num_workers=workers,
        prefetch_factor=prefetch if workers > 0 else None, pin_memory=pin_memory,
        persistent_workers=False)
    yield from loader
