"""Single-device training of the network (CPU or one GPU).

    grandmother train --preset small --data grandmother/sample/train --out runs/small --steps 300
    grandmother train ... --resume          # continue the run in --out from its latest checkpoint

Resume is exact: the data order is a pure function of (seed, step) and the checkpoint holds the
optimizer and RNG states, so N steps in one go and N/2 + resume N/2 give identical parameters on CPU.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from grandmother.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from grandmother.training.runs import continue_run, model_signature, start_run
from grandmother.config import Config, save_config
from grandmother.data.dataset import BatchOrder, load_batches
from grandmother.errors import GrandmotherError
from grandmother.io import append_jsonl, folder_lock
from grandmother.nn.model import Network, build_network
from grandmother.training.optim import build_optimizer, load_optimizer_state
from grandmother.training.runtime import resolve_device, seed_everything, sigterm_as_interrupt, step_is_atomic

# A test hook: step_points(point, step) is called at every point of a training step ("batch", "gradients",
# "update", "projected", "counted", "logged", "checkpointed", "end"), so tests/test_faults.py can signal there.
step_points = None


def _at(point: str, step: int) -> None:
    if step_points is not None:
        step_points(point, step)


# ---------------------------------------------------------------- one training step (also what `bench` times)

def loss_and_terms(net: Network, images: torch.Tensor):
    """Forward with the objective on one uint8 batch; returns (loss tensor, per-stage term tensors)."""
    out = net(net.prepare(images), objective=True)
    return out.loss, out.terms


def active_stage(train_cfg, step: int, num_stages: int) -> int | None:
    """The one stage that learns at `step` under train.schedule=greedy (equal phases, bottom up); None = all."""
    if train_cfg.schedule != "greedy":
        return None
    return min(num_stages - 1, step * num_stages // max(1, train_cfg.steps))


def gradients(net: Network, opt: torch.optim.Optimizer, batch: torch.Tensor, train_cfg, stage: int | None = None):
    """The gradients of one step on one uint8 batch: objective, backward, optional clipping
    (train.grad_clip). Nothing the checkpoint holds changes here. `stage` (greedy schedule): only that
    stage's objective is minimised, so only its weights move (stage gradients are local). Returns the
    network's output on the batch (loss, per-stage terms, activations)."""
    out = net(net.prepare(batch), objective=True)
    opt.zero_grad(set_to_none=True)
    t = out.terms[stage] if stage is not None else None
    (out.loss if t is None else t["reconstruction"] + t["sparsity"]).backward()
    if train_cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(net.parameters(), train_cfg.grad_clip)
    return out


def train_step(net: Network, opt: torch.optim.Optimizer, batch: torch.Tensor, train_cfg, stage: int | None = None):
    """One optimizer step on one uint8 batch: `gradients`, the update, then the norm projection
    (train.norm_control). Returns the network's output on the batch before the update."""
    out = gradients(net, opt, batch, train_cfg, stage)
    opt.step()
    net.project_norms(train_cfg.norm_control)
    return out


def terms_to_floats(terms) -> list[dict[str, float]]:
    return [{k: float(v.detach()) for k, v in t.items()} for t in terms]


# ---------------------------------------------------------------- the training function

def train(cfg: Config, data_path: Path, out_dir: Path, resume: bool = False, progress: bool = True,
          dataset=None, force_resume: bool = False) -> dict:
    """Train `cfg` on the images at `data_path`, writing to `out_dir`. Returns a summary dict.

    SIGTERM and Ctrl-C both end it with a checkpoint at the last completed step (then re-raise); within a
    step they wait for its end (step_is_atomic). One writer per run folder: `out_dir` is locked."""
    with folder_lock(out_dir, "train"), sigterm_as_interrupt():
        return _train(cfg, data_path, out_dir, resume, progress, dataset, force_resume)


