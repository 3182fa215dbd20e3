"""Downpour SGD, part 1: the flat parameter layout and the parameter-server shards.

Every parameter tensor of the network (in `named_parameters` order, which is also the checkpoint's
`state_dict` order) is laid end to end in ONE flat float32 vector. Shard k of K owns the contiguous
range `bounds[k]:bounds[k+1]` of that vector, `bounds[k] = k * total // K`: the K slices differ in size
by at most one element, whatever the tensor sizes (a slice may cut across tensors; shards never look at
tensor boundaries, their optimizers are elementwise). Parameters and gradients therefore travel as one
contiguous buffer per shard: a replica sends `flat_grad[bounds[k]:bounds[k+1]]` (a view, no copy before
Ray serialises it) and copies each fetched slice straight into its own flat parameter buffer, which the
network's parameters are views of.

A shard applies pushed gradients with the run's own optimizer (`optim.build_optimizer`: Adagrad, SGD
or Adam), on its slice. These optimizers act element by element, so K shards stepping K slices do
exactly what one optimizer does on the whole network, which is why one replica with P = G = 1 and
SGD reproduces single-device training step for step.

Sequence numbers: replica r numbers its pushes 1, 2, 3, ...; a shard remembers, per replica, the
last sequence number it applied (and the replica's local step that push ended at) and ignores any
push whose number is not larger. A push re-sent after a lost acknowledgement, or re-pushed by a
restarted replica for steps another shard had already taken, is therefore applied once per shard.
`applied` and `received` count pushes per (replica, seq) so tests can prove it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from grandmother.training.optim import build_optimizer, load_optimizer_state


@dataclass
class FlatLayout:
    """Where each named parameter tensor lives inside the flat parameter vector."""
    names: list[str]
    shapes: list[tuple[int, ...]]
    offsets: list[int]
    total: int

    @classmethod
    def of(cls, named_shapes) -> "FlatLayout":
        names, shapes, offsets, off = [], [], [], 0
        for name, shape in named_shapes:
            names.append(name)
            shapes.append(tuple(int(s) for s in shape))
            offsets.append(off)
            off += int(np.prod(shape, dtype=np.int64))
        return cls(names, shapes, offsets, off)

    def items(self):
        for name, shape, off in zip(self.names, self.shapes, self.offsets):
            yield name, shape, off, int(np.prod(shape, dtype=np.int64))

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        flat = torch.empty(self.total, dtype=torch.float32)
        for name, shape, off, n in self.items():
            flat[off:off + n] = tensors[name].detach().reshape(-1).to("cpu", torch.float32)
        return flat

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views into `flat`, one per parameter name (no copies)."""
        return {name: flat[off:off + n].view(shape) for name, shape, off, n in self.items()}


