"""Build the in-package demo sample grandmother/sample/ from ../shared/data (deterministic, seed 0).

    .venv/bin/python scripts/build_sample.py            # from the project root; needs ../shared/data
    .venv/bin/python scripts/build_sample.py --data /path/to/shared/data

What it writes (JPEG, quality 90; every image square-cropped and resized with grandmother.data.images.fit_image,
the same conversion every other part of the project uses):

  sample/train/                unlabeled training images, 64x64 gray (the small preset's input is gray):
      video/       40 random frames of vtest.avi, 40 of Megamind.avi, 20 of tree.avi   (video/)
      objects/     1,300 Caltech-101 object images, any class                            (objects/caltech101)
      faces_lfw/   420 LFW faces, one or two per person, of persons NOT in faces_test    (faces/lfw)
      faces_caltech/ 80 Caltech-101 faces                                               (faces/caltech101)
      cats/ 250, dogs/ 200, bodies/ 150                        (cats/kaggle, dogs/kaggle, bodies/inria)
    2,500 images of which 500 are faces (20%): rare enough for a sparse unit to be "on" for faces
    (docs/experiments.md: the face unit forms at 10-30% faces, not at 59% or 3%), common enough to form in
    the demo's few minutes; `grandmother run`'s rebalancing then removes nothing.
  sample/faces_test/positive/PERSON/*.jpg   300 LFW faces of held-out persons (whole persons), 64x64 gray
  sample/faces_test/negative/*.jpg          550 distractors, 64x64 gray: 250 Caltech objects, 150 cats,
                                            150 dogs, none of them in train/ (35:65, the paper's 13,026:23,974)
  sample/invariance/           10 LFW faces of held-out persons, 128x128 gray, for scale/translation curves
  sample/SOURCES.md            sources and licences

LFW is grayscale, so the test images are all stored gray: positives and negatives alike.
The result must stay under 15 MB (`du -sh grandmother/sample`).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grandmother.data.images import fit_image, list_images, load_image  # noqa: E402

SEED = 0
TRAIN_SIZE, TEST_SIZE, INVARIANCE_SIZE = 64, 64, 128


def save(arr: np.ndarray, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    img.save(path, quality=90)


def pick(rng, items: list, n: int) -> list:
    return [items[i] for i in sorted(rng.choice(len(items), size=min(n, len(items)), replace=False))]


def channels_of(path: Path) -> int:
    with Image.open(path) as im:
        return 1 if im.mode in ("L", "1", "I", "I;16") else 3


def copy_images(paths, out_dir: Path, size: int, gray: bool, prefix_parent: bool = False):
    for p in paths:
        c = 1 if gray else channels_of(p)
        name = f"{p.parent.name}_{p.name}" if prefix_parent else p.name
        save(load_image(p, size, c), out_dir / (Path(name).stem + ".jpg"))


def video_frames(path: Path, n: int, rng, out_dir: Path, gray: bool = False):
    import av
    with av.open(str(path)) as c:
        count = sum(1 for pkt in c.demux(c.streams.video[0]) if pkt.size)
    wanted = set(rng.choice(count, size=min(n, count), replace=False).tolist())
    with av.open(str(path)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i in wanted:
                save(fit_image(frame.to_image(), TRAIN_SIZE, 1 if gray else 3), out_dir / f"{path.stem}_{i:04d}.jpg")
            if i >= max(wanted):
                break


SOURCES = """# Sources of the demo sample

Built by `scripts/build_sample.py` (seed 0) from the project's shared evaluation images. Every image was
square-cropped, resized and converted to gray (grandmother.data.images.fit_image) and re-encoded as JPEG
(quality 90). train/ holds 2,500 images, 500 of them faces (20%). Nothing here was made by the project.

| folder | from | licence / terms |
|---|---|---|
| train/video | `vtest.avi`, `Megamind.avi`, `tree.avi`: OpenCV sample data, as shipped in Debian's `opencv-doc` package | OpenCV sample data licence (BSD-style) |
| train/objects, faces_test/negative (o_*) | Caltech-101 (Fei-Fei, Fergus, Perona 2004), object classes and BACKGROUND_Google | CC BY 4.0 |
| train/faces_caltech | Caltech-101 `Faces`, `Faces_easy` | CC BY 4.0 |
| train/faces_lfw, faces_test/positive, invariance | Labeled Faces in the Wild (Huang et al. 2007), not aligned | research use |
| train/cats, train/dogs, faces_test/negative (c_*, d_*) | Kaggle Dogs vs. Cats competition data | research use |
| train/bodies | INRIA Person dataset (Dalal & Triggs 2005), 96x160 pedestrian crops | research use |

