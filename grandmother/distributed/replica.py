"""Downpour SGD, part 2: a model replica (Dean et al. 2012, Algorithm 7.1, "Downpour SGD client").

A replica owns a copy of the network whose parameters are views of one flat buffer, and a flat
gradient buffer that the parameters' `.grad` are views of, so `backward()` accumulates straight into
it (no per-tensor gathering before a push, no scattering after a fetch). It trains on its own portion
of the data, `quota` minibatch steps in all:

    for each local step t:
        if t % P == 0 (or first step after a (re)start): fetch every shard's slice into the buffer
        compute the gradient of one minibatch; it adds into the flat gradient buffer
        if (t + 1) % G == 0 (or the last step): push slice k of the buffer to shard k, numbered seq

Unlike Algorithm 7.1 the replica does not apply local SGD steps between fetches: with Adagrad on the
servers, a plain-SGD step at the Adagrad rate has the wrong scale; with P = 1 (the default) both are
the same. Pushes are asynchronous: the replica waits for a push's acknowledgements only when it sends
the next one (at most one push in flight). Ray runs one caller's calls to one actor in order, so a
fetch always sees this replica's earlier pushes. An acknowledgement that does not come within
`ACK_TIMEOUT_S` is treated as lost and the same sequence number is sent again; the shards' dedup makes
that safe. `run` is a generator: after each step it yields a small record (loss, staleness, progress)
that the driver turns into metrics.
"""
from __future__ import annotations

import os
import time
import warnings

import numpy as np
import ray
import torch

from grandmother.config import Config
from grandmother.distributed.shards import FlatLayout
from grandmother.errors import GrandmotherError
from grandmother.nn.model import Network
from grandmother.data.dataset import BatchOrder
from grandmother.training.runtime import resolve_device
from grandmother.training.loop import loss_and_terms, terms_to_floats

ACK_TIMEOUT_S = 120.0
MAX_PUSH_TRIES = 3


def replica_items(n: int, replica: int, replicas: int) -> torch.Tensor | None:
    """The dataset indices of one replica's portion: every R-th image (strided, so each portion samples
    the whole dataset evenly even when it is sorted by source). One replica: None, i.e. everything."""
    return None if replicas == 1 else torch.arange(replica, n, replicas)


def replica_quota(steps: int, replica: int, replicas: int) -> int:
    """`train.steps` counts minibatch steps of all replicas together; replica r takes its share."""
    return steps // replicas + (1 if replica < steps % replicas else 0)