def _train(cfg, data_path, out_dir, resume, progress, dataset, force_resume) -> dict:
    # ============ setup ============
    out_dir = Path(out_dir)
    device = resolve_device(cfg.train.device)
    # refuses a foreign run, a damaged one, changed settings and no data before any write
    run = start_run(out_dir, cfg, resume, "local", data_path, dataset, progress, force_resume)
    continue_run(out_dir, run, resume)
    ckpt, fresh_optimizer, dataset, skipped = run.ckpt, run.fresh_optimizer, run.dataset, run.skipped
    seed_everything(cfg.train.seed)
    order = BatchOrder(len(dataset), cfg.train.batch_size, cfg.train.seed)

    # ============ model and optimizer ============
    net = build_network(cfg, device)
    net.project_norms(cfg.train.norm_control)
    net.train()
    opt = build_optimizer(net.parameters(), cfg.train)
    start_step, images_seen = 0, 0

    # ============ resume ============
    if ckpt is not None:
        tensors, state, meta = load_checkpoint(ckpt, map_location=device)
        try:
            net.load_state_dict(tensors)
        except RuntimeError as e:
            raise GrandmotherError(f"{ckpt / 'model.safetensors'} does not fit the model: "
                                   f"{str(e).strip().splitlines()[0].rstrip(':.')}") from None
        if fresh_optimizer:
            print(f"--force-resume: the {cfg.train.optimizer} optimizer starts afresh (the checkpoint's state "
                  f"belongs to another optimizer)")
        else:
            load_optimizer_state(opt, state["optimizer"], cfg.train, ckpt)
        set_rng_state(state["rng"])
        start_step, images_seen = meta["step"], meta["images_seen"]
    save_config(cfg, out_dir / "config.yaml")

    def checkpoint(step):
        meta = {"images_seen": images_seen, "model_signature": model_signature(cfg), "engine": "local",
                "data": None if data_path is None else str(Path(data_path).resolve()), "dataset_size": len(dataset)}
        save_checkpoint(out_dir, step, net.state_dict(), {"optimizer": opt.state_dict(), "rng": rng_state()}, meta,
                        keep=cfg.train.keep_checkpoints)

    # ============ training loop ============
    steps = cfg.train.steps
    metrics_path = out_dir / "metrics.jsonl"
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=start_step, desc="train", unit="step", disable=None, dynamic_ncols=True)
    completed = saved = start_step
    last = {"t": time.perf_counter(), "images": images_seen}
    t0 = time.perf_counter()
    record = None

    def log(done, loss, terms, out) -> dict:
        """One metrics.jsonl line for step `done`."""
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise GrandmotherError(f"the loss became {loss_value} at step {done}; lower --lr "
                                   f"(now {cfg.train.lr}) and resume from the last checkpoint")
        now = time.perf_counter()
        stages = [{**t, **d} for t, d in zip(terms_to_floats(terms), net.diagnostics(out))]
        rec = {"step": done, "images": images_seen, "loss": loss_value, "stages": stages,
               "images_per_s": (images_seen - last["images"]) / max(now - last["t"], 1e-9),
               "lr": cfg.train.lr, "elapsed_s": now - t0}
        append_jsonl(metrics_path, rec)
        last.update(t=now, images=images_seen)
        if bar is not None:
            bar.set_postfix(loss=f"{loss_value:.4g}", img_s=f"{rec['images_per_s']:.0f}")
        return rec

    try:
        # Batches in step order, decoded by train.num_workers background processes when > 0; the order
        # stays a function of (seed, step), so resume is exact with or without workers.
        batches = load_batches(dataset, (order.indices(s) for s in range(start_step, steps)),
                               workers=cfg.train.num_workers, pin_memory=device.type == "cuda")
        for step, batch in zip(range(start_step, steps), batches):
            batch = batch.to(device, non_blocking=True)
            _at("batch", step)
            out = gradients(net, opt, batch, cfg.train, active_stage(cfg.train, step, len(net.stages)))
            _at("gradients", step)  # a signal up to here drops the step: nothing was changed yet
            with step_is_atomic():  # the update and all that counts it: a signal waits for the end
                opt.step()
                _at("update", step)
                net.project_norms(cfg.train.norm_control)
                _at("projected", step)
                loss, terms = out.loss, out.terms
                images_seen += batch.shape[0]
                done = completed = step + 1
                _at("counted", step)
                if done % cfg.train.log_every == 0 or done == steps:
                    record = log(done, loss, terms, out)
                    _at("logged", step)
                if done % cfg.train.checkpoint_every == 0 and done != steps:
                    checkpoint(done)
                    saved = done
                    _at("checkpointed", step)
            if bar is not None:
                bar.update(1)
            _at("end", step)
    except KeyboardInterrupt:
        # Keep the work done so far: a checkpoint at the last completed step, then stop.
        if completed > start_step:
            if completed != saved:
                checkpoint(completed)
            print(f"\ninterrupted: checkpoint written at step {completed}; continue with --resume")
        raise
    finally:
        if bar is not None:
            bar.close()

    # ============ final checkpoint ============
    if steps > start_step or ckpt is None:
        with step_is_atomic():
            checkpoint(steps)
    return {"steps": steps, "start_step": start_step, "images_seen": images_seen, "final": record,
            "run_dir": str(out_dir), "skipped": len(skipped)}
