"""Atomic file writes: write beside the target, fsync, rename. A crash leaves the old file intact.

Also the one place that turns an OS error on an output (read-only folder, disk full, a path under /proc)
into a one-line error naming the path: `writing(path)` around a write, `make_dir(path)` for a folder.
`atomic_path` and `append_jsonl` use them, and so does the command line for any OS error left over.

And the one writer per output folder (`folder_lock`), and the one reader of `.npy` files (`load_npy`:
no pickle, one line naming a bad file).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from grandmother.errors import GrandmotherError

# mkstemp creates files readable by the owner only; results (reports, datasets, checkpoints) should get
# the permissions of any other file the user creates, i.e. 0o666 less the umask (read once, at import).
_UMASK = os.umask(0)
os.umask(_UMASK)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_os_error(e: BaseException) -> str:
    """The reason of an OS error in a few words ("No space left on device")."""
    if isinstance(e, OSError):
        if e.errno is not None:
            return e.strerror or os.strerror(e.errno)
        return str(e) or type(e).__name__
    # safetensors reports I/O failures as SafetensorError("... IoError(Os { code: 28, ... message: "..." })")
    text = str(e)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO):
        if f"code: {code}," in text:
            return os.strerror(code)
    return (text.strip().splitlines() or [type(e).__name__])[0][:200]


def output_error(path, e: BaseException) -> GrandmotherError:
    return GrandmotherError(f"cannot write {path}: {describe_os_error(e)}")


def _write_errors() -> tuple[type, ...]:
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        return (OSError,)
    return (OSError, SafetensorError)


@contextmanager
def writing(path):
    """Run a write to `path`; an OS error in it becomes a one-line GrandmotherError naming `path`."""
    try:
        yield
    except GrandmotherError:
        raise
    except _write_errors() as e:
        raise output_error(path, e) from None


def make_dir(path: Path) -> Path:
    """mkdir -p for an output folder, with a one-line error naming it."""
    path = Path(path)
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path in the target's folder; on success it replaces `path` atomically.
    OS errors (also those of the caller's writing) become one line naming `path`."""
    path = Path(path)
    make_dir(path.parent)
    with writing(path):
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
    with writing(path), open(path, "a") as f:
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


# ---------------------------------------------------------------- lists of paths (excluded.txt)

def _needs_quoting(name: str) -> bool:
    """A name that a plain line would not carry: a control character (a newline would split it in two), a
    leading or trailing space (readers strip lines), or a leading quote or # (read as JSON or a comment)."""
    return (name != name.strip() or name.startswith(('"', "#"))
            or any(ord(c) < 32 or ord(c) == 127 for c in name))


def path_line(name: str) -> bytes:
    """One line of a path list: the name's own bytes (os.fsencode; names need not be UTF-8), or, for a name
    that needs it (`_needs_quoting`), the name as one JSON string (non-UTF-8 bytes as \\udcXX escapes)."""
    if _needs_quoting(name):
        return json.dumps(name).encode("ascii") + b"\n"
    return os.fsencode(name) + b"\n"


