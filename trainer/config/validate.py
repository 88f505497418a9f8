"""Validation of a composed config, one function per section: every message names the key, the
value received and what is allowed (raised as ConfigError, printed as one line).

Types and the allowed values of choice fields are checked by OmegaConf while composing (the
schema's enum fields); what is left here is ranges, paths and how keys fit together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from trainer.config.machine import nvidia_gpu_present
from trainer.config.schema import (
    Config,
    stage_plan,
)
from trainer.errors import ConfigError
from trainer.models.presets import PRESETS, preset


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
    _model(cfg.model)
    _data(cfg.data)
    _aug(cfg.aug)
    _optim(cfg.optim)
    _schedule(cfg.schedule)
    _finetune(cfg.finetune)
    _recipe(cfg.recipe)
    _trainer(cfg.trainer)
    _distill(cfg.distill)
    stage_plan(cfg)  # stage epochs against trainer.epochs
    _check_xla_on_cpu(cfg)
    _logger_export_run(cfg)


def _model(m) -> None:
    for key in ("head_dropout", "dropout", "drop_path_rate"):
        _range(f"model.{key}", m[key], 0.0, 1.0, high_open=True)
    sources = list(preset(m.name).weights)  # imagenet, and imagenet22k[_384] for some v2 widths
    if m.pretrained not in (*sources, "none") and not Path(m.pretrained).expanduser().exists():
        raise ConfigError(f"model.pretrained={m.pretrained!r}: no such file or directory; use "
                          f"{', '.join(sources)} (the weights {m.name} has), none, a checkpoint "
                          f"file or a run directory")


def _data(d) -> None:
    if d.source == "tfds" and not d.tfds_name:
        raise ConfigError("data.tfds_name is missing; it is required when data.source=tfds")
    if d.source == "folder":
        if not d.path:
            raise ConfigError("data.path is missing; data=folder needs data.path=DIR "
                              "(DIR/<class>/*.jpg or DIR/train/<class>/...)")
        if not Path(d.path).is_dir():
            raise ConfigError(f"data.path={d.path!r} is not a directory")
        if d.cache_dir and Path(d.cache_dir).expanduser().exists() and not Path(
                d.cache_dir).expanduser().is_dir():
            raise ConfigError(f"data.cache_dir={d.cache_dir!r} is a file; give a directory for "
                              "the folder scan's cache (or leave it unset for ~/.cache)")
    _range("data.image_size", d.image_size, 8, 2048)
    _range("data.crop_pct", d.crop_pct, 0.0, 1.0, low_open=True)
    _range("data.val_fraction", d.val_fraction, 0.0, 0.5)
    _range("data.test_fraction", d.test_fraction, 0.0, 0.5)
    _range("data.shuffle_buffer", d.shuffle_buffer, 1)
    _range("data.train_per_class", d.train_per_class, 0)
    _range("data.mock_examples", d.mock_examples, 0)
    if d.classes is not None and len(d.classes) < 2:
        raise ConfigError(f"data.classes={list(d.classes)!r}: name at least 2 classes, or null "
                          f"for all")
    if d.val_split is None and d.val_fraction == 0.0:
        raise ConfigError("data.val_fraction=0.0 with no data.val_split: validation needs one")


def _aug(a) -> None:
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


def _optim(o) -> None:
    _range("optim.lr", o.lr, 0.0, low_open=True)
    _range("optim.weight_decay", o.weight_decay, 0.0)
    _range("optim.momentum", o.momentum, 0.0, 1.0, high_open=True)
    _range("optim.label_smoothing", o.label_smoothing, 0.0, 1.0, high_open=True)
    _range("optim.base_batch_size", o.base_batch_size, 1)
    if o.clip_norm is not None:
        _range("optim.clip_norm", o.clip_norm, 0.0, low_open=True)
    _range("optim.layer_decay", o.layer_decay, 0.0, 1.0, low_open=True)
    _range("optim.ema_decay", o.ema_decay, 0.0, 1.0, high_open=True)


def _schedule(s) -> None:
    _range("schedule.warmup_epochs", s.warmup_epochs, 0.0)
    _range("schedule.min_lr_ratio", s.min_lr_ratio, 0.0, 1.0)
    _range("schedule.decay_rate", s.decay_rate, 0.0, 1.0, low_open=True)
    if list(s.decay_epochs) != sorted(s.decay_epochs) or any(e <= 0 for e in s.decay_epochs):
        raise ConfigError(f"schedule.decay_epochs={list(s.decay_epochs)!r} must be increasing "
                          f"positive epochs")


def _finetune(f) -> None:
    for i, stage in enumerate(f.stages):
        if stage.epochs is not None:
            _range(f"finetune.stages[{i}].epochs", stage.epochs, 1)
        elif i != len(f.stages) - 1:
            raise ConfigError(f"finetune.stages[{i}].epochs is missing; only the last stage may "
                              f"leave it unset (it then runs the rest of trainer.epochs)")
        if stage.lr is not None:
            _range(f"finetune.stages[{i}].lr", stage.lr, 0.0, low_open=True)


def _recipe(r) -> None:
    _range("recipe.tolerance", r.tolerance, 0.0)
    if r.source != "none" and r.expected is None:
        raise ConfigError(f"recipe.source={r.source!r} needs recipe.expected (the {r.metric} "
                          f"the recipe should reach)")


def _trainer(t) -> None:
    _range("trainer.epochs", t.epochs, 1)
    _range("trainer.batch_size", t.batch_size, 1)
    _range("trainer.accumulate_steps", t.accumulate_steps, 1, 4096)
    _range("trainer.early_stopping.patience", t.early_stopping.patience, 0)
    _range("trainer.early_stopping.min_delta", t.early_stopping.min_delta, 0.0, 1.0)
    if t.steps_per_epoch is not None:
        _range("trainer.steps_per_epoch", t.steps_per_epoch, 1)
    if t.eval_steps is not None:
        _range("trainer.eval_steps", t.eval_steps, 1)
    _choice("trainer.jit_compile", str(t.jit_compile).lower(), ("auto", "true", "false"))
    _choice("trainer.recompute", str(t.recompute).lower(), ("auto", "true", "false"))
    threads = str(t.intra_op_threads).lower()
    if threads != "auto" and not (threads.isdigit() and int(threads) <= 1024):
        raise ConfigError(f"trainer.intra_op_threads={t.intra_op_threads!r}: allowed: auto, or a "
                          f"thread count from 0 (TensorFlow's default: all cores) to 1024")
    _range("trainer.log_every_steps", t.log_every_steps, 0)
    _range("trainer.checkpoint_every_steps", t.checkpoint_every_steps, 0)
    _range("trainer.keep_checkpoints", t.keep_checkpoints, 1)
    _range("trainer.cpu_replicas", t.cpu_replicas, 0, 64)
    _range("trainer.nan_lr_factor", t.nan_lr_factor, 0.0, 1.0, low_open=True, high_open=True)
    _range("trainer.max_rollbacks", t.max_rollbacks, 1)
    if t.cpu_replicas > 1 and t.batch_size % t.cpu_replicas:
        raise ConfigError(f"trainer.batch_size={t.batch_size} is not divisible by "
                          f"trainer.cpu_replicas={t.cpu_replicas} replicas; the global batch "
                          f"must split evenly")


def _distill(d) -> None:
    if d.teacher is None:
        return
    _range("distill.temperature", d.temperature, 0.0, 100.0, low_open=True)
    _range("distill.alpha", d.alpha, 0.0, 1.0)
    path = Path(d.teacher).expanduser()
    if (("/" in d.teacher or path.suffix) and not path.exists()):
        raise ConfigError(f"distill.teacher={d.teacher!r}: no such file or directory (a finished "
                          f"run directory, a .keras file, a SavedModel directory or a preset name)")
    if not path.exists() and d.teacher not in PRESETS:
        raise ConfigError(f"distill.teacher={d.teacher!r} is neither a path nor a preset; presets: "
                          f"{', '.join(PRESETS)}")
    if d.teacher in PRESETS and not d.teacher_weights:
        raise ConfigError(f"distill.teacher={d.teacher!r} is a preset: set distill.teacher_weights "
                          f"to weights with a head for your classes (a checkpoint, a .weights.h5 "
                          f"or a run directory)")


def _logger_export_run(cfg) -> None:
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
