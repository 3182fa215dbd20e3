"""The Keras peer of `grandmother bench --peers`: Keras 2's LocallyConnected2D, timed in a subprocess.

grandmother never imports TensorFlow. scripts/keras_peer.sh builds a virtual environment (KERAS_VENV, under
the checkout) holding tensorflow-cpu and tf_keras; the bench runs scripts/keras_peer.py with that
environment's Python (or the one GRANDMOTHER_KERAS_PYTHON names; "none" turns the peer off), sends it
the stage shapes as JSON on stdin and reads one JSON object back (the runner's docstring has both).
Where the environment or the runner is absent, or the runner fails, the peer is skipped with one line
saying why and how to install it; the rest of the bench goes on. CPU only.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from grandmother.errors import GrandmotherError

ROOT = Path(__file__).resolve().parents[2]  # the checkout (scripts/ and runs/ sit beside grandmother/)
KERAS_VENV = "runs/keras-venv"  # scripts/keras_peer.sh reads its default from this line
RUNNER = ROOT / "scripts" / "keras_peer.py"
PYTHON_ENV = "GRANDMOTHER_KERAS_PYTHON"
IMPLEMENTATIONS = (2, 1)  # LocallyConnected2D(implementation=...): 2 dense masked kernel, 1 a slice per location
TIMEOUT_S = 900


def impl_name(implementation: int) -> str:
    return f"keras-i{implementation}"


def keras_python() -> Path:
    """The Python of the Keras environment; GrandmotherError (one line, with the way to install) if absent."""
    named = os.environ.get(PYTHON_ENV)
    if named == "none":
        raise GrandmotherError(f"turned off ({PYTHON_ENV}=none)")
    python = Path(named) if named else ROOT / KERAS_VENV / "bin" / "python"
    how = f"build it with scripts/keras_peer.sh (or set {PYTHON_ENV} to a Python with tf_keras)"
    if not python.is_file():
        raise GrandmotherError(f"no Keras environment at {python}; {how}")
    if not RUNNER.is_file():
        raise GrandmotherError(f"no {RUNNER.relative_to(ROOT)} beside the package (not a checkout); {how}")
    return python


def parse_answer(text: str, shapes: list[dict]) -> dict:
    """The runner's JSON answer, checked: one row per (stage, implementation) asked for."""
    try:
        answer = json.loads(text.strip().splitlines()[-1]) if text.strip() else None
        rows = answer["rows"]
        got = {(int(r["stage"]), int(r["implementation"])) for r in rows}
        for r in rows:
            if r["seconds"] is not None and not float(r["seconds"]) > 0:
                raise ValueError(f"seconds {r['seconds']}")
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise GrandmotherError(f"the Keras runner's answer is not the expected JSON ({type(e).__name__}: {e})")
    want = {(s["stage"], i) for s in shapes for i in IMPLEMENTATIONS}
    if got != want:
        raise GrandmotherError(f"the Keras runner answered for {sorted(got)}, not {sorted(want)}")
    return answer


def run_keras(shapes: list[dict], batch_size: int, repeats: int, threads: int, memory_bytes: int) -> dict:
    """{"tensorflow", "tf_keras", "threads", "rows": [{"stage", "implementation", "seconds", "note"}]} from the
    runner; GrandmotherError (one line) when it cannot run or answers badly."""
    python = keras_python()
    request = {"batch": batch_size, "repeats": repeats, "threads": threads, "memory_bytes": memory_bytes,
               "implementations": list(IMPLEMENTATIONS), "shapes": shapes}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("PYTHONPATH", None)  # the Keras environment's own packages only
    try:
        done = subprocess.run([str(python), str(RUNNER)], input=json.dumps(request), capture_output=True, text=True,
                              env=env, timeout=TIMEOUT_S, cwd=ROOT)
    except subprocess.TimeoutExpired:
        raise GrandmotherError(f"the Keras runner took more than {TIMEOUT_S} s")
    except OSError as e:
        raise GrandmotherError(f"cannot run {python}: {e.strerror or e}")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise GrandmotherError(f"the Keras runner ({python}) exited with status {done.returncode}: {last}")
    return parse_answer(done.stdout, shapes)
