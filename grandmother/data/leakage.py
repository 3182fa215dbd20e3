"""Does a test image or a test person appear in a training set?

    leaks = find_leaks(TEST_DIR, DATA_DIR)     # {"files": [...], "persons": [...], "pixels": [...]}

Three independent checks, each a list of the training images that fail it:
- files: the training image came from a file the test set lists in `excluded.txt` (every test image
  and every file of every test person);
- persons: the training image came from a test person's folder (identity = folder relative to a
  positive source, as `grandmother testset` defines it with `--group-by folder`);
- pixels: the training image has exactly the pixels of a test image (a copy under another name),
  checked when both sets have the same size and colour; a histogram-matched test image is compared by
  the pixels it had before matching (its "pixels" digest).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from grandmother.data.dataset import open_dataset
from grandmother.data.testset import open_testset, read_excluded


def _digests(ds) -> list[str]:
    out = []
    for start in range(0, len(ds), 4096):
        arr = ds.get_array(range(start, min(start + 4096, len(ds))))
        out.extend(hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest() for a in arr)
    return out


def find_leaks(test_dir: Path, data_dir: Path) -> dict[str, list[str]]:
    test, _, index = open_testset(test_dir)
    train = open_dataset(data_dir)
    excluded = set(read_excluded(Path(test_dir) / index.get("excluded_file", "excluded.txt")))
    excluded |= {str(Path(it["path"]).resolve()) for it in test.items()}
    person_dirs = set()
    if index.get("group_by", "folder") == "folder":
        sources = [Path(s).resolve() for s in index.get("positive_sources", [])]
        for ident in index.get("test_identities", []):
            src_i, _, rel = ident.partition(":")
            if src_i.isdigit() and int(src_i) < len(sources) and rel:
                person_dirs.add(sources[int(src_i)] / rel)
    leaks = {"files": [], "persons": [], "pixels": []}
    train_items = train.items()
    for it in train_items:
        path = Path(it["path"]).resolve()
        if str(path) in excluded:
            leaks["files"].append(str(path))
        if person_dirs.intersection(path.parents):
            leaks["persons"].append(str(path))
    if (train.size, train.channels) == (test.size, test.channels):
        # the stored pixels, and each image's pixels before histogram matching (testset records them)
        test_digests = set(_digests(test)) | {it["pixels"] for it in test.items() if it.get("pixels")}
        leaks["pixels"] = [it["path"] for it, d in zip(train_items, _digests(train)) if d in test_digests]
    return leaks
