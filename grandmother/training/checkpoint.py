"""Checkpoints: everything needed to resume a run exactly, written so a crash never loses the last one.

Layout of a run directory:

    RUN_DIR/config.yaml                      the resolved config of the run
    RUN_DIR/metrics.jsonl                    one JSON line per logged step
    RUN_DIR/checkpoints/step_00000300/       one checkpoint:
        model.safetensors                    every parameter tensor
        train_state.safetensors              resume state: its tensors (optimizer, RNG)
        train_state.json                     resume state: everything else, tensors referred to by name
        meta.json                            step, images seen, the model config it belongs to
    RUN_DIR/checkpoints/latest               name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder, fsynced, and renamed into place; only then is
`latest` replaced (also atomically). A crash at any point leaves `latest` naming a complete checkpoint.

Run folders are data, never code: nothing here unpickles. Weights are read from model.safetensors only
(`load_weights`, all that probe, visualize, invariance, classify and report need); the resume state is
safetensors plus JSON (`pack_state` / `unpack_state`). A `train_state.pt` of an older version is read
with `torch.load(weights_only=True)` or refused.

If `latest` is damaged (empty, missing, naming a folder that is gone or incomplete), the newest
complete `step_*` folder is used and a warning says so; if step folders exist but none is complete, the
run is refused. A run never silently starts over while checkpoints exist.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from grandmother.errors import GrandmotherError
from grandmother.io import atomic_write_text, make_dir, pid_alive, writing

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


# ---------------------------------------------------------------- resume state as tensors + JSON

def pack_state(obj) -> tuple[dict[str, torch.Tensor], object]:
    """Split a nested state (dicts, lists, tuples, tensors, NumPy arrays, numbers, strings) into named
    tensors and a JSON-able skeleton that refers to them; `unpack_state` puts them back together."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x):
        if isinstance(x, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = x.detach().cpu().contiguous()
            return {"$tensor": key}
        if isinstance(x, np.ndarray):
            key = f"t{len(tensors)}"
            # stored as int64 / float64 (every NumPy dtype the RNG uses fits) and cast back on load
            wide = np.int64 if x.dtype.kind in "iub" else np.float64
            tensors[key] = torch.from_numpy(np.ascontiguousarray(x, dtype=wide))
            return {"$ndarray": key, "dtype": x.dtype.str}
        if isinstance(x, (np.integer, np.floating)):
            return x.item()
        if isinstance(x, tuple):
            return {"$tuple": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("$") for k in x):
                return {k: enc(v) for k, v in x.items()}
            return {"$items": [[enc(k), enc(v)] for k, v in x.items()]}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store a {type(x).__name__} in a checkpoint's resume state")

    return tensors, enc(obj)


def unpack_state(tensors: dict[str, torch.Tensor], skeleton, map_location="cpu"):
    def dec(x):
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "$tensor" in x:
            return tensors[x["$tensor"]].to(map_location)
        if "$ndarray" in x:
            return tensors[x["$ndarray"]].numpy().astype(np.dtype(x["dtype"]))
        if "$tuple" in x:
            return tuple(dec(v) for v in x["$tuple"])
        if "$items" in x:
            return {_hashable(dec(k)): dec(v) for k, v in x["$items"]}
        return {k: dec(v) for k, v in x.items()}

    return dec(skeleton)


def _hashable(k):
    return tuple(_hashable(v) for v in k) if isinstance(k, (list, tuple)) else k


# ---------------------------------------------------------------- writing

STATE_TENSORS, STATE_JSON, LEGACY_STATE = "train_state.safetensors", "train_state.json", "train_state.pt"
STEP_RE = re.compile(r"step_(\d+)$")
TMP_RE = re.compile(r"\.tmp-step_\d+-(\d+)$")


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], train_state: dict,
                    meta: dict, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically and point `latest` at it; keep the newest `keep` checkpoints."""
    root = make_dir(Path(run_dir) / CKPT_DIR)
    name = f"step_{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    with writing(final):
        _write_checkpoint_folder(tmp, final, root, step, tensors, train_state, meta)
    atomic_write_text(root / "latest", name + "\n")
    _rotate(root, step, keep)
    return final


def _write_checkpoint_folder(tmp: Path, final: Path, root: Path, step: int, tensors, train_state, meta) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
        state_tensors, skeleton = pack_state(train_state)
        save_file(state_tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(skeleton))
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2))  # last: marks it complete
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


def _rotate(root: Path, step: int, keep: int) -> None:
    # Rotation: the newest `keep` checkpoints up to this step stay. Later ones (left by a run that was
    # resumed from an earlier checkpoint) are not touched here; they are replaced when their step comes.
    older = sorted(p for p in root.glob("step_*") if p.is_dir() and _step_of(p) is not None and _step_of(p) < step)
    for old in older[:max(0, len(older) - (keep - 1))] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _step_of(path: Path) -> int | None:
    m = STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def remove_stale_temp(run_dir: Path) -> list[Path]:
    """Remove `.tmp-step_*` folders left by a process killed while writing a checkpoint (a process that
    is still running keeps its own). Returns what was removed."""
    root = Path(run_dir) / CKPT_DIR
    removed = []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        m = TMP_RE.match(p.name)
        if not m or not p.is_dir():
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and pid_alive(pid):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if removed:
        print(f"removed {len(removed)} unfinished checkpoint folder(s) left by an interrupted write: "
              f"{', '.join(p.name for p in removed)}", file=sys.stderr)
    return removed


# ---------------------------------------------------------------- finding the checkpoint to use

def is_complete(path: Path) -> bool:
    """All files of a checkpoint are present and meta.json parses (what the writer renames into place)."""
    path = Path(path)
    if not (path / "model.safetensors").is_file():
        return False
    if not ((path / STATE_TENSORS).is_file() and (path / STATE_JSON).is_file()) and not (path / LEGACY_STATE).is_file():
        return False
    try:
        return isinstance(json.loads((path / "meta.json").read_text()).get("step"), int)
    except (OSError, ValueError, AttributeError):
        return False


def latest_checkpoint(run_dir: Path, quiet: bool = False) -> Path | None:
    """The checkpoint to continue from or to read: the one `latest` names, or, if that pointer is
    damaged, the newest complete `step_*` folder (with a warning). None only if there is no step folder
    at all; step folders of which none is complete are an error (never a silent fresh start)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return None
    steps = sorted((p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None), key=_step_of)
    pointer = root / "latest"
    named, problem = None, None
    try:
        text = pointer.read_text().strip()
    except FileNotFoundError:
        text, problem = None, "is missing"
    except (OSError, UnicodeDecodeError) as e:
        text, problem = None, f"is unreadable ({type(e).__name__})"
    if text is not None:
        if not STEP_RE.match(text):
            problem = "is empty" if not text else f"names {text[:40]!r}, not a checkpoint"
        elif not is_complete(root / text):
            problem = f"names {text}, which is " + ("incomplete" if (root / text).is_dir() else "missing")
        else:
            named = root / text
    if named is not None:
        return named
    if not steps:
        if problem is not None and text is not None:
            raise GrandmotherError(f"{pointer} {problem} and there is no step_* folder; "
                                   f"move {root} away to start over")
        return None
    complete = [p for p in steps if is_complete(p)]
    if not complete:
        raise GrandmotherError(f"{root} holds {len(steps)} checkpoint folder(s) but none is complete "
                               f"({pointer.name} {problem}); move them away to start over, or choose another --out")
    chosen = complete[-1]
    if not quiet:
        print(f"warning: {pointer} {problem}; using {chosen.name}, the newest complete checkpoint", file=sys.stderr)
    return chosen


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise GrandmotherError(f"cannot read checkpoint {path}: {_one_line(e)}") from None
    if not isinstance(meta, dict):
        raise GrandmotherError(f"cannot read checkpoint {path}: meta.json is not a JSON object")
    return meta


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ---------------------------------------------------------------- reading

