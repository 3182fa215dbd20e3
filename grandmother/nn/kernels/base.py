"""The locally connected kernel: one interface, several registered implementations.

A locally connected layer is a convolution whose weights are not shared: every output location
(i, j) has its own filter bank. Weights are stored as one tensor of shape

    (Ho, Wo, M, C, k, k)    output rows, output cols, maps per location, input channels, field, field

for both the encoder W1 and the decoder W2 (untied, same shape). A kernel provides two maps:

    encode(x, w, stride)          x (B, C, H, W)   -> y (B, M, Ho, Wo)   y[b,m,i,j] = <w[i,j,m], patch(x)[b,i,j]>
    decode(y, w, stride, (H, W))  y (B, M, Ho, Wo) -> x (B, C, H, W)     the adjoint of encode with weights w:
                                                                     each location writes w[i,j]^T y into its
                                                                     patch, overlapping patches summed

Both must be differentiable in their inputs and weights. `decode` is exactly the input-gradient of
`encode`, so a fast kernel only needs three primitives (see `PrimitiveKernel`): forward,
backward-input and backward-weight; the autograd wiring for both maps is written once, here.

Select with `get_kernel(name, device)`: "reference" (unfold + batched matmul, the ground truth for
tests) or "auto" (the highest-priority kernel registered for the device type).

This module holds the interface, the registry and the tile budget; each implementation is a module of
this package that calls `register_kernel` at import, and grandmother/kernels/__init__.py imports them all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


class LocallyConnectedKernel:
    name: str = "?"

    def workspace_bytes(self, batch: int, in_chw: tuple[int, int, int], maps: int, field: int, stride: int,
                        device_type: str, element_size: int = 4) -> int:
        """Bytes one call allocates beyond its inputs and outputs (for memory estimates); 0 if negligible."""
        return 0

    def encode(self, x: torch.Tensor, w: torch.Tensor, stride: int) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, y: torch.Tensor, w: torch.Tensor, stride: int, in_hw: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError


class PrimitiveKernel(LocallyConnectedKernel):
    """A kernel defined by three non-differentiable primitives; autograd is derived from them.

    forward(x, w, stride) -> y                       (the encode map)
    backward_input(gy, w, stride, in_hw) -> gx       (its adjoint, which is also the decode map)
    backward_weight(x, gy, stride, field) -> gw      (sum over the batch of gy[b,:,i,j] (x) patch(x)[b,i,j])
    """

    def forward(self, x, w, stride):
        raise NotImplementedError

    def backward_input(self, gy, w, stride, in_hw):
        raise NotImplementedError

    def backward_weight(self, x, gy, stride, field):
        raise NotImplementedError

    def encode(self, x, w, stride):
        return _Encode.apply(x, w, self, stride)

    def decode(self, y, w, stride, in_hw):
        return _Decode.apply(y, w, self, stride, tuple(in_hw))


class _Encode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, kernel, stride):
        ctx.save_for_backward(x, w)
        ctx.kernel, ctx.stride = kernel, stride
        return kernel.forward(x, w, stride)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        k, s = ctx.kernel, ctx.stride
        gy = gy.contiguous()
        gx = k.backward_input(gy, w, s, x.shape[-2:]) if ctx.needs_input_grad[0] else None
        gw = k.backward_weight(x, gy, s, w.shape[-1]) if ctx.needs_input_grad[1] else None
        return gx, gw, None, None


class _Decode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, w, kernel, stride, in_hw):
        ctx.save_for_backward(y, w)
        ctx.kernel, ctx.stride = kernel, stride
        return kernel.backward_input(y, w, stride, in_hw)

    @staticmethod
    def backward(ctx, gx):
        y, w = ctx.saved_tensors
        k, s = ctx.kernel, ctx.stride
        gx = gx.contiguous()
        gy = k.forward(gx, w, s) if ctx.needs_input_grad[0] else None
        # decode(y) = sum_loc w^T y into patches, so dL/dw[loc] = y[loc] (x) patch(gx)[loc]
        gw = k.backward_weight(gx, y, s, w.shape[-1]) if ctx.needs_input_grad[1] else None
        return gy, gw, None, None, None


# ---------------------------------------------------------------- registry

@dataclass
class KernelEntry:
    name: str
    factory: Callable[[], LocallyConnectedKernel]
    devices: tuple[str, ...]  # device types it runs on: "cpu", "cuda"
    priority: int  # "auto" takes the highest priority among available kernels for the device
    available: Callable[[], bool] = lambda: True
    why_not: Callable[[], str | None] = lambda: None  # why it is not available here, in a few words


_REGISTRY: dict[str, KernelEntry] = {}
_INSTANCES: dict[str, LocallyConnectedKernel] = {}


def register_kernel(name, factory, devices=("cpu", "cuda"), priority=0, available=lambda: True, why_not=lambda: None):
    _REGISTRY[name] = KernelEntry(name, factory, tuple(devices), priority, available, why_not)


def unavailable_reason(name: str) -> str | None:
    """None where the registered kernel `name` can run here, else why not (e.g. the native build's error)."""
    entry = _REGISTRY[name]
    return None if entry.available() else (entry.why_not() or "not available on this machine")


def registered_names() -> list[str]:
    """Every registered kernel name, whatever the device (config validation checks names against these)."""
    return sorted(_REGISTRY)


def kernel_names(device_type: str | None = None) -> list[str]:
    return [e.name for e in sorted(_REGISTRY.values(), key=lambda e: -e.priority)
            if (device_type is None or device_type in e.devices) and e.available()]


def get_kernel(name: str, device: torch.device | str = "cpu") -> LocallyConnectedKernel:
    dtype = torch.device(device).type
    if name == "auto":
        names = kernel_names(dtype)
        if not names:
            raise ValueError(f"no locally connected kernel is registered for device {dtype}")
        name = names[0]
    if name not in _REGISTRY:
        raise ValueError(f"unknown kernel {name!r} (available: auto, {', '.join(sorted(_REGISTRY))})")
    entry = _REGISTRY[name]
    if dtype not in entry.devices:
        raise ValueError(f"kernel {name!r} does not run on {dtype} (runs on: {', '.join(entry.devices)})")
    if why := unavailable_reason(name):
        raise ValueError(f"kernel {name!r} is not available here: {why}")
    if name not in _INSTANCES:
        _INSTANCES[name] = entry.factory()
    return _INSTANCES[name]


# ---------------------------------------------------------------- tile budget

# Scratch-buffer budget of one tile (patches gathered at once). Measured on the 2-core CPU (small preset,
# batch 100; docs/kernels.md): torch.bmm has a large per-call cost, so tiles of a few locations were
# slower than big ones, while tiles of 32 MB and more fall out of cache (the stage-1 input-gradient pass
# took 2x longer than at 8-16 MB). CUDA: large tiles so each bmm fills the GPU.
TILE_BYTES = {"cpu": 8 << 20, "cuda": 1 << 30}


def tile_bytes(device_type: str) -> int:
    """The scratch budget of one tile on this device type (CUDA's for any device type not listed)."""
    return TILE_BYTES.get(device_type, TILE_BYTES["cuda"])

