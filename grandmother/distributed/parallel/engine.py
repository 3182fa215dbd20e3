"""Single-node model-parallel training: one replica spread over P processes on this machine.

    grandmother train --preset small --data DIR --out RUN --model-parallel 2      # 2 row blocks
    grandmother train ... --partition 2x2                                          # a 2 x 2 grid

The parent process does what `train.train` does before training (checks, data, run directory), then
starts P workers (torch.multiprocessing, one process group over 127.0.0.1: gloo on CPU, NCCL with one
GPU per worker on CUDA). Every step, worker 0 reads the batch and broadcasts it; each worker runs its
share of the network (mp_model.py) and steps the optimizer on its own parameter slices (SGD, Adagrad
and Adam are elementwise, so this is the single-process update; gradient clipping uses the norm over
all workers). Worker 0 writes metrics.jsonl and the checkpoints.

Checkpoints keep the standard layout: the workers' slices of every parameter and of every optimizer
state are assembled on worker 0, so model.safetensors and train_state.pt are exactly those of a
single-process run (meta.json adds "model_parallel": the partition). `probe`, `report`, `load_run` read
them as any other, and a run resumes with any P, or without model parallelism, and back.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from grandmother.training.checkpoint import latest_checkpoint, load_checkpoint, read_meta, rng_state, save_checkpoint
from grandmother.training.runs import continue_run, model_signature, start_run
from grandmother.config import Config, save_config
from grandmother.data.dataset import BatchOrder
from grandmother.errors import GrandmotherError, JobFailed
from grandmother.io import append_jsonl, folder_lock
from grandmother.nn.model import build_network
from grandmother.training.optim import build_optimizer
from grandmother.training.runtime import resolve_device, sigterm_as_interrupt
from grandmother.distributed.parallel.halo import HALO_BYTES
from grandmother.distributed.parallel.launch import WorkerLost, spawn
from grandmother.distributed.parallel.mp_model import ModelParallelNetwork, clip_grad_norm_, gather_full, reduce_terms
from grandmother.distributed.parallel.partition import Partition, plan_stages


# ---------------------------------------------------------------- optimizer states, slice by slice

def _state_tensors(state: dict, names: list[str]):
    """(key, parameter name, state name) of every per-element optimizer state tensor."""
    for idx, st in state["state"].items():
        name = names[int(idx)]
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() >= 2:  # per-element state ("sum", "exp_avg", ...), not "step"
                yield idx, name, k


def slice_optimizer_state(state: dict, net: ModelParallelNetwork) -> dict:
    """A full (single-process) optimizer state_dict -> this worker's, cut like its parameters."""
    names = [n for n, _ in net.named_parameters()]
    out = copy.deepcopy({"state": {}, "param_groups": state["param_groups"]})
    for idx, st in state["state"].items():
        out["state"][idx] = dict(st)
    for idx, name, k in _state_tensors(state, names):
        out["state"][idx][k] = net.slice_full(name, state["state"][idx][k]).clone()
    return out


def gather_checkpoint(net: ModelParallelNetwork, opt, full_shapes: dict, dst: int = 0):
    """(full parameters, full optimizer state_dict) on worker `dst`; (None, None) on the others."""
    names = [n for n, _ in net.named_parameters()]
    sd = opt.state_dict()  # its per-parameter dicts are the optimizer's own: copy before replacing entries
    sd = {"state": {idx: dict(st) for idx, st in sd["state"].items()}, "param_groups": sd["param_groups"]}
    local = {name: p.detach() for name, p in net.named_parameters()}
    shapes = dict(full_shapes)
    for idx, name, k in _state_tensors(sd, names):
        local[f"{name}|{k}"] = sd["state"][idx][k]
        shapes[f"{name}|{k}"] = full_shapes[name]
    full = gather_full(net, local, shapes, dst, net.group)
    if full is None:
        return None, None
    for idx, name, k in _state_tensors(sd, names):
        sd["state"][idx][k] = full.pop(f"{name}|{k}").cpu()
    return {n: t.cpu() for n, t in full.items()}, sd


# ---------------------------------------------------------------- one worker