faces_test holds persons whose LFW images appear nowhere in train/ (split by person, not by file).
"""

INVARIANCE_README = """Ten LFW faces (persons held out of train/), 128x128 gray, for the scale and translation
invariance curves of the paper's Figure 6 (the faces are shifted and rescaled in code).

The paper's 3D out-of-plane rotation curves used sequences of a face turning; no such rotation
sequences exist in the shared data, so none are included here, and the rotation curve cannot be
reproduced from this sample.
"""


def build(data: Path, out: Path):
    rng = np.random.default_rng(SEED)
    lfw = data / "faces" / "lfw"
    persons = sorted(p for p in lfw.iterdir() if p.is_dir())
    person_order = [persons[i] for i in rng.permutation(len(persons))]

    # ============ held-out persons: faces_test positives (whole persons) and invariance faces ============
    test_persons, n_pos = [], 0
    for person in person_order:
        files = sorted(person.glob("*.jpg"))
        if n_pos + len(files) > 300 or len(files) > 12:  # whole persons only; no one person dominates
            continue
        test_persons.append(person)
        n_pos += len(files)
        if n_pos == 300:
            break
    held_out = set(test_persons)
    rest = [p for p in person_order if p not in held_out]
    invariance_persons, train_persons = rest[:10], rest[10:]
    held_out |= set(invariance_persons)

    for person in test_persons:
        copy_images(sorted(person.glob("*.jpg")), out / "faces_test" / "positive" / person.name, TEST_SIZE, gray=True)
    for person in invariance_persons:
        copy_images(sorted(person.glob("*.jpg"))[:1], out / "invariance", INVARIANCE_SIZE, gray=True)

    # ============ negatives and training images, disjoint ============
    objects = list_images(data / "objects" / "caltech101")
    cats, dogs = list_images(data / "cats" / "kaggle"), list_images(data / "dogs" / "kaggle")
    objects_perm = [objects[i] for i in rng.permutation(len(objects))]
    cats_perm = [cats[i] for i in rng.permutation(len(cats))]
    dogs_perm = [dogs[i] for i in rng.permutation(len(dogs))]
    neg = out / "faces_test" / "negative"
    for prefix, paths in (("o", objects_perm[:250]), ("c", cats_perm[:150]), ("d", dogs_perm[:150])):
        for p in paths:
            save(load_image(p, TEST_SIZE, 1), neg / f"{prefix}_{p.parent.name}_{p.stem}.jpg")

    train = out / "train"
    copy_images(sorted(objects_perm[250:250 + 1300]), train / "objects", TRAIN_SIZE, gray=True, prefix_parent=True)
    copy_images(sorted(cats_perm[150:150 + 250]), train / "cats", TRAIN_SIZE, gray=True)
    copy_images(sorted(dogs_perm[150:150 + 200]), train / "dogs", TRAIN_SIZE, gray=True)
    copy_images(pick(rng, list_images(data / "bodies" / "inria"), 150), train / "bodies", TRAIN_SIZE, gray=True)
    copy_images(pick(rng, list_images(data / "faces" / "caltech101"), 80), train / "faces_caltech", TRAIN_SIZE,
                gray=True, prefix_parent=True)
    lfw_train = []
    for person in train_persons:  # one or two faces per person: many identities, none dominant
        files = sorted(person.glob("*.jpg"))
        lfw_train.extend(pick(rng, files, 2))
        if len(lfw_train) >= 420:
            break
    copy_images(lfw_train[:420], train / "faces_lfw", TRAIN_SIZE, gray=True)
    for name, n in (("vtest.avi", 40), ("Megamind.avi", 40), ("tree.avi", 20)):
        video_frames(data / "video" / name, n, rng, train / "video", gray=True)

    (out / "SOURCES.md").write_text(SOURCES)
    (out / "invariance" / "README.txt").write_text(INVARIANCE_README)
    # leakage check: no LFW person of the test set or invariance set is in train/
    train_names = {p.name for p in (train / "faces_lfw").iterdir()}
    assert not any(f.stem.rsplit("_", 1)[0] in {h.name for h in held_out} for f in map(Path, train_names))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the shared data folder")
    ap.add_argument("--out", default=str(ROOT / "grandmother" / "sample"))
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.out)
    if not (data / "faces" / "lfw").is_dir():
        sys.exit(f"build_sample: {data} does not hold the shared data (faces/lfw missing)")
    tmp = out.with_name(out.name + ".building")
    if tmp.exists():
        shutil.rmtree(tmp)
    build(data, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)  # the sample appears whole or not at all
    counts = {d.name: sum(1 for f in d.rglob("*.jpg")) for d in sorted(out.iterdir()) if d.is_dir()}
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {counts}, {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
