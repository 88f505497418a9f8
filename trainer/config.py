"""The typed schema of every config group, and validation with one-line messages.

Hydra merges the YAML files of `conf/` into these dataclasses, so an unknown key or a wrong type
fails while composing; `validate` then checks ranges, choices and paths. Both happen before
TensorFlow is imported (see `trainer/__main__.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

from trainer.preflight import nvidia_gpu_present

MODELS = ("mobilevit_xxs", "mobilevit_xs", "mobilevit_s")
SOURCES = ("tfds", "folder", "digits")
AUGS = ("none", "basic", "randaugment", "strong")
OPTIMIZERS = ("adamw", "sgd", "lamb", "lion")
SCHEDULES = ("cosine", "step", "constant")
BN_POLICIES = ("train", "frozen")
TRAINABLE = ("all", "head")
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
LOGGERS = ("csv", "wandb")


class ConfigError(ValueError):
    """A config mistake: the message names the key, the value and what is allowed."""


@dataclass
class ModelConfig:
    name: str = "mobilevit_xxs"
    pretrained: str = "imagenet"  # imagenet | none | a checkpoint file | a run directory
    checkpoint_format: Optional[str] = None  # timm | hf (default: detected from the keys)
    head_dropout: float = 0.1
    dropout: float = 0.0  # transformer dropout
    drop_path_rate: float = 0.0
    freeze_backbone: bool = False
    sync_bn: bool = False


@dataclass
class DataConfig:
    name: str = "digits"
    source: str = "digits"  # tfds | folder | digits
    tfds_name: Optional[str] = None
    data_dir: Optional[str] = None  # TFDS data directory (default: TFDS' own)
    download: bool = True
    mock_examples: int = 0  # > 0: TFDS mock data (random, real feature spec) for offline smoke runs
    path: Optional[str] = None  # image folder (source=folder)
    train_split: str = "train"
    val_split: Optional[str] = None  # None: a stratified split carved from train
    test_split: Optional[str] = None
    val_fraction: float = 0.1
    test_fraction: float = 0.0  # carve a test split from train too (digits)
    image_size: int = 256
    crop_pct: float = 0.9  # eval: resize the short side to size / crop_pct, centre-crop
    shuffle_buffer: int = 2048
    on_error: str = "skip"  # folder: skip | fail on undecodable files
    classes: Optional[List[str]] = None  # keep only these classes (relabelled 0..k-1, this order)
    train_per_class: int = 0  # > 0: a few labels per class (a seeded, stratified subset of train)


@dataclass
class AugConfig:
    name: str = "basic"
    random_resized_crop: bool = True
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: List[float] = field(default_factory=lambda: [0.75, 4 / 3])
    hflip: bool = True
    color_jitter: float = 0.0  # brightness, contrast and saturation factor (timm's 0.4)
    randaugment_ops: int = 0  # RandAugment N (0: off)
    randaugment_magnitude: float = 9.0  # RandAugment M on timm's 0..10 scale
    erasing_prob: float = 0.0  # random erasing probability per image
    mixup_alpha: float = 0.0  # Beta(alpha, alpha) mix weight; 0: off
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0  # probability that a batch is mixed at all
    switch_prob: float = 0.5  # cutmix instead of mixup, when both are on
    multiscale_sizes: List[int] = field(default_factory=list)  # e.g. [160, 192, 224, 256, 288]


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd
    label_smoothing: float = 0.1
    clip_norm: Optional[float] = None
    lr_scaling: str = "none"  # none | linear | sqrt: lr * (global batch / base_batch_size)^p
    base_batch_size: int = 256
    layer_decay: float = 1.0  # lr x decay^(depth from the head) per backbone stage; 1: off
    ema_decay: float = 0.0  # > 0: keep an EMA of the weights; evaluate, choose and export it


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0  # cosine: decays to min_lr_ratio * lr
    decay_epochs: List[float] = field(default_factory=lambda: [30.0, 60.0, 90.0])  # step
    decay_rate: float = 0.1  # step: lr x decay_rate at each of decay_epochs


@dataclass
class StageConfig:
    name: str = "stage"
    epochs: Optional[int] = None  # None (last stage only): the rest of trainer.epochs
    lr: Optional[float] = None  # peak lr of this stage (default optim.lr); schedule restarts
    train: str = "all"  # all | head
    bn: Optional[str] = None  # train | frozen (default finetune.bn)


@dataclass
class FinetuneConfig:
    name: str = "full"
    bn: str = "train"  # train | frozen: BN in inference mode, statistics and affine fixed
    stages: List[StageConfig] = field(default_factory=list)  # empty: one stage, whole network


@dataclass
class TrainerConfig:
    epochs: int = 10
    batch_size: int = 64  # global batch, split across replicas
    steps_per_epoch: Optional[int] = None  # cap per epoch (default: one pass over train)
    eval_steps: Optional[int] = None  # cap on evaluation batches (default: the whole split)
    strategy: str = "auto"
    cpu_replicas: int = 0  # > 1 splits the CPU into logical devices (multi-replica on CPU)
    precision: str = "float32"  # float32 | mixed_float16 | mixed_bfloat16
    jit_compile: str = "auto"  # auto (XLA on GPU/TPU) | true | false
    log_every_steps: int = 0  # > 0: log the loss of every N-th step
    checkpoint_every_steps: int = 0  # > 0: also checkpoint every N steps inside an epoch
    keep_checkpoints: int = 2  # the newest N under checkpoints/last (best: always 1)
    export: bool = True
    on_nan: str = "stop"  # stop | rollback: restore the last checkpoint, lr *= nan_lr_factor
    nan_lr_factor: float = 0.1
    max_rollbacks: int = 3
    allow_config_change: bool = False  # resume a run directory under a changed config
    deterministic: bool = False  # TF op determinism: same config -> bit-identical weights


@dataclass
class ExportConfig:
    litert: List[str] = field(default_factory=list)  # float32 | float16 | dynamic_int8 | int8
    calibration_images: int = 128  # training images that calibrate full int8
    check_images: int = 64  # validation images for the LiteRT agreement checks


@dataclass
class LoggerConfig:
    name: str = "csv"  # csv (history.csv + TensorBoard) | wandb (the same, plus wandb)
    tensorboard: bool = True
    mode: str = "online"  # wandb: online | offline | disabled
    project: str = "mobilevit-trainer"
    entity: Optional[str] = None
    group: Optional[str] = None  # default: the multirun's sweep directory name
    tags: List[str] = field(default_factory=list)


@dataclass
class RecipeConfig:
    """What a recipe (recipes/experiment/*.yaml) promises; read by `python -m trainer.reproduce`."""

    metric: str = "val_accuracy"  # a key of metrics.json
    expected: Optional[float] = None
    tolerance: float = 0.0  # |measured - expected| <= tolerance passes
    source: str = "none"  # measured (on the hardware the header names) | target (not yet measured)
    # Override key -> recipe whose run directory it takes, run first by trainer.reproduce
    # (e.g. model.pretrained: digits_0to4_pretrain).
    requires: Dict[str, str] = field(default_factory=dict)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    name: str = "run"  # short name in the run directory
    seed: int = 0


def register() -> None:
    """The schema, and the resolvers of the run and trial directories."""
    from trainer import rundir, sweeps

    ConfigStore.instance().store(name="config_schema", node=Config)
    rundir.register_resolver()
    sweeps.register_resolver()


# --------------------------------------------------------------------------- validation


def _choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(allowed)}")


def _range(key: str, value, low=None, high=None, low_open=False, high_open=False) -> None:
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        raise ConfigError(f"{key}={value!r} is out of range; it must be "
                          f"{' and '.join(s for s in (lo, hi) if s)}")


def check_schema(cfg) -> None:
    """Keys and types against the schema: `+key=value` may add keys that Hydra allows."""
    from omegaconf import OmegaConf

    def walk(node, schema, prefix: str) -> None:
        for key in node.keys():
            full = f"{prefix}{key}"
            if key not in schema:
                allowed = ", ".join(sorted(schema.keys()))
                raise ConfigError(f"unknown key '{full}'; allowed keys here: {allowed}")
            child, child_schema = node._get_node(key), schema._get_node(key)
            # An empty schema dict is a free-form Dict[str, ...] field (recipe.requires).
            if OmegaConf.is_dict(child) and OmegaConf.is_dict(child_schema) and len(child_schema):
                walk(child, child_schema, f"{full}.")

    walk(cfg, OmegaConf.structured(Config), "")


def validate(cfg) -> None:
    """Check keys, types, choices, ranges and paths of a composed config; raise ConfigError."""
    check_schema(cfg)
    m, d, a, o, s, t = cfg.model, cfg.data, cfg.aug, cfg.optim, cfg.schedule, cfg.trainer
    _choice("model.name", m.name, MODELS)
    if m.checkpoint_format is not None:
        _choice("model.checkpoint_format", m.checkpoint_format, ("timm", "hf"))
    for key in ("head_dropout", "dropout", "drop_path_rate"):
        _range(f"model.{key}", m[key], 0.0, 1.0, high_open=True)
    if m.pretrained not in ("imagenet", "none") and not Path(m.pretrained).expanduser().exists():
        raise ConfigError(f"model.pretrained={m.pretrained!r}: no such file or directory; use "
                          f"imagenet, none, a checkpoint file or a run directory")

    _choice("data.source", d.source, SOURCES)
    if d.source == "tfds" and not d.tfds_name:
        raise ConfigError("data.tfds_name is missing; it is required when data.source=tfds")
    if d.source == "folder":
        if not d.path:
            raise ConfigError("data.path is missing; data=folder needs data.path=DIR "
                              "(DIR/<class>/*.jpg or DIR/train/<class>/...)")
        if not Path(d.path).is_dir():
            raise ConfigError(f"data.path={d.path!r} is not a directory")
    _range("data.image_size", d.image_size, 8, 2048)
    _range("data.crop_pct", d.crop_pct, 0.0, 1.0, low_open=True)
    _range("data.val_fraction", d.val_fraction, 0.0, 0.5)
    _range("data.test_fraction", d.test_fraction, 0.0, 0.5)
    _range("data.shuffle_buffer", d.shuffle_buffer, 1)
    _choice("data.on_error", d.on_error, ("skip", "fail"))
    _range("data.train_per_class", d.train_per_class, 0)
    _range("data.mock_examples", d.mock_examples, 0)
    if d.classes is not None and len(d.classes) < 2:
        raise ConfigError(f"data.classes={list(d.classes)!r}: name at least 2 classes, or null "
                          f"for all")
    if d.val_split is None and d.val_fraction == 0.0:
        raise ConfigError("data.val_fraction=0.0 with no data.val_split: validation needs one")

    _choice("aug.name", a.name, AUGS)
    if len(a.scale) != 2 or not 0.0 < a.scale[0] <= a.scale[1] <= 1.0:
        raise ConfigError(f"aug.scale={list(a.scale)!r} must be [low, high] with 0 < low <= high <= 1")
    if len(a.ratio) != 2 or not 0.0 < a.ratio[0] <= a.ratio[1]:
        raise ConfigError(f"aug.ratio={list(a.ratio)!r} must be [low, high] with 0 < low <= high")
    _range("aug.color_jitter", a.color_jitter, 0.0, 1.0)
    _range("aug.randaugment_ops", a.randaugment_ops, 0, 10)
    _range("aug.randaugment_magnitude", a.randaugment_magnitude, 0.0, 10.0)
    for key in ("erasing_prob", "mix_prob", "switch_prob"):
        _range(f"aug.{key}", a[key], 0.0, 1.0)
    for key in ("mixup_alpha", "cutmix_alpha"):
        _range(f"aug.{key}", a[key], 0.0)
    for size in a.multiscale_sizes:
        _range("aug.multiscale_sizes[]", size, 8, 2048)

    _choice("optim.name", o.name, OPTIMIZERS)
    _range("optim.lr", o.lr, 0.0, low_open=True)
    _range("optim.weight_decay", o.weight_decay, 0.0)
    _range("optim.momentum", o.momentum, 0.0, 1.0, high_open=True)
    _range("optim.label_smoothing", o.label_smoothing, 0.0, 1.0, high_open=True)
    _choice("optim.lr_scaling", o.lr_scaling, ("none", "linear", "sqrt"))
    _range("optim.base_batch_size", o.base_batch_size, 1)
    if o.clip_norm is not None:
        _range("optim.clip_norm", o.clip_norm, 0.0, low_open=True)
    _range("optim.layer_decay", o.layer_decay, 0.0, 1.0, low_open=True)
    _range("optim.ema_decay", o.ema_decay, 0.0, 1.0, high_open=True)

    _choice("schedule.name", s.name, SCHEDULES)
    _range("schedule.warmup_epochs", s.warmup_epochs, 0.0)
    _range("schedule.min_lr_ratio", s.min_lr_ratio, 0.0, 1.0)
    _range("schedule.decay_rate", s.decay_rate, 0.0, 1.0, low_open=True)
    if list(s.decay_epochs) != sorted(s.decay_epochs) or any(e <= 0 for e in s.decay_epochs):
        raise ConfigError(f"schedule.decay_epochs={list(s.decay_epochs)!r} must be increasing "
                          f"positive epochs")

    f = cfg.finetune
    _choice("finetune.bn", f.bn, BN_POLICIES)
    for i, stage in enumerate(f.stages):
        if stage.epochs is not None:
            _range(f"finetune.stages[{i}].epochs", stage.epochs, 1)
        elif i != len(f.stages) - 1:
            raise ConfigError(f"finetune.stages[{i}].epochs is missing; only the last stage may "
                              f"leave it unset (it then runs the rest of trainer.epochs)")
        if stage.lr is not None:
            _range(f"finetune.stages[{i}].lr", stage.lr, 0.0, low_open=True)
        _choice(f"finetune.stages[{i}].train", stage.train, TRAINABLE)
        if stage.bn is not None:
            _choice(f"finetune.stages[{i}].bn", stage.bn, BN_POLICIES)

    r = cfg.recipe
    _choice("recipe.source", r.source, ("none", "measured", "target"))
    _range("recipe.tolerance", r.tolerance, 0.0)
    if r.source != "none" and r.expected is None:
        raise ConfigError(f"recipe.source={r.source!r} needs recipe.expected (the {r.metric} "
                          f"the recipe should reach)")

    _range("trainer.epochs", t.epochs, 1)
    stage_plan(cfg)  # stage epochs against trainer.epochs
    _range("trainer.batch_size", t.batch_size, 1)
    if t.steps_per_epoch is not None:
        _range("trainer.steps_per_epoch", t.steps_per_epoch, 1)
    if t.eval_steps is not None:
        _range("trainer.eval_steps", t.eval_steps, 1)
    _choice("trainer.strategy", t.strategy, STRATEGIES)
    _choice("trainer.precision", t.precision, PRECISIONS)
    _choice("trainer.jit_compile", str(t.jit_compile).lower(), ("auto", "true", "false"))
    _check_xla_on_cpu(cfg)
    _range("trainer.log_every_steps", t.log_every_steps, 0)
    _range("trainer.checkpoint_every_steps", t.checkpoint_every_steps, 0)
    _range("trainer.keep_checkpoints", t.keep_checkpoints, 1)
    _range("trainer.cpu_replicas", t.cpu_replicas, 0, 64)
    _choice("trainer.on_nan", t.on_nan, ("stop", "rollback"))
    _range("trainer.nan_lr_factor", t.nan_lr_factor, 0.0, 1.0, low_open=True, high_open=True)
    _range("trainer.max_rollbacks", t.max_rollbacks, 1)
    if t.cpu_replicas > 1 and t.batch_size % t.cpu_replicas:
        raise ConfigError(f"trainer.batch_size={t.batch_size} is not divisible by "
                          f"trainer.cpu_replicas={t.cpu_replicas} replicas; the global batch "
                          f"must split evenly")
    _choice("logger.name", cfg.logger.name, LOGGERS)
    _choice("logger.mode", cfg.logger.mode, ("online", "offline", "disabled"))
    for variant in cfg.export.litert:
        _choice("export.litert[]", variant, ("float32", "float16", "dynamic_int8", "int8"))
    _range("export.calibration_images", cfg.export.calibration_images, 1)
    _range("export.check_images", cfg.export.check_images, 1)
    if not str(cfg.name).replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"name={cfg.name!r} must be letters, digits, '-' and '_' only")
    if cfg.seed < 0:
        raise ConfigError(f"seed={cfg.seed} must be >= 0")


def _check_xla_on_cpu(cfg) -> None:
    """The one pair of settings that cannot run on a CPU: XLA with mixed precision, where
    MobileViT resizes a feature map of odd size (an input size not a multiple of 64). XLA's CPU
    compiler rejects the 16-bit gradient of that resize ("mixed precision is disallowed");
    measured: 32 and 48 px fail, 64 px trains, in float16 and bfloat16 alike."""
    t = cfg.trainer
    if (str(t.jit_compile).lower() != "true" or t.precision == "float32"
            or t.strategy == "tpu" or nvidia_gpu_present()):
        return
    sizes = sorted({cfg.data.image_size, *cfg.aug.multiscale_sizes})
    odd = [s for s in sizes if s % 64]
    if odd:
        raise ConfigError(
            f"trainer.jit_compile=true with trainer.precision={t.precision} does not compile on "
            f"this CPU for image size(s) {odd} (data.image_size, aug.multiscale_sizes): XLA's CPU "
            f"compiler rejects the {t.precision.split('_')[1]} gradient of the resize MobileViT "
            f"applies to odd-sized feature maps; use sizes that are multiples of 64, or drop one "
            f"of the two settings on a CPU")


@dataclass(frozen=True)
class Stage:
    """One fine-tuning stage, resolved: which epochs, peak lr, what trains, BN policy."""

    name: str
    start_epoch: int
    epochs: int
    lr: float
    train: str  # all | head
    bn: str  # train | frozen


def stage_plan(cfg) -> list[Stage]:
    """finetune.stages resolved against trainer.epochs; no stages: one, the whole network."""
    f, total = cfg.finetune, cfg.trainer.epochs
    if not f.stages:
        train = "head" if cfg.model.freeze_backbone else "all"
        return [Stage("all", 0, total, cfg.optim.lr, train, f.bn)]
    fixed = sum(s.epochs for s in f.stages if s.epochs is not None)
    open_ended = f.stages[-1].epochs is None
    if fixed + open_ended > total or (not open_ended and fixed != total):
        sums = " + ".join(str(s.epochs) for s in f.stages if s.epochs is not None)
        raise ConfigError(f"finetune.stages run {sums} = {fixed} epochs"
                          f"{' and more' if open_ended else ''} but trainer.epochs={total}; "
                          f"make them agree (a last stage without epochs takes the rest)")
    stages, start = [], 0
    for s in f.stages:
        epochs = s.epochs if s.epochs is not None else total - fixed
        stages.append(Stage(s.name, start, epochs, s.lr if s.lr is not None else cfg.optim.lr,
                            s.train, s.bn or f.bn))
        start += epochs
    return stages


def check_writable(run_dir: Path) -> None:
    """Fail before training if the run directory cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0" * 1024)
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"hydra.run.dir={str(run_dir)!r} is not writable: {e.strerror}") from None


def _allowed_keys(full_key: str) -> str:
    parent = full_key.rpartition(".")[0]
    from omegaconf import OmegaConf

    node = OmegaConf.structured(Config)
    node = OmegaConf.select(node, parent) if parent else node
    return ", ".join(sorted(node.keys())) if node is not None and hasattr(node, "keys") else ""


def one_line(error: Exception) -> str:
    """Turn Hydra / OmegaConf composition errors into one line naming the key."""
    chain, e = [], error
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        full_key = getattr(e, "full_key", None)
        msg = str(getattr(e, "msg", "") or e).splitlines()[0]
        if full_key and ("not in struct" in msg or type(e).__name__ in ("ConfigAttributeError",
                                                                         "ConfigKeyError")):
            allowed = _allowed_keys(full_key)
            return f"unknown key '{full_key}'" + (f"; allowed keys here: {allowed}" if allowed else "")
        if full_key and type(e).__name__ == "ValidationError":
            return f"{full_key}: {msg}"
        if full_key and type(e).__name__ == "MissingMandatoryValue":
            return f"{full_key} is missing: it must be set"
    text = str(error)
    if "Could not find '" in text and "Available options" in text:
        missing = text.split("Could not find '", 1)[1].split("'", 1)[0]
        group, _, option = missing.rpartition("/")
        options = []
        for line in text.split("Available options", 1)[1].splitlines()[1:]:
            if not line.startswith((" ", "\t")) or not line.strip():
                break
            options.append(line.strip())
        return f"{group}={option} is not an option; choose one of {', '.join(options)}"
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return " ".join(lines[:2]) if lines else type(error).__name__
