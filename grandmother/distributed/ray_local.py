"""The driver's side of Ray: `ray_get`, which ends a job in one line when an actor is lost; the embedded
instance's start without a dashboard process; and the clean-up of what an earlier driver's instance left.

A driver killed with SIGKILL cannot stop its embedded instance: some of Ray's agent processes linger for
minutes (one with a 127.0.0.1 listener) and its session folder stays in Ray's temp folder (/tmp/ray). So
every embedded instance is recorded (RAY_TMP/grandmother-drivers/PID.json: the driver's PID, its start
time and its session folder), and the next start removes the sessions of recorded drivers that are gone:
it kills the processes still working in that session folder, then deletes the folder. Sessions that a
grandmother driver did not start, and those of drivers still running, are never touched.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import ray

from grandmother.errors import GrandmotherError, JobFailed

MARKS = "grandmother-drivers"


# ---------------------------------------------------------------- ray.get, in one line

def ray_get(refs, what: str, names: list[str] | None = None, timeout: float | None = None):
    """ray.get(refs). An actor lost on the way (killed, its node gone, no answer in `timeout` seconds) or a
    call that failed is one line, JobFailed: which actor (`names[i]` for refs[i]), what the driver was
    doing (`what`) and why. A GrandmotherError raised inside the actor comes back as itself."""
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.RayError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, GrandmotherError):
            raise GrandmotherError(str(cause)) from None
        who = "an actor"
        if isinstance(refs, list):
            for i, ref in enumerate(refs):
                try:
                    ray.get(ref, timeout=0)
                except ray.exceptions.GetTimeoutError:
                    continue
                except ray.exceptions.RayError:
                    who = names[i] if names else f"actor {i}"
                    break
        elif names:
            who = names[0]
        why = f"no answer in {timeout:g} s" if isinstance(e, ray.exceptions.GetTimeoutError) else type(e).__name__
        raise JobFailed(f"{who} was lost ({why}) while {what}") from None


# ---------------------------------------------------------------- the embedded instance

@contextmanager
def no_dashboard():
    """Within the block, a new Ray head starts no dashboard process. Ray starts dashboard.py on every head,
    in a minimal mode when include_dashboard=False; an embedded instance needs none of it (no job
    submission, no state API, no web UI). The start is skipped by replacing it for the call."""
    from ray._private import node
    real = getattr(node.Node, "start_api_server", None)
    if real is None:  # another Ray: its own include_dashboard=False is all there is
        yield
        return
    node.Node.start_api_server = lambda self, **kwargs: None
    try:
        yield
    finally:
        node.Node.start_api_server = real


def temp_root(kwargs: dict) -> Path:
    """Ray's temp folder, where its session folders go (/tmp/ray unless RAY_TMPDIR or _temp_dir says)."""
    if kwargs.get("_temp_dir"):
        return Path(kwargs["_temp_dir"])
    try:
        from ray._common.utils import get_default_ray_temp_dir
        return Path(get_default_ray_temp_dir())
    except ImportError:
        return Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray"


def _started(pid: int) -> int | None:
    """The start time (clock ticks after boot) of a live process; None if there is none (or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


@contextmanager
def recorded_session(root: Path):
    """Record this driver before its embedded instance starts; the body returns the instance's RayContext,
    whose session folder is then recorded too (see the module docstring)."""
    marks = root / MARKS
    mark = marks / f"{os.getpid()}.json"
    info = {"pid": os.getpid(), "started": _started(os.getpid()), "session": None}
    try:
        marks.mkdir(parents=True, exist_ok=True)
        mark.write_text(json.dumps(info))
    except OSError:
        mark = None  # an unwritable temp folder: Ray itself will say so
    box = {}
    yield box
    if mark is not None and box.get("session"):
        info["session"] = str(box["session"])
        try:
            mark.write_text(json.dumps(info))
        except OSError:
            pass


def clean_dead_sessions(root: Path) -> None:
    """Remove the sessions of recorded drivers that are gone: kill what still runs in them, delete them."""
    marks = root / MARKS
    stopped, removed = [], []
    for mark in sorted(marks.glob("*.json")) if marks.is_dir() else []:
        try:
            info = json.loads(mark.read_text())
            pid = int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if pid == os.getpid() or (_started(pid) is not None and _started(pid) == info.get("started")):
            continue  # the driver still runs
        if info.get("session"):
            sessions = [Path(info["session"])]
        elif _started(pid) is None:  # it died while Ray started: its session folder ends in its PID
            sessions = sorted(root.glob(f"session_*_{pid}"))
        else:  # the PID is another process's now, and the session unknown: leave it
            sessions = []
        for session in sessions:
            if session.parent != root or not session.name.startswith("session_") or session.is_symlink():
                continue
            stopped += _kill_processes_in(session)
            shutil.rmtree(session, ignore_errors=True)
            removed.append(session)
        try:
            mark.unlink()
        except OSError:
            pass
    if stopped:
        print(f"Ray: stopped {len(stopped)} process(es) left by an earlier embedded instance whose driver was "
              f"killed (PIDs {', '.join(map(str, stopped))}) and removed its session folder", file=sys.stderr)


def _in(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + "/")


def _links(proc: Path) -> list[str]:
    """Where a process's working folder and open files are (what can be read of it)."""
    out = []
    for link in [proc / "cwd"] + [proc / "fd" / fd for fd in os.listdir(proc / "fd")]:
        try:
            out.append(os.readlink(link))
        except OSError:
            continue
    return out


def _kill_processes_in(session: Path) -> list[int]:
    """SIGKILL every Ray process (a program of Ray's package, or one named ray::...) that works in `session`
    (its command line names it, or it holds a file or its working folder there: Ray's agents and workers
    rename themselves), and their children."""
    folder, package = str(session), os.path.dirname(ray.__file__)
    mine = {os.getpid(), os.getppid()}
    found, children, is_ray = set(), {}, set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        pid, proc = int(entry), Path("/proc") / entry
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
            children.setdefault(ppid, []).append(pid)
            if not (cmd.startswith("ray::") or package in cmd):
                continue
            is_ray.add(pid)
            if folder in cmd or any(_in(link, folder) for link in _links(proc)):
                found.add(pid)
        except (OSError, IndexError, ValueError):
            continue
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child in is_ray and child not in found:
                found.add(child)
                todo.append(child)
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.time() + 5
    while time.time() < deadline and any(_started(p) is not None for p in found):
        time.sleep(0.1)
    return sorted(found)
