"""The paper's model: stages of locally connected filtering, L2 pooling and local contrast normalization.

    net = Network(cfg.model)                 # 3 stages by default
    out = net(net.prepare(images_uint8))     # out.stages[s]["filter" | "pool" | "lcn"], out.loss, out.terms

One stage (Le et al. 2012, section 3.2-3.3; Figure 1):
    y = W1 x              locally connected encoder: unshared weights, field k, stride s, M maps/location
    p = sqrt(eps + H y^2) L2 pooling over p x p neighbourhoods within one map, H uniform and fixed
    z = LCN(p)            subtractive then divisive normalization, Gaussian window over all maps
    objective = ||W2 y - x||^2 + lambda * sum(p)       (W2 the untied decoder), per image, summed over
                                                       the batch and divided by its size
The next stage's input is z. The training objective is the sum of the stages' objectives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from grandmother.nn.kernels import get_kernel
from grandmother.nn.shapes import stage_shapes


class LocallyConnected(nn.Module):
    """Encoder W1 and decoder W2 of one stage, both of shape (Ho, Wo, M, C, k, k), not tied."""

    def __init__(self, in_channels, in_hw, field, stride, maps, kernel="auto", generator=None, device=None,
                 tied=False):
        super().__init__()
        self.tied = tied
        self.in_channels, self.in_hw, self.field, self.stride, self.maps = in_channels, tuple(in_hw), field, stride, maps
        self.out_hw = ((in_hw[0] - field) // stride + 1, (in_hw[1] - field) // stride + 1)
        self.kernel_name = kernel
        shape = (*self.out_hw, maps, in_channels, field, field)
        self.encoder = nn.Parameter(torch.empty(shape, device=device))
        self.decoder = nn.Parameter(torch.empty(shape, device=device))
        if self.encoder.device.type != "meta":
            self.reset_parameters(generator)

    def reset_parameters(self, generator=None):
        fan_in = self.in_channels * self.field ** 2
        # Encoder: unit-variance inputs give unit-scale responses. Decoder: each input pixel receives
        # contributions from about M * (k/s)^2 features, so its scale is divided by that count.
        overlap = self.maps * (self.field / self.stride) ** 2
        with torch.no_grad():
            self.encoder.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
            self.decoder.normal_(0.0, 1.0 / math.sqrt(overlap * fan_in), generator=generator)

    @property
    def kernel(self):
        return get_kernel(self.kernel_name, self.encoder.device)

    def encode(self, x):
        return self.kernel.encode(x, self.encoder, self.stride)

    def decode(self, y):
        return self.kernel.decode(y, self.encoder if self.tied else self.decoder, self.stride, self.in_hw)

    def extra_repr(self):
        return (f"in={self.in_channels}x{self.in_hw[0]}x{self.in_hw[1]}, field={self.field}, stride={self.stride}, "
                f"maps={self.maps}, out={self.out_hw[0]}x{self.out_hw[1]}, kernel={self.kernel_name}")


def window_sum(x, size, stride, weights=None):
    """Sum over size x size windows (every stride-th), per map, as two 1-D passes of shifted slices.

    weights: optional 1-D taps (length size), applied in both directions (a separable window).
    Sums of shifted views are plain elementwise adds, vectorised and cheap to differentiate; on the
    2-core CPU they measured 2.3x faster than avg_pool2d forward + backward (docs/kernels.md).
    """
    H, W = x.shape[-2:]
    Ho, Wo = (H - size) // stride + 1, (W - size) // stride + 1
    tap = (lambda i, t: t) if weights is None else (lambda i, t: t * float(weights[i]))
    h = sum(tap(q, x[..., q:q + stride * (Wo - 1) + 1:stride]) for q in range(size))
    return sum(tap(p, h[..., p:p + stride * (Ho - 1) + 1:stride, :]) for p in range(size))


def l2_pool(y, size, stride, eps, separable=False):
    """sqrt(eps + sum over a size x size window of y^2), per map. H is a fixed window of ones.

    separable=True (`model.separable_ops`): the window sum by shifted slices (window_sum), else avg_pool2d.
    Both are deterministic; they differ only in the order of the additions (last-bit differences).
    """
    if separable:
        return torch.sqrt(eps + window_sum(y * y, size, stride))
    return torch.sqrt(eps + F.avg_pool2d(y * y, size, stride) * (size * size))


def gaussian_window(size, sigma):
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma ** 2))
    return g / g.sum()


class LocalContrastNorm(nn.Module):
    """Subtractive then divisive normalization with a Gaussian window over neighbours and all maps.

        v = x - sum_{m,p,q} G_pq x[m, i+p, j+q]            G sums to 1 over the window and the maps
        z = v / max(c, sqrt(sum_{m,p,q} G_pq v[m, i+p, j+q]^2))

    Output has the input's size ("same" padding). At the borders the window is cut off; the weights
    that remain are renormalised to sum to 1, so border statistics are averages, not shrunk towards 0.
    """

    def __init__(self, maps, hw, size, sigma, c, separable=False):
        super().__init__()
        self.size, self.c, self.separable = size, c, separable
        # The 2-D Gaussian is the outer product of a 1-D one: separable=True (`model.separable_ops`) sums
        # the maps first, then applies the 1-D taps along each axis (window_sum), instead of one conv2d.
        r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        taps = torch.exp(-r ** 2 / (2 * sigma ** 2))
        self.taps = (taps / taps.sum()).tolist()
        g = gaussian_window(size, sigma) / maps
        self.register_buffer("window", g.expand(1, maps, size, size).clone().float(), persistent=False)
        ones = torch.ones(1, maps, *hw, dtype=torch.float64)
        norm = F.conv2d(ones, g.expand(1, maps, size, size), padding=size // 2)
        self.register_buffer("norm", norm.float(), persistent=False)

    def _local_mean(self, x):
        if self.separable:
            pad = self.size // 2
            mean_of_maps = x.mean(1, keepdim=True)
            padded = F.pad(mean_of_maps, (pad, pad, pad, pad))
            return window_sum(padded, self.size, 1, self.taps) / self.norm.to(x.dtype)
        w = self.window.to(x.dtype)
        return F.conv2d(x, w, padding=self.size // 2) / self.norm.to(x.dtype)

    def forward(self, x):
        v = x - self._local_mean(x)
        sigma = torch.sqrt(self._local_mean(v * v))
        return v / torch.clamp(sigma, min=self.c)


class Stage(nn.Module):
    def __init__(self, shape, stage_cfg, model_cfg, generator=None, device=None):
        super().__init__()
        c, h, w = shape.input
        self.sigmoid = model_cfg.kind == "sigmoid_ae"
        self.filter = LocallyConnected(c, (h, w), stage_cfg.receptive_field, stage_cfg.stride, stage_cfg.maps,
                                       model_cfg.kernel, generator, device, tied=model_cfg.tied)
        self.pool_size, self.pool_stride, self.eps = stage_cfg.pool_size, stage_cfg.pool_stride, model_cfg.pool_eps
        self.separable = model_cfg.separable_ops
        self.sparsity = model_cfg.sparsity
        self.lcn = None
        if model_cfg.lcn and not self.sigmoid:
            self.lcn = LocalContrastNorm(stage_cfg.maps, shape.pool[1:], stage_cfg.lcn_size, stage_cfg.lcn_sigma,
                                         model_cfg.lcn_c, model_cfg.separable_ops)

    def forward(self, x, objective=True):
        """Return (activations by sublayer name, output, {"reconstruction", "sparsity"} or None)."""
        y = self.filter.encode(x)
        if self.sigmoid:
            h = torch.sigmoid(y)
            acts = {"filter": h}
            terms = None
            if objective:
                rec = self.filter.decode(h)
                terms = {"reconstruction": ((rec - x) ** 2).sum() / x.shape[0], "sparsity": x.new_zeros(())}
            return acts, h, terms
        p = l2_pool(y, self.pool_size, self.pool_stride, self.eps, self.separable)
        acts = {"filter": y, "pool": p}
        out = p
        if self.lcn is not None:
            out = self.lcn(p)
            acts["lcn"] = out
        terms = None
        if objective:
            rec = self.filter.decode(y)
            terms = {"reconstruction": ((rec - x) ** 2).sum() / x.shape[0],
                     "sparsity": self.sparsity * p.sum() / x.shape[0]}
        return acts, out, terms


def prepare_images(images: torch.Tensor, input_shape, input_norm: str, dtype, input_lcn=None) -> torch.Tensor:
    """Network.prepare for a given (channels, height, width) input shape (also used by grandmother/parallel);
    `input_lcn`: the LocalContrastNorm that input_norm "lcn" applies after standardizing."""
    c, h, w = input_shape
    if images.dim() != 4 or tuple(images.shape[1:]) != (c, h, w):
        raise ValueError(f"images of shape {tuple(images.shape[1:])} do not fit the network's input "
                         f"{c}x{h}x{w} (channels x height x width)")
    x = images.to(dtype)
    if images.dtype == torch.uint8:
        x = x / 255.0
    if input_norm in ("standardize", "lcn"):
        flat = x.flatten(1)
        x = ((flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-3)).view_as(x)
    if input_lcn is not None:
        x = input_lcn(x)
    return x


@dataclass
class NetworkOutput:
    stages: list[dict[str, torch.Tensor]]
    terms: list[dict[str, torch.Tensor]] = field(default_factory=list)
    loss: torch.Tensor | None = None


class Network(nn.Module):
    def __init__(self, model_cfg, generator=None, device=None):
        super().__init__()
        self.cfg = model_cfg
        self.shapes = stage_shapes(model_cfg)
        self.stages = nn.ModuleList(Stage(sh, sc, model_cfg, generator, device)
                                    for sh, sc in zip(self.shapes, model_cfg.stages))
        self.input_lcn = None
        if model_cfg.input_norm == "lcn":
            c, h, w = self.shapes[0].input
            s0 = model_cfg.stages[0]
            self.input_lcn = LocalContrastNorm(c, (h, w), s0.lcn_size, s0.lcn_sigma, model_cfg.lcn_c)

    @property
    def input_shape(self):
        return self.shapes[0].input

    def sublayers(self) -> list[tuple[int, str, tuple[int, int, int]]]:
        """(stage, sublayer name, (maps, h, w)) of every activation the forward pass returns."""
        out = []
        for sh, st in zip(self.shapes, self.stages):
            out.append((sh.index, "filter", sh.filter))
            if not st.sigmoid:
                out.append((sh.index, "pool", sh.pool))
                if st.lcn is not None:
                    out.append((sh.index, "lcn", sh.output))
        return out

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) images or floats in [0, 1] -> the network's input (per-image standardized)."""
        return prepare_images(images, self.input_shape, self.cfg.input_norm, self.stages[0].filter.encoder.dtype,
                              self.input_lcn)

    def forward(self, x, objective=True, upto: int | None = None) -> NetworkOutput:
        """Run the stages (all, or the first `upto`); with objective=True also the summed training loss."""
        out = NetworkOutput(stages=[])
        detach = self.cfg.stage_gradients == "local"
        for i, stage in enumerate(self.stages[:upto]):
            acts, x_next, terms = stage(x, objective)
            out.stages.append(acts)
            if objective:
                out.terms.append(terms)
            x = x_next.detach() if (detach and objective) else x_next
        if objective:
            out.loss = sum(t["reconstruction"] + t["sparsity"] for t in out.terms)
        return out

    @torch.no_grad()
    def project_norms(self, which: str) -> None:
        """Scale every unit's `which` ("encoder" or "decoder") vector to unit L2 norm; "none" does nothing."""
        if which == "none":
            return
        for stage in self.stages:
            w = getattr(stage.filter, which)  # (Ho, Wo, M, C, k, k): one vector of C*k*k per unit
            w.div_(w.flatten(3).norm(dim=-1).clamp_min(1e-12)[..., None, None, None])

    @torch.no_grad()
    def diagnostics(self, out: NetworkOutput) -> list[dict[str, float]]:
        """Per stage: median encoder and decoder vector norms and the fraction of dead units.

        A pooling unit is dead when, on every image of the batch, it stays below 2 sqrt(eps): its
        filters answer nothing beyond the eps floor. (Sigmoid stages: a filter unit whose response
        varies by less than 1e-3 over the batch.)
        """
        rows = []
        for stage, acts in zip(self.stages, out.stages):
            f = stage.filter
            row = {"encoder_norm": float(f.encoder.flatten(3).norm(dim=-1).median()),
                   "decoder_norm": float(f.decoder.flatten(3).norm(dim=-1).median())}
            if "pool" in acts:
                peak = acts["pool"].detach().amax(0)
                row["dead_fraction"] = float((peak < 2 * math.sqrt(stage.eps)).float().mean())
            else:
                row["dead_fraction"] = float((acts["filter"].detach().std(0) < 1e-3).float().mean())
            rows.append(row)
        return rows

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_network(cfg, device: torch.device) -> Network:
    """The network of config `cfg` at its seeded initialisation (the "random weights" baseline uses the same call)."""
    gen = torch.Generator().manual_seed(cfg.train.seed)
    net = Network(cfg.model, generator=gen)  # initialised on CPU so every device gets the same weights
    return net.to(device)
