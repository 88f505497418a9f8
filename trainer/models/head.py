"""The classification head on any backbone, and finding the backbone inside a classifier.

Below the backbone and the weights loader, which both use it: the loader puts checkpoints into
classifiers without depending on the backbone module (whose `from_preset` calls the loader).
"""

from __future__ import annotations

import keras
from keras import layers

HEAD = "head"  # the Dense layer's name: the weights loader finds the 1000-class head by it


def build_classifier(backbone: keras.Model, num_classes: int, dropout: float = 0.0,
                     name: str = "classifier") -> keras.Model:
    """Backbone -> global average pool -> dropout -> dense logits (float32 for mixed precision)."""
    if num_classes < 1:
        raise ValueError(f"`num_classes` must be >= 1, got {num_classes!r}")
    inputs = keras.Input(shape=backbone.input_shape[1:], name="images")
    return keras.Model(inputs, classifier_outputs(backbone(inputs), num_classes, dropout),
                       name=name)


def classifier_outputs(features, num_classes: int, dropout: float):
    """The head on a feature map: pool, dropout, dense logits (float32 for mixed precision)."""
    x = layers.GlobalAveragePooling2D(name="pool")(features)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    return layers.Dense(num_classes, name=HEAD, dtype="float32")(x)


def is_backbone(layer: keras.layers.Layer) -> bool:
    """A MobileViT backbone (any version): it maps its stage outputs in `pyramid_outputs`."""
    return isinstance(layer, keras.Model) and hasattr(layer, "pyramid_outputs")


def find_backbone(model: keras.Model) -> keras.Model:
    """The MobileViT backbone inside a classifier (or the model itself)."""
    if is_backbone(model):
        return model
    for layer in model.layers:
        if is_backbone(layer):
            return layer
    raise ValueError(f"model {model.name!r} contains no MobileViTBackbone")


def head_layer(model: keras.Model) -> keras.layers.Dense | None:
    try:
        return model.get_layer(HEAD)
    except ValueError:
        return None
