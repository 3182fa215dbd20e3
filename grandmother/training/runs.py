"""A training run's folder: what may start or resume in it, the checks before any write, and reading a finished run back.

Every engine starts through `start_run` (open_run's refusals, then the data; nothing written) and
`continue_run` (the folder, stale temps, metrics trimmed to the checkpoint, skipped.json). `load_run`
gives the analysis commands a run's network."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

from grandmother.config import Config, read_config
from grandmother.data.dataset import open_training_data
from grandmother.errors import GrandmotherError
from grandmother.io import atomic_write_json, make_dir, truncate_jsonl
from grandmother.training.checkpoint import (
    CKPT_DIR,
    RESUME_FREE,
    _one_line,
    latest_checkpoint,
    load_weights,
    read_meta,
    remove_stale_temp,
)


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


def _flat_settings(obj, prefix="") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flat_settings(v, f"{prefix}.{k}" if prefix else k))
        return out
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flat_settings(v, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def resume_changes(saved: Config, cfg: Config) -> list[tuple[str, object, object]]:
    """(setting, value in the run, value now) for each changed setting that changes what is trained."""
    a, b = _flat_settings(saved.to_dict()), _flat_settings(cfg.to_dict())
    out = []
    for key in sorted(set(a) | set(b)):
        if key in RESUME_FREE or (cfg.engine == "local" and key.startswith("downpour.")):
            continue
        if a.get(key) != b.get(key):
            out.append((key, a.get(key), b.get(key)))
    return out


def check_resume_settings(run_dir: Path, cfg: Config, meta: dict, data_path, force: bool = False) -> list[str]:
    """Refuse (one line, naming the setting) a resume whose settings or data differ from the run's,
    unless `force`; then the differences are returned (and printed) instead. Call before writing anything."""
    run_dir = Path(run_dir)
    changes = []
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        saved = read_config(cfg_path)
        changes += [f"{k} is {v!r} in {cfg_path} but {w!r} now" for k, v, w in resume_changes(saved, cfg)]
    if data_path is not None and meta.get("data") is not None:
        was, now = Path(meta["data"]).resolve(), Path(data_path).resolve()
        if was != now:
            changes.append(f"--data was {was}, now {now}")
    if not changes:
        return []
    if not force:
        more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
        raise GrandmotherError(f"--resume: {changes[0]}{more}; that changes what is trained. Use the run's "
                               f"settings, or pass --force-resume to continue with the new ones")
    for c in changes:
        print(f"--force-resume: {c}", file=sys.stderr)
    return changes


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


def open_run(out_dir: Path, cfg: Config, resume: bool, engine: str, data_path=None,
             force_resume: bool = False, check=None) -> tuple[Path | None, dict | None, bool]:
    """(checkpoint, its meta, fresh_optimizer) a training run continues from, or (None, None, False) for a new run.

    Every engine calls this (by start_run) before any slow work and before anything is written; it refuses
    in one line an existing run without --resume, a checkpoint of another model, one written by another
    engine, and a resume whose settings or data differ from the run's (unless `force_resume`; then
    fresh_optimizer says whether train.optimizer changed, so the checkpoint's optimizer state does not
    apply). A damaged checkpoints/latest falls back to the newest complete step_* (latest_checkpoint
    warns); none complete is refused, never silently restarted from step 0. `check(meta, cfg, ckpt)`: an
    engine's own check of the checkpoint (Downpour's shard layout), run before the settings are compared.
    """
    out_dir = Path(out_dir)
    ckpt = latest_checkpoint(out_dir, quiet=not resume)
    if ckpt is not None and not resume:
        raise GrandmotherError(f"{out_dir} already holds a run (checkpoint {ckpt.name}); pass --resume to "
                               f"continue it, or choose another --out")
    if ckpt is None:
        return None, None, False
    meta = read_meta(ckpt)
    check_compatible(meta, cfg, ckpt)
    if meta.get("engine", "local") != engine:
        raise GrandmotherError(f"checkpoint {ckpt} was written by --engine {meta.get('engine', 'local')}; "
                               f"resume it with that engine, or choose another --out")
    if check is not None:
        check(meta, cfg, ckpt)
    changes = check_resume_settings(out_dir, cfg, meta, data_path, force=force_resume)
    return ckpt, meta, any(c.startswith("train.optimizer ") for c in changes)


class RunStart(NamedTuple):
    """What a training engine starts from (start_run): the checkpoint it continues and its meta (None, None
    for a new run), whether the optimizer starts afresh, the training data, the images skipped as unreadable."""
    ckpt: Path | None
    meta: dict | None
    fresh_optimizer: bool
    dataset: object
    skipped: list


def start_run(out_dir: Path, cfg: Config, resume: bool, engine: str, data_path=None, dataset=None,
              progress: bool = True, force_resume: bool = False, check=None) -> RunStart:
    """Every engine's start: open_run's checks, then the training data (`dataset`, or the images at
    `data_path`), refused in one line when empty. Nothing is written; continue_run does that."""
    ckpt, meta, fresh_optimizer = open_run(out_dir, cfg, resume, engine, data_path, force_resume, check)
    skipped = []
    if dataset is None:
        dataset, skipped_obj = open_training_data(Path(data_path), cfg.model.image_size, cfg.model.channels,
                                                  progress=progress)
        skipped = skipped_obj.items
    if len(dataset) == 0:
        raise GrandmotherError(f"no training images in {data_path}")
    return RunStart(ckpt, meta, fresh_optimizer, dataset, skipped)


def continue_run(out_dir: Path, run: RunStart, resume: bool) -> None:
    """Make the run folder, remove .tmp-step_* folders a killed process left, drop the metrics lines an
    interrupted session logged past its checkpoint (all of them if it never wrote one: they are logged
    again), say where the run starts, and list the skipped images in skipped.json."""
    out_dir, meta = Path(out_dir), run.meta
    make_dir(out_dir)
    remove_stale_temp(out_dir)
    truncate_jsonl(out_dir / "metrics.jsonl", 0 if meta is None else meta["step"])
    if meta is not None:
        print(f"resuming {out_dir} from step {meta['step']} ({meta['images_seen']} images seen)")
    elif resume:
        print(f"--resume: no checkpoint in {out_dir} yet, starting from step 0")
    if run.skipped:
        atomic_write_json(out_dir / "skipped.json", {"skipped": run.skipped})
        print(f"skipped {len(run.skipped)} unreadable image(s); list in {out_dir / 'skipped.json'}")


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
    from grandmother.nn.model import Network

    cfg, path = read_run(run_dir, step)
    tensors, meta = load_weights(path, map_location=device)  # weights only: the resume state is never read
    check_compatible(meta, cfg, path)
    net = Network(cfg.model, device="meta")  # no memory for random weights we would overwrite
    try:
        net.load_state_dict(tensors, assign=True)
    except RuntimeError as e:
        raise GrandmotherError(f"{path / 'model.safetensors'} does not fit the run's model: "
                               f"{_one_line(e).rstrip(':.')}") from None
    net.to(device).eval()
    return cfg, net, meta
