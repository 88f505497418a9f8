"""The building blocks of MobileViT v1 (and the parts v2 shares): conv-BN-SiLU with PyTorch's
padding, MobileNetV2 inverted residuals, stochastic depth, patch (un)folding, the v1 transformer
and MobileViT block. Exact against apple/ml-cvnets, timm and transformers (see `mobilevit.py`).
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers, ops

from trainer.models import recompute
from trainer.models.attention import TokenAttention
from trainer.models.batchnorm import FusedBatchNormalization
from trainer.models.presets import make_divisible

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
LN_EPSILON = 1e-5

# --------------------------------------------------------------------------- custom layers
# Keras has no stochastic-depth layer and no MobileViT patch (un)folding; these are the only
# hand-written layers.


@keras.saving.register_keras_serializable(package="mobilevit")
def silu(x):
    """SiLU, y = x * sigmoid(x): Keras' "silu" to float32 rounding, with a gradient that keeps
    less. Autodiff of x * sigmoid(x) keeps x and sigmoid(x) for the backward pass; this gradient,
    dy * (s + y * (1 - s)), reads s and y, and y is kept anyway (the next layer's input): one
    activation-sized tensor fewer per SiLU, as many ops (XXS at 256x256, batch 32: 356 MiB
    fewer kept, `python -m bench.profile_memory`). Not Keras' silu: `tf.nn.silu` recomputes the
    sigmoid in its gradient and differentiates its constant beta, 9 ops more per activation."""
    return _silu(x)  # a plain function: what Keras serialises (a custom_gradient object is not)


@ops.custom_gradient
def _silu(x):
    s = ops.sigmoid(x)
    y = ops.multiply(x, s)

    def grad(*args, upstream=None):
        upstream = args[0] if upstream is None else upstream
        return ops.multiply(upstream, ops.add(s, ops.multiply(y, ops.subtract(1.0, s))))

    return y, grad


@keras.saving.register_keras_serializable(package="mobilevit")
class DropPath(layers.Layer):
    """Stochastic depth: drops the whole residual branch per example (scaled by 1 / keep)."""

    def __init__(self, rate: float = 0.0, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"DropPath rate must be in [0, 1), got {rate!r}")
        self.rate, self.seed = rate, seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=None):
        if not training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        mask = recompute.shared(self, lambda: ops.floor(
            keep + keras.random.uniform(shape, seed=self.seed_generator, dtype=x.dtype)))
        return x * mask / keep

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


def unfold_patches(x, patch: int):
    """[B, H, W, C] -> [B * P, N, C]: token n of sequence b * P + p is pixel p of patch n."""
    # -1 for the batch: with the map's size static (a served graph) the reshapes need no shape
    # arithmetic at run time (#20).
    h, w, c = ops.shape(x)[1], ops.shape(x)[2], x.shape[-1]
    x = ops.reshape(x, (-1, h // patch, patch, w // patch, patch, c))
    x = ops.transpose(x, (0, 2, 4, 1, 3, 5))  # [B, ph, pw, nh, nw, C]
    return ops.reshape(x, (-1, (h // patch) * (w // patch), c))


def fold_patches(tokens, h, w, patch: int):
    """Inverse of `unfold_patches` for a map of size h x w (both multiples of `patch`)."""
    c = tokens.shape[-1]
    x = ops.reshape(tokens, (-1, patch, patch, h // patch, w // patch, c))
    x = ops.transpose(x, (0, 3, 1, 4, 2, 5))  # [B, nh, ph, nw, pw, C]
    return ops.reshape(x, (-1, h, w, c))


def padded_size(size, patch: int):
    return (size + patch - 1) // patch * patch


def _resize_if_needed(x, h, w, new_h, new_w):
    """Bilinear resize with half-pixel centres (PyTorch's align_corners=False), only if needed.

    TensorFlow ops directly: keras.ops.image.resize wants a static size, and the backbone takes
    images of any size.
    """
    # tf.image.resize returns float32 for any input: back to x's dtype (bfloat16 / float16 under
    # mixed precision), or the two branches of the cond below disagree.
    if all(isinstance(v, int) for v in (h, w, new_h, new_w)):  # static shapes: decide in Python
        return x if (h, w) == (new_h, new_w) else tf.cast(
            tf.image.resize(x, (new_h, new_w), "bilinear"), x.dtype)
    return tf.cond(
        tf.logical_or(tf.not_equal(h, new_h), tf.not_equal(w, new_w)),
        lambda: tf.cast(tf.image.resize(x, tf.stack([new_h, new_w]), "bilinear"), x.dtype),
        lambda: x,
    )


class PatchLayer(layers.Layer):
    """A layer that works on `patch_size` x `patch_size` patches (no weights)."""

    def __init__(self, patch_size: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size}


@keras.saving.register_keras_serializable(package="mobilevit")
class PatchUnfold(PatchLayer):
    """Resize to a multiple of the patch size if needed (bilinear, half-pixel), then unfold."""

    def call(self, x):
        h, w = ops.shape(x)[1], ops.shape(x)[2]
        new_h, new_w = padded_size(h, self.patch_size), padded_size(w, self.patch_size)
        return unfold_patches(_resize_if_needed(x, h, w, new_h, new_w), self.patch_size)

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        p = self.patch_size
        n = None if h is None or w is None else padded_size(h, p) * padded_size(w, p) // p**2
        return (None if b is None else b * p * p, n, c)


@keras.saving.register_keras_serializable(package="mobilevit")
class PatchFold(PatchLayer):
    """Fold tokens back to the size of `reference` (resizing back if unfold had to resize)."""

    def call(self, inputs):
        tokens, reference = inputs
        h, w = ops.shape(reference)[1], ops.shape(reference)[2]
        new_h, new_w = padded_size(h, self.patch_size), padded_size(w, self.patch_size)
        x = fold_patches(tokens, new_h, new_w, self.patch_size)
        return _resize_if_needed(x, new_h, new_w, h, w)

    def compute_output_shape(self, input_shapes):
        tokens, reference = input_shapes
        return tuple(reference[:3]) + (tokens[-1],)


# --------------------------------------------------------------------------- building blocks


def conv_bn(x, filters: int, kernel: int, stride: int, name: str, *, act: bool = True,
            depthwise: bool = False, sync_bn: bool = False):
    """Conv (no bias) -> BatchNorm -> optional SiLU, with PyTorch's symmetric padding."""
    if kernel > 1 and stride > 1:
        # PyTorch pads k // 2 on every side; Keras "same" would pad (0, 1) and shift the map.
        x = layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same"  # identical to symmetric padding at stride 1
    if depthwise:
        x = layers.DepthwiseConv2D(kernel, stride, padding, use_bias=False, name=f"{name}_conv")(x)
    else:
        x = layers.Conv2D(filters, kernel, stride, padding, use_bias=False, name=f"{name}_conv")(x)
    x = FusedBatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, synchronized=sync_bn,
                                name=f"{name}_bn")(x)
    return layers.Activation(silu, name=f"{name}_act")(x) if act else x


def inverted_residual(x, out_channels: int, stride: int, expand_ratio: float, name: str,
                      drop_path: float, sync_bn: bool):
    """MobileNetV2 block: 1x1 expand -> 3x3 depthwise (stride) -> 1x1 linear projection."""
    in_channels = x.shape[-1]
    mid = make_divisible(in_channels * expand_ratio)
    y = conv_bn(x, mid, 1, 1, f"{name}_expand", sync_bn=sync_bn)
    y = conv_bn(y, mid, 3, stride, f"{name}_dw", depthwise=True, sync_bn=sync_bn)
    y = conv_bn(y, out_channels, 1, 1, f"{name}_project", act=False, sync_bn=sync_bn)
    if stride == 1 and in_channels == out_channels:
        y = DropPath(drop_path, name=f"{name}_droppath")(y) if drop_path else y
        y = layers.Add(name=f"{name}_add")([x, y])
    return y


def transformer_layer(x, dim: int, ffn_dim: int, num_heads: int, name: str, *, dropout: float,
                      attention_dropout: float, drop_path: float):
    """Pre-norm transformer layer: x + MHA(LN(x)); x + MLP(LN(x)), MLP with SiLU."""
    h = layers.LayerNormalization(epsilon=LN_EPSILON, name=f"{name}_norm1")(x)
    h = TokenAttention(num_heads, dim // num_heads, dropout=attention_dropout,
                       name=f"{name}_attn")(h, h)
    h = layers.Dropout(dropout, name=f"{name}_attn_drop")(h) if dropout else h
    h = DropPath(drop_path, name=f"{name}_droppath1")(h) if drop_path else h
    x = layers.Add(name=f"{name}_add1")([x, h])
    h = layers.LayerNormalization(epsilon=LN_EPSILON, name=f"{name}_norm2")(x)
    h = layers.Dense(ffn_dim, activation=silu, name=f"{name}_fc1")(h)
    h = layers.Dropout(dropout, name=f"{name}_ffn_drop1")(h) if dropout else h
    h = layers.Dense(dim, name=f"{name}_fc2")(h)
    h = layers.Dropout(dropout, name=f"{name}_ffn_drop2")(h) if dropout else h
    h = DropPath(drop_path, name=f"{name}_droppath2")(h) if drop_path else h
    return layers.Add(name=f"{name}_add2")([x, h])


def mobilevit_block(x, dim: int, depth: int, name: str, *, mlp_ratio: float, num_heads: int,
                    patch_size: int, dropout: float, attention_dropout: float,
                    drop_paths: list[float], sync_bn: bool):
    """Local 3x3 conv, 1x1 to d, unfold, transformer, LN, fold, 1x1 back to C, concat, 3x3 fuse."""
    channels = x.shape[-1]
    shortcut = x
    y = conv_bn(x, channels, 3, 1, f"{name}_local", sync_bn=sync_bn)
    y = layers.Conv2D(dim, 1, use_bias=False, name=f"{name}_to_tokens")(y)
    tokens = PatchUnfold(patch_size, name=f"{name}_unfold")(y)
    for i in range(depth):
        tokens = transformer_layer(tokens, dim, int(dim * mlp_ratio), num_heads, f"{name}_tf{i}",
                                   dropout=dropout, attention_dropout=attention_dropout,
                                   drop_path=drop_paths[i])
    tokens = layers.LayerNormalization(epsilon=LN_EPSILON, name=f"{name}_norm")(tokens)
    y = PatchFold(patch_size, name=f"{name}_fold")([tokens, y])
    y = conv_bn(y, channels, 1, 1, f"{name}_proj", sync_bn=sync_bn)
    y = layers.Concatenate(name=f"{name}_concat")([shortcut, y])
    return conv_bn(y, channels, 3, 1, f"{name}_fusion", sync_bn=sync_bn)
