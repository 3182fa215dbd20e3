"""One worker's share of a spatially partitioned network (see partition.py for who owns what).

    net = ModelParallelNetwork(cfg.model, Partition(2, 2), rank)   # inside an initialised process group
    net.load_full(full_state_dict)                                  # take this worker's slices
    out = net(net.prepare(images))                                  # every worker gets the whole batch
    out.loss.backward()                                             # the LOCAL share; halos carry gradients
    total = all_reduce_sum(out.loss.detach())                       # the network's loss

Worker k computes, for every stage, exactly what the single-process `Network` computes on its blocks:

    x_need = gather(x_own)                  encoder input halo (stage 0: sliced from the whole image)
    y      = W1_k x_need                    its filter block (W1_k: the encoder rows of its locations)
    p      = L2pool(gather(y))              its pooled block, from the filter halo
    z      = LCN(gather(p))                 its output block, from a pooled halo of 2 LCN radii
    rec    = scatter_add(W2_k y)            partial reconstructions summed at the pixels' owners
    loss_k = ||rec - x_own||^2 / B + lambda * sum(p) / B

so every pixel's reconstruction error and every pooled unit's sparsity is counted on exactly one worker,
the network's loss is the sum of the loss_k, and autograd through the halo exchanges gives every worker
the gradient of that sum for its own weights. Parameter names and the order of the parameters are those
of `Network`, with shapes cut to the worker's block, so optimizer states convert slice by slice.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from grandmother.nn.kernels import get_kernel
from grandmother.nn.model import LocalContrastNorm, Network, NetworkOutput, l2_pool, prepare_images, window_sum
from grandmother.nn.shapes import stage_shapes
from grandmother.distributed.parallel.halo import gather, scatter_add
from grandmother.distributed.parallel.partition import Partition, Rect, StagePlan, exchange, plan_stages


class _Filter(nn.Module):
    def __init__(self, shape, device=None, dtype=None):
        super().__init__()
        self.encoder = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
        self.decoder = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))


class LocalStage(nn.Module):
    """Stage `plan.index` restricted to worker `rank`'s blocks."""

    def __init__(self, plan: StagePlan, rank: int, stage_cfg, model_cfg, in_channels: int, device=None, dtype=None,
                 group=None):
        super().__init__()
        self.plan, self.rank, self.group, i = plan, rank, group, plan.index
        f = plan.filter_own[rank]
        k, m = plan.field, stage_cfg.maps
        self.kernel_name = model_cfg.kernel
        self.filter = _Filter((f.h, f.w, m, in_channels, k, k), device, dtype)
        self.tied = model_cfg.tied  # decode with W1 (the decoder parameter is then unused, as in Network)
        self.sigmoid = not plan.pooled
        self.eps, self.sparsity = model_cfg.pool_eps, model_cfg.sparsity
        self.separable = model_cfg.separable_ops  # the same pooling and LCN arithmetic as the single process
        self.ex_input = exchange(plan.input_own, plan.input_need, rank, f"stage{i}.input")
        # The same rectangles, used backwards: partial reconstructions summed at the pixels' owners.
        self.ex_rec = exchange(plan.input_own, plan.input_need, rank, f"stage{i}.reconstruction")
        if plan.pooled:
            self.ex_filter = exchange(plan.filter_own, plan.filter_need, rank, f"stage{i}.filter")
        self.lcn_c = None
        if plan.lcn:
            self.ex_pool = exchange(plan.output_own, plan.pool_need, rank, f"stage{i}.pool")
            self.lcn_c = model_cfg.lcn_c
            # The single-process LCN's own window and border normalisers (same rounding), cut to this block:
            # normalisers over the block grown by one radius, 1 outside the layer where the mask zeroes v.
            lcn = LocalContrastNorm(m, plan.output_hw, stage_cfg.lcn_size, stage_cfg.lcn_sigma, model_cfg.lcn_c)
            r, o = plan.lcn_radius, plan.output_own[rank]
            mid = o.grow(r, r)
            rows, cols = slice(mid.r0 + r, mid.r1 + r), slice(mid.c0 + r, mid.c1 + r)
            norm = F.pad(lcn.norm, (r, r, r, r), value=1.0)[..., rows, cols]
            mask = F.pad(torch.ones_like(lcn.norm), (r, r, r, r))[..., rows, cols]
            self.register_buffer("window", lcn.window.clone(), persistent=False)
            self.lcn_size, self.taps = stage_cfg.lcn_size, lcn.taps
            self.register_buffer("norm_mid", norm.contiguous(), persistent=False)
            self.register_buffer("mask_mid", mask.contiguous(), persistent=False)
            self.register_buffer("norm_own", lcn.norm[..., o.r0:o.r1, o.c0:o.c1].contiguous(), persistent=False)

    @property
    def kernel(self):
        return get_kernel(self.kernel_name, self.filter.encoder.device)

    def _window(self, t):
        """The LCN window's weighted sum at every valid position of t (already padded by its radius)."""
        if self.separable:  # as LocalContrastNorm._local_mean with model.separable_ops: maps averaged first
            return window_sum(t.mean(1, keepdim=True), self.lcn_size, 1, self.taps)
        return F.conv2d(t, self.window.to(t.dtype))

    def _lcn(self, p_own):
        plan, r = self.plan, self.plan.lcn_radius
        own, need = plan.output_own[self.rank], plan.pool_need[self.rank]
        p_need = gather(p_own, self.ex_pool, self.group)
        full = own.grow(2 * r, 2 * r)  # the rectangle the windows reach, unclipped: zeros outside the layer
        pe = F.pad(p_need, (need.c0 - full.c0, full.c1 - need.c1, need.r0 - full.r0, full.r1 - need.r1))
        dt = p_own.dtype
        mean = self._window(pe) / self.norm_mid.to(dt)  # the subtractive step on own grown by r
        v = (pe[..., r:pe.shape[-2] - r, r:pe.shape[-1] - r] - mean) * self.mask_mid.to(dt)
        sigma = torch.sqrt(self._window(v * v) / self.norm_own.to(dt))
        return v[..., r:v.shape[-2] - r, r:v.shape[-1] - r] / torch.clamp(sigma, min=self.lcn_c)

    def forward(self, x_own, x_need=None, objective=True):
        """x_own: this worker's input block; x_need: the encoder's input (gathered when None)."""
        if x_need is None:
            x_need = gather(x_own, self.ex_input, self.group)
        s, kern = self.plan.stride, self.kernel
        y = kern.encode(x_need, self.filter.encoder, s)
        batch = x_own.shape[0]
        need = self.plan.input_need[self.rank]
        w2 = self.filter.encoder if self.tied else self.filter.decoder
        if self.sigmoid:
            h = torch.sigmoid(y)
            terms = None
            if objective:
                rec = scatter_add(kern.decode(h, w2, s, (need.h, need.w)), self.ex_rec, self.group)
                terms = {"reconstruction": ((rec - x_own) ** 2).sum() / batch, "sparsity": x_own.new_zeros(())}
            return {"filter": h}, h, terms
        p = l2_pool(gather(y, self.ex_filter, self.group), self.plan.pool_size, self.plan.pool_stride, self.eps,
                    self.separable)
        acts, out = {"filter": y, "pool": p}, p
        if self.lcn_c is not None:
            out = acts["lcn"] = self._lcn(p)
        terms = None
        if objective:
            rec = scatter_add(kern.decode(y, w2, s, (need.h, need.w)), self.ex_rec, self.group)
            terms = {"reconstruction": ((rec - x_own) ** 2).sum() / batch,
                     "sparsity": self.sparsity * p.sum() / batch}
        return acts, out, terms


