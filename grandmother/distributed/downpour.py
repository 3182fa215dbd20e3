"""Downpour SGD on Ray (Dean et al. 2012): asynchronous model replicas and sharded parameter servers.

    grandmother train --engine downpour --replicas 2 --ps-shards 2 --fetch-every 1 --push-every 1 ...

The driver (this module) starts K parameter-server shard actors (grandmother/downpour_ps.py) and R
replica actors (grandmother/downpour_replica.py), streams the replicas' per-step records into one
progress bar and `metrics.jsonl`, restarts replicas that die, and writes checkpoints in the standard
run-directory layout (grandmother/checkpoint.py), so `load_run` and `--resume` work as for `train()`.

Choices (also in docs/downpour.md):
- `train.steps` counts minibatch steps of ALL replicas together (replica r runs its share), so a
  downpour run and a local run with the same steps have seen the same number of images.
- Replica r trains on every R-th image (indices r, r+R, ...), in the seeded order BatchOrder(seed + r).
  One replica uses exactly the single-device order.
- Staleness of a push = PS updates applied (by any replica) between this replica's last fetch and the
  push being applied.
- A restarted replica asks the shards how far it got (the smallest last-applied sequence number over
  the shards, and the local step that push ended at), fetches the current parameters and continues its
  portion from there; pushes the other shards already applied are ignored by sequence number.
- Checkpoints: every `downpour.ps_checkpoint_every` PS updates, on Ctrl-C and at the end, the driver
  collects every shard's state (parameter slice, optimizer state, per-replica progress) and writes one
  checkpoint: model.safetensors with the full parameter set, train_state.pt with the shard states,
  meta.json with the shard layout. The driver collects rather than each shard writing its own file so
  that a cluster needs no shared file system. Shards snapshot independently (a few updates apart);
  each shard's own progress record keeps resume exact per shard.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import ray
import torch

from grandmother.training.checkpoint import latest_checkpoint, load_checkpoint, read_meta, rng_state, save_checkpoint
from grandmother.training.runs import continue_run, model_signature, start_run
from grandmother.config import Config, save_config
from grandmother.distributed.ray_local import clean_dead_sessions, no_dashboard, ray_get, recorded_session, temp_root
from grandmother.distributed.shards import FlatLayout, ParamShard, shard_bounds
from grandmother.distributed.replica import Replica
from grandmother.errors import GrandmotherError, JobFailed
from grandmother.io import append_jsonl, folder_lock
from grandmother.nn.model import build_network
from grandmother.training.runtime import seed_everything, sigterm_as_interrupt

MAX_RESTARTS = 3  # per replica; a replica that keeps dying is a bug, not bad luck


# ---------------------------------------------------------------- checks before any work

def check_resume_layout(meta: dict, cfg: Config, where: Path) -> None:
    d = cfg.downpour
    shards = meta.get("ps_layout", {}).get("shards")
    if shards != d.ps_shards:
        raise GrandmotherError(f"checkpoint {where} has {shards} parameter-server shards, this run asks for "
                               f"--ps-shards {d.ps_shards}; resume with --ps-shards {shards}")
    if meta.get("model_parallel", "") != cfg.train.partition:
        raise GrandmotherError(f"checkpoint {where} was trained with --partition '{meta.get('model_parallel', '')}', "
                               f"this run asks for '{cfg.train.partition}' (the shards count pushes per "
                               f"process); resume with the same partition")
    if meta.get("replicas") != d.replicas:
        raise GrandmotherError(f"checkpoint {where} was trained by {meta.get('replicas')} replicas (one data portion "
                               f"each), this run asks for --replicas {d.replicas}; resume with --replicas "
                               f"{meta.get('replicas')}")


def _parts(cfg: Config) -> int:
    if not cfg.train.partition:
        return 1
    from grandmother.distributed.parallel.partition import Partition
    return Partition.parse(cfg.train.partition).size


def check_resources(cfg: Config, cpus: float, gpus: float, where: str) -> None:
    d = cfg.downpour
    parts = _parts(cfg)  # processes per replica (model parallelism)
    need_cpu, need_gpu = d.replicas * parts * d.replica_cpus, d.replicas * parts * d.replica_gpus
    if need_cpu > cpus + 1e-9:
        raise GrandmotherError(f"--replicas {d.replicas} x --replica-cpus {d.replica_cpus:g} needs {need_cpu:g} CPUs, "
                               f"{where} has {cpus:g}; lower --replicas or --replica-cpus")
    if need_gpu > gpus + 1e-9:
        raise GrandmotherError(f"--replicas {d.replicas} x --replica-gpus {d.replica_gpus:g} needs {need_gpu:g} GPUs, "
                               f"{where} has {gpus:g}; lower --replicas or --replica-gpus")


def check_replica_settings(cfg: Config) -> None:
    """What config.validate checks that depends on the engine, again here: callers may set the engine after
    the config was validated (the other downpour.* values are checked by config.validate)."""
    if cfg.train.norm_control != "none":
        raise GrandmotherError(f"train.norm_control={cfg.train.norm_control}: the Downpour engine does not project "
                               f"norms; use --set train.norm_control=none with --engine downpour")


def check_address_reachable(address: str, timeout_s: float = 3.0) -> None:
    """A quick TCP connect to HOST:PORT, so an unreachable cluster fails in seconds with one line."""
    if address == "auto":
        return  # ray.init(address="auto") itself fails fast when no cluster is running here
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise GrandmotherError(f"--ray-address {address!r}: expected 'auto' or HOST:PORT (e.g. 10.0.0.1:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise GrandmotherError(f"--ray-address {address}: no Ray cluster reachable there ({e.strerror or e}); "
                               f"start one with `ray start --head` or omit --ray-address") from None


def connect_ray(cfg: Config) -> bool:
    """Start an embedded Ray or join a cluster; True if this call started/joined it (and must shut it down).

    The one place that calls ray.init. The embedded instance listens on 127.0.0.1 only (GCS, raylet,
    object manager, workers) and starts no dashboard process; authentication stays at Ray's default (token
    authentication in Ray >= 2.5x, the token in ~/.ray/auth_token). docs/safety.md says how a cluster is
    secured and how to turn authentication off.
    """
    d = cfg.downpour
    if ray.is_initialized():  # the caller (a test, a notebook) owns Ray; use it as it is
        return False
    quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
    if d.ray_address:
        host = d.ray_address.split("://", 1)[-1].rpartition(":")[0]
        try:
            if host in ("127.0.0.1", "localhost"):  # a cluster on this machine's loopback: join it as a loopback node
                with _loopback_node():
                    ray.init(address=d.ray_address, _node_ip_address=LOOPBACK, **quiet)
            else:
                ray.init(address=d.ray_address, **quiet)
        except Exception as e:  # Ray raises ConnectionError, RuntimeError, ValueError... for a bad address
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise GrandmotherError(f"--ray-address {d.ray_address}: cannot join a Ray cluster ({first})") from None
    else:
        ctx = start_local_ray(num_cpus=os.cpu_count() or 1, num_gpus=torch.cuda.device_count(),
                              object_store_memory=d.object_store_memory, **quiet)
        print(f"Ray: embedded instance on {ctx.address_info['gcs_address']} (listening on 127.0.0.1 only, "
              f"dashboard off)", file=sys.stderr)
    return True


LOOPBACK = "127.0.0.1"


@contextmanager
def _loopback_node():
    """Within the block, Ray keeps a node address of 127.0.0.1 instead of replacing it by the machine's
    outward address (see start_local_ray)."""
    from ray._private import ray_constants
    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def start_local_ray(**kwargs):
    """ray.init() of a new single-machine instance bound to 127.0.0.1, no dashboard process; its RayContext.

    Ray binds its gRPC servers to 127.0.0.1 only when the node's address is literally 127.0.0.1, and on
    Linux it replaces a given 127.0.0.1 by the machine's outward address unless its "no cluster" mode (the
    one Ray uses on macOS and Windows) is on. That mode is switched on for the call and checked after it.
    First, what the instances of earlier drivers killed with SIGKILL left is cleaned up (ray_local.py).
    """
    root = temp_root(kwargs)
    clean_dead_sessions(root)
    with recorded_session(root) as session, _loopback_node(), no_dashboard():
        # address="local": a new instance even where `ray start` left a cluster running on this machine.
        ctx = ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False, **kwargs)
        session["session"] = ctx.address_info.get("session_dir")
    info = dict(ctx.address_info)
    if info.get("node_ip_address") != LOOPBACK:
        ray.shutdown()
        raise GrandmotherError(f"the embedded Ray instance would listen on {info.get('node_ip_address')}, not "
                               f"{LOOPBACK} (Ray {ray.__version__}); start a cluster yourself and pass --ray-address")
    return ctx


# ---------------------------------------------------------------- the driver

class DownpourJob:
    """The actors of one run and the bookkeeping the driver keeps about them."""

    def __init__(self, cfg: Config, out_dir: Path, data_path, dataset, flat: torch.Tensor, layout: FlatLayout,
                 shard_states: list, faults: dict | None):
        d = cfg.downpour
        self.cfg, self.out_dir, self.data_path, self.layout = cfg, out_dir, data_path, layout
        self.dataset_size = len(dataset)
        self.bounds = shard_bounds(layout.total, d.ps_shards)
        self.faults = dict(faults or {})
        shard_cls = ray.remote(num_cpus=0)(ParamShard)
        self.shards = [shard_cls.remote(k, flat[self.bounds[k]:self.bounds[k + 1]].numpy(), cfg.train, shard_states[k])
                       for k in range(d.ps_shards)]
        self._get([s.ping.remote() for s in self.shards], "the parameter shards started")
        self.dataset_ref = ray.put(dataset)  # one copy in the object store; replicas on a node share it
        self.replica_cls = ray.remote(Replica)
        self.actors, self.gens, self.restarts = {}, {}, {r: 0 for r in range(d.replicas)}
        self.steps = {}  # replica -> local steps done
        self.started_at = {r: [] for r in range(d.replicas)}  # replica -> local step of each (re)start
        self.joined_at = {}  # replica -> steps of the whole job done when it first started (warm start)

    def _get(self, refs: list, what: str, timeout: float | None = None, names: list[str] | None = None):
        """ray.get of one call to each parameter shard (or to the actors `names` names): a lost one ends the
        job in one line (JobFailed) that names it and the checkpoint the run continues from."""
        try:
            return ray_get(refs, what, names or [f"parameter shard {k}" for k in range(len(refs))], timeout)
        except JobFailed as e:
            last = latest_checkpoint(self.out_dir, quiet=True)
            where = f"the last checkpoint is {last.name}" if last else "there is no checkpoint yet"
            raise JobFailed(f"{e}; the job stops ({where}): continue with --resume") from None

    def progress(self, replica: int) -> tuple[int, int]:
        """(last seq, local step) this replica's pushes reached on EVERY shard (the smallest seq)."""
        return min(self._get([s.progress.remote(replica) for s in self.shards], f"asking how far replica "
                             f"{replica} got"))

    def start(self, r: int):
        d = self.cfg.downpour
        faults = {"lose_ack": self.faults["lose_ack"][1]} if self.faults.get("lose_ack", (None,))[0] == r \
            and self.restarts[r] == 0 else {}
        actor = self.replica_cls.options(num_cpus=d.replica_cpus, num_gpus=d.replica_gpus, max_restarts=0).remote(
            r, self.cfg, self.dataset_ref, self.layout, self.bounds, self.shards, faults)
        seq, step = self.progress(r)
        self.actors[r] = actor
        self.steps[r] = step
        self.started_at[r].append(step)
        self.joined_at.setdefault(r, sum(self.steps.values()))
        self.gens[r] = actor.run.options(num_returns="streaming").remote(step, seq + 1)

    def restart(self, r: int, why: Exception):
        self.dead_shard_check()
        self.restarts[r] += 1
        if self.restarts[r] > MAX_RESTARTS:
            raise GrandmotherError(f"replica {r} died {self.restarts[r]} times (last: {type(why).__name__}); giving up")
        logging.getLogger(__name__).warning("replica %d died (%s); restarting it", r, type(why).__name__)
        self.start(r)

    def dead_shard_check(self):
        self._get([s.ping.remote() for s in self.shards], "checking on the parameter shards", timeout=30)

    def checkpoint(self):
        """Collect every shard's state and write one checkpoint in the standard layout."""
        states = self._get([s.state.remote() for s in self.shards], "the driver collected a checkpoint")
        flat = torch.from_numpy(np.concatenate([np.asarray(st.pop("params")) for st in states]))
        d = self.cfg.downpour
        # The resume point of each replica: the step its pushes reached on every shard.
        reached = [self.reached(states, r) for r in range(d.replicas)]
        step = sum(reached)
        meta = {"images_seen": step * self.cfg.train.batch_size, "model_signature": model_signature(self.cfg),
                "engine": "downpour",
                "data": None if self.data_path is None else str(Path(self.data_path).resolve()),
                "dataset_size": self.dataset_size,
                "replicas": d.replicas, "replica_steps": reached, "ps_updates": min(st["version"] for st in states),
                "ps_layout": {"shards": d.ps_shards, "bounds": self.bounds}}
        if self.cfg.train.partition:
            meta["model_parallel"] = self.cfg.train.partition
        save_checkpoint(self.out_dir, step, self.layout.unflatten(flat), {"ps_shards": states, "rng": rng_state()},
                        meta, keep=self.cfg.train.keep_checkpoints)
        return step

    def reached(self, states: list[dict], replica: int) -> int:
        """The local step this replica's pushes reached on every shard (its resume point)."""
        return min((st["last_seq"].get(replica, 0), st["last_step"].get(replica, 0)) for st in states)[1]

    # Hooks for replicas made of several processes (grandmother/parallel/downpour_mp.py); no-ops here.
    def dead_groups(self) -> list:
        return []

    def group_failed(self, replica: int) -> bool:
        return False

    def finished(self, replica: int) -> None:
        pass

    def victim_pid(self, replica: int, rec: dict) -> int:
        return rec["pid"]

    def push_counts(self) -> list[dict]:
        return self._get([s.push_counts.remote() for s in self.shards], "the driver collected the push counts")

    def shutdown(self):
        for a in list(self.actors.values()) + self.shards:
            try:
                ray.kill(a)
            except Exception:  # already dead
                pass


