#!/usr/bin/env bash
# Builds every data set the experiments use, once (about 2 minutes on 2 cores). Seeded; re-running
# rebuilds the same sets. Output under runs/data/ (ignored by git):
#   test_faces   LFW persons (held out whole) vs Caltech-101 objects, 32x32 gray, 35% faces
#   test_cats    Kaggle cats vs Kaggle dogs and Caltech-101 objects, 32x32 gray
#   test_bodies  INRIA pedestrians vs Caltech-101 objects, 32x32 gray
#   excluded.txt every file of the three test sets and every file of every test person
#   train        all of ../shared/data minus excluded.txt, 32x32 gray (the training set)
#   train_fewfaces the training set with faces cut to 10% (seeded)
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
# Fewer faces: the training set with faces cut to 10% of its images (a seeded random subset kept).
.venv/bin/python - <<'PY'
import numpy as np
from grandmother.data.dataset import open_dataset
items = open_dataset("runs/data/train").items()
faces = sorted(it["path"] for it in items if "/faces/" in it["path"])
others = len(items) - len(faces)
keep = int(others / 9)  # faces = 10% of the result
drop = np.random.default_rng(0).permutation(len(faces))[keep:]
extra = sorted(faces[i] for i in drop)
with open("runs/data/excluded_fewfaces.txt", "w") as f:
    f.write(open("runs/data/excluded.txt").read() + "".join(p + "\n" for p in extra))
print(f"fewfaces: keep {keep} of {len(faces)} faces beside {others} other images")
PY
$GM ingest $SHARED --exclude $OUT/excluded_fewfaces.txt --size 32 --color gray --out $OUT/train_fewfaces --overwrite --quiet
# The leakage check: no test file and no test person's file is in a training set.
.venv/bin/python experiments/check_leak.py $OUT/train $OUT/train_nofaces $OUT/train_fewfaces
