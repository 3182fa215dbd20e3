"""Downpour SGD with model-parallel replicas: R replicas x P partitions on Ray (`--engine downpour
--replicas R --partition RxC`).

Each replica is a group of P Ray actors (`PartitionWorker`), one per block of the partition, which form
one torch.distributed process group of their own (gloo over 127.0.0.1 on one machine) for the halo
exchanges. Worker k of a replica fetches and pushes only its own parameter slice: the flat positions of
its blocks (`part_index`), registered once with every parameter shard, so a push carries the slice's
values only and the shard scatters them into its part of the vector before the optimizer step.

Bookkeeping extends the replica one: every worker is a pusher of its own, key = replica * P + part,
with its own sequence numbers, and the shards apply each (key, seq) at most once. A worker that dies
takes its replica down: the driver kills the whole group and starts a fresh one (new process group)
from the smallest progress any of its workers reached on every shard; pushes some shards already
applied are then ignored by sequence number, so every push is applied exactly once. Other replicas
keep going.

The update on a shard is the optimizer step on a gradient that is zero outside the pushed slice. For
SGD without momentum and Adagrad that leaves every other parameter and its state unchanged, so it is
the same as stepping the slice alone; Adam and momentum would move the other elements, and are refused.
"""
from __future__ import annotations

import os
import time
import warnings

import numpy as np
import ray
import torch
import torch.distributed as dist

from grandmother.config import Config
from grandmother.data.dataset import BatchOrder
from grandmother.distributed.shards import FlatLayout
from grandmother.distributed.replica import replica_items, replica_quota
from grandmother.errors import GrandmotherError
from grandmother.training.runtime import resolve_device
from grandmother.distributed.parallel.launch import free_port, init_group, leave_group
from grandmother.distributed.parallel.mp_model import ModelParallelNetwork, reduce_terms
from grandmother.distributed.parallel.partition import Partition, plan_stages

GROUP_TIMEOUT_S = 60.0  # a collective waiting on a dead peer fails after this (gloo also notices closed sockets)


def check_partitioned_downpour(cfg: Config) -> None:
    t = cfg.train
    if t.optimizer == "adam" or (t.optimizer == "sgd" and t.momentum > 0):
        raise GrandmotherError(f"--engine downpour with --partition: --optimizer {t.optimizer}"
                               f"{' with momentum' if t.optimizer == 'sgd' else ''} keeps state that a slice's "
                               f"push would move elsewhere; use adagrad or sgd without momentum")


def part_index(layout: FlatLayout, plans, part: int) -> torch.Tensor:
    """Ascending flat positions of worker `part`'s parameter slices (its blocks of every W1 and W2)."""
    pieces = []
    for name, shape, off, _ in layout.items():
        b = plans[int(name.split(".")[1])].filter_own[part]
        inner = int(np.prod(shape[2:], dtype=np.int64))
        starts = off + (torch.arange(b.r0, b.r1) * shape[1] + b.c0) * inner
        pieces.append((starts[:, None] + torch.arange(b.w * inner)[None, :]).reshape(-1))
    return torch.cat(pieces)


def shard_ranges(index: torch.Tensor, bounds: list[int]) -> list[tuple[int, int]]:
    """For each shard [bounds[s], bounds[s+1]): the range [lo, hi) of `index` positions that fall in it."""
    edges = torch.searchsorted(index, torch.tensor(bounds, dtype=index.dtype)).tolist()
    return list(zip(edges[:-1], edges[1:]))