def write_path_list(path: Path, names) -> None:
    """A path list (one name a line, `path_line`), written atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(b"".join(path_line(n) for n in names))


def read_path_list(path: Path) -> list[str]:
    """The names of a path list: lines that start with a double quote are JSON strings; other lines are
    names as they are (stripped; what older versions wrote, and hand-written lists); blank lines and lines
    starting with # are skipped. Names that are not UTF-8 come back as os.fsdecode gives them."""
    names = []
    for raw in Path(path).read_bytes().splitlines():
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        if line.startswith(b'"'):
            try:
                name = json.loads(line.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                name = None
            if isinstance(name, str):
                names.append(name)
                continue
        names.append(os.fsdecode(line))
    return names


# ---------------------------------------------------------------- one writer per folder

LOCK_FILE = ".lock"
_held: dict[str, tuple[int, int]] = {}  # lock file -> (fd, depth): the locks this process holds


def _close_held_in_child() -> None:
    # A forked child (a decoding pool, a data-loader worker) gets copies of the lock's file descriptor;
    # closing them there leaves the parent's lock as it is and lets it end with the parent.
    for fd, _ in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def _holder(fd: int) -> tuple[str, str]:
    """(PID, command) written in a lock file; ("", "") if it holds nothing readable."""
    try:
        words = os.pread(fd, 200, 0).decode("utf-8", "replace").split(None, 1)
    except OSError:
        return "", ""
    if not words or not words[0].isdigit():
        return "", ""
    return words[0], (words[1].strip() if len(words) > 1 else "")


@contextmanager
def folder_lock(folder, what: str, beside: bool = False):
    """Hold the advisory lock of an output folder while `what` ("train", "probe", ...) writes into it.

    The lock is fcntl.flock on FOLDER/.lock (with `beside`: on .NAME.lock next to the folder, for an
    output that is built elsewhere and renamed into place), and the file holds the holder's PID. A second
    writer gets one line naming that PID. flock ends with its process, so a lock left by a killed process
    is taken over, with a line saying so. Re-entrant within a process (`run` trains under its own lock).
    The folder is made if missing, and removed again on the way out if nothing else was written to it.
    """
    folder = Path(folder)
    lock = folder.parent / f".{folder.name}.lock" if beside else folder / LOCK_FILE
    key = os.path.realpath(lock)
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        try:
            yield
        finally:
            _held[key] = (fd, depth)
        return
    created = []
    parent = lock.parent
    while not parent.exists() and parent != parent.parent:
        created.append(parent)
        parent = parent.parent
    fd = _acquire(folder, lock, what)
    _held[key] = (fd, 1)
    try:
        yield
    finally:
        _held.pop(key, None)
        try:
            os.unlink(lock)  # while still held: whoever opened this file before sees it gone, and retries
        except OSError:
            pass
        os.close(fd)
        for d in created:  # made for this command and left empty (it failed before writing): remove
            try:
                os.rmdir(d)
            except OSError:
                break


def _acquire(folder: Path, lock: Path, what: str) -> int:
    for _ in range(100):
        make_dir(lock.parent)
        with writing(folder):
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666 & ~_UMASK)
            except FileNotFoundError:
                if lock.parent.is_dir():
                    raise
                continue  # the folder was removed under us (its last user left it empty): make it again
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid, cmd = _holder(fd)
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise output_error(lock, e) from None
            by = f"{'grandmother ' + cmd if cmd else 'another process'} (PID {pid})" if pid else "another process"
            raise GrandmotherError(f"{folder} is in use: {by} is writing to it; wait for it to finish or stop "
                                   f"it, then run this again") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except OSError:
            same = False
        if not same:  # its holder removed the file between our open and our lock: take the new one
            os.close(fd)
            continue
        pid, cmd = _holder(fd)
        if pid and int(pid) != os.getpid():
            print(f"{folder}: taking over the lock of {'grandmother ' + cmd if cmd else 'a process'} (PID {pid}), "
                  f"which ended without releasing it", file=sys.stderr)
        try:  # the holder's name, for the message of a second writer; the lock holds without it (a full disk)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {what}\n".encode(), 0)
        except OSError:
            pass
        return fd
    raise GrandmotherError(f"{folder}: could not take its lock ({lock} keeps changing)")


# ---------------------------------------------------------------- reading arrays

def load_npy(path, mmap: bool = False):
    """A NumPy .npy file as an array (memory-mapped read-only with `mmap`). Pickles are never loaded: an
    object array, a truncated or foreign file is one line naming the file."""
    import numpy as np
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise GrandmotherError(f"{path}: file not found") from None
    except (OSError, ValueError, EOFError) as e:
        reason = describe_os_error(e)
        if "Object arrays" in reason or "Python objects" in reason:
            reason = "an object array (pickled Python objects), which is never loaded"
        raise GrandmotherError(f"{path}: not a plain NumPy array file ({reason})") from None