def train_downpour(cfg: Config, data_path: Path, out_dir: Path, resume: bool = False, progress: bool = True,
                   dataset=None, faults: dict | None = None, force_resume: bool = False) -> dict:
    """Train `cfg` with Downpour SGD; the same inputs, outputs and run directory as `train.train`.

    `faults` is a test hook: {"kill": (replica, local_step)} SIGKILLs that replica's process once it
    reports the step; {"lose_ack": (replica, seq)} makes that replica treat that push's ack as lost.
    SIGTERM and Ctrl-C both end it with a checkpoint of what the shards hold. A lost parameter shard ends it
    in one line (JobFailed). `out_dir` is locked (one writer).
    """
    with folder_lock(out_dir, "train"), sigterm_as_interrupt():
        return _train_downpour(cfg, data_path, out_dir, resume, progress, dataset, faults, force_resume)


def _train_downpour(cfg, data_path, out_dir, resume, progress, dataset, faults, force_resume) -> dict:
    d, out_dir = cfg.downpour, Path(out_dir)
    # ============ checks before any work ============
    check_replica_settings(cfg)
    if cfg.train.partition:
        from grandmother.distributed.parallel.downpour_mp import check_partitioned_downpour
        from grandmother.distributed.parallel.partition import check_partition
        check_partition(cfg)
        check_partitioned_downpour(cfg)
    if ray.is_initialized():  # a caller's Ray (tests, notebooks): check against what it has
        res = ray.cluster_resources()
        check_resources(cfg, res.get("CPU", 0), res.get("GPU", 0), "the running Ray instance")
    elif d.ray_address:
        check_address_reachable(d.ray_address)
    else:
        check_resources(cfg, os.cpu_count() or 1, torch.cuda.device_count(), "this machine")
    # refuses a foreign run, a damaged one, changed settings and no data before any write; data as train() reads it
    run = start_run(out_dir, cfg, resume, "downpour", data_path, dataset, progress, force_resume,
                    check=check_resume_layout)
    ckpt, fresh_optimizer, dataset, skipped = run.ckpt, run.fresh_optimizer, run.dataset, run.skipped
    if len(dataset) < d.replicas:
        raise GrandmotherError(f"{len(dataset)} training image(s) in {data_path} cannot be split into "
                               f"--replicas {d.replicas} portions")

    # ============ initial parameters: seeded init or the checkpoint ============
    seed_everything(cfg.train.seed)
    net = build_network(cfg, torch.device("cpu"))
    layout = FlatLayout.of((n, p.shape) for n, p in net.named_parameters())
    shard_states = [None] * d.ps_shards
    if ckpt is not None:
        tensors, state, meta = load_checkpoint(ckpt)
        try:
            flat = layout.flatten(tensors)
        except (KeyError, RuntimeError) as e:
            raise GrandmotherError(f"{ckpt / 'model.safetensors'} does not fit the model ({type(e).__name__}: "
                                   f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
        shard_states = state["ps_shards"]
        if fresh_optimizer:
            print(f"--force-resume: the {cfg.train.optimizer} optimizer starts afresh on every shard")
            shard_states = [{**st, "optimizer": None} for st in shard_states]
    else:
        flat = layout.flatten(dict(net.named_parameters()))
    del net

    # ============ Ray; the run directory is written only once the cluster is known to fit ============
    owns_ray = connect_ray(cfg)
    job = None
    try:
        res = ray.cluster_resources()
        check_resources(cfg, res.get("CPU", 0), res.get("GPU", 0), "the Ray cluster")
        continue_run(out_dir, run, resume)  # makes the folder, removes stale .tmp-step_*, trims metrics.jsonl
        save_config(cfg, out_dir / "config.yaml")
        with sigterm_as_interrupt():  # again: ray.init installed its own SIGTERM handler, which aborts
            job_cls = DownpourJob
            if cfg.train.partition:  # each replica a group of processes, one per block of the partition
                from grandmother.distributed.parallel.downpour_mp import PartitionedDownpourJob
                job_cls = type("PartitionedJob", (PartitionedDownpourJob, DownpourJob), {})
            job = job_cls(cfg, out_dir, data_path, dataset, flat, layout, shard_states, faults)
            if cfg.train.partition:
                job.setup_parts()
            return _drive(job, cfg, out_dir, ckpt, skipped, progress)
    finally:
        if job is not None:
            job.shutdown()
        if owns_ray:
            ray.shutdown()


def _drive(job: DownpourJob, cfg: Config, out_dir: Path, ckpt, skipped, progress: bool) -> dict:
    d, t = cfg.downpour, cfg.train
    kill = job.faults.get("kill")
    killed = False
    # Warm start (DistBelief): replica 0 trains alone for warmstart_steps before the others join.
    waiting = list(range(1, d.replicas))
    job.start(0)
    if d.warmstart_steps <= 0 or job.steps[0] >= d.warmstart_steps:
        for r in waiting:
            job.start(r)
        waiting = []
    start_total = sum(job.steps.values()) + sum(job.progress(r)[1] for r in waiting)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=t.steps, initial=min(start_total, t.steps), desc="downpour", unit="step", disable=None,
                   dynamic_ncols=True)
    latest, worked = {}, False
    last_log = {"t": time.perf_counter(), "total": start_total, "steps": dict(job.steps)}
    t0, record = time.perf_counter(), None
    updates_done = lambda: sum(math.ceil(s / d.push_every) for s in job.steps.values())  # noqa: E731
    logged_total, ckpt_updates = start_total, updates_done()
    try:
        while job.gens:
            ready, _ = ray.wait(list(job.gens.values()), num_returns=1, timeout=1.0)
            for r, e in job.dead_groups():  # a replica's other process died: restart the replica
                job.restart(r, e)
                ready = [g for g in ready if g in job.gens.values()]
            for gen in ready:
                r = next(k for k, g in job.gens.items() if g is gen)
                try:
                    rec = ray.get(next(gen))
                except StopIteration:
                    del job.gens[r]
                    job.finished(r)
                    continue
                except ray.exceptions.RayActorError as e:
                    del job.gens[r]
                    job.restart(r, e)
                    continue
                except ray.exceptions.RayError as e:  # a task error, a lost object: one line, whatever it is
                    if job.group_failed(r):  # a collective failed because another process of r died
                        del job.gens[r]
                        job.restart(r, e)
                        continue
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, GrandmotherError):
                        raise GrandmotherError(str(cause)) from None
                    job.dead_shard_check()
                    first = (str(cause or e).strip().splitlines() or [""])[0][:200]
                    raise JobFailed(f"replica {r} failed ({type(cause or e).__name__}: {first}); the job stops: "
                                    f"continue from the last checkpoint with --resume") from None
                worked = True
                latest[r], job.steps[r] = rec, rec["step"]
                if kill and not killed and r == kill[0] and rec["step"] >= kill[1]:
                    os.kill(job.victim_pid(r, rec), signal.SIGKILL)  # test hook: a replica process dies mid-run
                    killed = True
            if waiting and (job.steps[0] >= d.warmstart_steps or 0 not in job.gens):
                for w in waiting:
                    job.start(w)
                waiting = []
            total = sum(job.steps.values())
            if bar is not None:
                bar.update(max(0, min(total, t.steps) - bar.n))
            crossed = total // t.log_every > logged_total // t.log_every
            if latest and (crossed or (not job.gens and total != logged_total)):
                record = _metrics_record(job, cfg, latest, last_log, total, t0)
                append_jsonl(out_dir / "metrics.jsonl", record)
                logged_total = total
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4g}", img_s=f"{record['images_per_s']:.0f}",
                                    stale=max(x["staleness"] for x in record["replicas"]))
            updates = updates_done()  # PS updates so far (each push is one update on every shard)
            if updates // d.ps_checkpoint_every > ckpt_updates // d.ps_checkpoint_every and job.gens:
                job.checkpoint()
                ckpt_updates = updates
    except KeyboardInterrupt:
        step = job.checkpoint()  # on shutdown: keep what the shards have
        print(f"\ninterrupted: checkpoint written at step {step}; continue with --resume")
        raise
    finally:
        if bar is not None:
            bar.close()
    counts = job.push_counts()
    final_step = job.checkpoint() if worked or ckpt is None else read_meta(ckpt)["step"]
    return {"steps": t.steps, "start_step": start_total, "images_seen": final_step * t.batch_size, "final": record,
            "run_dir": str(out_dir),
            "skipped": len(skipped), "restarts": dict(job.restarts), "started_at": job.started_at,
            "joined_at": job.joined_at, "push_counts": counts, "checkpoint_step": final_step}


