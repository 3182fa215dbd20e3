"""Where a job runs and how it is seeded: the device choice and the global RNG seed."""
from __future__ import annotations

import torch

from .errors import GrandmotherError


def resolve_device(name: str) -> torch.device:
    """"auto" is CUDA when available, else CPU; asking for CUDA where there is none is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GrandmotherError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed torch's global generator (every other random choice here takes its own seeded generator)."""
    torch.manual_seed(seed)
