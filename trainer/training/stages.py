"""What trains when: fine-tuning stages, the BatchNorm policy, layer-wise lr decay.

A stage sets the trainable set (the whole network or the head only) and the BatchNorm policy
(`train`, or `frozen`: BN in inference mode with its statistics and affine weights fixed).
Keras traces a training step for one trainable set, so the loop rebuilds its step at every
stage boundary (`Loop.reset`).
"""

from __future__ import annotations

import math

import keras

from trainer.config.schema import Stage
from trainer.models.head import find_backbone

# The backbone's layer groups from input to output, by layer-name prefix (see models/mobilevit).
GROUP_ORDER = ("stem", "stage0", "stage1", "stage2", "stage3", "stage4", "final")


def apply_stage(model: keras.Model, stage: Stage) -> dict:
    """Set trainable flags for `stage`; returns what trains (weights and parameter counts)."""
    backbone = find_backbone(model)
    train_all, freeze_bn = stage.train == "all", stage.bn == "frozen"
    # Every layer explicitly, parents first: assigning a container the value it already has
    # does not reach its sub-layers in Keras 3.15, so a BN frozen earlier would stay frozen.
    for layer in backbone._flatten_layers(include_self=True):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = train_all and not (freeze_bn and is_bn)  # non-trainable BN: inference
    weights = model.trainable_weights
    return {"stage": stage.name, "train": stage.train, "bn": stage.bn,
            "trainable_weights": len(weights),
            "trainable_params": int(sum(math.prod(w.shape) for w in weights))}


def stage_at(stages: list[Stage], epoch: int) -> Stage:
    return next(s for s in stages if s.start_epoch <= epoch < s.start_epoch + s.epochs)


def layer_decay_factors(model: keras.Model, decay: float) -> dict[str, float]:
    """lr factor per weight path: decay^(groups from the top) in the backbone, 1 in the head.

    With the 7 groups of GROUP_ORDER, the stem gets decay^7, stage0 decay^6 ... the final 1x1
    conv decay^1, the head 1.
    """
    if decay == 1.0:
        return {}
    backbone, factors = find_backbone(model), {}
    for layer in backbone.layers:
        group = layer.name.split("_", 1)[0]
        if group in GROUP_ORDER:
            depth = len(GROUP_ORDER) - GROUP_ORDER.index(group)
            factors.update({w.path: decay ** depth for w in layer.weights})
    return factors
