"""Naming single units ("neurons") of a network, and reading their activations: the one place for both.

A unit is one output of one sublayer: stage s, sublayer (filter, pool or lcn), map m, location (y, x).
Its id is written  s{stage}.{sublayer}.m{map}.y{row}.x{col}  e.g.  s2.lcn.m3.y10.x12
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from grandmother.errors import GrandmotherError

_UNIT_RE = re.compile(r"^s(\d+)\.(filter|pool|lcn)\.m(\d+)\.y(\d+)\.x(\d+)$")


@dataclass(frozen=True)
class Unit:
    stage: int
    sublayer: str
    map: int
    y: int
    x: int

    def __str__(self):
        return f"s{self.stage}.{self.sublayer}.m{self.map}.y{self.y}.x{self.x}"

    @classmethod
    def parse(cls, text: str) -> "Unit":
        m = _UNIT_RE.match(text.strip())
        if not m:
            raise GrandmotherError(f"--unit {text!r}: expected s<stage>.<filter|pool|lcn>.m<map>.y<row>.x<col>, "
                                   f"e.g. s2.lcn.m3.y10.x12")
        s, sub, mp, y, x = m.groups()
        return cls(int(s), sub, int(mp), int(y), int(x))

    def check(self, net) -> "Unit":
        """Raise a one-line error if the network has no such unit."""
        shapes = {(s, name): shape for s, name, shape in net.sublayers()}
        if (self.stage, self.sublayer) not in shapes:
            have = ", ".join(f"s{s}.{n}" for s, n in shapes)
            raise GrandmotherError(f"unit {self}: the network has no sublayer s{self.stage}.{self.sublayer} "
                                   f"(it has {have})")
        maps, h, w = shapes[(self.stage, self.sublayer)]
        if not (self.map < maps and self.y < h and self.x < w):
            raise GrandmotherError(f"unit {self}: outside s{self.stage}.{self.sublayer}, which has {maps} maps "
                                   f"of {h}x{w} (m0..m{maps - 1}, y0..y{h - 1}, x0..x{w - 1})")
        return self


def unit_from_index(stage: int, sublayer: str, shape: tuple[int, int, int], flat_index: int) -> Unit:
    """The unit at position `flat_index` of a sublayer's activations flattened as (maps, h, w)."""
    _, h, w = shape
    m, rest = divmod(int(flat_index), h * w)
    y, x = divmod(rest, w)
    return Unit(stage, sublayer, m, y, x)


def unit_activation(net, x: torch.Tensor, unit: Unit) -> torch.Tensor:
    """Activations (B,) of one unit for a prepared input batch x; differentiable in x."""
    out = net(x, objective=False, upto=unit.stage + 1)
    return out.stages[unit.stage][unit.sublayer][:, unit.map, unit.y, unit.x]


# ---------------------------------------------------------------- every unit of a network at once

def network_layout(net) -> list[tuple[int, str, tuple[int, int, int], int]]:
    """(stage, sublayer, shape, offset of its first unit in the concatenated unit vector)."""
    out, offset = [], 0
    for s, name, shape in net.sublayers():
        out.append((s, name, tuple(shape), offset))
        offset += int(np.prod(shape))
    return out


def unit_at(layout, flat: int) -> Unit:
    """The unit at position `flat` of the concatenated unit vector of `layout`."""
    for s, name, shape, off in reversed(layout):
        if flat >= off:
            return unit_from_index(s, name, shape, flat - off)
    raise IndexError(flat)


def network_batch_fn(net, dataset, device):
    """(fn, layout): fn(indices) -> (B, units) float32 CPU responses of every unit of `net` to those images of
    `dataset`, all sublayers concatenated in layout order."""
    layout = network_layout(net)

    @torch.no_grad()
    def fn(indices):
        x = net.prepare(dataset.get_batch(indices).to(device))
        out = net(x, objective=False)
        return torch.cat([out.stages[s][name].flatten(1) for s, name, _, _ in layout], 1).float().cpu()
    return fn, layout


# ---------------------------------------------------------------- one unit over many images

def prepared_batches(net, dataset, batch_size: int = 256) -> Iterator[torch.Tensor]:
    """The dataset's images in order, in prepared batches on the network's device."""
    device = next(net.parameters()).device
    for start in range(0, len(dataset), batch_size):
        yield net.prepare(dataset.get_batch(list(range(start, min(start + batch_size, len(dataset))))).to(device))


@torch.no_grad()
def unit_responses(net, unit: Unit, batches: Iterable[torch.Tensor]) -> np.ndarray:
    """The unit's activation (float64) for every image of the prepared input batches, in order."""
    out = [unit_activation(net, x, unit).double().cpu().numpy() for x in batches]
    return np.concatenate(out) if out else np.zeros(0)
