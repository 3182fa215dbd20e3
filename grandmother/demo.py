"""`make demo` / `grandmother demo`: the whole job on the sample shipped inside the package.

Trains the small preset on grandmother/sample/train (built by scripts/build_sample.py from ../shared/data).
"""
from __future__ import annotations

from pathlib import Path

from .config import load_config
from .errors import GrandmotherError
from .samples import SAMPLE_DIR


def run_demo(out: Path, steps: int | None = None) -> dict:
    out = Path(out)
    train_dir = SAMPLE_DIR / "train"
    if not train_dir.is_dir():
        raise GrandmotherError(f"the in-package sample is missing ({train_dir}); run scripts/build_sample.py")
    overrides = [f"train.steps={steps}"] if steps else []
    cfg = load_config("small", overrides)
    run_dir = out / "run"
    # ============ train ============
    from .train import train
    print(f"[demo] training the small preset for {cfg.train.steps} steps on {train_dir}")
    summary = train(cfg, train_dir, run_dir, resume=True)
    print(f"[demo] run directory: {run_dir}")
    return summary
