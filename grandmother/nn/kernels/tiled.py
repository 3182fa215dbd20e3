"""Tiled locally connected kernel: patches of a few output rows at a time, one batched matmul per tile.

The reference kernel unfolds the whole batch into patches (B x Ho*Wo x C*k*k floats: 13 GB for a batch
of 100 paper-sized images) and then multiplies. Here the output rows are cut into tiles; for each tile
the patches are gathered from a strided view of the input (`as_strided`, one copy into a location-major
(L_t, B, C*k*k) buffer; F.unfold measured ~30x slower than this copy on CPU) and one torch.bmm per tile
does every location's (M x Ckk) @ (Ckk x B) product. The patch buffer is bounded by the tile budget
(base.tile_bytes), so the memory added beyond inputs, outputs and weights is O(tile), never the whole batch's patches.

The same torch-ops code runs on CPU and CUDA; only the tile budget differs. torch.bmm is multithreaded
on CPU (intra-op parallelism) and one batched cuBLAS call on CUDA, so there is no extra threading here.
On CUDA, `torch.backends.cuda.matmul.allow_tf32` applies to these products as to any matmul; the
benchmark's `--tf32` flag turns it on and reports the error against float64.
"""
from __future__ import annotations

import torch

from grandmother.nn.kernels.base import PrimitiveKernel, register_kernel, tile_bytes



def _row_tiles(B, w_shape, element_size, device_type):
    """Yield (i0, i1) ranges of output rows whose patch buffer fits the device's tile budget."""
    Ho, Wo, M, C, k, _ = w_shape
    row_bytes = B * Wo * C * k * k * element_size
    rows = max(1, min(Ho, tile_bytes(device_type) // max(1, row_bytes)))
    for i0 in range(0, Ho, rows):
        yield i0, min(Ho, i0 + rows)


def _patch_view(x, i0, i1, Wo, k, stride):
    """Strided view (i1-i0, Wo, B, C, k, k) of the patches of output rows i0..i1-1 (no copy)."""
    B, C = x.shape[:2]
    sb, sc, sh, sw = x.stride()
    base = x[:, :, i0 * stride:, :]
    return base.as_strided((i1 - i0, Wo, B, C, k, k), (stride * sh, stride * sw, sb, sc, sh, sw),
                           base.storage_offset())


def _tile_patches(x, i0, i1, Wo, k, stride):
    """Patches of output rows i0..i1-1, location-major and contiguous: (L_t, B, C*k*k)."""
    B, C = x.shape[:2]
    return _patch_view(x, i0, i1, Wo, k, stride).reshape((i1 - i0) * Wo, B, C * k * k)


class TiledKernel(PrimitiveKernel):
    name = "tiled"

    def workspace_bytes(self, batch, in_chw, maps, field, stride, device_type, element_size=4):
        return tile_bytes(device_type)  # at most one tile's patch buffer

    def forward(self, x, w, stride):
        Ho, Wo, M, C, k, _ = w.shape
        B = x.shape[0]
        x = x.contiguous()
        # y built as (Ho, Wo, M, B): each tile's bmm writes its rows in place; one permute at the end
        y = x.new_empty(Ho, Wo, M, B)
        for i0, i1 in _row_tiles(B, w.shape, x.element_size(), x.device.type):
            n = (i1 - i0) * Wo
            p = _tile_patches(x, i0, i1, Wo, k, stride)
            torch.bmm(w[i0:i1].reshape(n, M, C * k * k), p.transpose(1, 2), out=y[i0:i1].view(n, M, B))
        return y.permute(3, 2, 0, 1).contiguous()

    def backward_input(self, gy, w, stride, in_hw):
        Ho, Wo, M, C, k, _ = w.shape
        B = gy.shape[0]
        gx = gy.new_zeros(B, C, *in_hw)
        gyl = gy.permute(2, 3, 1, 0).contiguous()  # (Ho, Wo, M, B)
        for i0, i1 in _row_tiles(B, w.shape, gy.element_size(), gy.device.type):
            n = (i1 - i0) * Wo
            wt = w[i0:i1].reshape(n, M, C * k * k)
            gp = torch.bmm(wt.transpose(1, 2), gyl[i0:i1].reshape(n, M, B))  # (L_t, Ckk, B)
            gp = gp.view(i1 - i0, Wo, C, k, k, B)
            target = _patch_view(gx, i0, i1, Wo, k, stride)  # (rows, Wo, B, C, k, k), overlapping
            # Patches overlap, so one strided add over all offsets would race; each (p, q) offset alone
            # does not. (F.fold does the same sum but measured 2-3x slower on CPU.)
            for p in range(k):
                for q in range(k):
                    target[..., p, q].add_(gp[:, :, :, p, q].permute(0, 1, 3, 2))
        return gx

    def backward_weight(self, x, gy, stride, field):
        B, C = x.shape[:2]
        _, M, Ho, Wo = gy.shape
        k = field
        x = x.contiguous()
        gw = x.new_empty(Ho, Wo, M, C, k, k)
        gwf = gw.view(Ho, Wo * M, C * k * k)
        gyl = gy.permute(2, 3, 1, 0).contiguous()  # (Ho, Wo, M, B)
        for i0, i1 in _row_tiles(B, gw.shape, x.element_size(), x.device.type):
            n = (i1 - i0) * Wo
            p = _tile_patches(x, i0, i1, Wo, k, stride)
            torch.bmm(gyl[i0:i1].reshape(n, M, B), p, out=gwf[i0:i1].view(n, M, C * k * k))
        return gw


register_kernel("tiled", TiledKernel, devices=("cpu", "cuda"), priority=10)
