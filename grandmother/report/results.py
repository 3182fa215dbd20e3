"""The one schema of every results file, and where each command writes it.

Every results file (probe.json, visualize.json, invariance.json, classify.json) starts with the same
fields, written by `result_fields`:

    run_dir           the training run, as an absolute path (so the report finds it from any folder)
    checkpoint_step   the step of the checkpoint the results were computed with
    images_seen       images the network had seen at that checkpoint
    commands          the command lines that reproduce the file

`grandmother report` reads these files through `read_result` and matches them to a run by `run_dir`.
"""
from __future__ import annotations

import json
from pathlib import Path

from grandmother.errors import GrandmotherError

RESULT_FILES = {"probe": "probe.json", "visualize": "visualize.json", "invariance": "invariance.json",
                "classify": "classify.json"}


def result_fields(run_dir: Path, meta: dict, command: str | None = None) -> dict:
    """The fields every results file shares; `meta` is the checkpoint's meta.json."""
    return {"run_dir": str(Path(run_dir).resolve()), "checkpoint_step": meta.get("step"),
            "images_seen": meta.get("images_seen"), "commands": [command] if command else []}


def read_result(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise GrandmotherError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise GrandmotherError(f"{path}: not a results file (a JSON object was expected)")
    return data