class ModelParallelNetwork(nn.Module):
    """Worker `rank`'s part of `Network(model_cfg)` under `partition`; call inside a process group of
    partition.size workers whose ranks are the partition's (row-major grid order)."""

    def __init__(self, model_cfg, partition: Partition, rank: int, device=None, dtype=None, group=None):
        super().__init__()
        self.cfg, self.partition, self.rank, self.group = model_cfg, partition, rank, group
        self.plans = plan_stages(model_cfg, partition)
        self.shapes = stage_shapes(model_cfg)
        self.stages = nn.ModuleList(LocalStage(plan, rank, sc, model_cfg, sh.input[0], device, dtype, group)
                                    for plan, sc, sh in zip(self.plans, model_cfg.stages, self.shapes))
        self.input_lcn = None  # input_norm "lcn": every worker normalizes the whole images it holds
        if model_cfg.input_norm == "lcn":
            c, h, w = self.shapes[0].input
            s0 = model_cfg.stages[0]
            self.input_lcn = LocalContrastNorm(c, (h, w), s0.lcn_size, s0.lcn_sigma, model_cfg.lcn_c).to(device)

    @property
    def input_shape(self):
        return self.shapes[0].input

    def block_of(self, name: str) -> Rect:
        """The location block (of the full parameter's first two dims) that parameter `name` holds."""
        return self.plans[int(name.split(".")[1])].filter_own[self.rank]

    def slice_full(self, name: str, full: torch.Tensor) -> torch.Tensor:
        b = self.block_of(name)
        return full[b.r0:b.r1, b.c0:b.c1]

    @torch.no_grad()
    def load_full(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy this worker's slices out of a full state dict (a checkpoint's, or a Network's)."""
        for name, p in self.named_parameters():
            p.copy_(self.slice_full(name, tensors[name]))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return prepare_images(images, self.input_shape, self.cfg.input_norm, self.stages[0].filter.encoder.dtype,
                              self.input_lcn)

    def project_norms(self, which: str) -> None:
        """Network.project_norms on this worker's slices: the projection is per unit, so per slice."""
        Network.project_norms(self, which)

    def forward(self, x: torch.Tensor, objective: bool = True) -> NetworkOutput:
        """x: the WHOLE prepared batch (B, C, H, W). Activations, terms and loss are this worker's blocks'."""
        out = NetworkOutput(stages=[])
        detach = self.cfg.stage_gradients == "local"
        first = self.plans[0]
        own, need = first.input_own[self.rank], first.input_need[self.rank]
        x_own, x_need = x[..., own.r0:own.r1, own.c0:own.c1], x[..., need.r0:need.r1, need.c0:need.c1]
        for stage in self.stages:
            acts, x_next, terms = stage(x_own, x_need, objective)
            out.stages.append(acts)
            if objective:
                out.terms.append(terms)
            x_own, x_need = (x_next.detach() if (detach and objective) else x_next), None
        if objective:
            out.loss = sum(t["reconstruction"] + t["sparsity"] for t in out.terms)
        return out


# ---------------------------------------------------------------- collectives over the partition

def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t, group=group)
    return t


