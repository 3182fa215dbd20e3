"""The optimizer of a run, from `train.optimizer` (used by the trainer and by each Downpour PS shard)."""
from __future__ import annotations

import torch

from .errors import GrandmotherError


def build_optimizer(params, train_cfg) -> torch.optim.Optimizer:
    fused = {"fused": True} if train_cfg.fused_optimizer else {}  # train.fused_optimizer
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train_cfg.lr, momentum=train_cfg.momentum, **fused)
    if train_cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=train_cfg.lr, **fused)
    if train_cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=train_cfg.lr, **fused)
    raise GrandmotherError(f"--optimizer {train_cfg.optimizer!r}: choose sgd, adagrad or adam")
