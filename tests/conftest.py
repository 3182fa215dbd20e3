"""Shared fixtures and helpers, and the markers (pyproject.toml: slow, gpu, shared_data, ray).

Helpers the test files import (`from conftest import TINY, make_images, write_run`):
    TINY          overrides that shrink the small preset to a 16x16 network of 2 maps (trains in ms)
    make_images   a folder of smooth random PNGs
    write_run     a run directory as training leaves it (config, metrics, one checkpoint)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()



def need_shared_data() -> Path:
    """Return ../shared/data or skip the calling test with a clear message."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data not found at {SHARED_DATA}: this test needs the shared real images")
    return SHARED_DATA


@pytest.fixture
def shared_data() -> Path:
    return need_shared_data()


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- helpers shared by the test files

TINY = ["model.image_size=16", "model.stages.*.receptive_field=4", "model.stages.*.maps=2",
        "model.stages.*.pool_size=2", "model.stages.*.lcn_size=3", "model.stages.*.lcn_sigma=1.0",
        "train.batch_size=8", "train.log_every=1", "train.checkpoint_every=1000"]


def make_images(folder: Path, n: int = 24, size: int = 20, seed: int = 0, grid: int = 5) -> Path:
    """n smooth random PNGs: low-frequency noise upsampled, so an autoencoder has structure to learn."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 255, (grid, grid), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / f"img_{i:03d}.png")
    return folder


def write_run(run_dir: Path, cfg, net, step: int = 5, meta: dict | None = None, metrics: bool = True) -> Path:
    """A run directory as training leaves it: config.yaml, metrics.jsonl (steps 1-5, unless `metrics` is
    False) and one checkpoint at `step` whose meta.json is a local run's, updated with `meta`."""
    from grandmother.training.checkpoint import save_checkpoint
    from grandmother.training.runs import model_signature
    from grandmother.config import save_config
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    if metrics:
        lines = [{"step": s, "images": 8 * s, "loss": 10.0 / s, "images_per_s": 100.0, "elapsed_s": 0.1 * s,
                  "stages": [{"reconstruction": 9.0 / s, "sparsity": 1.0 / s}]} for s in range(1, 6)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    base = {"images_seen": 40, "model_signature": model_signature(cfg), "engine": "local", "data": "fake",
            "dataset_size": 40}
    save_checkpoint(run_dir, step, net.state_dict(), {}, {**base, **(meta or {})})
    return run_dir
