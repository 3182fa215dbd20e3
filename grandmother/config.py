"""One place for every setting: dataclasses, loaded from a preset YAML, overridden from the command line.

    cfg = load_config("small", overrides=["model.sparsity=0.2", "train.lr=0.05"])

A preset is `grandmother/presets/NAME.yaml` or a path to a YAML file. Unknown keys are errors, so a typo
in a YAML file or an override never silently does nothing.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from grandmother.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class StageConfig:
    # Paper section 3.2: 18x18 receptive fields connected to all input maps, 8 maps per location
    # (docs/paper-notes.md: 8 maps at stride 1 reproduces the "1 billion connections").
    receptive_field: int = 18
    # The paper gives no stride; stride 1 is the only one that matches ~1B encoder weights (docs/paper-notes.md).
    stride: int = 1
    maps: int = 8
    # L2 pooling over 5x5 overlapping neighbourhoods within one map; stride 1 ("overlapping").
    pool_size: int = 5
    pool_stride: int = 1
    # Local contrast normalization window: the paper says "Gaussian"; size is not given. We follow
    # Jarrett et al. 2009 (the paper's LCN reference): 9x9, sigma chosen so the window is ~2 sigma wide.
    lcn_size: int = 9
    lcn_sigma: float = 2.0


@dataclass
class ModelConfig:
    image_size: int = 200  # square input, pixels
    channels: int = 3  # 3 = RGB, 1 = grayscale
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig() for _ in range(3)])
    # lambda in the objective; 0.1 from lecture notes / Nervana's re-implementation (docs/paper-notes.md, secondary).
    sparsity: float = 0.1
    # eps inside sqrt(eps + H (W1 x)^2); not recoverable from the paper. 0.01 keeps the gradient of
    # the square root bounded (1 / (2 sqrt(eps)) = 5) at zero activation.
    pool_eps: float = 0.01
    # c in max(c, local std): 0.01 per the paper's text.
    lcn_c: float = 0.01
    # False gives the "without contrast normalization" ablation of Table 1 (`train --no-lcn`).
    lcn: bool = True
    # "local": each stage's objective trains only that stage (its input is detached), as in greedy
    # stacked autoencoders; "joint": later stages' objectives also backpropagate into earlier stages.
    # Default local: every stage objective is defined "on its own input"; letting stage 2's
    # sparsity penalty reach stage 1 rewards stage 1 for making stage-2 inputs easy, not informative,
    # and it costs a backward pass through pooling and LCN. Both sum the three objectives.
    stage_gradients: str = "local"
    # Per-image preprocessing of the raw pixels: "standardize" (zero mean, unit variance per image,
    # our choice: the paper is silent), "lcn" (standardize, then local contrast normalization of the
    # pixels with stage 0's LCN window: a local whitening), or "none" (pixels scaled to [0, 1]).
    input_norm: str = "standardize"
    # True: the decoder is the encoder's transpose (RICA, Le et al. NIPS 2011); the decoder tensor is
    # then unused. False: untied W1 and W2 as in the paper.
    tied: bool = False
    # Locally connected kernel: "auto" picks the fastest registered one for the device, "reference"
    # is the plain unfold + batched-matmul implementation (see grandmother/kernels).
    kernel: str = "auto"
    # Pooling and LCN windows as sums of shifted slices, separably (model.window_sum): 2.3x faster than
    # avg_pool2d / conv2d forward + backward on the 2-core CPU; equal up to the order of additions
    # (last-bit differences), deterministic, so resumed runs stay bit-identical. False: the library ops.
    separable_ops: bool = True
    # "sparse_ae" is the paper's model; "sigmoid_ae" is the locally connected deep autoencoder baseline
    # of Table 1 (sigmoid units, no pooling or LCN, reconstruction only).
    kind: str = "sparse_ae"


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 100  # paper: minibatches of 100 examples
    # Paper is silent on the rate; Adagrad as in DistBelief (Dean et al. 2012). The rate is per-preset.
    optimizer: str = "adagrad"
    lr: float = 0.01
    momentum: float = 0.0  # sgd only
    device: str = "auto"
    seed: int = 0
    checkpoint_every: int = 200  # steps; a checkpoint is also written at the end
    # How many of the newest checkpoints a run keeps; 0 keeps every one (a learning curve scores them all).
    keep_checkpoints: int = 2
    log_every: int = 10  # steps between metrics.jsonl lines
    num_workers: int = 0  # background data-loading workers
    grad_clip: float = 0.0  # 0 = off
    # Norm control for the untied objective, whose scale is degenerate (W1 * a, W2 / a keeps the
    # reconstruction and shrinks the sparsity term): after every step each unit's "decoder" (or
    # "encoder") vector is projected back to unit L2 norm, as sparse coding does with its dictionary.
    # "none" is the paper's text. Default per preset (docs/experiments.md).
    norm_control: str = "none"
    # Spatial model parallelism (grandmother/parallel): "" = one process; "RxC" splits one replica over an
    # R x C grid of worker processes (`--model-parallel P` is "Px1"); "RxC:w1,..:v1,.." gives unequal blocks.
    partition: str = ""
    # PyTorch's fused (single-kernel) optimizer step: Adagrad's step 2.2x faster than the per-tensor loop
    # on the 2-core CPU. Deterministic, and the choice is saved in the optimizer state, so a resumed run
    # continues with the implementation it started with; last-bit differences from the loop.
    fused_optimizer: bool = True
    # "joint": every step trains every stage (each on the current output of the stage below; the paper).
    # "greedy": the steps are split into equal phases, one per stage, bottom up; in phase s only stage s
    # learns and the stages below it are frozen (stage-wise pretraining, Hinton et al. 2006; Le et al.
    # 2011 trained RICA layer by layer). Needs model.stage_gradients=local; single-device engine only.
    schedule: str = "joint"


@dataclass
class DownpourConfig:
    # Downpour SGD (Dean et al. 2012); the paper used 5 replicas and 256 parameter-server shards.
    replicas: int = 2
    ps_shards: int = 2
    fetch_every: int = 1  # P: fetch parameters every P steps
    push_every: int = 1  # G: push accumulated gradients every G steps
    ray_address: str = ""  # "" = start an embedded local Ray; "auto" or host:port joins a cluster
    replica_device: str = "cpu"
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    ps_checkpoint_every: int = 100  # parameter-server updates between shard checkpoints
    object_store_memory: int = 256 * 1024 * 1024
    warmstart_steps: int = 0  # steps a single replica trains before the others join (DistBelief)


@dataclass
class Config:
    preset: str = "paper"
    engine: str = "local"  # local | downpour
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    downpour: DownpourConfig = field(default_factory=DownpourConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "engine": ("local", "downpour"),
    "model.stage_gradients": ("local", "joint"),
    "model.input_norm": ("standardize", "lcn", "none"),
    "model.kind": ("sparse_ae", "sigmoid_ae"),
    "train.optimizer": ("sgd", "adagrad", "adam"),
    "train.norm_control": ("none", "decoder", "encoder"),
    "train.schedule": ("joint", "greedy"),
    "train.device": ("auto", "cpu", "cuda"),
    "downpour.replica_device": ("cpu", "cuda"),
}

# Lower bounds of numeric settings, checked by `validate` (which also refuses NaN and infinity anywhere).
# (key, bound, inclusive, what it is)
BOUNDS = [
    ("model.sparsity", 0, True, "the sparsity weight lambda"),
    ("train.momentum", 0, True, "SGD momentum"),
    ("train.grad_clip", 0, True, "the gradient-norm clip (0 = off)"),
    ("train.checkpoint_every", 1, True, "steps between checkpoints"),
    ("train.log_every", 1, True, "steps between metrics.jsonl lines"),
    ("train.keep_checkpoints", 0, True, "checkpoints kept (0 = all)"),
    ("train.num_workers", 0, True, "background data-loading workers"),
    ("downpour.replica_cpus", 0, True, "CPUs per replica"),
    ("downpour.replica_gpus", 0, True, "GPUs per replica"),
    ("downpour.ps_checkpoint_every", 1, True, "parameter-server updates between checkpoints"),
    ("downpour.object_store_memory", 78643200, True, "bytes of Ray object store (Ray needs at least 75 MiB)"),
    ("downpour.warmstart_steps", 0, True, "steps one replica trains alone first"),
]


# ---------------------------------------------------------------- dict <-> dataclass

def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown setting {where + '.' if where else ''}{sorted(unknown)[0]} "
                          f"(known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _coerce(tp, value, where: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        return str(value)
    return value


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def _get(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> None:
    """The checks that need only the values. Those that need a higher layer run where that layer starts:
    kernel name and stage shapes in `grandmother.nn.shapes.check_network`, the partition in
    `grandmother.distributed.parallel.partition.check_partition` (the command layer runs both at once)."""
    for key, value in _numbers(cfg.to_dict(), ""):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value}: must be a finite number")
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    m = cfg.model
    if m.channels not in (1, 3):
        raise ConfigError(f"model.channels={m.channels}: must be 1 (gray) or 3 (rgb)")
    if not m.stages:
        raise ConfigError("model.stages: at least one stage is needed")
    for i, s in enumerate(m.stages):
        for name in ("receptive_field", "stride", "maps", "pool_size", "pool_stride", "lcn_size"):
            if getattr(s, name) < 1:
                raise ConfigError(f"model.stages[{i}].{name} must be >= 1")
        if s.lcn_sigma <= 0:
            raise ConfigError(f"model.stages[{i}].lcn_sigma={s.lcn_sigma} must be > 0 (the LCN Gaussian's width)")
    if m.lcn_c <= 0 or m.pool_eps <= 0 or m.sparsity < 0:
        raise ConfigError(f"model.lcn_c={m.lcn_c} and model.pool_eps={m.pool_eps} must be > 0, "
                          f"model.sparsity={m.sparsity} must be >= 0")
    t = cfg.train
    if t.steps < 0 or t.batch_size < 1 or t.lr <= 0:
        raise ConfigError("train.steps >= 0, train.batch_size >= 1 and train.lr > 0 are required")
    if cfg.engine == "downpour" and t.norm_control != "none":
        raise ConfigError(f"train.norm_control={t.norm_control}: the Downpour engine does not project norms (its "
                          f"shards hold flat slices); use --set train.norm_control=none with --engine downpour")
    if t.schedule == "greedy" and (m.stage_gradients != "local" or cfg.engine != "local" or t.partition):
        raise ConfigError("train.schedule=greedy needs model.stage_gradients=local and the single-device engine "
                          "(no --engine downpour, no --model-parallel)")
    d = cfg.downpour
    if d.fetch_every < 1 or d.push_every < 1:
        raise ConfigError(f"--fetch-every and --push-every must be >= 1 (got P={d.fetch_every}, G={d.push_every})")
    if d.replicas < 1 or d.ps_shards < 1:
        raise ConfigError("--replicas and --ps-shards must be >= 1")
    _validate_numbers(cfg)
    if d.replica_device == "cuda" and d.replica_gpus <= 0:
        raise ConfigError("--replica-device cuda needs --replica-gpus > 0 (downpour.replica_device, downpour.replica_gpus; "
                          "e.g. 1: one GPU per replica)")


def _validate_numbers(cfg: Config) -> None:
    """Every bounded setting is within its bound (BOUNDS)."""
    for key, bound, inclusive, what in BOUNDS:
        value = _get(cfg, key)
        if value < bound or (not inclusive and value == bound):
            raise ConfigError(f"{key}={value}: must be {'>=' if inclusive else '>'} {bound} ({what})")


def _numbers(obj, prefix: str):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{prefix}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield prefix, obj


# ---------------------------------------------------------------- presets and overrides

def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    p = PRESET_DIR / f"{name}.yaml"
    if not p.is_file():
        raise ConfigError(f"unknown preset {name!r} (available: {', '.join(available_presets())})")
    return p


def parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. model.sparsity=0.2")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({_yaml_problem(e)})") from None


def _yaml_problem(e: Exception) -> str:
    return str(getattr(e, "problem", None) or (str(e).strip().splitlines() or [type(e).__name__])[0])


def apply_overrides(data: dict, overrides: list[str] | dict) -> dict:
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
    for key, value in items:
        node = data
        parts = key.split(".")
        # A path that does not fit the structure (a list indexed by name, an index past its end, a
        # number indexed into) is the user's typo: name it, like an unknown key.
        try:
            for part in parts[:-1]:
                if part.isdigit() and isinstance(node, list):
                    node = node[int(part)]
                else:
                    node = node.setdefault(part, {})
            last = parts[-1]
            if isinstance(node, list) and last.isdigit():
                node[int(last)] = value
            else:
                node[last] = value
        except (TypeError, IndexError, AttributeError):
            raise ConfigError(f"unknown setting {key} (the path does not match the config's structure)") from None
    return data


def _expand_stars(overrides: list[str], data: dict) -> list[str]:
    out = []
    for text in overrides:
        key, raw = text.split("=", 1) if "=" in text else (text, "")
        if ".*." in key:
            head, tail = key.split(".*.", 1)
            seq = data
            for part in head.split("."):
                seq = seq.setdefault(part, [])
            out += [f"{head}.{i}.{tail}={raw}" for i in range(len(seq))]
        else:
            out.append(text)
    return out


def load_config(preset: str = "paper", overrides: list[str] | dict | None = None) -> Config:
    path = preset_path(preset)
    data = _read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    data.setdefault("preset", Path(preset).stem)
    try:  # the file's own shape, checked as a run's config.yaml is (`model: 5` is one line, naming the file)
        _build(Config, data, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if isinstance(overrides, list):
        overrides = _expand_stars(overrides, _stages_default(data))
    if overrides:
        apply_overrides(data, overrides)
    return config_from_dict(data)


def _stages_default(data: dict) -> dict:
    # "model.stages.*.x" needs the stage list present in the YAML to know how many stages there are.
    model = data.setdefault("model", {})
    if "stages" not in model:
        model["stages"] = [{} for _ in ModelConfig().stages]
    return data


def save_config(cfg: Config, path: Path) -> None:
    from grandmother.io import atomic_write_text
    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _read_yaml(path: Path):
    """A YAML file as plain data. Tags that build Python objects (!!python/...) are refused: a config is
    data, never code."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror or type(e).__name__})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: cannot read the config (not UTF-8 text)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not a plain YAML config ({_yaml_problem(e)})") from None


def read_config(path: Path) -> Config:
    """The config saved in a run directory; one-line errors for a missing or unreadable file."""
    return config_from_dict(_read_yaml(path))