def _metrics_record(job: DownpourJob, cfg: Config, latest: dict, last_log: dict, total: int, t0: float) -> dict:
    """One metrics.jsonl line for the whole job: the standard fields plus a per-replica breakdown."""
    now, b = time.perf_counter(), cfg.train.batch_size
    dt = max(now - last_log["t"], 1e-9)
    replicas = []
    for r in sorted(latest):
        rec = latest[r]
        done = job.steps[r] - last_log["steps"].get(r, job.steps[r])
        replicas.append({"replica": r, "step": job.steps[r], "loss": rec["loss"], "staleness": rec["staleness"],
                         "images_per_s": max(done, 0) * b / dt, "restarts": job.restarts[r]})
    first = next(iter(latest.values()))["stages"]  # each stage's terms, averaged over the replicas' latest steps
    stages = [{k: float(np.mean([rec["stages"][s][k] for rec in latest.values()])) for k in first[s]}
              for s in range(len(first))]
    record = {"step": total, "images": total * b, "loss": float(np.mean([x["loss"] for x in latest.values()])),
              "stages": stages, "images_per_s": max(total - last_log["total"], 0) * b / dt, "lr": cfg.train.lr,
              "elapsed_s": now - t0, "engine": "downpour", "replicas": replicas}
    last_log.update(t=now, total=total, steps=dict(job.steps))
    return record
