"""The fused training-mode BatchNorm (trainer/models/batchnorm.py) against Keras' own."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.models.batchnorm import FusedBatchNormalization


def one_step(cls, x, run):
    """Output, input and weight gradients, and moving statistics after one training call."""
    keras.utils.set_random_seed(0)
    layer = cls(momentum=0.9, epsilon=1e-5)
    layer.build(x.shape)
    layer.gamma.assign(np.linspace(0.5, 1.5, x.shape[-1]).astype("float32"))
    layer.beta.assign(np.linspace(-0.2, 0.3, x.shape[-1]).astype("float32"))

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * y * 0.5 + y)  # a gradient that depends on y
        dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma, layer.beta])
        return y, dx, dgamma, dbeta

    y, dx, dgamma, dbeta = run(step)(tf.constant(x))
    return [t.numpy() for t in (y, dx, dgamma, dbeta, layer.moving_mean, layer.moving_variance)]


@pytest.mark.parametrize("mode", ["eager", "tf.function"])
def test_fused_training_batchnorm_equals_keras(mode):
    x = np.random.default_rng(0).normal(1.5, 2.0, (4, 5, 6, 8)).astype("float32")
    run = (lambda f: f) if mode == "eager" else tf.function
    ours = one_step(FusedBatchNormalization, x, run)
    keras_bn = one_step(keras.layers.BatchNormalization, x, run)
    names = ["output", "input gradient", "gamma gradient", "beta gradient", "moving mean",
             "moving variance (biased batch variance, as Keras)"]
    for name, a, b in zip(names, ours, keras_bn):
        scale = max(float(np.abs(b).max()), 1.0)
        assert np.abs(a - b).max() / scale <= 1e-5, name


def test_inference_and_unfusable_cases_are_keras():
    x = np.random.default_rng(1).normal(size=(2, 3, 3, 4)).astype("float32")
    layer = FusedBatchNormalization()
    reference = keras.layers.BatchNormalization()
    for lay in (layer, reference):
        lay.build(x.shape)
        lay.moving_variance.assign(np.full(4, 2.0, "float32"))
    np.testing.assert_array_equal(layer(x, training=False), reference(x, training=False))
    # A 2-D input has no fused kernel: Keras' path, same numbers.
    flat = x.reshape(-1, 4)
    np.testing.assert_array_equal(FusedBatchNormalization()(flat, training=True),
                                  keras.layers.BatchNormalization()(flat, training=True))
    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(restored) is FusedBatchNormalization
