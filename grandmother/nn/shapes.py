"""Shapes, parameter counts and FLOPs of a network, computed from its config alone.

This is what `grandmother model-info` prints; it needs no memory for the weights, so it works for the
billion-parameter `paper` preset on any machine. tests/test_model.py checks it against a built model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from grandmother.errors import ConfigError


@dataclass
class StageShape:
    index: int
    input: tuple[int, int, int]  # (channels, height, width)
    filter: tuple[int, int, int]  # (maps, height, width) of the locally connected output
    pool: tuple[int, int, int]
    output: tuple[int, int, int]  # after LCN (same as pool)
    receptive_field: int
    stride: int
    encoder_params: int
    decoder_params: int
    flops_forward: int  # per image: encoder + decoder + pooling + LCN
    flops_train: int  # per image, forward + backward

    def to_dict(self) -> dict:
        return asdict(self)


def check_network(model_cfg) -> None:
    """One-line ConfigError for a network that cannot be built: an unknown kernel, one that cannot run on
    this machine (the native kernel without a compiler), or a stage whose receptive field does not fit its
    input (names the stage). Runs before anything is written, so a refused run leaves no folder behind."""
    from grandmother.nn.kernels import registered_names, unavailable_reason
    if model_cfg.kernel != "auto" and model_cfg.kernel not in registered_names():
        raise ConfigError(f"model.kernel={model_cfg.kernel!r}: unknown kernel "
                          f"(available: auto, {', '.join(registered_names())})")
    if model_cfg.kernel != "auto" and (why := unavailable_reason(model_cfg.kernel)):
        raise ConfigError(f"model.kernel={model_cfg.kernel!r} (--kernel {model_cfg.kernel}) cannot run here: {why}; "
                          f"choose another kernel or auto")
    stage_shapes(model_cfg)


def conv_out(size: int, field: int, stride: int) -> int:
    return (size - field) // stride + 1


def stage_shapes(model_cfg) -> list[StageShape]:
    c, h, w = model_cfg.channels, model_cfg.image_size, model_cfg.image_size
    out = []
    for i, s in enumerate(model_cfg.stages):
        k = s.receptive_field
        if k > h or k > w:
            raise ConfigError(f"model.stages[{i}].receptive_field={k} is larger than its input {h}x{w} "
                              f"(stage {i} input is {c}x{h}x{w})")
        if (h - k) % s.stride or (w - k) % s.stride:
            raise ConfigError(f"model.stages[{i}]: receptive field {k} at stride {s.stride} does not tile "
                              f"its {h}x{w} input exactly ((size - field) must be a multiple of stride)")
        fh, fw = conv_out(h, k, s.stride), conv_out(w, k, s.stride)
        sigmoid = model_cfg.kind == "sigmoid_ae"
        if sigmoid:  # the deep-autoencoder baseline: no pooling, no LCN
            ph, pw = fh, fw
        else:
            if s.pool_size > fh or s.pool_size > fw:
                raise ConfigError(f"model.stages[{i}].pool_size={s.pool_size} is larger than the "
                                  f"{fh}x{fw} filter output")
            ph, pw = conv_out(fh, s.pool_size, s.pool_stride), conv_out(fw, s.pool_size, s.pool_stride)
            if model_cfg.lcn and s.lcn_size % 2 == 0:
                # LCN keeps its input's size with a window centred on each location: odd sizes only.
                raise ConfigError(f"model.stages[{i}].lcn_size={s.lcn_size} must be odd "
                                  f"(the LCN window is centred on each location)")
        m = s.maps
        n_enc = fh * fw * m * c * k * k
        mac = n_enc  # multiply-adds of the encoder for one image; the decoder has as many
        pool_flops = 0 if sigmoid else m * ph * pw * (2 * s.pool_size ** 2 + 2) + 2 * m * fh * fw
        lcn_flops = 0 if (sigmoid or not model_cfg.lcn) else m * ph * pw * (4 * s.lcn_size ** 2 + 6)
        fwd = 2 * mac * 2 + pool_flops + lcn_flops
        # backward of each linear map is two matmuls of the forward's size (input and weight grads)
        train = 3 * (2 * mac * 2) + 3 * (pool_flops + lcn_flops)
        out.append(StageShape(i, (c, h, w), (m, fh, fw), (m, ph, pw), (m, ph, pw), k, s.stride,
                              n_enc, n_enc, fwd, train))
        c, h, w = m, ph, pw
    return out


def model_info(cfg) -> dict:
    stages = stage_shapes(cfg.model)
    enc = sum(s.encoder_params for s in stages)
    dec = sum(s.decoder_params for s in stages)
    return {
        "preset": cfg.preset,
        "stages": [s.to_dict() for s in stages],
        "parameters": {"encoder": enc, "decoder": dec, "total": enc + dec},
        "flops_per_image": sum(s.flops_train for s in stages),
        "flops_per_image_forward": sum(s.flops_forward for s in stages),
    }


def format_model_info(info: dict) -> str:
    rows = [f"preset: {info['preset']}",
            f"{'stage':>5}  {'input':>12}  {'filter out':>12}  {'pool/LCN out':>12}  {'encoder':>14}  "
            f"{'decoder':>14}  {'train FLOPs/img':>16}"]
    fmt = lambda t: "x".join(map(str, t))
    for s in info["stages"]:
        rows.append(f"{s['index']:>5}  {fmt(s['input']):>12}  {fmt(s['filter']):>12}  {fmt(s['output']):>12}  "
                    f"{s['encoder_params']:>14,}  {s['decoder_params']:>14,}  {s['flops_train']:>16,}")
    p = info["parameters"]
    rows.append(f"parameters: encoder {p['encoder']:,}  decoder {p['decoder']:,}  total {p['total']:,}")
    rows.append(f"forward+backward FLOPs per image: {info['flops_per_image']:,} "
                f"({info['flops_per_image'] / 1e9:.2f} GFLOP)")
    return "\n".join(rows)
