#!/usr/bin/env bash
# Builds every data set the experiments use, once (about 2 minutes on 2 cores). Seeded; re-running
# rebuilds the same sets. Output under runs/data/ (ignored by git):
#   test_faces   LFW persons (held out whole) vs Caltech-101 objects, 32x32 gray, 35% faces
#   test_cats    Kaggle cats vs Kaggle dogs and Caltech-101 objects, 32x32 gray
#   test_bodies  INRIA pedestrians vs Caltech-101 objects, 32x32 gray
#   excluded.txt every file of the three test sets and every file of every test person
#   train        all of ../shared/data minus excluded.txt, 32x32 gray (the training set)
#   train_fewfaces the training set with faces cut to 10% (seeded; also 1, 3, 20 and 30%: train_facesNN)
#   train_nofaces the control: ../shared/data without faces/ and minus excluded.txt, at 64x64 so the
#                face detector can see faces, then `filter-faces` (whatever it still detects is removed)
# Usage: bash experiments/data.sh   (from the repository root; SHARED=path overrides ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared/data}
GM=${GM:-.venv/bin/python -m grandmother}
OUT=runs/data
mkdir -p $OUT
[ -d "$SHARED/faces/lfw" ] || { echo "data.sh: $SHARED/faces/lfw not found (set SHARED=)"; exit 1; }

$GM testset --positive $SHARED/faces/lfw --negative $SHARED/objects --color gray --size 32 \
    --count 5000 --seed 0 --out $OUT/test_faces --overwrite --quiet
$GM testset --positive $SHARED/cats/kaggle --negative $SHARED/dogs $SHARED/objects --group-by file \
    --color gray --size 32 --count 1500 --seed 1 --out $OUT/test_cats --overwrite --quiet
$GM testset --positive $SHARED/bodies/inria --negative $SHARED/objects --group-by file \
    --color gray --size 32 --count 1500 --seed 2 --out $OUT/test_bodies --overwrite --quiet
cat $OUT/test_faces/excluded.txt $OUT/test_cats/excluded.txt $OUT/test_bodies/excluded.txt | sort -u > $OUT/excluded.txt

$GM ingest $SHARED --exclude $OUT/excluded.txt --size 32 --color gray --out $OUT/train --overwrite --quiet
$GM ingest $SHARED/objects $SHARED/cats $SHARED/dogs $SHARED/bodies $SHARED/video --exclude $OUT/excluded.txt \
    --size 64 --color gray --out $OUT/nofaces64 --overwrite --quiet