def reduce_terms(terms, group=None) -> list[dict[str, float]]:
    """Per-stage terms summed over the workers (one all-reduce), as floats."""
    flat = torch.stack([v.detach().to(torch.float64) for t in terms for v in t.values()])
    dist.all_reduce(flat, group=group)
    vals, out = flat.tolist(), []
    for t in terms:
        out.append({k: vals.pop(0) for k in t})
    return out


def clip_grad_norm_(params, max_norm: float, group=None) -> float:
    """torch.nn.utils.clip_grad_norm_ over the parameters of ALL workers (each holds disjoint slices)."""
    params = [p for p in params if p.grad is not None]
    sq = torch.stack([p.grad.detach().to(torch.float64).pow(2).sum() for p in params]).sum()
    dist.all_reduce(sq, group=group)
    norm = float(sq.sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1:
        for p in params:
            p.grad.detach().mul_(coef)
    return norm


def gather_full(net: ModelParallelNetwork, local: dict[str, torch.Tensor], full_shapes: dict[str, tuple],
                dst: int = 0, group=None) -> dict[str, torch.Tensor] | None:
    """Assemble full tensors on rank `dst` from every worker's slices (same names, sliced like the
    parameters). `local` maps a parameter name to this worker's slice of a tensor of that parameter's
    full shape (the parameter itself, its gradient, an optimizer state). Returns the dict on dst, else None."""
    names = sorted(local)
    if net.rank != dst:
        ops = [dist.P2POp(dist.isend, local[n].detach().contiguous(), dst, group) for n in names]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        return None
    out, ops, pieces = {}, [], []
    for n in names:
        out[n] = local[n].new_empty(full_shapes[n])
        net.slice_full(n, out[n]).copy_(local[n])
    for peer in range(net.partition.size):
        if peer == dst:
            continue
        plan = [p.filter_own[peer] for p in net.plans]
        for n in names:
            b = plan[int(n.split(".")[1])]
            buf = local[n].new_empty((b.h, b.w, *full_shapes[n][2:]))
            pieces.append((n, b, buf))
            ops.append(dist.P2POp(dist.irecv, buf, peer, group))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    for n, b, buf in pieces:
        out[n][b.r0:b.r1, b.c0:b.c1] = buf
    return out