def load_weights(path: Path, map_location="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of one checkpoint folder: model.safetensors and meta.json only, nothing executable."""
    path = Path(path)
    meta = read_meta(path)
    f = path / "model.safetensors"
    try:
        tensors = load_file(str(f), device=str(map_location))
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        raise GrandmotherError(f"cannot read {f}: {_one_line(e)} (damaged or not a safetensors file)") from None
    return tensors, meta


def load_train_state(path: Path, map_location="cpu") -> dict:
    """The resume state of one checkpoint folder (optimizer, RNG, shard progress), without unpickling."""
    path = Path(path)
    if (path / STATE_JSON).is_file():
        try:
            tensors = load_file(str(path / STATE_TENSORS), device="cpu")
            skeleton = json.loads((path / STATE_JSON).read_text())
            return unpack_state(tensors, skeleton, map_location)
        except (OSError, SafetensorError, ValueError, KeyError, TypeError) as e:
            raise GrandmotherError(f"cannot read the resume state in {path}: {_one_line(e)}") from None
    legacy = path / LEGACY_STATE
    if legacy.is_file():
        try:
            return torch.load(legacy, map_location=map_location, weights_only=True)
        except Exception as e:  # UnpicklingError, RuntimeError, ...: whatever it is, nothing was executed
            raise GrandmotherError(f"{legacy}: refused to load ({_one_line(e)[:160]}); only tensors are read from a "
                                   f"run folder. Start a new run, or train from these weights in another --out") from None
    raise GrandmotherError(f"checkpoint {path} has no resume state ({STATE_JSON})")


def load_checkpoint(path: Path, map_location="cpu") -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors, train_state, meta) of one checkpoint folder, for resuming."""
    tensors, meta = load_weights(path, map_location)
    return tensors, load_train_state(path, map_location), meta


# Settings a resumed run may change: they decide how long, where and how fast it runs, not what is
# trained. Every other setting must equal the run's config.yaml unless --force-resume is given.
RESUME_FREE = {"preset", "train.steps", "train.checkpoint_every", "train.log_every", "train.num_workers",
               "train.partition", "train.device", "model.kernel", "downpour.ray_address", "downpour.replica_device",
               "downpour.replica_cpus", "downpour.replica_gpus", "downpour.ps_checkpoint_every",
               "downpour.object_store_memory"}


# ---------------------------------------------------------------- a training run's folder


