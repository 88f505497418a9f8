"""BatchNorm folded into its convolution (trainer/models/folding.py), as the exports serve it."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.models.folding import conv_bn_pairs, fold_batchnorm
from trainer.models.head import build_classifier
from trainer.models.mobilevit import MobileViTBackbone


def with_real_statistics(model: keras.Model, seed: int = 0) -> keras.Model:
    """Random BN statistics and affine weights (a fresh model's are 0 / 1: folding is trivial)."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        name = w.path.rsplit("/", 1)[-1]
        if name == "moving_variance":
            w.assign(rng.uniform(0.2, 3.0, w.shape).astype("float32"))
        elif name in ("moving_mean", "beta"):
            w.assign(rng.normal(0.0, 0.5, w.shape).astype("float32"))
        elif name == "gamma":
            w.assign(rng.uniform(0.3, 2.0, w.shape).astype("float32"))
    return model


@pytest.mark.parametrize("preset,pairs", [("mobilevit_xxs", 32), ("mobilevitv2_050", 25)])
def test_folded_model_is_the_same_function_with_no_batchnorm(preset, pairs):
    model = with_real_statistics(build_classifier(MobileViTBackbone.from_preset(preset), 7))
    assert len(conv_bn_pairs(model)) == pairs  # every conv_bn of the builder
    folded = fold_batchnorm(model)
    leaves = [layer for layer in folded._flatten_layers() if not isinstance(layer, keras.Model)]
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in leaves)
    # Each pair's 4 BN vectors become the convolution's one bias.
    bn_weights = sum(4 * conv.kernel.shape[-1] * (conv.kernel.shape[-2]
                     if isinstance(conv, keras.layers.DepthwiseConv2D) else 1)
                     for conv in conv_bn_pairs(model).values())
    assert folded.count_params() == model.count_params() - bn_weights * 3 // 4
    images = np.random.default_rng(1).random((2, 64, 64, 3), dtype=np.float32)
    expected = model(images, training=False).numpy()
    got = folded(images, training=False).numpy()
    assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-5
    # Inside a tf.function, as the export traces it; and folding again changes nothing.
    again = fold_batchnorm(folded)
    assert again is folded
    traced = tf.function(lambda x: folded(x, training=False))(images).numpy()
    np.testing.assert_allclose(traced, got, rtol=0, atol=1e-5 * np.abs(expected).max())
    # The trainable model is untouched.
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in
               model._flatten_layers())
