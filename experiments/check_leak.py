"""Exit 1 if any test image or test person of runs/data's test sets is in a training set.

    python experiments/check_leak.py TRAIN_DIR [TRAIN_DIR ...]   (test sets: runs/data/test_*, or TESTS="a b")
"""
import os
import sys
from pathlib import Path

from grandmother.data.leakage import find_leaks

bad = 0
for train in sys.argv[1:]:
    tests = [Path("runs/data") / t for t in os.environ["TESTS"].split()] if os.environ.get("TESTS") else \
        sorted(Path("runs/data").glob("test_*"))
    for test in tests:
        leaks = find_leaks(test, Path(train))
        n = {k: len(v) for k, v in leaks.items()}
        print(f"{train} vs {test}: leaked files {n['files']}, persons {n['persons']}, identical pixels {n['pixels']}")
        bad += sum(n.values())
sys.exit(1 if bad else 0)
