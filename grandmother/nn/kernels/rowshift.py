"""Row-shift locally connected kernel (stride 1): no patch is ever copied; k batched matmuls read the input.

Layout trick. The input is put batch-last, xb[h, w, c, b] (H+1 rows, the extra one zero), so for a fixed
row offset p of the field, the k*C*B numbers of patch row p of output location (i, j) are *contiguous*:
xb[i+p, j:j+k, :, :]. Output locations are numbered t = i*W + j with j running over the whole input
width W (not just the Wo valid columns), so location t's patch row starts at t*C*B + p*W*C*B: one
strided view X_p of shape (Ho*W, k*C, B), batch stride C*B, with no copy. Then

    y[t] = sum_p  W_p[t] @ X_p[t]          W_p[t]: the (M x k*C) weights of location t for field row p

is k calls of torch.baddbmm over all locations. The W - Wo "junk" columns per row (where the window runs
off the row's end into the next) get zero weights and are dropped: a (k-1)/W overhead (22% at the small
preset's 32, 8.5% at the paper's 200), against the tiled kernel's full copy of every patch. The weights
are permuted to (Ho, W, M, k, k, C) on each call (M/B of the patch volume: 8% at batch 100).

Backward: the weight gradient is the same k products transposed (gy_t @ X_p^T). The input gradient
uses that field offset (p, q) of every location lands in one contiguous block of the batch-last input
gradient: k^2 baddbmm accumulate into those blocks directly (for one input channel, where those products
are too thin, a field row's patch gradients are computed in chunks bounded by the tile budget, then added).

Strides other than 1 would need junk at every column (waste (s-1)/s), so they use the tiled kernel.
Same torch-ops code on CPU and CUDA (cuBLAS strided-batched matmuls accept the overlapping views).
"""
from __future__ import annotations

import torch

from grandmother.nn.kernels.base import register_kernel, tile_bytes
from grandmother.nn.kernels.tiled import TiledKernel


def _batch_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (H+1, W, C, B), the last row zero so every shifted view stays inside the tensor."""
    B, C, H, W = x.shape
    xb = x.new_empty(H + 1, W, C, B)
    xb[:H] = x.permute(2, 3, 1, 0)
    xb[H] = 0
    return xb


def _padded_weights(w: torch.Tensor, W: int) -> torch.Tensor:
    """(Ho, Wo, M, C, k, k) -> (Ho*W, M, k, k*C): rows of the field outermost, junk columns zero."""
    Ho, Wo, M, C, k, _ = w.shape
    wp = w.new_zeros(Ho, W, M, k, k, C)
    wp[:, :Wo] = w.permute(0, 1, 2, 4, 5, 3)
    return wp.view(Ho * W, M, k, k * C)


def _locations_last(gy: torch.Tensor, W: int) -> torch.Tensor:
    """(B, M, Ho, Wo) -> (Ho*W, M, B), junk columns zero."""
    B, M, Ho, Wo = gy.shape
    gt = gy.new_zeros(Ho, W, M, B)
    gt[:, :Wo] = gy.permute(2, 3, 1, 0)
    return gt.view(Ho * W, M, B)


def _row_view(xb: torch.Tensor, n: int, p: int, k: int) -> torch.Tensor:
    """X_p: (n, k*C, B) view of patch row p of the first n locations (no copy)."""
    _, W, C, B = xb.shape
    return xb.as_strided((n, k * C, B), (C * B, B, 1), xb.storage_offset() + p * W * C * B)


class RowShiftKernel(TiledKernel):
    name = "rowshift"

    def workspace_bytes(self, batch, in_chw, maps, field, stride, device_type, element_size=4):
        if stride != 1:
            return super().workspace_bytes(batch, in_chw, maps, field, stride, device_type, element_size)
        c, h, w = in_chw
        ho = h - field + 1
        relaid = (h + 1) * w * c * batch + ho * w * maps * c * field ** 2 + ho * w * maps * batch
        chunk = tile_bytes(device_type) if c == 1 else 0
        return element_size * relaid + chunk  # batch-last input, padded weights and output; C == 1 buffer

    def forward(self, x, w, stride):
        if stride != 1:
            return super().forward(x, w, stride)
        Ho, Wo, M, C, k, _ = w.shape
        B, W = x.shape[0], x.shape[3]
        xb, wp = _batch_last(x), _padded_weights(w, W)
        n = Ho * W
        y = x.new_zeros(n, M, B)
        for p in range(k):
            y.baddbmm_(wp[:, :, p], _row_view(xb, n, p, k))
        return y.view(Ho, W, M, B)[:, :Wo].permute(3, 2, 0, 1).contiguous()

    def backward_weight(self, x, gy, stride, field):
        if stride != 1:
            return super().backward_weight(x, gy, stride, field)
        B, C, H, W = x.shape
        _, M, Ho, Wo = gy.shape
        k, n = field, Ho * W
        xb, gt = _batch_last(x), _locations_last(gy, W)
        gw = x.new_empty(k, n, M, k * C)  # field row p outermost, so each product writes a contiguous block
        for p in range(k):
            torch.bmm(gt, _row_view(xb, n, p, k).transpose(1, 2), out=gw[p])
        # (p, Ho, W, M, q, C) -> keep the Wo valid columns -> (Ho, Wo, M, C, p, q)
        return gw.view(k, Ho, W, M, k, C)[:, :, :Wo].permute(1, 2, 3, 5, 0, 4).contiguous()

    def backward_input(self, gy, w, stride, in_hw):
        if stride != 1:
            return super().backward_input(gy, w, stride, in_hw)
        Ho, Wo, M, C, k, _ = w.shape
        B = gy.shape[0]
        H, W = in_hw
        n = Ho * W
        wp, gt = _padded_weights(w, W), _locations_last(gy, W)
        gxb = gy.new_zeros(H + 1, W, C, B)
        flat = gxb.view(-1)
        CB = C * B
        # Field offset (p, q) of location t lands at row-major input position t + p*W + q, so for one
        # (p, q) all locations write one contiguous block of gxb: (n, C, B), no overlap within it.
        if C > 1:
            # Accumulate each (p, q)'s products straight into that block: k^2 baddbmm, no buffer.
            for p in range(k):
                for q in range(k):
                    start = (p * W + q) * CB
                    flat[start:start + n * CB].view(n, C, B).baddbmm_(
                        wp[:, :, p, q * C:(q + 1) * C].transpose(1, 2), gt)
        else:
            # One input channel makes those products (1 x M) @ (M x B), too thin for a matmul (measured
            # 1.6x slower at the small preset's stage 0): compute a whole field row's patch gradients in
            # chunks of locations (bounded by the tile budget), then k adds of contiguous blocks.
            budget = tile_bytes(gy.device.type)
            chunk = max(1, budget // (k * CB * gy.element_size()))
            for t0 in range(0, n, chunk):
                t1 = min(n, t0 + chunk)
                for p in range(k):
                    g = torch.bmm(wp[t0:t1, :, p].transpose(1, 2), gt[t0:t1]).view(t1 - t0, k, CB)
                    for q in range(k):
                        start = (t0 + p * W + q) * CB
                        flat[start:start + (t1 - t0) * CB].view(t1 - t0, CB).add_(g[:, q])
        return gxb[:H].permute(3, 2, 0, 1).contiguous()


register_kernel("rowshift", RowShiftKernel, devices=("cpu", "cuda"), priority=20)
