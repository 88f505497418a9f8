"""`MobileViTClassifier`: a backbone and a new (or the ImageNet) head, as one functional Keras model.

The library counterpart of the TF Hub `mobilevit_*_1k_256` classifiers: `from_preset(name,
weights="imagenet", num_classes=5)` builds any preset of the registry, loads its weights and puts
a new head on it unless 1000 classes are asked for. `compile` / `fit` / `save` / `export` work as for
any Keras model.
"""

from __future__ import annotations

import keras

from trainer.models.head import classifier_outputs
from trainer.models.mobilevit import MobileViTBackbone
from trainer.models.preprocessing import MobileViTPreprocessor
from trainer.models.presets import preset
from trainer.models.weights import IMAGENET_CLASSES, load_weights


@keras.saving.register_keras_serializable(package="mobilevit")
class MobileViTClassifier(keras.Model):
    """Images -> [preprocessor] -> backbone -> global average pool -> dropout -> dense logits.

    Args:
        backbone: a `MobileViTBackbone`.
        num_classes: width of the new head.
        dropout: dropout before the head.
        preprocessor: optional `MobileViTPreprocessor`; with it the model takes raw uint8 images
            of any size, without it float32 RGB in [0, 1] at the backbone's input shape.
    """

    def __init__(self, backbone: MobileViTBackbone, num_classes: int, dropout: float = 0.0,
                 preprocessor: MobileViTPreprocessor | None = None, **kwargs):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"`num_classes` must be a positive int, got {num_classes!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}")
        if preprocessor is None:
            inputs = keras.Input(shape=backbone.input_shape[1:], name="images")
            x = inputs
        else:
            inputs = keras.Input(shape=(None, None, 3), dtype="uint8", name="images")
            x = preprocessor(inputs)
        logits = classifier_outputs(backbone(x), num_classes, dropout)
        kwargs.setdefault("name", "classifier")
        super().__init__(inputs=inputs, outputs=logits, **kwargs)
        self.backbone, self.preprocessor = backbone, preprocessor
        self.num_classes, self.dropout = num_classes, dropout

    @classmethod
    def from_preset(cls, name: str, weights: str | None = None, num_classes: int = IMAGENET_CLASSES,
                    dropout: float = 0.0, preprocessing: bool = False,
                    checkpoint_format: str | None = None, **backbone_overrides
                    ) -> MobileViTClassifier:
        """Preset `name` with `weights` (see `MobileViTBackbone.from_preset`). The head is the
        checkpoint's when it has `num_classes` outputs (1000 for ImageNet, or a run's own classes),
        else new. `preprocessing=True` puts the preset's `MobileViTPreprocessor` in front."""
        backbone = MobileViTBackbone.from_preset(name, **backbone_overrides)
        source = weights if weights in preset(name).weights else "imagenet"
        preprocessor = MobileViTPreprocessor.from_preset(name, source) if preprocessing else None
        model = cls(backbone, num_classes, dropout, preprocessor)
        if weights is not None:
            load_weights(model, weights, name, checkpoint_format)
        return model

    def get_config(self) -> dict:
        return {
            "name": self.name, "trainable": self.trainable,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "num_classes": self.num_classes, "dropout": self.dropout,
            "preprocessor": (None if self.preprocessor is None
                             else keras.saving.serialize_keras_object(self.preprocessor)),
        }

    @classmethod
    def from_config(cls, config: dict) -> MobileViTClassifier:
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        if config.get("preprocessor") is not None:
            config["preprocessor"] = keras.saving.deserialize_keras_object(config["preprocessor"])
        return cls(**config)
