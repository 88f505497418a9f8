"""The MobileViT v2 block (Mehta & Rastegari, 2022: separable self-attention), channels-last.

Exact against apple/ml-cvnets `MobileViTBlockv2` and timm `MobileVitV2Block`:
- a map not divisible by the patch size is first resized *up* to the next multiple, bilinear
  with align_corners=True (v1 uses half-pixel centres and resizes back; v2 keeps the new size);
- local representation: 3x3 *depthwise* conv-BN-SiLU, then a 1x1 conv to the attention width d;
- tokens [B, P, N, d]: pixel p of each 2x2 patch, n over the N patches;
- linear attention: one 1x1 conv gives a query channel, keys and values; the query is softmaxed over
  the N patches, the context is sum_n(key * score), the output relu(value) * context, projected;
- every norm is GroupNorm with one group: statistics over (P, N, d) together per example, eps 1e-5,
  an affine per channel (not a per-token LayerNorm);
- no shortcut concat and no fusion conv: 1x1 conv-BN back to C is the block's output.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers, ops

from trainer.models.layers import (
    DropPath,
    PatchLayer,
    conv_bn,
    fold_patches,
    padded_size,
    silu,
    unfold_patches,
)

GN_EPSILON = 1e-5


@keras.saving.register_keras_serializable(package="mobilevit")
class ResizeToPatches(PatchLayer):
    """Resize up to a multiple of the patch size, bilinear with align_corners=True, if needed.

    TensorFlow's raw op: `tf.image.resize` and keras.ops have no align_corners, which the
    reference uses here (and LiteRT's RESIZE_BILINEAR supports).
    """

    def call(self, x):
        h, w = ops.shape(x)[1], ops.shape(x)[2]
        new_h, new_w = padded_size(h, self.patch_size), padded_size(w, self.patch_size)

        def resize():
            size = tf.cast(tf.stack([new_h, new_w]), tf.int32)
            out = tf.raw_ops.ResizeBilinear(images=x, size=size, align_corners=True,
                                            half_pixel_centers=False)
            return tf.cast(out, x.dtype)  # float32 out for any input: back to x's dtype

        if all(isinstance(v, int) for v in (h, w)):  # static shapes: decide in Python
            return x if (h, w) == (new_h, new_w) else resize()
        return tf.cond(tf.logical_or(tf.not_equal(h, new_h), tf.not_equal(w, new_w)),
                       resize, lambda: x)

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        p = self.patch_size
        return (b, None if h is None else padded_size(h, p), None if w is None else
                padded_size(w, p), c)


@keras.saving.register_keras_serializable(package="mobilevit")
class PatchesToTokens(PatchLayer):
    """[B, H, W, d] (H, W multiples of the patch size) -> [B, P, N, d]: v1's unfold, with the
    batch and pixel-position axes kept apart for the one-group GroupNorm."""

    def call(self, x):
        p, b = self.patch_size, ops.shape(x)[0]
        return ops.reshape(unfold_patches(x, p), (b, p * p, -1, x.shape[-1]))

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        p = self.patch_size
        return (b, p * p, None if h is None or w is None else (h // p) * (w // p), c)


@keras.saving.register_keras_serializable(package="mobilevit")
class TokensToPatches(PatchLayer):
    """Inverse of `PatchesToTokens`, to the size of `reference` [B, H, W, *]."""

    def call(self, inputs):
        tokens, reference = inputs
        p, b, c = self.patch_size, ops.shape(tokens)[0], tokens.shape[-1]
        h, w = ops.shape(reference)[1], ops.shape(reference)[2]
        return fold_patches(ops.reshape(tokens, (b * p * p, -1, c)), h, w, p)

    def compute_output_shape(self, input_shapes):
        tokens, reference = input_shapes
        return tuple(reference[:3]) + (tokens[-1],)


def group_norm(x, name: str):
    """GroupNorm with one group: normalised over (P, N, d) per example, affine per channel."""
    return layers.GroupNormalization(groups=1, axis=-1, epsilon=GN_EPSILON, name=name)(x)


def linear_attention(x, dim: int, name: str, attention_dropout: float):
    """Separable self-attention over tokens [B, P, N, d]: O(N), elementwise."""
    qkv = layers.Dense(1 + 2 * dim, name=f"{name}_qkv")(x)
    query, key, value = qkv[..., :1], qkv[..., 1:1 + dim], qkv[..., 1 + dim:]
    scores = layers.Softmax(axis=2, name=f"{name}_softmax")(query)  # over the N patches
    if attention_dropout:
        scores = layers.Dropout(attention_dropout, name=f"{name}_drop")(scores)
    context = ops.sum(key * scores, axis=2, keepdims=True)  # [B, P, 1, d]
    out = layers.ReLU(name=f"{name}_relu")(value) * context
    return layers.Dense(dim, name=f"{name}_out")(out)


def linear_transformer_layer(x, dim: int, ffn_dim: int, name: str, *, dropout: float,
                             attention_dropout: float, drop_path: float):
    """x + attention(GN(x)); x + MLP(GN(x)), the MLP with SiLU (1x1 convs = Dense on d)."""
    h = linear_attention(group_norm(x, f"{name}_norm1"), dim, f"{name}_attn", attention_dropout)
    h = layers.Dropout(dropout, name=f"{name}_attn_drop")(h) if dropout else h
    h = DropPath(drop_path, name=f"{name}_droppath1")(h) if drop_path else h
    x = layers.Add(name=f"{name}_add1")([x, h])
    h = layers.Dense(ffn_dim, activation=silu, name=f"{name}_fc1")(group_norm(x, f"{name}_norm2"))
    h = layers.Dropout(dropout, name=f"{name}_ffn_drop")(h) if dropout else h
    h = layers.Dense(dim, name=f"{name}_fc2")(h)
    h = DropPath(drop_path, name=f"{name}_droppath2")(h) if drop_path else h
    return layers.Add(name=f"{name}_add2")([x, h])


def mobilevit_v2_block(x, dim: int, depth: int, name: str, *, mlp_ratio: float,
                       patch_size: int, dropout: float, attention_dropout: float,
                       drop_paths: list[float], sync_bn: bool):
    """Resize to patches, depthwise 3x3, 1x1 to d, unfold, linear transformer, GN, fold, 1x1 to C."""
    channels = x.shape[-1]
    x = ResizeToPatches(patch_size, name=f"{name}_resize")(x)
    y = conv_bn(x, channels, 3, 1, f"{name}_local", depthwise=True, sync_bn=sync_bn)
    y = layers.Conv2D(dim, 1, use_bias=False, name=f"{name}_to_tokens")(y)
    tokens = PatchesToTokens(patch_size, name=f"{name}_unfold")(y)
    for i in range(depth):
        tokens = linear_transformer_layer(tokens, dim, int(dim * mlp_ratio), f"{name}_tf{i}",
                                          dropout=dropout, attention_dropout=attention_dropout,
                                          drop_path=drop_paths[i])
    tokens = group_norm(tokens, f"{name}_norm")
    y = TokensToPatches(patch_size, name=f"{name}_fold")([tokens, y])
    return conv_bn(y, channels, 1, 1, f"{name}_proj", act=False, sync_bn=sync_bn)
