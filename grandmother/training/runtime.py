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


@contextmanager
def sigterm_as_interrupt():
    """Within the block, the first SIGTERM raises Terminated; further ones are ignored while the run
    writes its last checkpoint (SIGKILL still ends it, and the previous checkpoint survives that).
    Re-enter it after starting anything that installs its own SIGTERM handler (Ray does)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum, frame):
        nonlocal fired
        if not fired:
            fired = True
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
