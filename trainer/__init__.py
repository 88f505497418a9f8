"""mobilevit-trainer: MobileViT backbones in Keras 3, and a trainer that fine-tunes them.

The library, without Hydra (each name is imported on first use, so that `python -m trainer` checks
its config before TensorFlow starts):

    from trainer import MobileViTBackbone, MobileViTClassifier, MobileViTPreprocessor, load_run

    backbone = MobileViTBackbone.from_preset("mobilevit_xs", weights="imagenet")
    model = MobileViTClassifier.from_preset("mobilevit_xs", weights="imagenet", num_classes=5)
    preprocess = MobileViTPreprocessor.from_preset("mobilevit_xs")   # uint8 -> model input
    model = load_run("outputs/2026-11-30/12-00-00-mobilevit_xs-flowers")

`PRESETS` is the registry of backbone presets (architecture, weight sources, preprocessing).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MobileViTBackbone": "trainer.models.mobilevit",
    "MobileViTClassifier": "trainer.models.classifier",
    "MobileViTPreprocessor": "trainer.models.preprocessing",
    "PRESETS": "trainer.models.presets",
    "load_run": "trainer.run.load",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
