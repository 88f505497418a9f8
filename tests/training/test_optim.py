"""Schedules in steps, learning-rate scaling with the global batch, weight-decay exclusions."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import ROOT, run_python, tiny_cfg

from trainer.models.head import build_classifier
from trainer.models.mobilevit import MobileViTBackbone
from trainer.training.optim import make_optimizer, make_schedule, scaled_lr


@pytest.mark.parametrize("scaling,expected", [("none", 1e-3), ("linear", 4e-3), ("sqrt", 2e-3)])
def test_lr_scaling_with_global_batch(scaling, expected):
    cfg = tiny_cfg(f"optim.lr_scaling={scaling}", "optim.base_batch_size=64")
    assert scaled_lr(cfg.optim, 256) == pytest.approx(expected)


def test_cosine_schedule_warms_up_then_decays():
    cfg = tiny_cfg("optim.lr=0.01", "schedule.warmup_epochs=1", "schedule.min_lr_ratio=0.1")
    schedule = make_schedule(cfg.optim, cfg.schedule, steps_per_epoch=10, epochs=5,
                             global_batch=64)
    values = [float(schedule(step)) for step in (0, 5, 10, 30, 50)]
    assert values[0] == 0.0 and values[1] == pytest.approx(0.005)
    assert values[2] == pytest.approx(0.01)
    assert values[2] > values[3] > values[4] == pytest.approx(0.001)


def test_no_weight_decay_on_norms_and_biases():
    model = build_classifier(MobileViTBackbone.from_preset("mobilevit_xxs"), 3)
    cfg = tiny_cfg()
    opt = make_optimizer(cfg.optim, 1e-3, model)
    opt.build(model.trainable_variables)
    decayed = {v.path for v in model.trainable_variables if opt._use_weight_decay(v)}
    assert "head/kernel" in decayed and "head/bias" not in decayed
    assert not any(p.endswith(("gamma", "beta", "bias")) for p in decayed)


# --------------------------------------------------------------------------- fused updates

# TensorFlow's Adam kernel forms 1 - beta in float32 (1 - 0.999f = 0.00099998713), Keras in
# Python floats (0.001): Keras is given the betas' float32 values, the ones the kernel uses.
F32_BETAS = {"beta_1": float(np.float32(0.9)), "beta_2": float(np.float32(0.999))}
FUSED_CASES = {  # name: (our optimizer class, Keras' own, constructor arguments)
    "adamw": ("FusedAdamW", "AdamW", F32_BETAS),
    "sgd_nesterov": ("FusedSGD", "SGD", {"momentum": 0.9, "nesterov": True}),
    "sgd_momentum": ("FusedSGD", "SGD", {"momentum": 0.9}),
    "sgd_plain": ("FusedSGD", "SGD", {}),
    "lion": ("FusedLion", "Lion", {}),
}


def fused_vs_keras(replicas: int, steps: int = 4) -> dict:
    """Max relative difference between our fused optimizers and Keras' own after `steps` updates
    of a small conv net (cosine schedule with warmup, weight decay, global clipping, EMA), inside
    `strategy.run` in a `tf.function` as the trainer runs them."""

    from trainer.training import fused
    from trainer.training.distribute import make_strategy
    from trainer.training.optim import make_schedule

    strategy = make_strategy("mirrored" if replicas > 1 else "default", cpu_replicas=replicas)
    cfg = tiny_cfg("optim.lr=0.01", "schedule.warmup_epochs=1")
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 4, 8)
    out = {}
    for case, (ours, theirs, kwargs) in FUSED_CASES.items():
        weights = []
        for cls in (getattr(fused, ours), getattr(keras.optimizers, theirs)):
            keras.utils.set_random_seed(1)
            with strategy.scope():
                model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(6, 3),
                                          keras.layers.BatchNormalization(),
                                          keras.layers.GlobalAveragePooling2D(),
                                          keras.layers.Dense(4)])
                schedule = make_schedule(cfg.optim, cfg.schedule, 2, 3, 8)
                opt = cls(learning_rate=schedule, weight_decay=0.05, global_clipnorm=1.0,
                          use_ema=True, ema_momentum=0.5, **kwargs)
                opt.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
                opt.build(model.trainable_variables)

            def replica_step(x, y, model=model, opt=opt):
                with tf.GradientTape() as tape:
                    loss = tf.nn.compute_average_loss(keras.losses.sparse_categorical_crossentropy(
                        y, model(x, training=True), from_logits=True))
                grads = tape.gradient(loss, model.trainable_variables)
                opt.apply_gradients(zip(grads, model.trainable_variables))

            step = tf.function(lambda x, y: strategy.run(replica_step, args=(x, y)))
            data = iter(strategy.experimental_distribute_dataset(
                tf.data.Dataset.from_tensors((images, labels)).repeat()))
            for _ in range(steps):
                step(*next(data))
            weights.append([v.numpy() for v in model.variables + opt.variables])
        moved = max(float(np.abs(a).max()) for a in weights[1])
        out[case] = max(float(np.abs(a - b).max()) for a, b in zip(*weights)) / moved
    return out


def test_fused_updates_equal_keras_optimizers():
    """One TensorFlow kernel per variable (trainer/training/fused.py) computes what Keras'
    per-op update does: weights, slots, EMA and step count equal within float32 rounding."""
    diffs = fused_vs_keras(replicas=1)
    assert max(diffs.values()) <= 1e-6, diffs


def test_fused_updates_equal_keras_optimizers_on_two_replicas():
    result = run_python(f"""
        import importlib.util, sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        spec = importlib.util.spec_from_file_location("optim", {str(Path(__file__).resolve())!r})
        optim = importlib.util.module_from_spec(spec); spec.loader.exec_module(optim)
        print("DIFFS", optim.fused_vs_keras(replicas=2))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    diffs = eval(result.stdout.split("DIFFS", 1)[1])
    assert max(diffs.values()) <= 1e-6, diffs
