"""Optimizers and learning-rate schedules, counted in steps.

- Schedules: cosine, step and constant, each with a linear warmup; with fine-tuning stages, one
  schedule per stage, restarting at each stage's first step (`StagedSchedule`).
- Optimizers: Keras' AdamW, SGD (Nesterov), LAMB and Lion; no weight decay on norms and biases;
  global-norm clipping; the EMA of the weights is Keras' own (`use_ema`).
- Layer-wise learning-rate decay: Keras optimizers have one learning rate, so the optimizer's
  `lr_factors` multiply it per variable (trainer/training/fused.py).
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from trainer.config.schema import OptimName
from trainer.training.fused import FusedAdamW, FusedLamb, FusedLion, FusedSGD
from trainer.training.stages import layer_decay_factors


def scaled_lr(optim_cfg, global_batch: int, lr: float | None = None) -> float:
    """The peak rate (`lr`, default optim.lr) scaled with the global batch: none, linear, sqrt."""
    ratio = global_batch / optim_cfg.base_batch_size
    factor = {"none": 1.0, "linear": ratio, "sqrt": ratio ** 0.5}[optim_cfg.lr_scaling]
    return (optim_cfg.lr if lr is None else lr) * factor


# --------------------------------------------------------------------------- schedules


@keras.saving.register_keras_serializable(package="mobilevit_trainer")
class StepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to `lr` over `warmup` steps, then lr x rate^(milestones passed)."""

    def __init__(self, lr: float, warmup: int, milestones: list[int], rate: float):
        self.lr, self.warmup, self.milestones, self.rate = lr, warmup, list(milestones), rate

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        passed = tf.reduce_sum(tf.cast(step >= tf.constant(self.milestones or [1 << 30],
                                                           tf.float32), tf.float32))
        decayed = self.lr * tf.pow(self.rate, passed)
        if not self.warmup:
            return decayed
        return tf.where(step < self.warmup, self.lr * step / self.warmup, decayed)

    def get_config(self) -> dict:
        return {"lr": self.lr, "warmup": self.warmup, "milestones": self.milestones,
                "rate": self.rate}


@keras.saving.register_keras_serializable(package="mobilevit_trainer")
class StagedSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Stage i's schedule, restarted at its first step: lr(step) = schedules[i](step - start_i)."""

    def __init__(self, starts: list[int], schedules: list):
        self.starts, self.schedules = list(starts), list(schedules)

    def __call__(self, step):
        step = tf.cast(step, tf.int64)
        index = tf.reduce_sum(tf.cast(step >= tf.constant(self.starts[1:] or [1 << 62],
                                                          tf.int64), tf.int32))

        def branch(schedule, start):
            return lambda: tf.cast(_call(schedule, step - start), tf.float32)

        return tf.switch_case(index, [branch(s, b) for s, b in zip(self.schedules, self.starts)])

    def get_config(self) -> dict:
        return {"starts": self.starts,
                "schedules": [keras.optimizers.schedules.serialize(s) if callable(s) else s
                              for s in self.schedules]}

    @classmethod
    def from_config(cls, config: dict):
        return cls(config["starts"], [keras.optimizers.schedules.deserialize(s)
                                      if isinstance(s, dict) else s for s in config["schedules"]])


def _call(schedule, step):
    return schedule(step) if callable(schedule) else tf.constant(schedule, tf.float32)


def make_schedule(optim_cfg, schedule_cfg, steps_per_epoch: int, epochs: int,
                  global_batch: int, lr: float | None = None):
    """One stage's schedule over `epochs` epochs, peaking at `lr` (default optim.lr)."""
    lr = scaled_lr(optim_cfg, global_batch, lr)
    total = max(steps_per_epoch * epochs, 1)
    warmup = min(int(round(schedule_cfg.warmup_epochs * steps_per_epoch)), total - 1)
    if schedule_cfg.name == "step":
        milestones = [int(round(e * steps_per_epoch)) for e in schedule_cfg.decay_epochs]
        return StepDecay(lr, warmup, [m for m in milestones if m < total],
                         schedule_cfg.decay_rate)
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


# --------------------------------------------------------------------------- optimizers

