"""`grandmother bench`: time every locally connected kernel inside the whole network, against this machine.

For each kernel registered for the device it times, on random images of the preset's shape: the
locally connected maps alone (lc_layers), forward (network with objective), forward+backward, and the
full training step (the trainer's own `train.train_step`: forward, backward, the update of
`train.optimizer`, so `--set train.optimizer=sgd` times SGD); then, once, the training step with the locally
connected maps skipped (the floor no kernel can go below). FLOPs come from grandmother/shapes.py; the
yardsticks are a large float32 matmul and a large copy timed in the same run, so "fraction_of_matmul"
is comparable across noisy or shared machines.
Peak memory: torch.cuda.max_memory_allocated on CUDA; on CPU the process's peak RSS (VmHWM, reset
through /proc/self/clear_refs before each measurement), which includes parameters and optimizer state.
With peers=True (`--peers`), also one layer per stage shape against peers: see grandmother/bench/peers.py.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from grandmother.errors import GrandmotherError


def matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    _sync(device)
    a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t) / 1e9


def copy_gbs(device, mib: int = 256, repeats: int = 5) -> float:
    """Memory bandwidth yardstick: GB/s of reading plus writing a large float32 tensor (a copy)."""
    a = torch.empty(mib << 18, device=device).fill_(1.0)
    b = torch.empty_like(a)
    b.copy_(a)
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        b.copy_(a)
    _sync(device)
    return 2 * a.numel() * 4 * repeats / (time.perf_counter() - t) / 1e9


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # "5" resets the peak resident set size (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def _peak(device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def kernel_workspace(cfg, batch_size: int, kernel: str, device_type: str) -> int:
    """Bytes the kernel allocates beyond inputs and outputs in the network's largest stage (float32)."""
    from grandmother.nn.kernels import get_kernel
    from grandmother.nn.shapes import stage_shapes
    k = get_kernel(kernel, device_type)
    return max(k.workspace_bytes(batch_size, s.input, s.filter[0], s.receptive_field, s.stride, device_type)
               for s in stage_shapes(cfg.model))


def memory_estimate(cfg, batch_size: int, workspace_bytes: int = 0) -> dict:
    """Bytes of one float32 training step: parameters, gradients, optimizer state, activations.

    Activations: per stage, the tensors autograd keeps (input, filter output, pooled output, LCN
    intermediates ~4x the pooled size, reconstruction) at float32. An estimate, not a measurement.
    """
    from grandmother.nn.shapes import stage_shapes

    shapes = stage_shapes(cfg.model)
    params = sum(s.encoder_params + s.decoder_params for s in shapes)
    act = 0
    for s in shapes:
        n_in = s.input[0] * s.input[1] * s.input[2]
        n_f = s.filter[0] * s.filter[1] * s.filter[2]
        n_p = s.pool[0] * s.pool[1] * s.pool[2]
        act += 2 * n_in + 2 * n_f + 5 * n_p
    t = cfg.train  # tensors of optimizer state per parameter tensor
    states = {"adagrad": 1, "adam": 2, "sgd": 1 if t.momentum else 0}.get(t.optimizer, 1)
    out = {"parameters": 4 * params, "gradients": 4 * params, f"{t.optimizer}_state": 4 * params * states,
           "activations": 4 * act * batch_size, "kernel_workspace": workspace_bytes}
    out["total"] = sum(out.values())
    return out


