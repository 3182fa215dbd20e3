"""Checkpoints: everything needed to resume a run exactly, written so a crash never loses the last one.

Layout of a run directory:

    RUN_DIR/config.yaml                      the resolved config of the run
    RUN_DIR/metrics.jsonl                    one JSON line per logged step
    RUN_DIR/checkpoints/step_00000300/       one checkpoint:
        model.safetensors                    every parameter tensor
        train_state.pt                       optimizer state, RNG states (torch file)
        meta.json                            step, images seen, the model config it belongs to
    RUN_DIR/checkpoints/latest               name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder, fsynced, and renamed into place; only then is
`latest` replaced (also atomically). A crash at any point leaves `latest` naming a complete checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import Config, read_config
from .errors import GrandmotherError
from .io import atomic_write_text, truncate_jsonl

CKPT_DIR = "checkpoints"


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], train_state: dict,
                    meta: dict, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically and point `latest` at it; keep the newest `keep` checkpoints."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
        torch.save(train_state, tmp / "train_state.pt")
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", name + "\n")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep] if keep > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / CKPT_DIR
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "meta.json").is_file() else None


def read_meta(path: Path) -> dict:
    try:
        return json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise GrandmotherError(f"cannot read checkpoint {path}: {e}") from None


def load_checkpoint(path: Path, map_location="cpu") -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors, train_state, meta) of one checkpoint folder."""
    path = Path(path)
    try:
        meta = read_meta(path)
        tensors = load_file(str(path / "model.safetensors"), device=str(map_location))
        state_file = path / "train_state.pt"
        train_state = torch.load(state_file, map_location=map_location, weights_only=False) if state_file.exists() else {}
    except (OSError, ValueError, RuntimeError) as e:
        raise GrandmotherError(f"cannot read checkpoint {path}: {e}") from None
    return tensors, train_state, meta


def model_signature(cfg: Config) -> dict:
    """The parts of a config that decide the parameter tensors; a checkpoint only fits an equal one."""
    m = cfg.model
    return {"image_size": m.image_size, "channels": m.channels, "kind": m.kind,
            "stages": [{"receptive_field": s.receptive_field, "stride": s.stride, "maps": s.maps,
                        "pool_size": s.pool_size, "pool_stride": s.pool_stride} for s in m.stages]}


def check_compatible(ckpt_meta: dict, cfg: Config, where: Path) -> None:
    want, have = model_signature(cfg), ckpt_meta.get("model_signature")
    if have != want:
        diff = _first_difference(have, want) if have else "it has no model signature"
        raise GrandmotherError(f"checkpoint {where} belongs to a different model ({diff}); "
                               f"use the same preset and model settings, or a new --out directory")


def _first_difference(a, b, path="model") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}")
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} stages in the checkpoint, {len(b)} in the config"
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return f"{path}: {a} in the checkpoint, {b} in the config"


# ---------------------------------------------------------------- a training run's folder

def open_run(out_dir: Path, cfg: Config, resume: bool, engine: str) -> tuple[Path | None, dict | None]:
    """(checkpoint, its meta) a training run continues from, or (None, None) for a new run.

    Both engines call this before any slow work; it refuses in one line an existing run without
    --resume, a checkpoint of another model, and one written by another engine.
    """
    out_dir = Path(out_dir)
    ckpt = latest_checkpoint(out_dir)
    if ckpt is not None and not resume:
        raise GrandmotherError(f"{out_dir} already holds a run (checkpoint {ckpt.name}); pass --resume to "
                               f"continue it, or choose another --out")
    if ckpt is None:
        return None, None
    meta = read_meta(ckpt)
    check_compatible(meta, cfg, ckpt)
    if meta.get("engine", "local") != engine:
        raise GrandmotherError(f"checkpoint {ckpt} was written by --engine {meta.get('engine', 'local')}; "
                               f"resume it with that engine, or choose another --out")
    return ckpt, meta


def continue_run(out_dir: Path, meta: dict | None, resume: bool) -> None:
    """Say where a run starts; when it resumes, drop the metrics lines an interrupted session logged past
    its checkpoint (they are logged again)."""
    out_dir = Path(out_dir)
    if meta is not None:
        truncate_jsonl(out_dir / "metrics.jsonl", meta["step"])
        print(f"resuming {out_dir} from step {meta['step']} ({meta['images_seen']} images seen)")
    elif resume:
        print(f"--resume: no checkpoint in {out_dir} yet, starting from step 0")


def read_run(run_dir: Path, step: int | None = None) -> tuple[Config, Path]:
    """(config, checkpoint folder) of a training run: its latest checkpoint, or the one of `step`.

    The one reader of a run folder (load_run and the report use it); one-line errors for a folder
    that is not a run or has no such checkpoint.
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise GrandmotherError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = read_config(cfg_path)
    path = latest_checkpoint(run_dir) if step is None else run_dir / CKPT_DIR / f"step_{step:08d}"
    if path is None or not path.is_dir():
        raise GrandmotherError(f"run directory {run_dir} has no checkpoint" + ("" if step is None else f" for step {step}"))
    return cfg, path


def load_run(run_dir: Path, device="cpu", step: int | None = None):
    """(cfg, net, meta) of a training run: its config and the network with its latest (or given) weights."""
    from .model import Network

    cfg, path = read_run(run_dir, step)
    tensors, _, meta = load_checkpoint(path, map_location=device)
    check_compatible(meta, cfg, path)
    net = Network(cfg.model, device="meta")  # no memory for random weights we would overwrite
    net.load_state_dict(tensors, assign=True)
    net.to(device).eval()
    return cfg, net, meta