def _worker(rank, world, cfg: Config, partition_text: str, dataset, out_dir: str, data_path: str,
            ckpt: str | None, progress: bool, fresh_optimizer: bool = False, stop=None):
    partition = Partition.parse(partition_text)
    out_dir = Path(out_dir)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    net = ModelParallelNetwork(cfg.model, partition, rank, device=device)
    full = build_network(cfg, torch.device("cpu"))  # the seeded initialisation of train(); take our slices
    full_shapes = {n: tuple(p.shape) for n, p in full.named_parameters()}
    net.load_full(full.state_dict())
    del full
    net.train()
    net.project_norms(cfg.train.norm_control)  # as train() does at the start
    opt = build_optimizer(net.parameters(), cfg.train)
    start_step, images_seen = 0, 0
    if ckpt is not None:
        tensors, state, meta = load_checkpoint(Path(ckpt))
        net.load_full(tensors)
        if not fresh_optimizer:  # --force-resume with another train.optimizer: it starts afresh
            opt.load_state_dict(slice_optimizer_state(state["optimizer"], net))
        start_step, images_seen = meta["step"], meta["images_seen"]
        del tensors, state

    def checkpoint(step):
        tensors, opt_state = gather_checkpoint(net, opt, full_shapes)
        if rank == 0:
            meta = {"images_seen": images_seen, "model_signature": model_signature(cfg), "engine": "local",
                    "model_parallel": str(partition), "data": data_path, "dataset_size": len(dataset)}
            save_checkpoint(out_dir, step, tensors, {"optimizer": opt_state, "rng": rng_state()}, meta,
                            keep=cfg.train.keep_checkpoints)

    t = cfg.train
    c, h, w = net.input_shape
    order = BatchOrder(len(dataset), t.batch_size, t.seed)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=t.steps, initial=start_step, desc=f"train {partition}", unit="step", disable=None,
                   dynamic_ncols=True)
    last_t, last_images, t0 = time.perf_counter(), images_seen, time.perf_counter()
    last_halo, last_step = 0, start_step
    stopping = torch.zeros(1, dtype=torch.uint8, device=device)
    completed = start_step
    for step in range(start_step, t.steps):
        if stop is not None:  # Ctrl-C or SIGTERM (launch.spawn): worker 0 says for all whether to stop here
            stopping.fill_(stop.value if rank == 0 else 0)
            dist.broadcast(stopping, 0)
            if stopping.item():
                break
        if rank == 0:
            batch = dataset.get_batch(order.indices(step)).to(device)
        else:
            batch = torch.empty((t.batch_size, c, h, w), dtype=torch.uint8, device=device)
        dist.broadcast(batch, 0)
        out = net(net.prepare(batch))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if t.grad_clip > 0:
            clip_grad_norm_(net.parameters(), t.grad_clip, net.group)
        opt.step()
        net.project_norms(t.norm_control)
        images_seen += t.batch_size
        done = completed = step + 1
        if done % t.log_every == 0 or done == t.steps:
            terms = reduce_terms(out.terms, net.group)
            halo = torch.tensor([float(sum(HALO_BYTES.values()))], dtype=torch.float64, device=device)
            dist.all_reduce(halo, group=net.group)  # bytes sent by all workers so far
            halo_per_step = (float(halo) - last_halo) / (done - last_step)
            last_halo, last_step = float(halo), done
            loss = sum(v for st in terms for v in st.values())
            if not math.isfinite(loss):
                raise GrandmotherError(f"the loss became {loss} at step {done}; lower --lr (now {t.lr}) and "
                                       f"resume from the last checkpoint")
            if rank == 0:
                now = time.perf_counter()
                record = {"step": done, "images": images_seen, "loss": loss, "stages": terms,
                          "images_per_s": (images_seen - last_images) / max(now - last_t, 1e-9), "lr": t.lr,
                          "elapsed_s": now - t0, "model_parallel": str(partition),
                          "halo_bytes_per_step": halo_per_step}
                append_jsonl(out_dir / "metrics.jsonl", record)
                last_t, last_images = now, images_seen
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4g}", img_s=f"{record['images_per_s']:.0f}")
        if bar is not None:
            bar.update(1)
        if done % t.checkpoint_every == 0 and done != t.steps:
            checkpoint(done)
    if bar is not None:
        bar.close()
    if completed < t.steps:  # stopped: keep the work done so far, as train() does on an interrupt
        if completed > start_step:
            checkpoint(completed)
            if rank == 0:
                print(f"\ninterrupted: checkpoint written at step {completed}; continue with --resume")
        return
    if t.steps > start_step or ckpt is None:
        checkpoint(t.steps)


# ---------------------------------------------------------------- the entry point

def train_model_parallel(cfg: Config, data_path: Path, out_dir: Path, resume: bool = False, progress: bool = True,
                         dataset=None, force_resume: bool = False) -> dict:
    """`train.train` with the replica spread over `cfg.train.partition` workers; same run directory, opened
    by the same checks (checkpoint.start_run / continue_run).

    SIGTERM and Ctrl-C, to the parent or to any worker, end it with a checkpoint at the last completed step
    (then re-raise: exit 143 or 130); a worker that dies ends it in one line (JobFailed). The workers act
    on a signal only between steps, so a step is never cut in two. `out_dir` is locked (one writer)."""
    with folder_lock(out_dir, "train"), sigterm_as_interrupt():
        return _train_model_parallel(cfg, data_path, out_dir, resume, progress, dataset, force_resume)


def _train_model_parallel(cfg, data_path, out_dir, resume, progress, dataset, force_resume) -> dict:
    partition = Partition.parse(cfg.train.partition)
    plan_stages(cfg.model, partition)  # a partition the network cannot take fails here, before any work
    out_dir = Path(out_dir)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and torch.cuda.device_count() < partition.size:
        raise GrandmotherError(f"--partition {partition}: {partition.size} workers need as many GPUs, this machine "
                               f"has {torch.cuda.device_count()}; use --device cpu or fewer workers")
    # refuses a foreign run, a damaged one, changed settings and no data before any write
    run = start_run(out_dir, cfg, resume, "local", data_path, dataset, progress, force_resume)
    continue_run(out_dir, run, resume)  # makes the folder, removes stale .tmp-step_*, trims metrics.jsonl
    ckpt, dataset = run.ckpt, run.dataset
    if ckpt is not None:
        print(f"resuming with {partition.size} workers ({partition})")
    save_config(cfg, out_dir / "config.yaml")
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        spawn(_worker, partition.size, (cfg, str(partition), dataset, str(out_dir), str(data_path),
                                        str(ckpt) if ckpt else None, progress, run.fresh_optimizer),
              backend=backend, stoppable=True)
    except WorkerLost as e:
        last = latest_checkpoint(out_dir)
        where = f"its last checkpoint is {last.name}" if last else "it has no checkpoint yet"
        raise JobFailed(f"{e}; the run stops ({where}): continue with --resume") from None
    last = latest_checkpoint(out_dir)
    meta = read_meta(last)
    final = None
    metrics = out_dir / "metrics.jsonl"
    if metrics.is_file():
        import json
        lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
        final = json.loads(lines[-1]) if lines else None
    return {"steps": cfg.train.steps, "start_step": run.meta["step"] if run.meta else 0,
            "images_seen": meta["images_seen"], "final": final, "run_dir": str(out_dir),
            "skipped": len(run.skipped), "model_parallel": str(partition)}
