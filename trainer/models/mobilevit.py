"""MobileViT v1 (Mehta & Rastegari, 2021) and v2 (2022) as one native Keras 3 functional
backbone, channels-last, built from the architecture tables in `models/presets.py`.

v1 is exact against apple/ml-cvnets, timm `mobilevit_*` and transformers `MobileViTModel`:
- BatchNorm eps 1e-5 and Keras momentum 0.9 (PyTorch's momentum=0.1 is the weight of the *new*
  batch; Keras' momentum is the weight of the *old* statistic, so the same rule is 0.9 here);
- stride-2 3x3 convs pad one pixel on every side, like PyTorch. Keras "same" pads (0, 1) on even
  inputs, which shifts every feature map by one pixel;
- the MobileViT block unfolds 2x2 patches so that attention runs over the N patches separately for
  each of the P = 4 pixel positions, and resizes maps not divisible by 2 (bilinear, half-pixel).
v2 (stages of type "vit2", no final 1x1 conv) against timm `mobilevitv2_*` and transformers
`MobileViTV2Model`: see `layers_v2.py`. The building blocks are in `layers.py`.
"""

from __future__ import annotations

import contextlib
import math

import keras
import numpy as np
from keras.src.models.functional import operation_fn as functional_operation_fn

from trainer.models.head import build_classifier
from trainer.models.layers import conv_bn, inverted_residual, mobilevit_block
from trainer.models.layers_v2 import mobilevit_v2_block
from trainer.models.presets import preset
from trainer.models.recompute import recomputed
from trainer.models.weights import load_weights

# --------------------------------------------------------------------------- the backbone


@keras.saving.register_keras_serializable(package="mobilevit")
class MobileViTBackbone(keras.Model):
    """MobileViT feature extractor: RGB in [0, 1] -> final feature map (stride 32).

    `stages`: one dict per stage after the stem: "mv2" (MobileNetV2 blocks), "vit" (a stride-2
    MV2, then a v1 MobileViT block of width `dim` and `depth` layers) or "vit2" (the same with a
    v2 block). `final_channels`: the last 1x1 conv-BN-SiLU (v1), None for none (v2).
    `pyramid_outputs` maps "P1".."P5" (strides 2..32) to the stage outputs for dense tasks;
    `feature_channels` is the width of the final map (320 / 384 / 640 for v1; 256..1024 for v2).
    """

    def __init__(self, stem_channels: int, stages: list[dict], final_channels: int | None,
                 expand_ratio: float, num_heads: int = 4, patch_size: int = 2,
                 mlp_ratio: float = 2.0, dropout: float = 0.0, attention_dropout: float = 0.0,
                 drop_path_rate: float = 0.0, sync_bn: bool = False,
                 image_shape: tuple = (None, None, 3), recompute: bool = False, **kwargs):
        _check_args(stages, num_heads, patch_size, dropout, attention_dropout, drop_path_rate,
                    image_shape)
        n_blocks = sum(s["depth"] for s in stages)
        rates = iter([drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)])
        attention = dict(mlp_ratio=mlp_ratio, patch_size=patch_size, dropout=dropout,
                         attention_dropout=attention_dropout, sync_bn=sync_bn)

        inputs = keras.Input(shape=tuple(image_shape), name="images")
        # The chain of blocks, as (input, output, recompute it): the convolutional ones are the
        # units `recompute` runs again in the backward pass (`models/recompute.py`).
        chain = []

        def block(block_in, block_out, remat: bool):
            chain.append((block_in, block_out, remat))
            return block_out

        x = block(inputs, conv_bn(inputs, stem_channels, 3, 2, "stem", sync_bn=sync_bn), True)
        pyramid = {}
        for si, stage in enumerate(stages):
            name = f"stage{si}"
            if stage["type"] == "mv2":
                for bi in range(stage["depth"]):
                    x = block(x, inverted_residual(
                        x, stage["channels"], stage["stride"] if bi == 0 else 1, expand_ratio,
                        f"{name}_mv2_{bi}", next(rates), sync_bn), True)
            else:
                x = block(x, inverted_residual(x, stage["channels"], stage["stride"],
                                               expand_ratio, f"{name}_mv2_0", 0.0, sync_bn), True)
                drop_paths = [next(rates) for _ in range(stage["depth"])]
                if stage["type"] == "vit":
                    x = block(x, mobilevit_block(
                        x, stage["dim"], stage["depth"], f"{name}_vit", num_heads=num_heads,
                        drop_paths=drop_paths, **attention), False)
                else:
                    x = block(x, mobilevit_v2_block(
                        x, stage["dim"], stage["depth"], f"{name}_vit", drop_paths=drop_paths,
                        **attention), False)
            pyramid[f"P{si + 1}"] = x
        if final_channels:
            x = block(x, conv_bn(x, final_channels, 1, 1, "final", sync_bn=sync_bn), False)
            pyramid["P5"] = x
        super().__init__(inputs=inputs, outputs=x, **kwargs)

        self.pyramid_outputs = pyramid
        self.feature_channels = final_channels or stages[-1]["channels"]
        self.stem_channels, self.stages, self.final_channels = stem_channels, stages, final_channels
        self.expand_ratio, self.num_heads, self.patch_size = expand_ratio, num_heads, patch_size
        self.mlp_ratio, self.dropout, self.attention_dropout = mlp_ratio, dropout, attention_dropout
        self.drop_path_rate, self.sync_bn = drop_path_rate, sync_bn
        self.image_shape = tuple(image_shape)
        self.recompute = recompute
        # Each block as a function over this graph's own layers; set past Keras' and
        # TensorFlow's tracking (no new checkpoint keys, no copies in saved files).
        object.__setattr__(self, "_blocks", [
            (keras.Function(block_in, block_out, name=f"block{i}"), remat)
            for i, (block_in, block_out, remat) in enumerate(chain)])

    def call(self, inputs, training=None, mask=None):
        """The functional graph; in training with `recompute` on, block by block, the
        convolutional blocks' intermediates computed again in the backward pass instead of kept
        (`models/recompute.py`): less memory for about one more forward pass of those blocks."""
        if not (training and self.recompute):
            return super().call(inputs, training=training, mask=mask)
        x = self._standardize_inputs(inputs)[0]
        # Each layer called as Functional.call calls it (Keras' own wrapper passes `training`
        # to the layers that take it), one block at a time.
        for block, remat in self._blocks:
            def run(t, block=block):
                return block._run_through_graph(
                    [t], operation_fn=lambda op: functional_operation_fn(op, training=training))
            x = recomputed(run)(x) if remat else run(x)
        return x

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
            "recompute": self.recompute,
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
        if s.get("type") not in ("mv2", "vit", "vit2"):
            raise ValueError(f"stage type must be 'mv2', 'vit' or 'vit2', got {s!r}")
        if s["type"] == "vit" and s["dim"] % num_heads:
            raise ValueError(f"transformer dim {s['dim']} is not divisible by num_heads={num_heads}")


def build_model(model_cfg, num_classes: int, recompute: bool = False) -> keras.Model:
    """The classifier a `model` config describes (weights not loaded: models/weights.py);
    `recompute`: the trainer's choice of memory over speed (`MobileViTBackbone.call`)."""
    backbone = MobileViTBackbone.from_preset(
        model_cfg.name, dropout=model_cfg.dropout, drop_path_rate=model_cfg.drop_path_rate,
        sync_bn=model_cfg.sync_bn, recompute=recompute)
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
