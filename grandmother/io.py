"""Atomic file writes: write beside the target, fsync, rename. A crash leaves the old file intact."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

# mkstemp creates files readable by the owner only; results (reports, datasets, checkpoints) should get
# the permissions of any other file the user creates, i.e. 0o666 less the umask (read once, at import).
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path in the target's folder; on success it replaces `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def atomic_write_json(path: Path, obj, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def append_jsonl(path: Path, record: dict) -> None:
    """One JSON object per line; flushed so `tail -f` and a crash both see whole lines."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def truncate_jsonl(path: Path, max_step: int, key: str = "step") -> int:
    """Drop records with record[key] > max_step (atomically); returns how many were dropped.

    A resumed run restarts at its checkpoint, so metrics logged after that checkpoint by the interrupted
    run would otherwise appear twice. Lines that are not whole JSON (a crash mid-write) are dropped too.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get(key), (int, float)) and rec[key] > max_step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return dropped
