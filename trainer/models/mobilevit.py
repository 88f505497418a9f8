"""MobileViT v1 (Mehta & Rastegari, 2021) as a native Keras 3 functional model, channels-last.

Exact against apple/ml-cvnets, timm `mobilevit_*` and transformers `MobileViTModel`:
- BatchNorm eps 1e-5 and Keras momentum 0.9 (PyTorch's momentum=0.1 is the weight of the *new*
  batch; Keras' momentum is the weight of the *old* statistic, so the same rule is 0.9 here);
- stride-2 3x3 convs pad one pixel on every side, like PyTorch. Keras "same" pads (0, 1) on even
  inputs, which shifts every feature map by one pixel;
- the MobileViT block unfolds 2x2 patches so that attention runs over the N patches separately for
  each of the P = 4 pixel positions, and resizes maps not divisible by 2 (bilinear, half-pixel).

The architectures are tables in `models/presets.py`; `MobileViTBackbone.from_preset(name)` builds one.
"""

from __future__ import annotations

import contextlib
import math

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from trainer.models.head import build_classifier
from trainer.models.presets import preset
from trainer.models.weights import load_weights

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
LN_EPSILON = 1e-5

def make_divisible(value: float, divisor: int = 8) -> int:
    """Channel rounding of MobileNetV2 / ml-cvnets / timm (never more than 10% below `value`)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


# --------------------------------------------------------------------------- custom layers
# Keras has no stochastic-depth layer and no MobileViT patch (un)folding; these are the only
# hand-written layers.


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
        mask = ops.floor(keep + keras.random.uniform(shape, seed=self.seed_generator, dtype=x.dtype))
        return x * mask / keep

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


def _unfold(x, patch: int):
    """[B, H, W, C] -> [B * P, N, C]: token n of sequence b * P + p is pixel p of patch n."""
    b, h, w, c = ops.shape(x)[0], ops.shape(x)[1], ops.shape(x)[2], x.shape[-1]
    x = ops.reshape(x, (b, h // patch, patch, w // patch, patch, c))
    x = ops.transpose(x, (0, 2, 4, 1, 3, 5))  # [B, ph, pw, nh, nw, C]
    return ops.reshape(x, (b * patch * patch, (h // patch) * (w // patch), c))


def _fold(tokens, h, w, patch: int):
    """Inverse of `_unfold` for a map of size h x w (both multiples of `patch`)."""
    c = tokens.shape[-1]
    b = ops.shape(tokens)[0] // (patch * patch)
    x = ops.reshape(tokens, (b, patch, patch, h // patch, w // patch, c))
    x = ops.transpose(x, (0, 3, 1, 4, 2, 5))  # [B, nh, ph, nw, pw, C]
    return ops.reshape(x, (b, h, w, c))


def _padded_size(size, patch: int):
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


@keras.saving.register_keras_serializable(package="mobilevit")
class PatchUnfold(layers.Layer):
    """Resize to a multiple of the patch size if needed (bilinear, half-pixel), then unfold."""

    def __init__(self, patch_size: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size

    def call(self, x):
        h, w = ops.shape(x)[1], ops.shape(x)[2]
        new_h, new_w = _padded_size(h, self.patch_size), _padded_size(w, self.patch_size)
        return _unfold(_resize_if_needed(x, h, w, new_h, new_w), self.patch_size)

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        p = self.patch_size
        n = None if h is None or w is None else _padded_size(h, p) * _padded_size(w, p) // p**2
        return (None if b is None else b * p * p, n, c)

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size}


@keras.saving.register_keras_serializable(package="mobilevit")
class PatchFold(layers.Layer):
    """Fold tokens back to the size of `reference` (resizing back if unfold had to resize)."""

    def __init__(self, patch_size: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size

    def call(self, inputs):
        tokens, reference = inputs
        h, w = ops.shape(reference)[1], ops.shape(reference)[2]
        new_h, new_w = _padded_size(h, self.patch_size), _padded_size(w, self.patch_size)
        x = _fold(tokens, new_h, new_w, self.patch_size)
        return _resize_if_needed(x, new_h, new_w, h, w)

    def compute_output_shape(self, input_shapes):
        tokens, reference = input_shapes
        return tuple(reference[:3]) + (tokens[-1],)

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size}


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
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, synchronized=sync_bn,
                                  name=f"{name}_bn")(x)
    return layers.Activation("silu", name=f"{name}_act")(x) if act else x


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
    h = layers.MultiHeadAttention(num_heads, dim // num_heads, dropout=attention_dropout,
                                  name=f"{name}_attn")(h, h)
    h = layers.Dropout(dropout, name=f"{name}_attn_drop")(h) if dropout else h
    h = DropPath(drop_path, name=f"{name}_droppath1")(h) if drop_path else h
    x = layers.Add(name=f"{name}_add1")([x, h])
    h = layers.LayerNormalization(epsilon=LN_EPSILON, name=f"{name}_norm2")(x)
    h = layers.Dense(ffn_dim, activation="silu", name=f"{name}_fc1")(h)
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


# --------------------------------------------------------------------------- the backbone


@keras.saving.register_keras_serializable(package="mobilevit")
class MobileViTBackbone(keras.Model):
    """MobileViT feature extractor: RGB in [0, 1] -> final feature map (stride 32).

    `pyramid_outputs` maps "P1".."P5" (strides 2..32) to the stage outputs for dense tasks;
    `feature_channels` is the width of the final map (320 / 384 / 640).
    """

    def __init__(self, stem_channels: int, stages: list[dict], final_channels: int,
                 expand_ratio: float, num_heads: int = 4, patch_size: int = 2,
                 mlp_ratio: float = 2.0, dropout: float = 0.0, attention_dropout: float = 0.0,
                 drop_path_rate: float = 0.0, sync_bn: bool = False,
                 image_shape: tuple = (None, None, 3), **kwargs):
        _check_args(stages, num_heads, patch_size, dropout, attention_dropout, drop_path_rate,
                    image_shape)
        n_blocks = sum(s["depth"] for s in stages)
        rates = iter([drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)])

        inputs = keras.Input(shape=tuple(image_shape), name="images")
        x = conv_bn(inputs, stem_channels, 3, 2, "stem", sync_bn=sync_bn)
        pyramid = {}
        for si, stage in enumerate(stages):
            name = f"stage{si}"
            if stage["type"] == "mv2":
                for bi in range(stage["depth"]):
                    x = inverted_residual(x, stage["channels"], stage["stride"] if bi == 0 else 1,
                                          expand_ratio, f"{name}_mv2_{bi}", next(rates), sync_bn)
            else:
                x = inverted_residual(x, stage["channels"], stage["stride"], expand_ratio,
                                      f"{name}_mv2_0", 0.0, sync_bn)
                x = mobilevit_block(x, stage["dim"], stage["depth"], f"{name}_vit",
                                    mlp_ratio=mlp_ratio, num_heads=num_heads,
                                    patch_size=patch_size, dropout=dropout,
                                    attention_dropout=attention_dropout,
                                    drop_paths=[next(rates) for _ in range(stage["depth"])],
                                    sync_bn=sync_bn)
            pyramid[f"P{si + 1}"] = x
        x = conv_bn(x, final_channels, 1, 1, "final", sync_bn=sync_bn)
        pyramid["P5"] = x
        super().__init__(inputs=inputs, outputs=x, **kwargs)

        self.pyramid_outputs = pyramid
        self.feature_channels = final_channels
        self.stem_channels, self.stages, self.final_channels = stem_channels, stages, final_channels
        self.expand_ratio, self.num_heads, self.patch_size = expand_ratio, num_heads, patch_size
        self.mlp_ratio, self.dropout, self.attention_dropout = mlp_ratio, dropout, attention_dropout
        self.drop_path_rate, self.sync_bn = drop_path_rate, sync_bn
        self.image_shape = tuple(image_shape)

    @classmethod
    def from_preset(cls, name: str, weights: str | None = None,
                    checkpoint_format: str | None = None, **overrides) -> MobileViTBackbone:
        """The preset's architecture (`models/presets.py`), with `weights` loaded if given:
        a source of the preset ("imagenet", ...), a timm or transformers checkpoint file
        (`checkpoint_format` "timm" | "hf", else detected), a `.weights.h5` written by
        `trainer.convert`, or a finished run directory of the trainer. `overrides`: any other
        constructor argument (dropout, drop_path_rate, image_shape, ...)."""
        spec = preset(name)  # its name a plain str (a config's enum member would reach .keras files)
        backbone = cls(**{**spec.arch, "name": spec.name, **overrides})
        if weights is not None:
            load_weights(backbone, weights, spec.name, checkpoint_format)
        return backbone

    def get_config(self) -> dict:
        return {
            "name": self.name, "trainable": self.trainable,
            "stem_channels": self.stem_channels, "stages": [dict(s) for s in self.stages],
            "final_channels": self.final_channels, "expand_ratio": self.expand_ratio,
            "num_heads": self.num_heads, "patch_size": self.patch_size,
            "mlp_ratio": self.mlp_ratio, "dropout": self.dropout,
            "attention_dropout": self.attention_dropout, "drop_path_rate": self.drop_path_rate,
            "sync_bn": self.sync_bn, "image_shape": list(self.image_shape),
        }

    @classmethod
    def from_config(cls, config: dict) -> MobileViTBackbone:
        return cls(**config)


def _check_args(stages, num_heads, patch_size, dropout, attention_dropout, drop_path_rate,
                image_shape) -> None:
    for key, value in [("dropout", dropout), ("attention_dropout", attention_dropout),
                       ("drop_path_rate", drop_path_rate)]:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"`{key}` must be in [0, 1), got {value!r}")
    if patch_size < 1:
        raise ValueError(f"`patch_size` must be >= 1, got {patch_size!r}")
    if len(image_shape) != 3 or image_shape[-1] != 3:
        raise ValueError(f"`image_shape` must be (height, width, 3), got {image_shape!r}")
    for s in stages:
        if s.get("type") not in ("mv2", "vit"):
            raise ValueError(f"stage type must be 'mv2' or 'vit', got {s!r}")
        if s["type"] == "vit" and s["dim"] % num_heads:
            raise ValueError(f"transformer dim {s['dim']} is not divisible by num_heads={num_heads}")


def build_model(model_cfg, num_classes: int) -> keras.Model:
    """The classifier a `model` config describes (weights not loaded: models/weights.py)."""
    backbone = MobileViTBackbone.from_preset(
        model_cfg.name, dropout=model_cfg.dropout, drop_path_rate=model_cfg.drop_path_rate,
        sync_bn=model_cfg.sync_bn)
    return build_classifier(backbone, num_classes, dropout=model_cfg.head_dropout)


@contextlib.contextmanager
def float32_policy():
    """Layers made inside compute in float32, whatever the global (mixed) precision policy."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def float32_copy(model: keras.Model) -> keras.Model:
    """`model` computing in float32 with the same weights: what exports serve, whatever precision
    it trained in (a float16 graph does not convert to LiteRT; callers expect float32)."""
    if all(layer.compute_dtype == "float32" for layer in model._flatten_layers()):
        return model

    def in_float32(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if "dtype" in config:
            config["dtype"] = "float32"
        return layer.__class__.from_config(config)

    with float32_policy():  # the backbone's own layers take the global policy
        copy = keras.models.clone_model(model, clone_function=in_float32)
    copy.set_weights(model.get_weights())
    # By name, not position: a clone that ordered its layers differently would fail here.
    source = {w.path: w for w in model.weights}
    if [w.path for w in copy.weights] != list(source) or not all(
            np.array_equal(w.numpy(), source[w.path].numpy()) for w in copy.weights):
        raise RuntimeError(f"the float32 copy of {model.name} does not hold its weights by name")
    return copy


def count_params(model: keras.Model) -> int:
    """Trainable parameters: the number PyTorch reports (BN running stats are buffers there)."""
    return int(sum(math.prod(w.shape) for w in model.trainable_weights))
