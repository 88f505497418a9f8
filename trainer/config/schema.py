"""The typed schema of every config group (one dataclass per group), and the stage plan.

Hydra merges the YAML files of `conf/` into these dataclasses, so an unknown key or a wrong type
fails while composing; `config/validate.py` then checks ranges, choices and paths. Both happen
before TensorFlow is imported (see `trainer/__main__.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import SI

from trainer.errors import ConfigError
from trainer.models.presets import MODEL_NAMES


def _choice(name: str, *values: str) -> type[StrEnum]:
    """The allowed values of a field: OmegaConf checks them while composing (and names the key);
    a StrEnum member compares, formats and serialises as its string."""
    return StrEnum(name, [(v, v) for v in values])


ModelName = _choice("ModelName", *MODEL_NAMES)
CheckpointFormat = _choice("CheckpointFormat", "timm", "hf")
Source = _choice("Source", "tfds", "folder", "digits")
OnError = _choice("OnError", "skip", "fail")
Interpolation = _choice("Interpolation", "bilinear", "bicubic")
AugName = _choice("AugName", "none", "basic", "randaugment", "strong")
OptimName = _choice("OptimName", "adamw", "sgd", "lamb", "lion")
LrScaling = _choice("LrScaling", "none", "linear", "sqrt")
ScheduleName = _choice("ScheduleName", "cosine", "step", "constant")
BNPolicy = _choice("BNPolicy", "train", "frozen")
Trainable = _choice("Trainable", "all", "head")
Strategy = _choice("Strategy", "auto", "default", "one_device", "mirrored", "multi_worker", "tpu")
Precision = _choice("Precision", "float32", "mixed_float16", "mixed_bfloat16")
OnNaN = _choice("OnNaN", "stop", "rollback")
LiteRTVariant = _choice("LiteRTVariant", "float32", "float16", "dynamic_int8", "int8",
                        "int8_integer_only")
LoggerName = _choice("LoggerName", "csv", "wandb")
LoggerMode = _choice("LoggerMode", "online", "offline", "disabled")
ClassBalance = _choice("ClassBalance", "none", "weighted_loss", "sampler")
RecipeSource = _choice("RecipeSource", "none", "measured", "target")
TOP_K = 5  # top-k accuracy in training and evaluation, the top-k outputs of the export
TTA_MODES = ("none", "flip", "crops", "crops_flip")  # python -m trainer.evaluate tta=...


@dataclass
class ModelConfig:
    name: ModelName = ModelName.mobilevit_xxs
    pretrained: str = "imagenet"  # imagenet | none | a checkpoint file | a run directory
    checkpoint_format: Optional[CheckpointFormat] = None  # timm | hf (default: detected from the keys)
    head_dropout: float = 0.1
    dropout: float = 0.0  # transformer dropout
    drop_path_rate: float = 0.0
    freeze_backbone: bool = False
    sync_bn: bool = False


@dataclass
class DataConfig:
    name: str = "digits"
    source: Source = Source.digits
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
    # Evaluation and export: resize the short side to size / crop_pct (this interpolation,
    # antialiased), centre-crop. Default: what the model preset's weights were evaluated with.
    crop_pct: float = SI("${preset:${model.name},crop_pct}")
    interpolation: Interpolation = SI("${preset:${model.name},interpolation}")
    shuffle_buffer: int = 2048
    on_error: OnError = OnError.skip  # folder: skip or fail on undecodable files
    # folder: where the scan's verdicts and converted files are kept (default: the user's cache
    # directory, $XDG_CACHE_HOME/mobilevit-trainer or ~/.cache/mobilevit-trainer)
    cache_dir: Optional[str] = None
    classes: Optional[List[str]] = None  # keep only these classes (relabelled 0..k-1, this order)
    train_per_class: int = 0  # > 0: a few labels per class (a seeded, stratified subset of train)
    # Imbalanced classes: weighted_loss weighs each example's loss by n / (classes x n_class);
    # sampler draws every class equally often (an epoch keeps its length). Counts in dataset.json.
    class_balance: ClassBalance = ClassBalance.none


@dataclass
class AugConfig:
    name: AugName = AugName.basic
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
    name: OptimName = OptimName.adamw
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd
    label_smoothing: float = 0.1
    clip_norm: Optional[float] = None
    lr_scaling: LrScaling = LrScaling.none  # lr * (global batch / base_batch_size)^p
    base_batch_size: int = 256
    layer_decay: float = 1.0  # lr x decay^(depth from the head) per backbone stage; 1: off
    ema_decay: float = 0.0  # > 0: keep an EMA of the weights; evaluate, choose and export it


@dataclass
class ScheduleConfig:
    name: ScheduleName = ScheduleName.cosine
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0  # cosine: decays to min_lr_ratio * lr
    decay_epochs: List[float] = field(default_factory=lambda: [30.0, 60.0, 90.0])  # step
    decay_rate: float = 0.1  # step: lr x decay_rate at each of decay_epochs


@dataclass
class StageConfig:
    name: str = "stage"
    epochs: Optional[int] = None  # None (last stage only): the rest of trainer.epochs
    lr: Optional[float] = None  # peak lr of this stage (default optim.lr); schedule restarts
    train: Trainable = Trainable.all
    bn: Optional[BNPolicy] = None  # default: finetune.bn


@dataclass
class FinetuneConfig:
    name: str = "full"
    bn: BNPolicy = BNPolicy.train  # frozen: BN in inference mode, statistics and affine fixed
    stages: List[StageConfig] = field(default_factory=list)  # empty: one stage, whole network


@dataclass
class EarlyStoppingConfig:
    # > 0: end the run when val_accuracy has not risen by more than min_delta for this many
    # epochs; the best epoch is exported as usual.
    patience: int = 0
    min_delta: float = 0.0


@dataclass
class TrainerConfig:
    epochs: int = 10
    batch_size: int = 64  # global batch, split across replicas
    # > 1: each optimizer update averages the gradients of K batches (an effective batch of
    # K x batch_size; BatchNorm still sees batch_size). Steps, schedules and checkpoints count updates.
    accumulate_steps: int = 1
    steps_per_epoch: Optional[int] = None  # cap per epoch (default: one pass over train)
    eval_steps: Optional[int] = None  # cap on evaluation batches (default: the whole split)
    strategy: Strategy = Strategy.auto
    cpu_replicas: int = 0  # > 1 splits the CPU into logical devices (multi-replica on CPU)
    precision: Precision = Precision.float32
    jit_compile: str = "auto"  # auto (XLA on GPU/TPU) | true | false
    # Threads one op may use on the CPU: auto (1 for a small step on a machine without GPU,
    # else TensorFlow's default, all cores) | N (0: TensorFlow's default). training/distribute.py
    intra_op_threads: str = "auto"
    # The convolutional blocks' activations computed again in the backward pass instead of kept:
    # auto (on for a large CPU step, without GPU or XLA) | true | false. training/distribute.py
    recompute: str = "auto"
    log_every_steps: int = 0  # > 0: log the loss of every N-th step
    checkpoint_every_steps: int = 0  # > 0: also checkpoint every N steps inside an epoch
    keep_checkpoints: int = 2  # the newest N under checkpoints/last (best: always 1)
    export: bool = True
    on_nan: OnNaN = OnNaN.stop  # rollback: restore the last checkpoint, lr *= nan_lr_factor
    nan_lr_factor: float = 0.1
    max_rollbacks: int = 3
    allow_config_change: bool = False  # resume a run directory under a changed config
    deterministic: bool = False  # TF op determinism: same config -> bit-identical weights
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass
class DistillConfig:
    # Knowledge distillation (off when unset): a preset name (with teacher_weights), a finished
    # run directory, a .keras file or a SavedModel directory, trained on the same classes.
    teacher: Optional[str] = None
    teacher_weights: Optional[str] = None  # a preset teacher's weights (what from_preset takes)
    temperature: float = 4.0  # softens both distributions of the KL term
    alpha: float = 0.5  # loss = alpha x KL(teacher || student) x T^2 + (1 - alpha) x label loss


@dataclass
class ExportConfig:
    litert: List[LiteRTVariant] = field(default_factory=list)
    calibration_images: int = 128  # training images that calibrate full int8
    check_images: int = 64  # validation images for the LiteRT agreement checks


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.csv  # csv: history.csv + TensorBoard; wandb: also wandb
    tensorboard: bool = True
    mode: LoggerMode = LoggerMode.online  # wandb's mode
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
    source: RecipeSource = RecipeSource.none  # measured (on the hardware the header names) or
    # target (not yet measured)
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
    distill: DistillConfig = field(default_factory=DistillConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    name: str = "run"  # short name in the run directory
    seed: int = 0


def register() -> None:
    """Store the schema that conf/config.yaml's defaults list names (`config_schema`)."""
    ConfigStore.instance().store(name="config_schema", node=Config)


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
        return [Stage("all", 0, total, cfg.optim.lr, train, str(f.bn))]
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
                            str(s.train), str(s.bn or f.bn)))
        start += epochs
    return stages


