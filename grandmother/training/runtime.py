"""Where a job runs and how it is seeded and stopped: the device choice, the global RNG seed, and SIGTERM
handled like Ctrl-C."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

import torch

from grandmother.errors import GrandmotherError


def resolve_device(name) -> torch.device:
    """auto (CUDA when available, else CPU), cpu, cuda or cuda:N as a torch.device; one-line errors for
    other names and for CUDA this machine lacks (checked before any checkpoint is read, so the error
    names the flag, not a file)."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise GrandmotherError(f"--device {name!r}: choose auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GrandmotherError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise GrandmotherError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def seed_everything(seed: int) -> None:
    """Seed torch's global generator (every other random choice here takes its own seeded generator)."""
    torch.manual_seed(seed)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM, Kubernetes and `kill` send before killing), raised where Ctrl-C would be, so
    training stops the same way: a checkpoint at the last completed step, then exit (status 143)."""


class _Signals:
    """What sigterm_as_interrupt's handler and step_is_atomic share (main thread only)."""
    installed = 0  # depth of sigterm_as_interrupt blocks
    deferring = 0  # depth of step_is_atomic blocks
    pending: int | None = None  # the first signal that arrived while deferring; delivered when the block ends
    term_fired = False  # the first SIGTERM became Terminated: later ones are ignored


def _deliver(signum: int) -> None:
    if signum == signal.SIGTERM:
        if _Signals.term_fired:
            return
        _Signals.term_fired = True
        raise Terminated()
    raise KeyboardInterrupt()


def _handler(signum, frame):
    if _Signals.deferring:
        if _Signals.pending is None:
            _Signals.pending = signum
        return
    _deliver(signum)


@contextmanager
def sigterm_as_interrupt():
    """Within the block, the first SIGTERM raises Terminated; further ones are ignored while the run
    writes its last checkpoint (SIGKILL still ends it, and the previous checkpoint survives that).
    Ctrl-C raises KeyboardInterrupt as usual. Inside `step_is_atomic` both wait for the block's end.
    Re-enter it after starting anything that installs its own SIGTERM handler (Ray does)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if not _Signals.installed:
        _Signals.term_fired, _Signals.pending, _Signals.deferring = False, None, 0
    previous_term = signal.signal(signal.SIGTERM, _handler)
    previous_int = signal.getsignal(signal.SIGINT)
    own_int = previous_int not in (signal.SIG_IGN, None)  # a job started with Ctrl-C ignored keeps ignoring it
    if own_int:
        signal.signal(signal.SIGINT, _handler)
    _Signals.installed += 1
    try:
        yield
    finally:
        _Signals.installed -= 1
        signal.signal(signal.SIGTERM, previous_term)
        if own_int:
            signal.signal(signal.SIGINT, previous_int)


@contextmanager
def step_is_atomic():
    """Within the block (the update of a training step, its count, metrics line and checkpoint), SIGTERM
    and Ctrl-C are held back and take effect when it ends: a checkpoint then always pairs the weights,
    optimizer state, step, metrics lines and RNG state of one completed step. Needs sigterm_as_interrupt
    around it (elsewhere, and outside the main thread, signals act as they otherwise would)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _Signals.deferring += 1
    try:
        yield
    except BaseException:
        _Signals.deferring -= 1
        if not _Signals.deferring:
            _Signals.pending = None  # the block failed: its error ends the command, not the held signal
        raise
    _Signals.deferring -= 1
    if not _Signals.deferring and _Signals.pending is not None:
        signum, _Signals.pending = _Signals.pending, None
        _deliver(signum)
