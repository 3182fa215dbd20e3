"""What a stage of `grandmother run` is: a name, the inputs it depends on, its outputs, a plan and a run.

    class Mystage(Stage):
        name = "mystage"                       # the key in run.json and the name --restart-from takes
        inputs = ("config", "mystage")         # the parts of the job's inputs whose change redoes it

        def fingerprint(self) -> dict:         # the parts it introduces; checks bad input (fast, one line)
            return {"mystage": {"setting": self.job.some_setting}}

        def outputs(self) -> list[Path]:       # what --restart-from deletes before redoing it
            return [self.job.out / "mystage"]

        def plan(self, rec) -> tuple[dict, float, str]:   # (kept in run.json, ETA in seconds, what it does)
            return {}, 1.0, "doing my stage"

        def run(self, rec) -> dict:            # the work; the result is stored in run.json
            ...

and then the class is added to `STAGES` in grandmother/pipeline/stages.py at its place in the order. The
job (grandmother/pipeline/job.py) keeps only the bookkeeping of run.json: which stages are done, which
inputs changed, what to redo. A stage reads the job's settings and the earlier stages' results through
`self.job` (its `out`, `cfg`, `record`, ...).
"""
from __future__ import annotations

import datetime as _dt
import shlex
from pathlib import Path


class Stage:
    name: str = ""
    inputs: tuple[str, ...] = ()

    def __init__(self, job):
        self.job = job

    def fingerprint(self) -> dict:
        """The parts of the job's inputs this stage introduces (name -> JSON value); raises GrandmotherError
        for bad input. Called for every stage, in order, before any stage runs."""
        return {}

    def outputs(self) -> list[Path]:
        return []

    def plan(self, rec: dict) -> tuple[dict, float, str]:
        """(entries to keep in the stage's run.json record, ETA in seconds, one phrase of what it does)."""
        return {}, 1.0, self.name

    def run(self, rec: dict) -> dict:
        raise NotImplementedError

    def result(self, stage: str) -> dict:
        """The recorded result of an earlier stage."""
        return self.job.record.stages[stage]["result"]


def quote(path) -> str:
    return shlex.quote(str(path))


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def fmt_seconds(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