$GM filter-faces $OUT/nofaces64 --out $OUT/train_nofaces --overwrite --quiet
# Fewer faces: the training set with faces cut to a fraction of its images, by `ingest --max-face-fraction`
# (grandmother/data/rebalance.py) with the faces known by path. The same non-face images in every set; the
# faces kept are the first of one seeded order, so each smaller set's faces are in every larger one
# (train_fewfaces = 10%; train_faces01 / 03 / 20 / 30 = 1%, 3%, 20%, 30%).
for spec in fewfaces:0.10 faces01:0.01 faces03:0.03 faces20:0.20 faces30:0.30; do
    $GM ingest $SHARED --exclude $OUT/excluded.txt --size 32 --color gray --max-face-fraction ${spec#*:} \
        --face-paths '*/faces/*' --out $OUT/train_${spec%%:*} --overwrite --quiet
done
# The leakage check: no test file and no test person's file is in a training set.
PYTHONPATH=. .venv/bin/python experiments/check_leak.py $OUT/train $OUT/train_nofaces $OUT/train_fewfaces $OUT/train_faces{01,03,20,30}

# ---- Cats and bodies (issue 20): cat faces cropped with OpenCV's cat-face cascade, pedestrians padded to a
# square (experiments/crops.py writes runs/data/src/), and a training set where faces, cat faces and bodies
# are each rare (7% each, the same nested seeded rule as above).
.venv/bin/python experiments/crops.py
SRC=$OUT/src
$GM testset --positive $SRC/catfaces --negative $SHARED/dogs $SHARED/objects --group-by file \
    --color gray --size 32 --count 900 --seed 1 --out $OUT/test_catfaces --overwrite --quiet
$GM testset --positive $SRC/bodies_pad --negative $SRC/objects_pad --group-by folder \
    --color gray --size 32 --count 1500 --seed 2 --out $OUT/test_bodiespad --overwrite --quiet
PYTHONPATH=. .venv/bin/python - <<'PY'
# Every test file excluded, under its derived and its source name (a padded distractor's photo, a cropped
# cat's photo), so no test photo reaches training in either form.
from pathlib import Path
shared = Path("../shared/data").resolve()
src = Path("runs/data/src").resolve()
lines = set()
for t in ("test_faces", "test_catfaces", "test_bodiespad"):
    lines |= set(Path(f"runs/data/{t}/excluded.txt").read_text().splitlines())
raw = {}
for p in list(shared.joinpath("objects").rglob("*")) + list(shared.joinpath("cats").rglob("*")):
    raw.setdefault(str(p.with_suffix("")), []).append(str(p))
for line in list(lines):
    for d, s in (("objects_pad", "objects"), ("catfaces", "cats/kaggle")):
        root = str(src / d) + "/"
        if line.startswith(root):
            lines |= set(raw.get(str(shared / s / line[len(root):]).rsplit(".", 1)[0], []))
Path("runs/data/excluded_rare3_tests.txt").write_text("".join(sorted(x + "\n" for x in lines)))
print(f"rare3: {len(lines)} test files excluded")
PY
$GM ingest $SHARED/faces $SRC/catfaces $SRC/bodies_pad $SHARED/dogs $SHARED/objects $SHARED/video \
    --exclude $OUT/excluded_rare3_tests.txt --size 32 --color gray --out $OUT/rare3_all --overwrite --quiet
PYTHONPATH=. .venv/bin/python - <<'PY'
import numpy as np
from grandmother.data.dataset import open_dataset
items = open_dataset("runs/data/rare3_all").items()
classes = {"faces": "/shared/data/faces/", "catfaces": "/src/catfaces/", "bodies": "/src/bodies_pad/"}
paths = {c: sorted(it["path"] for it in items if key in it["path"]) for c, key in classes.items()}
others = len(items) - sum(len(v) for v in paths.values())
keep = int(others * 0.07 / (1 - 3 * 0.07))  # each class 7% of the result
drop = []
for i, (c, ps) in enumerate(paths.items()):
    order = np.random.default_rng(i).permutation(len(ps))
    k = min(keep, len(ps))
    drop += [ps[j] for j in order[k:]]
    print(f"rare3: {c}: keep {k} of {len(ps)}")
print(f"rare3: beside {others} other images")
with open("runs/data/excluded_rare3.txt", "w") as f:
    f.write(open("runs/data/excluded_rare3_tests.txt").read() + "".join(p + "\n" for p in sorted(drop)))
PY
$GM ingest $SHARED/faces $SRC/catfaces $SRC/bodies_pad $SHARED/dogs $SHARED/objects $SHARED/video \
    --exclude $OUT/excluded_rare3.txt --size 32 --color gray --out $OUT/train_rare3 --overwrite --quiet
TESTS="test_faces test_catfaces test_bodiespad" PYTHONPATH=. .venv/bin/python experiments/check_leak.py $OUT/train_rare3

# ---- 64x64 input (one run): the 10% faces set and the face test set at 64x64 (same files, same split).
$GM testset --positive $SHARED/faces/lfw --negative $SHARED/objects --color gray --size 64 \
    --count 5000 --seed 0 --out $OUT/test_faces64 --overwrite --quiet
cmp <(sort $OUT/test_faces/excluded.txt) <(sort $OUT/test_faces64/excluded.txt)  # the same test files
$GM ingest $SHARED --exclude $OUT/excluded.txt --size 64 --color gray --max-face-fraction 0.10 --face-paths '*/faces/*' \
    --out $OUT/train_fewfaces64 --overwrite --quiet
