"""Optimizer and learning-rate schedule, counted in steps; no weight decay on norms and biases."""

from __future__ import annotations

import keras


def scaled_lr(optim_cfg, global_batch: int) -> float:
    """optim.lr scaled with the global batch: none, linear (Goyal et al.) or sqrt."""
    ratio = global_batch / optim_cfg.base_batch_size
    return optim_cfg.lr * {"none": 1.0, "linear": ratio, "sqrt": ratio ** 0.5}[optim_cfg.lr_scaling]


def make_schedule(optim_cfg, schedule_cfg, steps_per_epoch: int, epochs: int,
                  global_batch: int):
    lr = scaled_lr(optim_cfg, global_batch)
    total = max(steps_per_epoch * epochs, 1)
    warmup = min(int(round(schedule_cfg.warmup_epochs * steps_per_epoch)), total - 1)
    if schedule_cfg.name == "constant":
        if warmup == 0:
            return lr
        return keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=total, alpha=1.0, warmup_target=lr, warmup_steps=warmup)
    # Keras' CosineDecay with a linear warmup from 0 to lr, then cosine down to alpha * lr.
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else lr, decay_steps=max(total - warmup, 1),
        alpha=schedule_cfg.min_lr_ratio, warmup_target=lr if warmup else None,
        warmup_steps=warmup)


@keras.saving.register_keras_serializable(package="mobilevit_trainer")
class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """`base(step) * scale`: `scale` is a variable that a NaN rollback lowers (and checkpoints)."""

    def __init__(self, base, scale):
        self.base, self.scale = base, scale

    def __call__(self, step):
        base = self.base(step) if callable(self.base) else self.base
        return base * keras.ops.cast(self.scale, "float32")

    def get_config(self) -> dict:
        base = (keras.optimizers.schedules.serialize(self.base) if callable(self.base)
                else self.base)
        return {"base": base, "scale": float(keras.ops.convert_to_numpy(self.scale))}

    @classmethod
    def from_config(cls, config: dict):
        base = config["base"]
        if isinstance(base, dict):
            base = keras.optimizers.schedules.deserialize(base)
        return cls(base, config["scale"])


def make_optimizer(optim_cfg, schedule, model: keras.Model) -> keras.optimizers.Optimizer:
    common = dict(learning_rate=schedule, global_clipnorm=optim_cfg.clip_norm)
    if optim_cfg.name == "adamw":
        opt = keras.optimizers.AdamW(weight_decay=optim_cfg.weight_decay, **common)
    else:
        opt = keras.optimizers.SGD(momentum=optim_cfg.momentum, nesterov=True,
                                   weight_decay=optim_cfg.weight_decay, **common)
    # Norm scales/offsets and biases are not decayed: every 1-D weight, and the attention
    # biases, which Keras' MultiHeadAttention stores as (heads, head_dim).
    opt.exclude_from_weight_decay(
        var_list=[v for v in model.trainable_variables
                  if len(v.shape) <= 1 or v.path.endswith(("bias", "gamma", "beta"))])
    return opt


def current_lr(optimizer: keras.optimizers.Optimizer) -> float:
    lr = optimizer.learning_rate
    return float(lr.numpy() if hasattr(lr, "numpy") else lr)