# Keras' optimizers, each variable's update one fused TensorFlow kernel where one exists
# (trainer/training/fused.py says why).
OPTIMIZERS = {OptimName.adamw: FusedAdamW, OptimName.sgd: FusedSGD, OptimName.lamb: FusedLamb,
              OptimName.lion: FusedLion}


def make_optimizer(optim_cfg, schedule, model: keras.Model,
                   lr_factors: dict[str, float] | None = None) -> keras.optimizers.Optimizer:
    """The configured optimizer, built on every weight any stage may train."""
    cls = OPTIMIZERS[optim_cfg.name]
    if lr_factors:
        cls = type(f"LayerDecay{cls.__name__}", (cls,), {"lr_factors": lr_factors})
    kwargs = dict(learning_rate=schedule, global_clipnorm=optim_cfg.clip_norm,
                  weight_decay=optim_cfg.weight_decay)
    if optim_cfg.ema_decay > 0:
        kwargs.update(use_ema=True, ema_momentum=optim_cfg.ema_decay)
    if optim_cfg.name == "sgd":
        kwargs.update(momentum=optim_cfg.momentum, nesterov=True)
    opt = cls(**kwargs)
    # Norm scales/offsets and biases are not decayed: every 1-D weight, and the attention
    # biases, which Keras' MultiHeadAttention stores as (heads, head_dim).
    opt.exclude_from_weight_decay(
        var_list=[v for v in model.trainable_variables
                  if len(v.shape) <= 1 or v.path.endswith(("bias", "gamma", "beta"))])
    return opt


def ema_pairs(optimizer: keras.optimizers.Optimizer) -> tuple[list, list] | None:
    """(variables, their EMA) as the optimizer keeps them; None without EMA."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # under loss scaling
    if not getattr(inner, "use_ema", False):
        return None
    # Keras keeps the averages only in this attribute, aligned with _trainable_variables.
    return inner._trainable_variables, inner._model_variables_moving_average


@contextlib.contextmanager
def ema_swapped(pairs: tuple[list, list] | None):
    """Inside the block the variables hold their EMA; afterwards their raw values again.

    Keras' public swap is the `SwapEMAWeights` callback, which works only inside `Model.fit`."""
    if pairs is None:
        yield
        return
    variables, averages = pairs
    raw = [v.numpy() for v in variables]
    for v, a in zip(variables, averages):
        v.assign(a)
    try:
        yield
    finally:
        for v, value in zip(variables, raw):
            v.assign(value)


def finalize_ema(optimizer: keras.optimizers.Optimizer, pairs: tuple[list, list] | None) -> None:
    """Load the EMA into the variables for good (final evaluation and export): Keras' own
    `finalize_variable_values`, on the variables the optimizer was built on."""
    if pairs is not None:
        optimizer.finalize_variable_values(pairs[0])


def current_lr(optimizer: keras.optimizers.Optimizer) -> float:
    lr = optimizer.learning_rate
    return float(lr.numpy() if hasattr(lr, "numpy") else lr)


# --------------------------------------------------------------------------- the run's optimizer


def stage_schedules(optim_cfg, schedule_cfg, stages, steps_per_epoch: int, global_batch: int):
    """One schedule per fine-tuning stage, each restarting at the stage's first step."""
    schedules = [make_schedule(optim_cfg, schedule_cfg, steps_per_epoch, s.epochs, global_batch,
                               lr=s.lr) for s in stages]
    if len(stages) == 1:
        return schedules[0]
    return StagedSchedule([s.start_epoch * steps_per_epoch for s in stages], schedules)


def make_run_optimizer(optim_cfg, schedule_cfg, stages, steps_per_epoch: int, global_batch: int,
                       model: keras.Model, precision: str):
    """The optimizer a run trains with (call inside the strategy's scope), and the learning-rate
    scale that NaN rollbacks lower. Built on every weight any stage trains (nothing is frozen
    yet), with loss scaling under mixed_float16."""
    lr_scale = tf.Variable(1.0, dtype=tf.float32, trainable=False)
    schedule = ScaledSchedule(
        stage_schedules(optim_cfg, schedule_cfg, stages, steps_per_epoch, global_batch), lr_scale)
    optimizer = make_optimizer(optim_cfg, schedule, model,
                               layer_decay_factors(model, optim_cfg.layer_decay))
    if precision == "mixed_float16":  # dynamic loss scaling
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    return optimizer, lr_scale
