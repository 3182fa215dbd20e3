"""Reference locally connected kernel: unfold the input into patches, one small matmul per location.

Plain differentiable torch ops, so autograd (not hand-written backward code) gives its gradients: it is
the ground truth the fast kernels are tested against. It materialises every patch of the batch
(B x L x C*k*k floats), which is what makes it slow and, at the paper's size, impossible.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from grandmother.nn.kernels.base import LocallyConnectedKernel, register_kernel


class ReferenceKernel(LocallyConnectedKernel):
    name = "reference"

    def workspace_bytes(self, batch, in_chw, maps, field, stride, device_type, element_size=4):
        c, h, w = in_chw  # the whole batch's unfolded patches
        return element_size * batch * ((h - field) // stride + 1) * ((w - field) // stride + 1) * c * field ** 2

    def encode(self, x, w, stride):
        Ho, Wo, M, C, k, _ = w.shape
        B = x.shape[0]
        patches = F.unfold(x, k, stride=stride)  # (B, C*k*k, L)
        y = torch.einsum("bkl,lmk->bml", patches, w.reshape(Ho * Wo, M, C * k * k))
        return y.reshape(B, M, Ho, Wo)

    def decode(self, y, w, stride, in_hw):
        Ho, Wo, M, C, k, _ = w.shape
        B = y.shape[0]
        patches = torch.einsum("bml,lmk->bkl", y.reshape(B, M, Ho * Wo), w.reshape(Ho * Wo, M, C * k * k))
        return F.fold(patches, tuple(in_hw), k, stride=stride)


register_kernel("reference", ReferenceKernel, devices=("cpu", "cuda"), priority=0)