class PartitionWorker:
    """Worker `part` of replica `replica` (a Ray actor)."""

    def __init__(self, replica: int, part: int, cfg: Config, dataset, layout: FlatLayout, bounds: list[int],
                 shards: list, port: int):
        d = cfg.downpour
        torch.set_num_threads(max(1, int(round(d.replica_cpus))))
        self.partition = Partition.parse(cfg.train.partition)
        self.replica, self.part, self.port = replica, part, port
        self.key = replica * self.partition.size + part
        self.cfg, self.shards, self.dataset = cfg, shards, dataset
        self.device = resolve_device(d.replica_device)
        self.quota = replica_quota(cfg.train.steps, replica, d.replicas)
        self.order = BatchOrder(len(dataset), cfg.train.batch_size, cfg.train.seed + replica,
                                replica_items(len(dataset), replica, d.replicas))
        index = part_index(layout, plan_stages(cfg.model, self.partition), part)
        self.ranges = shard_ranges(index, bounds)
        # This worker's parameters as views of one flat buffer, their gradients of another.
        self.net = ModelParallelNetwork(cfg.model, self.partition, part, device=self.device)
        self.flat = torch.zeros(len(index), device=self.device)
        self.flat_grad = torch.zeros(len(index), device=self.device)
        off = 0
        for name, p in list(self.net.named_parameters()):
            n = p.numel()
            owner, attr = name.rsplit(".", 1)
            param = torch.nn.Parameter(self.flat[off:off + n].view(p.shape))
            param.grad = self.flat_grad[off:off + n].view(p.shape)
            setattr(self.net.get_submodule(owner), attr, param)
            off += n
        self.net.train()
        self.fetched_version, self.pending, self.staleness = 0, None, 0

    def pid(self) -> int:
        return os.getpid()

    def _fetch(self):
        parts = ray.get([s.fetch_part.remote(self.part) for s in self.shards])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only object-store arrays; we only read them
            for (lo, hi), (arr, _) in zip(self.ranges, parts):
                self.flat[lo:hi].copy_(torch.from_numpy(np.asarray(arr)))
        self.fetched_version = max(v for _, v in parts)

    def _await_pending(self):
        if self.pending is not None:
            refs, fetched = self.pending
            acks = ray.get(refs)
            self.staleness = max(a["version"] for a in acks) - fetched
            self.pending = None

    def _push(self, seq: int, step_end: int):
        self._await_pending()
        host = self.flat_grad.cpu().numpy()
        refs = [s.push.remote(self.key, seq, step_end, ray.put(host[lo:hi]), self.part)
                for s, (lo, hi) in zip(self.shards, self.ranges)]
        self.pending = (refs, self.fetched_version)
        self.flat_grad.zero_()

    def run(self, start_step: int, next_seq: int):
        """Local steps start_step .. quota-1 in the replica's process group; one record per step."""
        d = self.cfg.downpour
        init_group(self.part, self.partition.size, self.port, "nccl" if self.device.type == "cuda" else "gloo",
                   timeout_s=GROUP_TIMEOUT_S)
        try:
            seq, t_last = next_seq, time.perf_counter()
            for step in range(start_step, self.quota):
                if step == start_step or step % d.fetch_every == 0:
                    self._fetch()
                batch = self.dataset.get_batch(self.order.indices(step)).to(self.device)
                out = self.net(self.net.prepare(batch))
                out.loss.backward()  # accumulates into self.flat_grad through the .grad views
                terms = reduce_terms(out.terms)
                loss = sum(v for t in terms for v in t.values())
                if not np.isfinite(loss):
                    raise GrandmotherError(f"replica {self.replica}: the loss became {loss} at its step {step + 1}; "
                                           f"lower --lr (now {self.cfg.train.lr}) and resume from the last checkpoint")
                if (step + 1) % d.push_every == 0 or step + 1 == self.quota:
                    self._push(seq, step + 1)
                    seq += 1
                    if step + 1 == self.quota:
                        self._await_pending()
                now = time.perf_counter()
                yield {"replica": self.replica, "part": self.part, "step": step + 1, "quota": self.quota,
                       "loss": loss, "stages": terms, "staleness": self.staleness, "pid": os.getpid(),
                       "step_s": now - t_last, "images": int(batch.shape[0])}
                t_last = now
            dist.barrier()  # every worker's last push is acknowledged before any reports the end
        finally:
            leave_group()


