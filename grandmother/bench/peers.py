"""`grandmother bench --peers`: one locally connected layer per stage shape, our kernels against peers.

For every stage of the preset (input C x H x W, field k, M maps, stride s) and the batch of the run,
each implementation does forward + backward of one layer: y = f(x, w), then the gradients of x and w
for a given dL/dy (three products of the encoder's size). Rates are FLOP/s of those three products
(6 * B * Ho * Wo * M * C * k * k), as a fraction of the float32 matmul timed in the same run.

Peers (written here from their descriptions, not copied):
- "unfold": the common PyTorch community locally connected layer. Patches by Tensor.unfold along H and
  W, a weight of shape (1, M, C, Ho, Wo, k*k), an elementwise product broadcast over the batch and a sum
  over channels and the field; autograd differentiates it. It materialises B x M x C x Ho x Wo x k^2
  numbers, so rows whose product would not fit in a quarter of the free memory are skipped (n/a).
- "conv2d": torch.nn.functional.conv2d of the same shape (shared weights, so it is a yardstick of what
  the machine's tuned convolution reaches on this shape, not an implementation of the layer).
- "keras-i2", "keras-i1" (CPU): Keras 2's LocallyConnected2D, implementation 2 (dense masked kernel) and 1
  (a slice per location), in its own virtual environment and process (grandmother/bench/keras_peer.py);
  skipped with one line where that environment is not built.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PEERS = ("unfold", "conv2d")


def unfold_lc(x: torch.Tensor, w: torch.Tensor, stride: int) -> torch.Tensor:
    """Community-style locally connected layer. x (B, C, H, W), w (1, M, C, Ho, Wo, k*k) -> (B, M, Ho, Wo)."""
    B, C = x.shape[:2]
    k = int(round(w.shape[-1] ** 0.5))
    patches = x.unfold(2, k, stride).unfold(3, k, stride)  # (B, C, Ho, Wo, k, k)
    patches = patches.contiguous().view(B, 1, C, patches.shape[2], patches.shape[3], k * k)
    return (patches * w).sum(dim=(2, 5))


def _unfold_bytes(B, C, H, W, M, k, s, element_size=4) -> int:
    ho, wo = (H - k) // s + 1, (W - k) // s + 1
    return 3 * element_size * B * M * C * ho * wo * k * k  # the product, its gradient and the patches' gradient


def _fwd_bwd(fn, x, w, gy):
    def run():
        x.grad = w.grad = None
        torch.autograd.backward(fn(x, w), gy)
    return run


def run_peers(cfg, device: torch.device, batch_size: int, kernels: list[str], matmul: float, timer,
              available_bytes: int, repeats: int) -> tuple[list[dict], dict]:
    """(rows {stage, shape, impl, seconds, gflops, fraction_of_matmul} (seconds None where skipped), the Keras
    peer's record: its versions and threads, or {"skipped": why}).

    timer(fn) -> seconds per call (the benchmark's own, with its warm-up and repeats)."""
    from grandmother.nn.kernels import get_kernel
    from grandmother.nn.shapes import stage_shapes

    rows, shapes = [], []
    gen = torch.Generator().manual_seed(2)
    for n, s in enumerate(stage_shapes(cfg.model)):
        C, H, W = s.input
        k, st, M = s.receptive_field, s.stride, s.filter[0]
        Ho, Wo = s.filter[1], s.filter[2]
        shapes.append({"stage": n, "C": C, "H": H, "W": W, "k": k, "M": M, "stride": st})
        x = torch.randn(batch_size, C, H, W, generator=gen).to(device).requires_grad_()
        gy = torch.randn(batch_size, M, Ho, Wo, generator=gen).to(device)
        impls = {}
        for name in kernels:
            kern = get_kernel(name, device.type)
            w = torch.randn(Ho, Wo, M, C, k, k, generator=gen).to(device).requires_grad_()
            impls[name] = _fwd_bwd(lambda a, b, kern=kern: kern.encode(a, b, st), x, w, gy)
        if _unfold_bytes(batch_size, C, H, W, M, k, st) <= available_bytes // 4:
            w = torch.randn(1, M, C, Ho, Wo, k * k, generator=gen).to(device).requires_grad_()
            impls["unfold"] = _fwd_bwd(lambda a, b: unfold_lc(a, b, st), x, w, gy)
        else:
            impls["unfold"] = None
        w = torch.randn(M, C, k, k, generator=gen).to(device).requires_grad_()
        impls["conv2d"] = _fwd_bwd(lambda a, b: F.conv2d(a, b, stride=st), x, w, gy)
        for name, fn in impls.items():
            rows.append(_row(shapes[-1], name, timer(fn) if fn is not None else None, batch_size, matmul))
        del impls, x, gy
    keras = _keras_rows(shapes, device, batch_size, repeats, available_bytes // 4, matmul, rows)
    return rows, keras


def _row(shape: dict, impl: str, seconds, batch_size: int, matmul: float, note=None) -> dict:
    ho, wo = (shape["H"] - shape["k"]) // shape["stride"] + 1, (shape["W"] - shape["k"]) // shape["stride"] + 1
    flops = 6 * batch_size * ho * wo * shape["M"] * shape["C"] * shape["k"] ** 2
    gflops = flops / seconds / 1e9 if seconds else None
    row = {"stage": shape["stage"], "shape": {k: v for k, v in shape.items() if k != "stage"}, "impl": impl,
           "seconds": seconds, "gflops": gflops, "fraction_of_matmul": gflops / matmul if gflops else None}
    return {**row, "note": note} if note else row


def _keras_rows(shapes, device, batch_size, repeats, memory_bytes, matmul, rows) -> dict:
    """Appends the Keras peer's rows to `rows`; returns its record, or {"skipped": why} (nothing appended)."""
    from grandmother.bench import keras_peer
    from grandmother.errors import GrandmotherError
    if device.type != "cpu":
        return {"skipped": f"the Keras peer runs on the CPU only, not on {device.type}"}
    try:
        answer = keras_peer.run_keras(shapes, batch_size, repeats, torch.get_num_threads(), memory_bytes)
    except GrandmotherError as e:
        return {"skipped": str(e)}
    by_stage = {s["stage"]: s for s in shapes}
    for r in answer["rows"]:
        rows.append(_row(by_stage[r["stage"]], keras_peer.impl_name(r["implementation"]), r["seconds"], batch_size,
                         matmul, r.get("note")))
    return {k: answer[k] for k in ("tensorflow", "tf_keras", "threads")}


def format_peers(rows: list[dict], kernels: list[str], keras: dict | None = None) -> str:
    """One line per stage: each implementation's fraction of matmul, and the best kernel over the unfold peer
    and over the best Keras implementation; then one line on the Keras peer (versions, or why it was skipped)."""
    from grandmother.bench.keras_peer import IMPLEMENTATIONS, impl_name
    ran = {r["impl"] for r in rows}
    kerases = [impl_name(i) for i in IMPLEMENTATIONS if impl_name(i) in ran]
    names = list(kernels) + list(PEERS) + kerases
    ratios = [("best/unfold", ["unfold"])] + ([("best/keras", kerases)] if kerases else [])
    lines = ["one locally connected layer, forward + backward, fraction of the float32 matmul rate "
             "(unfold: community pattern; conv2d: shared weights, a yardstick; keras-iN: Keras 2 LocallyConnected2D, "
             "implementation N)",
             f"{'stage':<6} {'C,H,k,M':<13} " + " ".join(f"{n:>9}" for n in names)
             + "".join(f" {head:>12}" for head, _ in ratios)]
    for stage in sorted({r["stage"] for r in rows}):
        by = {r["impl"]: r for r in rows if r["stage"] == stage}
        sh = next(iter(by.values()))["shape"]
        cells = []
        for n in names:
            f = by.get(n, {}).get("fraction_of_matmul")
            cells.append(f"{100 * f:>8.1f}%" if f else f"{'n/a':>9}")
        best = max((by[n]["gflops"] for n in kernels if by.get(n, {}).get("gflops")), default=None)
        for _, peers in ratios:
            peer = max((by[n]["gflops"] for n in peers if by.get(n, {}).get("gflops")), default=None)
            cells.append(f"{best / peer:>11.1f}x" if best and peer else f"{'n/a':>12}")
        label = f"{sh['C']},{sh['H']},{sh['k']},{sh['M']}"
        lines.append(f"{stage:<6} {label:<13} " + " ".join(cells))
    notes = sorted({f"{r['impl']} stage {r['stage']}: {r['note']}" for r in rows if r.get("note")})
    lines += [f"n/a: {n}" for n in notes]
    if keras:
        lines.append(keras_line(keras))
    return "\n".join(lines)


def keras_line(keras: dict) -> str:
    if "skipped" in keras:
        return f"Keras peer skipped: {keras['skipped']}"
    return f"Keras peer: tensorflow {keras['tensorflow']}, tf_keras {keras['tf_keras']}, {keras['threads']} thread(s)"