def shard_bounds(total: int, shards: int) -> list[int]:
    """K + 1 boundaries of K contiguous slices whose sizes differ by at most one."""
    return [k * total // shards for k in range(shards + 1)]


def _bump(table: dict[int, bytearray], replica: int, seq: int) -> None:
    counts = table.setdefault(replica, bytearray())
    if len(counts) < seq:
        counts.extend(bytes(seq - len(counts)))
    counts[seq - 1] = min(255, counts[seq - 1] + 1)


class ShardState:
    """One parameter-server shard: its parameter slice, optimizer, update count and push bookkeeping.

    Plain Python (no Ray) so it can be tested directly; `ParamShard` is the Ray actor around it.
    """

    def __init__(self, index: int, params, train_cfg, state: dict | None = None):
        self.index = index
        if isinstance(params, torch.Tensor):
            params = params.detach().to("cpu", torch.float32).clone()
        else:  # a (possibly read-only, object-store) NumPy array: the shard needs its own writable copy
            params = torch.from_numpy(np.array(params, dtype=np.float32, copy=True))
        self.param = torch.nn.Parameter(params)
        self.opt = build_optimizer([self.param], train_cfg)
        self.version = 0  # updates applied so far (this shard's clock for staleness)
        self.last_seq: dict[int, int] = {}  # replica -> last applied push's sequence number
        self.last_step: dict[int, int] = {}  # replica -> its local step count when it sent that push
        # Per replica, one byte per sequence number (index seq - 1): times applied (never above 1) and
        # times received (duplicates included). Compact, so a long run's bookkeeping stays small.
        self.applied: dict[int, bytearray] = {}
        self.received: dict[int, bytearray] = {}
        # Model-parallel replicas (grandmother/parallel/downpour_mp.py): worker k of a partition pushes and
        # fetches only its slice, these positions of this shard's vector.
        self.parts: dict[int, torch.Tensor] = {}
        if state:
            if state.get("optimizer") is not None:  # None: --force-resume with another optimizer
                load_optimizer_state(self.opt, state["optimizer"], train_cfg, f"parameter shard {index}")
            self.version = int(state["version"])
            self.last_seq = {int(k): int(v) for k, v in state["last_seq"].items()}
            self.last_step = {int(k): int(v) for k, v in state["last_step"].items()}

    def register_part(self, part: int, index) -> None:
        """Positions (in this shard's vector) of partition worker `part`'s parameter slice."""
        self.parts[int(part)] = torch.as_tensor(np.array(index, dtype=np.int64, copy=True))

    def fetch_part(self, part: int):
        """(worker `part`'s slice of this shard as a NumPy array, version)."""
        return self.param.detach()[self.parts[part]].numpy(), self.version

    def push(self, replica: int, seq: int, step_end: int, grad, part: int | None = None) -> dict:
        """Apply one pushed gradient unless this (replica, seq) was applied before.

        With `part`, `grad` holds the values of that partition worker's slice only (`replica` is then
        the worker's pusher key); the gradient is zero elsewhere in this shard.

        Returns {"applied", "version"}: `version` is the number of updates applied before this one, so
        `version - fetched_version` is the push's staleness.
        """
        _bump(self.received, replica, seq)
        if seq <= self.last_seq.get(replica, 0):
            return {"applied": False, "version": self.version}
        with warnings.catch_warnings():
            # Ray hands large arrays over read-only and zero-copy; the optimizer only reads the gradient.
            warnings.simplefilter("ignore", UserWarning)
            grad_t = torch.as_tensor(grad)
        if part is not None:
            index = self.parts[part]
            if grad_t.shape != index.shape:
                raise ValueError(f"shard {self.index}: gradient of {tuple(grad_t.shape)} for worker {part}'s "
                                 f"slice of {tuple(index.shape)}")
            full = torch.zeros_like(self.param.detach())
            full[index] = grad_t
            grad_t = full
        if grad_t.shape != self.param.shape:
            raise ValueError(f"shard {self.index}: gradient of {tuple(grad_t.shape)} for a slice of "
                             f"{tuple(self.param.shape)}")
        before = self.version
        self.param.grad = grad_t
        self.opt.step()
        self.param.grad = None
        self.version += 1
        self.last_seq[replica], self.last_step[replica] = seq, step_end
        _bump(self.applied, replica, seq)
        return {"applied": True, "version": before}

    def fetch(self):
        """(parameter slice as a NumPy array, version). Ray copies it into the object store on return."""
        return self.param.detach().numpy(), self.version

    def progress(self, replica: int) -> tuple[int, int]:
        """(last applied seq, local step it ended at) of `replica`; (0, 0) before its first push."""
        return self.last_seq.get(replica, 0), self.last_step.get(replica, 0)

    def state(self) -> dict:
        """Everything a checkpoint needs from this shard (the parameter slice separately, as NumPy)."""
        return {"params": self.param.detach().numpy(), "optimizer": self.opt.state_dict(),
                "version": self.version, "last_seq": dict(self.last_seq), "last_step": dict(self.last_step)}

    def push_counts(self) -> dict:
        """{"applied" | "received": {replica: [count of seq 1, count of seq 2, ...]}} (pushes of this run)."""
        return {name: {r: list(counts) for r, counts in table.items()}
                for name, table in (("applied", self.applied), ("received", self.received))}


class ParamShard(ShardState):
    """The Ray actor body: one thread (shards are created with num_cpus=0 and must not steal cores)."""

    def __init__(self, *args, **kwargs):
        torch.set_num_threads(1)
        super().__init__(*args, **kwargs)

    def ping(self) -> int:
        return self.index
