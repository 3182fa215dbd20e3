"""Starting the P worker processes of one replica on this machine and joining them into a process group.

Every connection stays on 127.0.0.1: the rendezvous store binds there and gloo is told to use the
loopback interface (GLOO_SOCKET_IFNAME=lo) unless the caller chose one.

A worker that dies ends the run in one line (WorkerLost, naming it and the signal), a worker's
GrandmotherError is that one line, and a signal to one worker stops them all as it would stop the parent.
The workers die with the parent (a SIGKILLed parent leaves none writing into the run folder).
"""
from __future__ import annotations

import ctypes
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grandmother.errors import GrandmotherError, JobFailed
from grandmother.training.runtime import Terminated

ERROR_BYTES = 1000  # room for each worker's one-line error
USER_ERROR = 3  # a worker's exit status after a GrandmotherError (its message is in the shared array)
GRACE_S = 15.0  # how long the others get to end after one worker failed (they fail in their next collective)


class WorkerLost(JobFailed):
    """A worker process died (killed by a signal or by the machine) while the run went on."""


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(rank: int, world: int, port: int, backend: str | None = None, timeout_s: float = 300.0) -> None:
    """Join the process group of one replica: `world` workers rendezvousing at 127.0.0.1:port."""
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _die_with(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent ends (Linux; elsewhere nothing changes)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it ended before the call
        os._exit(1)


def _entry(rank, fn, world, port, backend, threads, args, stop, errors, parent):
    _die_with(parent)
    torch.set_num_threads(threads)
    try:  # tqdm's default lock is a multiprocessing semaphore, which a killed worker would leak
        from tqdm import tqdm
        tqdm.set_lock(threading.RLock())
    except ImportError:
        pass
    kw = {}
    if stop is not None:  # Ctrl-C (sent to every process of the terminal's job) and SIGTERM only ask for a
        # stop: fn ends at a step boundary, as all workers agree; the parent then exits as for that signal
        def ask(signum, frame):
            if not stop.value:
                stop.value = signum
        signal.signal(signal.SIGINT, ask)
        signal.signal(signal.SIGTERM, ask)
        kw["stop"] = stop
    init_group(rank, world, port, backend)
    try:
        fn(rank, world, *args, **kw)
    except GrandmotherError as e:  # bad input or a diverged loss: its one line reaches the parent
        text = str(e).encode("utf-8", "replace")[:ERROR_BYTES - 1]
        errors[rank * ERROR_BYTES:rank * ERROR_BYTES + len(text)] = text
        sys.exit(USER_ERROR)
    finally:
        leave_group()


def spawn(fn, world: int, args: tuple = (), backend: str | None = "gloo", threads: int | None = None,
          stoppable: bool = False) -> None:
    """Run fn(rank, world, *args) in `world` new processes joined into one process group; wait for all.

    `fn` must be importable by name (a module-level function). If one worker fails, the others get
    GRACE_S to end, then are killed, and the failure is raised here: WorkerLost for a worker killed by a
    signal, a worker's GrandmotherError as itself, anything else as torch's ProcessRaisedException.
    `stoppable`: fn also takes stop=, a shared flag (stop.value: the signal number) that Ctrl-C or SIGTERM
    (see runtime.sigterm_as_interrupt) sets, here or in a worker; fn is to end soon after, cleanly. Once
    every worker has ended, that interrupt is raised here (Terminated for SIGTERM), wherever it arrived.
    """
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // world)
    ctx = mp.get_context("spawn")
    stop = ctx.Value("b", 0, lock=False) if stoppable else None
    errors = ctx.Array("c", ERROR_BYTES * world, lock=False)
    workers = mp.spawn(_entry, args=(fn, world, free_port(), backend, threads, args, stop, errors, os.getpid()),
                       nprocs=world, join=False)
    interrupted, ours = None, set()
    try:
        try:
            failed = _wait(workers.processes, ours)
        except KeyboardInterrupt as e:
            if stop is None:
                raise
            interrupted = e
            if not stop.value:
                stop.value = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
            failed = _wait(workers.processes, ours)
    finally:
        for p in workers.processes:  # only after an error here: a normal end has joined them all
            if p.is_alive():
                p.kill()
                p.join()
    if failed:
        _raise_failure(workers, [i for i in failed if i not in ours] or failed, errors)
    if interrupted is not None:
        raise interrupted
    if stop is not None and stop.value:  # a worker was signalled: the run stopped as if we had been
        raise Terminated() if stop.value == signal.SIGTERM else KeyboardInterrupt()


def _wait(processes, ours: set) -> list[int]:
    """Wait for every worker. After the first failure the others get GRACE_S, then are killed (their
    indices go into `ours`). Returns the failed workers' indices, in the order they were seen."""
    sentinels = {p.sentinel: i for i, p in enumerate(processes) if p.exitcode is None}
    failed = [i for i, p in enumerate(processes) if p.exitcode not in (None, 0)]
    deadline = time.monotonic() + GRACE_S if failed else None
    while sentinels:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = multiprocessing.connection.wait(list(sentinels), timeout=timeout)
        if not ready:  # the grace period is over
            for i in sentinels.values():
                processes[i].kill()
                ours.add(i)
            timeout, deadline = None, None
            continue
        for s in ready:
            i = sentinels.pop(s)
            processes[i].join()
            if processes[i].exitcode != 0:
                failed.append(i)
                if deadline is None:
                    deadline = time.monotonic() + GRACE_S
    return failed


def _raise_failure(workers, failed: list[int], errors) -> None:
    procs = workers.processes
    killed = [i for i in failed if procs[i].exitcode < 0]
    if killed:
        i = killed[0]
        try:
            name = signal.Signals(-procs[i].exitcode).name
        except ValueError:
            name = f"signal {-procs[i].exitcode}"
        raise WorkerLost(f"model-parallel worker {i} (PID {procs[i].pid}) was killed by {name}")
    for i in failed:
        if procs[i].exitcode == USER_ERROR:
            raise GrandmotherError(errors[i * ERROR_BYTES:(i + 1) * ERROR_BYTES].rstrip(b"\0").decode())
    workers.join()  # torch's own exception, with the failed worker's traceback
    raise RuntimeError(f"model-parallel workers {failed} failed")