class PartitionedDownpourJob:
    """Mixed into downpour.DownpourJob (see `job_class`): a replica is a group of P actors."""

    def setup_parts(self):
        self.partition = Partition.parse(self.cfg.train.partition)
        plans = plan_stages(self.cfg.model, self.partition)
        regs = []
        for k in range(self.partition.size):
            index = part_index(self.layout, plans, k)
            for s, (lo, hi) in enumerate(shard_ranges(index, self.bounds)):
                regs.append(self.shards[s].register_part.remote(k, (index[lo:hi] - self.bounds[s]).numpy()))
        self._get(regs, "the partition was registered with the parameter shards",
                  names=[f"parameter shard {s}" for _ in range(self.partition.size) for s in range(len(self.shards))])
        self.worker_cls = ray.remote(PartitionWorker)
        self.groups, self.part_gens, self.pids = {}, {}, {}

    def keys(self, replica: int) -> list[int]:
        return [replica * self.partition.size + k for k in range(self.partition.size)]

    def progress(self, replica: int) -> tuple[int, int]:
        """(last seq, local step) that EVERY worker of the replica reached on every shard."""
        keys = self.keys(replica)
        return min(self._get([s.progress.remote(key) for s in self.shards for key in keys],
                             f"asking how far replica {replica} got",
                             names=[f"parameter shard {k}" for k in range(len(self.shards)) for _ in keys]))

    def reached(self, states: list[dict], replica: int) -> int:
        return min((st["last_seq"].get(key, 0), st["last_step"].get(key, 0))
                   for st in states for key in self.keys(replica))[1]

    def start(self, r: int):
        d = self.cfg.downpour
        port = free_port()
        actors = [self.worker_cls.options(num_cpus=d.replica_cpus, num_gpus=d.replica_gpus, max_restarts=0).remote(
            r, k, self.cfg, self.dataset_ref, self.layout, self.bounds, self.shards, port)
            for k in range(self.partition.size)]
        seq, step = self.progress(r)
        self.groups[r], self.actors[r] = actors, actors[0]
        self.pids[r] = self._get([a.pid.remote() for a in actors], f"replica {r} started",
                                 names=[f"replica {r} worker {k}" for k in range(len(actors))])
        self.steps[r] = step
        self.started_at[r].append(step)
        self.joined_at.setdefault(r, sum(self.steps.values()))
        gens = [a.run.options(num_returns="streaming").remote(step, seq + 1) for a in actors]
        self.gens[r], self.part_gens[r] = gens[0], gens[1:]

    def stop_group(self, r: int):
        for a in self.groups.pop(r, []):
            try:
                ray.kill(a)
            except Exception:  # already dead
                pass
        self.part_gens.pop(r, None)
        self.gens.pop(r, None)

    def restart(self, r: int, why: Exception):
        self.stop_group(r)  # one dead worker takes its replica down: the whole group starts again
        super().restart(r, why)

    def dead_groups(self) -> list[tuple[int, Exception]]:
        """Replicas one of whose workers 1..P-1 died (their records are read and dropped here)."""
        dead = []
        for r, gens in list(self.part_gens.items()):
            for gen in list(gens):
                ready, _ = ray.wait([gen], num_returns=1, timeout=0)
                if not ready:
                    continue
                try:
                    ray.get(next(gen))
                except StopIteration:
                    gens.remove(gen)
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                    dead.append((r, e))
                    break
        return dead

    def group_failed(self, r: int) -> bool:
        """Whether any worker of replica r is dead (its worker 0 then fails in a collective)."""
        for a in self.groups.get(r, []):
            try:
                ray.get(a.pid.remote(), timeout=10)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                return True
        return False

    def finished(self, r: int):
        self.stop_group(r)  # worker 0 ends after a barrier that follows every worker's last acknowledged push

    def victim_pid(self, r: int, rec: dict) -> int:
        return self.pids[r][self.faults.get("kill_part", 0)]

    def shutdown(self):
        for r in list(self.groups):
            self.stop_group(r)
        super().shutdown()