def _available_memory(device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def _time(fn, device, repeats: int) -> float:
    fn()  # warm-up (allocations, first-call setup)
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / repeats


def run_bench(cfg, device: torch.device, batch_size: int, kernels: list[str] | None = None,
              repeats: int = 3, peers: bool = False) -> dict:
    from grandmother.nn.kernels import kernel_names
    from grandmother.nn.shapes import stage_shapes

    shapes = stage_shapes(cfg.model)
    flops_fwd = sum(s.flops_forward for s in shapes) * batch_size
    flops_train = sum(s.flops_train for s in shapes) * batch_size
    names = kernels or kernel_names(device.type)
    workspace = {name: kernel_workspace(cfg, batch_size, name, device.type) for name in names}
    have = _available_memory(device)
    for name in names:  # every kernel timed must fit, not only the first
        need = memory_estimate(cfg, batch_size, workspace[name])["total"]
        if need > have:
            raise GrandmotherError(
                f"--preset {cfg.preset} at --batch-size {batch_size} needs about {need / 2**30:.1f} GiB for one "
                f"training step with --kernel {name} on {device.type}, but only {have / 2**30:.1f} GiB is free")
    mm = matmul_gflops(device)
    bw = copy_gbs(device)
    rows = []
    gen = torch.Generator().manual_seed(0)
    c, h, w = shapes[0].input
    images = torch.randint(0, 256, (batch_size, c, h, w), dtype=torch.uint8, generator=gen).to(device)
    for name in names:
        cfg.model.kernel = name
        net, forward, forward_backward, train = _step_functions(cfg, images, device)
        lc_only, flops_lc = _lc_layers_only(net, shapes, batch_size, device)
        for step, fn, flops in (("lc_layers", lc_only, flops_lc), ("forward", forward, flops_fwd),
                                ("forward_backward", forward_backward, flops_train), ("train", train, flops_train)):
            _reset_peak(device)
            seconds = _time(fn, device, repeats)
            gflops = flops / seconds / 1e9
            rows.append({"impl": name, "step": step, "seconds_per_batch": seconds,
                         "images_per_s": batch_size / seconds, "gflops": gflops,
                         "fraction_of_matmul": gflops / mm, "peak_memory_bytes": _peak(device)})
        del net, forward, forward_backward, train, lc_only
    # The floor no kernel can go below: the same training step with the locally connected maps skipped.
    net, _, _, train = _step_functions(cfg, images, device)
    for st in net.stages:
        st.filter.encode, st.filter.decode = _skipped_lc(st.filter, "encode"), _skipped_lc(st.filter, "decode")
    rest = _time(train, device, repeats)
    extra = {}
    if peers:  # one layer per stage shape against the unfold pattern and conv2d (grandmother/bench/peers.py)
        from grandmother.bench.peers import run_peers
        extra["peers"], extra["keras_peer"] = run_peers(cfg, device, batch_size, names, mm,
                                                        lambda fn: _time(fn, device, repeats), have, repeats)
    return {**extra, "preset": cfg.preset, "device": device_name(device), "batch_size": batch_size,
            "matmul_gflops": mm, "copy_gbs": bw, "memory_estimate_bytes": memory_estimate(cfg, batch_size, workspace[names[0]]),
            "rows": rows, "rest_of_train_step_seconds": rest,
            "train_step_seconds_at_25_percent": flops_train / (0.25 * mm * 1e9)}


def _step_functions(cfg, images, device):
    """(net, forward, forward_backward, train) closures over one network built with cfg.model.kernel;
    `train` is the trainer's own step (train.train_step) with the config's optimizer."""
    from grandmother.nn.model import Network
    from grandmother.training.optim import build_optimizer
    from grandmother.training.loop import train_step
    net = Network(cfg.model, generator=torch.Generator().manual_seed(0), device=device)
    opt = build_optimizer(net.parameters(), cfg.train)  # the trainer's optimizer (train.fused_optimizer)
    x = net.prepare(images)

    def forward():
        with torch.no_grad():
            net(x, objective=True)

    def forward_backward():
        net.zero_grad(set_to_none=False)
        net(x, objective=True).loss.backward()

    def train():
        train_step(net, opt, images, cfg.train)

    return net, forward, forward_backward, train


class _NoLC(torch.autograd.Function):
    """Output of the right shape, gradients of the right shapes, no arithmetic (for the floor)."""

    @staticmethod
    def forward(ctx, inp, w, out_shape):
        ctx.shapes = inp.shape, w.shape
        return inp.new_zeros(out_shape)

    @staticmethod
    def backward(ctx, g):
        inp_shape, w_shape = ctx.shapes
        return g.new_zeros(inp_shape), g.new_zeros(w_shape), None


def _skipped_lc(layer, which: str):
    (ho, wo), (h, w) = layer.out_hw, layer.in_hw
    if which == "encode":
        return lambda x: _NoLC.apply(x, layer.encoder, (x.shape[0], layer.maps, ho, wo))
    return lambda y: _NoLC.apply(y, layer.decoder, (y.shape[0], layer.in_channels, h, w))


def _lc_layers_only(net, shapes, batch_size: int, device):
    """The locally connected maps alone, every stage: encode, decode and both their backwards.

    Separates the kernels' own rate from the rest of the step (pooling, LCN, the loss, the optimizer): the
    "lc_layers" row is what a kernel reaches; "train" is what the network reaches with it.
    FLOPs: six matrix products of the encoder's size per stage (2 forward, 4 backward).
    """
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(batch_size, *s.input, generator=gen).to(device).requires_grad_() for s in shapes]
    gouts = [torch.randn(batch_size, *s.input, generator=gen).to(device) for s in shapes]
    stages = list(net.stages)

    def run():
        for st, x, g in zip(stages, inputs, gouts):
            lc = st.filter
            r = lc.decode(lc.encode(x))
            torch.autograd.backward(r, g)
        for st, x in zip(stages, inputs):
            x.grad = None
            st.filter.encoder.grad = st.filter.decoder.grad = None

    return run, 12 * sum(s.encoder_params for s in shapes) * batch_size


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return "cpu"


def format_table(result: dict) -> str:
    lines = [f"preset {result['preset']}, batch {result['batch_size']}, device {result['device']}",
             f"float32 matmul: {result['matmul_gflops']:.1f} GFLOP/s; memory copy: {result['copy_gbs']:.1f} GB/s "
             f"(read + write)",
             f"{'impl':<12} {'step':<17} {'s/batch':>9} {'images/s':>10} {'GFLOP/s':>9} {'of matmul':>10} "
             f"{'peak MB':>9}"]
    for r in result["rows"]:
        lines.append(f"{r['impl']:<12} {r['step']:<17} {r['seconds_per_batch']:>9.4f} {r['images_per_s']:>10.1f} "
                     f"{r['gflops']:>9.2f} {100 * r['fraction_of_matmul']:>9.1f}% "
                     f"{r['peak_memory_bytes'] / 2**20:>9.0f}")
    lines.append(f"rest of the training step (pooling, LCN, objective, optimizer; locally connected maps skipped): "
                 f"{result['rest_of_train_step_seconds']:.4f} s/batch; a whole step at 25% of matmul would take "
                 f"{result['train_step_seconds_at_25_percent']:.4f} s")
    if "peers" in result:
        from grandmother.bench.peers import format_peers
        lines.append(format_peers(result["peers"], sorted({r["impl"] for r in result["rows"]},
                                                          key=[r["impl"] for r in result["rows"]].index),
                                  result.get("keras_peer")))
    est = result["memory_estimate_bytes"]
    lines.append(f"training-step memory estimate ({result['rows'][0]['impl'] if result['rows'] else '?'}): " + ", ".join(
        f"{k} {v / 2**30:.2f} GiB" for k, v in est.items()))
    return "\n".join(lines)