class Replica:
    def __init__(self, index: int, cfg: Config, dataset, layout: FlatLayout, bounds: list[int], shards: list,
                 faults: dict | None = None):
        d = cfg.downpour
        torch.set_num_threads(max(1, int(round(d.replica_cpus))))
        self.index, self.cfg, self.shards, self.bounds = index, cfg, shards, bounds
        self.device = resolve_device(d.replica_device)
        self.dataset = dataset
        self.quota = replica_quota(cfg.train.steps, index, d.replicas)
        subset = replica_items(len(dataset), index, d.replicas)
        # Replica 0 of 1 uses exactly train()'s order; others a seed of their own over their portion.
        self.order = BatchOrder(len(dataset), cfg.train.batch_size, cfg.train.seed + index, subset)
        self.faults = dict(faults or {})

        # The network as views of one flat parameter buffer and one flat gradient buffer.
        self.net = Network(cfg.model, device="meta")  # structure only: no memory for weights we overwrite
        self.flat = torch.zeros(layout.total, device=self.device)
        self.flat_grad = torch.zeros(layout.total, device=self.device)
        grads = layout.unflatten(self.flat_grad)
        for name, view in layout.unflatten(self.flat).items():
            owner, attr = name.rsplit(".", 1)
            param = torch.nn.Parameter(view)
            param.grad = grads[name]
            setattr(self.net.get_submodule(owner), attr, param)
        self.net.to(self.device).train()
        # Pushes and fetches go through host memory; on CPU the host buffers ARE the device buffers.
        on_cpu = self.device.type == "cpu"
        self.host_grad = self.flat_grad if on_cpu else torch.empty(layout.total, pin_memory=True)
        self.fetched_version = 0
        self.pending = None  # (seq, step_end, refs, version its gradient was computed at) of the push in flight
        self.staleness = 0

    # ------------------------------------------------------------ talking to the shards

    def _fetch(self):
        parts = ray.get([s.fetch.remote() for s in self.shards])
        versions = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the arrays are read-only; we only read them
            for k, (arr, version) in enumerate(parts):
                # One copy per slice, straight into place (the array is a view of the object store).
                self.flat[self.bounds[k]:self.bounds[k + 1]].copy_(torch.from_numpy(np.asarray(arr)))
                versions.append(version)
        self.fetched_version = max(versions)

    def _await_pending(self):
        """Wait for the push in flight; re-send it (same seq) if its acknowledgement is lost."""
        if self.pending is None:
            return
        seq, step_end, refs, fetched = self.pending
        for attempt in range(1, MAX_PUSH_TRIES + 1):
            try:
                if self.faults.get("lose_ack") == seq:  # test hook: pretend this ack never arrived
                    self.faults.pop("lose_ack")
                    raise ray.exceptions.GetTimeoutError(f"simulated lost ack for push {seq}")
                acks = ray.get(refs, timeout=ACK_TIMEOUT_S)
                break
            except ray.exceptions.GetTimeoutError:
                if attempt == MAX_PUSH_TRIES:
                    raise
                # The gradient buffer was zeroed after sending; the shards that already applied this
                # seq ignore the re-send, the others (if any) get the same gradient from the object store.
                refs = self._resend(seq, step_end)
        self.staleness = max(a["version"] for a in acks) - fetched
        self.pending = None

    def _resend(self, seq, step_end):
        return [s.push.remote(self.index, seq, step_end, grad_ref)
                for s, grad_ref in zip(self.shards, self._sent_slices)]

    def _push(self, seq: int, step_end: int):
        self._await_pending()
        if self.host_grad is not self.flat_grad:
            self.host_grad.copy_(self.flat_grad)
        clip = self.cfg.train.grad_clip
        if clip > 0:  # on the accumulated gradient: with G = 1 the same as single-device training
            norm = float(self.host_grad.norm())
            if norm > clip:
                self.host_grad.mul_(clip / (norm + 1e-6))
        host = self.host_grad.numpy()
        # Put each slice in the object store once; the push (and a possible re-send) refers to it.
        self._sent_slices = [ray.put(host[self.bounds[k]:self.bounds[k + 1]]) for k in range(len(self.shards))]
        refs = [s.push.remote(self.index, seq, step_end, ref) for s, ref in zip(self.shards, self._sent_slices)]
        self.pending = (seq, step_end, refs, self.fetched_version)
        self.flat_grad.zero_()

    # ------------------------------------------------------------ the training loop

    def run(self, start_step: int, next_seq: int):
        """Train local steps start_step .. quota-1; yield one record per step."""
        d = self.cfg.downpour
        seq, t_last = next_seq, time.perf_counter()
        for step in range(start_step, self.quota):
            if step == start_step or step % d.fetch_every == 0:
                self._fetch()
            batch = self.dataset.get_batch(self.order.indices(step)).to(self.device, non_blocking=True)
            loss, terms = loss_and_terms(self.net, batch)
            loss.backward()  # accumulates into self.flat_grad through the .grad views
            loss_value = loss.item()
            if not np.isfinite(loss_value):
                raise GrandmotherError(f"replica {self.index}: the loss became {loss_value} at its step {step + 1}; "
                                       f"lower --lr (now {self.cfg.train.lr}) and resume from the last checkpoint")
            pushed = (step + 1) % d.push_every == 0 or step + 1 == self.quota
            if pushed:
                self._push(seq, step + 1)
                seq += 1
                if step + 1 == self.quota:
                    self._await_pending()
            now = time.perf_counter()
            yield {"replica": self.index, "step": step + 1, "quota": self.quota, "loss": loss_value,
                   "stages": terms_to_floats(terms), "staleness": self.staleness, "pid": os.getpid(),
                   "step_s": now - t_last, "images": int(batch.shape[0])}
            t_last = now
