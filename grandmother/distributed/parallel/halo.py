"""Autograd-aware halo exchange between the workers of one model replica (torch.distributed P2P).

Two differentiable maps, adjoint to each other, both driven by one `Exchange` (partition.py):

    gather(x_own, ex)       x_own covers ex.own -> a tensor covering ex.need: my part copied, the
                            rest received from the owners. Backward: the gradient of every received
                            part is sent back to its owner and added there.
    scatter_add(x_need, ex) partial sums covering ex.need -> a tensor covering ex.own: my part plus the
                            parts of the neighbours' partial sums that fall in my block. Backward:
                            the gradient of my block is sent to every worker whose partial sum it
                            received (a gather).

Ranks in an `Exchange` are ranks of `group` (None: the default group); peers are addressed by their
global rank, so a subgroup must consist of global ranks 0 .. P-1 (tests run P = 2, 3, 4 in one world).
Each call posts all its sends and receives at once (`torch.distributed.batch_isend_irecv`) and waits for
them, so there is no ordering deadlock; gloo carries CPU tensors, NCCL CUDA tensors. Every worker of a
replica runs the same sequence of calls (also in backward: the autograd graphs have the same shape on
every worker), which is what pairs up the messages.

`HALO_BYTES` counts the bytes this process sent, by label and direction ("LABEL/forward",
"LABEL/backward"); `grandmother model-info --model-parallel` predicts the same figures from the
partition alone, and tests/test_model_parallel.py checks one against the other.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from grandmother.distributed.parallel.partition import Exchange

HALO_BYTES: dict[str, int] = defaultdict(int)


def reset_halo_bytes() -> None:
    HALO_BYTES.clear()


def _swap(sends, recvs, group=None) -> None:
    """Post every send and receive of one exchange, then wait for all of them."""
    ops = [dist.P2POp(dist.isend, t, peer, group) for peer, t in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, group) for peer, t in recvs]
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()


def _count(label: str, tensors) -> None:
    HALO_BYTES[label] += sum(t.numel() * t.element_size() for t in tensors)


def _block(t: torch.Tensor, rect, origin) -> torch.Tensor:
    rows, cols = rect.within(origin)
    return t[..., rows, cols]


def _move(src: torch.Tensor, src_rect, dst_rect, ex: Exchange, direction: str, add: bool, phase: str, group=None):
    """Exchange `src` (covering src_rect) into a new tensor covering dst_rect.

    direction "gather": my sends go out of src (ex.sends), receives land in the result (ex.recvs);
    "scatter": the reverse (send the parts of src that peers own, receive the parts of theirs that fall
    in my block). Received parts are added when `add` (partial sums), copied otherwise.
    """
    out = src.new_zeros(*src.shape[:-2], dst_rect.h, dst_rect.w)
    local = ex.local
    if local is not None:
        _block(out, local, dst_rect).copy_(_block(src, local, src_rect))
    outgoing, incoming = (ex.sends, ex.recvs) if direction == "gather" else (ex.recvs, ex.sends)
    sends = [(peer, _block(src, rect, src_rect).contiguous()) for peer, rect in outgoing]
    bufs = [(peer, src.new_empty(*src.shape[:-2], rect.h, rect.w)) for peer, rect in incoming]
    _count(f"{ex.label}/{phase}", [t for _, t in sends])
    _swap(sends, bufs, group)
    for (_, rect), (_, buf) in zip(incoming, bufs):
        target = _block(out, rect, dst_rect)
        if add:
            target.add_(buf)
        else:
            target.copy_(buf)
    return out


def _exchange(x, ex: Exchange, gathering: bool, phase: str, group):
    """gather (my block -> my block plus its halo) or its adjoint, scatter_add (partial sums over what I
    need -> my block, every worker's part added)."""
    if gathering:
        return _move(x, ex.own, ex.need, ex, "gather", False, phase, group)
    return _move(x, ex.need, ex.own, ex, "scatter", True, phase, group)


class _Exchange(torch.autograd.Function):
    """gather or scatter_add forward; the gradient goes back through the other (each is the other's adjoint)."""

    @staticmethod
    def forward(ctx, x, ex, gathering, group):
        ctx.ex, ctx.gathering, ctx.group = ex, gathering, group
        return _exchange(x, ex, gathering, "forward", group)

    @staticmethod
    def backward(ctx, g):
        return _exchange(g.contiguous(), ctx.ex, not ctx.gathering, "backward", ctx.group), None, None, None


def gather(x_own: torch.Tensor, ex: Exchange, group=None) -> torch.Tensor:
    """(..., own.h, own.w) -> (..., need.h, need.w): my block plus the halo received from its owners."""
    return _Exchange.apply(x_own, ex, True, group)


def scatter_add(x_need: torch.Tensor, ex: Exchange, group=None) -> torch.Tensor:
    """(..., need.h, need.w) partial sums -> (..., own.h, own.w): every worker's part of my block, added."""
    return _Exchange.apply(x_need, ex, False, group)
