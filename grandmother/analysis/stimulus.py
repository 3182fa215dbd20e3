"""The optimal stimulus of one unit (paper section 4.3, Figure 3): x* = argmax_x f(x) subject to ||x||_2 = r.

    x, value, info = optimal_stimulus(net, unit, StimulusSettings())
    similarity = stimulus_similarity(net, unit, x, top_mean, negative_mean)

The paper's problem, solved in the network's input space (standardized images, Network.prepare) on the
sphere of radius r = sqrt(C*H*W), the norm of a standardized image; x*/||x*|| is what is saved and shown.
Solver: projected gradient ascent (step, then project back onto the sphere) with a backtracking Armijo
line search along the projection arc (Bertsekas 1976), from several random starts run side by side as
one batch; the best start is kept.

Plain gradient ascent on pixels finds a pattern no image resembles: high-frequency noise that drives the
unit far above any test image (measured: 4.8 against 1.5 for the best image, correlation 0.07 with the mean
of the unit's top images). Two choices of the feature-visualisation literature (Olah, Mordvintsev &
Schubert, "Feature Visualization", Distill 2017; Mahendran & Vedaldi 2015) counter it, both settings:
- **parameterization="fourier"**: the ascent direction is the gradient preconditioned by the natural-image
  spectrum, P g = F^-1 (S^2 . F g) with S(f) = 1 / max(|f|, 1)^decay (f in cycles per image), i.e.
  the ascent of the spectrally decorrelated parameterisation x = F^-1 (S . z); the random starts are drawn
  from the same spectrum. What it solves: its fixed points have P g parallel to x, so x* maximises f among
  images of equal spectrally weighted energy ||S^-1 F x|| (an ellipsoid on which high frequencies are
  costly), taken at the scale where ||x|| is the paper's radius. "pixel" is the plain ascent, which solves
  the paper's problem itself (tests/test_visualize.py checks it against known maximisers); "data"
  preconditions by the covariance of the training images instead of the 1/f spectrum.
- **jitter=j**: the objective is the unit's mean response over the input shifted by every (dy, dx) in
  [-j, j]^2 (np.roll, wrapping): a fixed average, so the line search stays exact, and a stimulus that only
  works at one exact pixel alignment no longer wins.
The norm constraint is the paper's and stays. Pixels outside the unit's receptive field (which its response
does not depend on) start at zero and stay there. Defaults (fourier, decay 1, jitter 1) were chosen on the
selection half's choice of unit and its training images' means; docs/experiments.md has the measurement.

`stimulus_similarity` measures the result: the Pearson correlation, over the unit's receptive field (the
pixels its response depends on), between x* and the mean of the unit's top test images, and between x* and
the mean negative (non-face) test image.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from grandmother.errors import GrandmotherError

if TYPE_CHECKING:
    import torch

# torch and the network code are imported inside the functions: the command layer imports this module for
# the settings alone, and `grandmother --help` should not wait for torch.

PARAMETERIZATIONS = ("fourier", "pixel", "data")


@dataclass
class StimulusSettings:
    restarts: int = 4  # random starts, run side by side
    max_iters: int = 300  # ascent iterations per start
    radius: float | None = None  # None: sqrt(C*H*W), the norm of a standardized image
    seed: int = 0
    parameterization: str = "fourier"  # "fourier": spectrum-preconditioned ascent; "pixel": plain ascent
    decay: float = 1.0  # S(f) = 1 / f^decay for parameterization="fourier"
    jitter: int = 1  # mean response over shifts in [-jitter, jitter]^2 pixels; 0 = the unit at one alignment
    zero_mean: bool = False  # True: x* also has zero mean, like the standardized images the network saw
    tol: float = 1e-6  # a start stops after `patience` iterations gaining less than tol * max(1, |f|)
    patience: int = 10

    def check(self) -> None:
        if self.parameterization not in PARAMETERIZATIONS:
            raise GrandmotherError(f"--stimulus-parameterization {self.parameterization!r}: choose "
                                   f"{' or '.join(PARAMETERIZATIONS)}")
        if self.restarts < 1 or self.max_iters < 1:
            raise GrandmotherError("--restarts and --iters must be at least 1")
        if self.decay < 0 or self.jitter < 0:
            raise GrandmotherError(f"--stimulus-decay {self.decay} and --stimulus-jitter {self.jitter} must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


def spectrum_scale(h: int, w: int, decay: float, device=None) -> torch.Tensor:
    """S(f) (H, W//2+1) = 1 / max(|f|, 1)^decay, f in cycles per image (the lowest frequency's weight: 1)."""
    import torch
    fy = torch.fft.fftfreq(h, device=device)[:, None] * h
    fx = torch.fft.rfftfreq(w, device=device)[None, :] * w
    f = torch.sqrt(fy ** 2 + fx ** 2).clamp_min(1.0)
    return f.pow(-decay)


def _precondition(g: torch.Tensor, s2: torch.Tensor | None) -> torch.Tensor:
    import torch
    if s2 is None:
        return g
    if s2.dim() == 2 and s2.shape[0] == s2.shape[1] == g[0].numel():  # a covariance matrix
        return (g.flatten(1).double() @ s2).view_as(g).to(g.dtype)
    h, w = g.shape[-2:]
    return torch.fft.irfft2(torch.fft.rfft2(g.double()) * s2, s=(h, w)).to(g.dtype)


def _shifts(jitter: int) -> list[tuple[int, int]]:
    return list(itertools.product(range(-jitter, jitter + 1), repeat=2))


def optimal_stimulus(net, unit, settings: StimulusSettings | None = None,
                     covariance: torch.Tensor | None = None) -> tuple[torch.Tensor, float, dict]:
    """(x* (C, H, W) on the sphere, f(x*) at the unit's own alignment, info) for `unit` of `net`.
    `covariance` (C*H*W, C*H*W) of prepared training images: needed by parameterization="data"."""
    import torch

    from grandmother.analysis.units import unit_activation
    st = settings or StimulusSettings()
    st.check()
    c, h, w = net.input_shape
    radius = float(st.radius) if st.radius else math.sqrt(c * h * w)
    p = next(net.parameters())
    gen = torch.Generator().manual_seed(st.seed)
    sigma, dims, n = 1e-4, (1, 2, 3), st.restarts
    shifts = _shifts(st.jitter)
    s2 = spectrum_scale(h, w, st.decay, p.device).double() ** 2 if st.parameterization == "fourier" else None
    if st.parameterization == "data":
        if covariance is None:
            raise GrandmotherError("parameterization 'data' needs the covariance of the training images")
        s2 = covariance.to(p.device, torch.float64)

    def objective(x):  # mean over the shifts of the unit's response; (n,)
        batch = torch.cat([torch.roll(x, s, dims=(2, 3)) for s in shifts]) if len(shifts) > 1 else x
        return unit_activation(net, batch, unit).view(len(shifts), -1).mean(0)

    def values(x):
        with torch.no_grad():
            return objective(x).double()

    def values_and_grads(x):
        x = x.detach().requires_grad_(True)
        v = objective(x)
        (g,) = torch.autograd.grad(v.sum(), x)  # per-start gradients: the starts are independent
        return v.detach().double(), g.detach()

    # Pixels outside the receptive field do not change the response: they start at zero (the mean of a
    # standardized image) and stay there, so the picture shows only what the unit sees.
    field = torch.as_tensor(receptive_field(net, unit), device=p.device).to(p.dtype)

    def project(x):
        if st.zero_mean:  # the mean over the receptive field's pixels (outside it x stays 0)
            x = (x - (x * field).sum((2, 3), keepdim=True) / field.sum()) * field
        return x * (radius / x.flatten(1).norm(dim=1).clamp_min(1e-30)).view(-1, 1, 1, 1)

    x0 = torch.randn((n, c, h, w), generator=gen, dtype=torch.float64)
    x = project(_precondition(x0, s2.cpu() if s2 is not None else None).to(p.device, p.dtype) * field)
    v, g = values_and_grads(x)
    step = torch.zeros(n, dtype=torch.float64, device=p.device)  # 0 = no step accepted yet
    active = torch.ones(n, dtype=torch.bool, device=p.device)
    stalled = torch.zeros(n, dtype=torch.long, device=p.device)
    iterations = torch.zeros(n, dtype=torch.long, device=p.device)
    x_prev = d_prev = None
    for _ in range(st.max_iters):
        d = _precondition(g, s2) * field  # the ascent direction, inside the receptive field
        dnorm = d.flatten(1).norm(dim=1).double()
        active &= dnorm > 0
        if not active.any():
            break
        # Trial step: Barzilai-Borwein <s,s>/<s,y> from the last move (s = x - x_prev, y = d_prev - d) where
        # it is positive, else twice the last accepted step; the very first moves a tenth of the radius.
        t = torch.where(step > 0, 2.0 * step, 0.1 * radius / dnorm.clamp_min(1e-30))
        if x_prev is not None:
            s_, y_ = (x - x_prev).flatten(1).double(), (d_prev - d).flatten(1).double()
            sy = (s_ * y_).sum(1)
            t = torch.where(sy > 0, (s_ * s_).sum(1) / sy.clamp_min(1e-300), t)
        accepted = ~active
        x_new, v_new = x.clone(), v.clone()
        while not accepted.all():
            trial = project(x + t.to(x.dtype).view(-1, 1, 1, 1) * d)
            vt = values(trial)
            ok = (vt >= v + sigma * (g * (trial - x)).sum(dims).double()) & ~accepted
            x_new[ok], v_new[ok], step[ok] = trial[ok], vt[ok], t[ok]
            accepted |= ok
            t = torch.where(accepted, t, 0.5 * t)
            tiny = ~accepted & (t * dnorm < 1e-12 * radius)
            active &= ~tiny  # no ascent step at this precision: a stationary point, stop this start
            accepted |= tiny
        gain = v_new - v
        iterations += active.long()
        x_prev, d_prev = x, d
        x = torch.where(active.view(-1, 1, 1, 1), x_new, x)
        stalled = torch.where(active & (gain <= st.tol * v_new.abs().clamp_min(1.0)), stalled + 1, 0)
        active &= stalled < st.patience
        if not active.any():
            break
        v, g = values_and_grads(x)
    v = values(x)
    best = int(torch.argmax(v))
    with torch.no_grad():
        at_unit = float(unit_activation(net, x[best:best + 1], unit)[0])
    runs = [{"restart": i, "value": float(v[i]), "iterations": int(iterations[i])} for i in range(n)]
    info = {**st.to_dict(), "radius": radius, "objective": float(v[best]), "runs": runs}
    return x[best].detach().clone(), at_unit, info


# ---------------------------------------------------------------- does it look like the unit's images?

def receptive_field(net, unit, probes: int = 4, seed: int = 0) -> np.ndarray:
    """(H, W) bool: the input pixels the unit's response depends on (non-zero gradient at random inputs)."""
    import torch

    from grandmother.analysis.units import unit_activation
    c, h, w = net.input_shape
    p = next(net.parameters())
    x = torch.randn((probes, c, h, w), generator=torch.Generator().manual_seed(seed)).to(p.device, p.dtype)
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(unit_activation(net, x, unit).sum(), x)
    return (g.abs().sum((0, 1)) > 0).cpu().numpy()


def correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of two (C, H, W) arrays over the pixels where mask (H, W) is true."""
    a = np.asarray(a, np.float64)[:, mask].ravel()
    b = np.asarray(b, np.float64)[:, mask].ravel()
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def is_even(net, unit, trials: int = 3, seed: int = 1) -> bool:
    """Whether f(-x) = f(x) for the unit (true for every unit above the first L2 pooling: the pool squares the
    filter responses), checked at random inputs."""
    import torch

    from grandmother.analysis.units import unit_activation
    c, h, w = net.input_shape
    p = next(net.parameters())
    x = torch.randn((trials, c, h, w), generator=torch.Generator().manual_seed(seed)).to(p.device, p.dtype)
    with torch.no_grad():
        a, b = unit_activation(net, x, unit), unit_activation(net, -x, unit)
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5))


def stimulus_similarity(net, unit, x, top_mean, negative_mean) -> dict:
    """Correlation of x* with the mean of the unit's top test images and with the mean negative image, over
    the unit's receptive field (the means are of prepared, network-input images), and x* with the sign shown.

    Above the first L2 pooling a unit cannot tell x from -x (the pool squares), so x* and -x* are equally
    optimal: for such a unit the correlations are taken as absolute values and x* is shown with the sign
    that correlates positively with the mean of the top images (a display convention; f is the same)."""
    import torch
    mask = receptive_field(net, unit)
    x = x.detach().double().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    top, neg = correlation(x, top_mean, mask), correlation(x, negative_mean, mask)
    even = is_even(net, unit)
    sign = -1.0 if even and top < 0 else 1.0
    return {"receptive_field_pixels": int(mask.sum()), "sign_free": even, "shown_sign": sign,
            "top_images": abs(top) if even else top, "mean_negative": abs(neg) if even else neg,
            "stimulus": sign * x}
