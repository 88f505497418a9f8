"""The SavedModels' layers written in the op patterns TensorFlow's CPU runtime fuses (#20).

Two layers account for most of the ops one image runs through in MobileViT's transformers:

- LayerNormalization: Keras computes it as 9 elementwise ops (mean, squared difference, mean,
  rsqrt, negation, three multiplies and adds). Grappler's remapper turns TensorFlow's own
  layer-norm pattern (the one tf.keras 2 emitted: a training-mode FusedBatchNormV3 over
  [1, tokens, features, 1] in NCHW, then the scale and offset) into one oneDNN `_MklLayerNorm`;
  it does not match Keras 3's arithmetic.
- Dense on [B, T, C] tokens: Keras' TensorFlow backend computes it with `tf.tensordot`, which
  reads the input's shape at run time (Shape, two GatherV2, two Prod, Pack, ConcatV2 around the
  MatMul). Flattened to [B x T, C] with T known it is Reshape, MatMul, Reshape, and the bias and
  activation fuse into the MatMul.

`for_onednn` returns a copy of a model with those two layer types swapped for these subclasses
(same config, same weights, same function up to float rounding), for the exported SavedModels
only: the Keras model and checkpoints keep Keras' layers, and LiteRT converts from the model
before this swap (its converter has no training-mode batch norm). Measured
(bench/profile_infer.py, 2-core Xeon): the served XXS graph 594 -> ~195 ops per image, but batch 1
no faster (XXS 25.6 vs 24.5 ms, S 53.6 vs 54.1): those ops' time is oneDNN kernel time, not
executor overhead. Hand-written: no library rewrites a Keras model into the fused patterns.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers, ops

from trainer.models.folding import leaf_layers


class FusableLayerNorm(layers.LayerNormalization):
    """LayerNormalization over the last axis of [B, T, C] as the pattern grappler fuses."""

    def _fusable(self, inputs) -> bool:
        axes = self.axis if isinstance(self.axis, (list, tuple)) else [self.axis]
        rank = len(inputs.shape)
        return (rank in (2, 3) and [a % rank for a in axes] == [rank - 1] and self.center
                and self.scale and not self.rms_scaling and inputs.dtype == tf.float32)

    def call(self, inputs):
        if not self._fusable(inputs):
            return super().call(inputs)
        shape = tf.shape(inputs)
        rows = tf.reduce_prod(shape[:-1])
        # NCHW [1, rows, C, 1]: each token a "channel" whose statistics are over its C features.
        x = tf.reshape(inputs, tf.stack([1, rows, inputs.shape[-1], 1]))
        y = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=tf.fill([rows], 1.0), offset=tf.fill([rows], 0.0),
            mean=tf.constant([], tf.float32), variance=tf.constant([], tf.float32),
            epsilon=self.epsilon, data_format="NCHW", is_training=True).y
        return tf.reshape(y, shape) * self.gamma + self.beta


class FlatDense(layers.Dense):
    """Dense on [B, T, C] as one 2-D matmul of [B x T, C] (T static), like PyTorch's Linear."""

    def call(self, inputs, training=None):
        middle = inputs.shape[1:-1]
        if (len(inputs.shape) <= 2 or any(d is None for d in middle)
                or getattr(self, "quantization_mode", None) or getattr(self, "lora_enabled", False)):
            return super().call(inputs, training=training)
        flat = super().call(ops.reshape(inputs, (-1, inputs.shape[-1])), training=training)
        return ops.reshape(flat, (-1, *middle, self.units))


SWAPS = {layers.LayerNormalization: FusableLayerNorm, layers.Dense: FlatDense}


def for_onednn(model: keras.Model) -> keras.Model:
    """A copy of `model` whose LayerNormalization and Dense layers are the fusable subclasses
    above; every other layer, and every weight, as it is. `model` itself if it has none."""
    if not any(type(layer) in SWAPS for layer in leaf_layers(model)):
        return model

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        return SWAPS.get(type(layer), type(layer)).from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    source = {layer.name: layer for layer in leaf_layers(model)}
    for layer in leaf_layers(copy):
        if layer.weights:
            layer.set_weights([w.numpy() for w in source[layer.name].weights])
    return copy
