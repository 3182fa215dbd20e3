"""The optimizer of a run, from `train.optimizer` (used by the trainer and by each Downpour PS shard)."""
from __future__ import annotations

import torch

from grandmother.errors import GrandmotherError


def build_optimizer(params, train_cfg) -> torch.optim.Optimizer:
    fused = {"fused": True} if train_cfg.fused_optimizer else {}  # train.fused_optimizer
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train_cfg.lr, momentum=train_cfg.momentum, **fused)
    if train_cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=train_cfg.lr, **fused)
    if train_cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=train_cfg.lr, **fused)
    raise GrandmotherError(f"--optimizer {train_cfg.optimizer!r}: choose sgd, adagrad or adam")


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict, train_cfg, where) -> None:
    """Load a checkpoint's optimizer state; the learning rate (and momentum) stay the config's (they
    differ only under --force-resume). A state of another shape is a one-line error naming `where`."""
    try:
        opt.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise GrandmotherError(f"{where}: the optimizer state does not fit ({first})") from None
    for group in opt.param_groups:
        group["lr"] = train_cfg.lr
        if "momentum" in group:
            group["momentum"] = train_cfg.momentum
