"""Starting the P worker processes of one replica on this machine and joining them into a process group.

Every connection stays on 127.0.0.1: the rendezvous store binds there and gloo is told to use the
loopback interface (GLOO_SOCKET_IFNAME=lo) unless the caller chose one.
"""
from __future__ import annotations

import os
import signal
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


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


def _entry(rank, fn, world, port, backend, threads, args, stop):
    torch.set_num_threads(threads)
    kw = {}
    if stop is not None:  # Ctrl-C (sent to every process of the terminal's job; also what a worker gets when
        # the parent dies) and SIGTERM only ask for a stop: fn ends at a step boundary, as all workers agree
        def ask(signum, frame):
            stop.value = 1
        signal.signal(signal.SIGINT, ask)
        signal.signal(signal.SIGTERM, ask)
        kw["stop"] = stop
    init_group(rank, world, port, backend)
    try:
        fn(rank, world, *args, **kw)
    finally:
        leave_group()


def spawn(fn, world: int, args: tuple = (), backend: str | None = "gloo", threads: int | None = None,
          stoppable: bool = False) -> None:
    """Run fn(rank, world, *args) in `world` new processes joined into one process group; wait for all.

    `fn` must be importable by name (a module-level function). If one worker fails, the others are
    stopped and the failure is raised here (torch.multiprocessing.ProcessRaisedException).
    `stoppable`: fn also takes stop=, a shared flag (stop.value) that Ctrl-C or SIGTERM (see
    runtime.sigterm_as_interrupt) sets, here or in a worker; fn is to end soon after, cleanly. An
    interrupt here is raised again once every worker has ended.
    """
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // world)
    stop = mp.get_context("spawn").Value("b", 0, lock=False) if stoppable else None
    workers = mp.spawn(_entry, args=(fn, world, free_port(), backend, threads, args, stop), nprocs=world,
                       join=False)
    try:
        while not workers.join():
            pass
    except KeyboardInterrupt:
        if stop is None:
            raise
        stop.value = 1
        while not workers.join():
            pass
        raise
