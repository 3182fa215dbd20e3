"""The optimizer of a run, from `train.optimizer` (used by the trainer and by each Downpour PS shard)."""
from __future__ import annotations

import torch

from .errors import GrandmotherError


def build_optimizer(params, train_cfg) -> torch.optim.Optimizer:
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train_cfg.lr, momentum=train_cfg.momentum)
    if train_cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=train_cfg.lr)
    if train_cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=train_cfg.lr)
    raise GrandmotherError(f"--optimizer {train_cfg.optimizer!r}: choose sgd, adagrad or adam")
