"""The one registry of backbone presets: architecture, pretrained weights, preprocessing.

Pure data (no TensorFlow): the config validates `model.name` against it before TensorFlow
starts, the backbone is built from its architecture table, the weights loader and the offline
pre-check read its weight sources, bench measures every preset. Preprocessing is what the
reference (timm's pretrained config of the same weights) evaluates with.

A v1 architecture: one row per stage after the stem, MobileNetV2 blocks ("mv2") or a stride-2
MV2 followed by a MobileViT block ("vit": transformer width `dim`, `depth` layers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

HUB_FILE = "model.safetensors"


@dataclass(frozen=True)
class Preset:
    name: str
    arch: dict[str, Any]  # MobileViTBackbone arguments
    # model.pretrained value -> Hugging Face Hub repository holding HUB_FILE
    weights: dict[str, str] = field(default_factory=dict)
    image_size: int = 256  # the resolution the weights were trained and evaluated at
    crop_pct: float = 0.9  # evaluation: resize the short side to size / crop_pct, centre-crop
    interpolation: str = "bicubic"  # the reference's evaluation resize


def _v1(name: str, stem: int, expand: float, final: int, widths: list[tuple]) -> Preset:
    (c0, c1, (c2, d2), (c3, d3), (c4, d4)) = widths
    stages = [dict(type="mv2", channels=c0, depth=1, stride=1),
              dict(type="mv2", channels=c1, depth=3, stride=2),
              dict(type="vit", channels=c2, stride=2, dim=d2, depth=2),
              dict(type="vit", channels=c3, stride=2, dim=d3, depth=4),
              dict(type="vit", channels=c4, stride=2, dim=d4, depth=3)]
    # ImageNet-1k weights of apple/ml-cvnets, in timm's naming (top-1 from the TF Hub cards).
    return Preset(name, dict(stem_channels=stem, expand_ratio=expand, final_channels=final,
                             stages=stages),
                  weights={"imagenet": f"timm/{name}.cvnets_in1k"})


PRESETS: dict[str, Preset] = {p.name: p for p in (
    _v1("mobilevit_xxs", 16, 2.0, 320, [16, 24, (48, 64), (64, 80), (80, 96)]),  # top-1 68.58
    _v1("mobilevit_xs", 16, 4.0, 384, [32, 48, (64, 96), (80, 120), (96, 144)]),  # 74.67
    _v1("mobilevit_s", 16, 4.0, 640, [32, 64, (96, 144), (128, 192), (160, 240)]),  # 78.38
)}
MODEL_NAMES = tuple(PRESETS)


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown MobileViT preset {name!r}; allowed: {', '.join(PRESETS)}")
    return PRESETS[name]


def hub_repo(name: str, source: str = "imagenet") -> str:
    """The Hugging Face Hub repository of `name`'s `source` weights."""
    weights = preset(name).weights
    if source not in weights:
        raise ValueError(f"{name} has no {source!r} weights; it has: {', '.join(weights)}")
    return weights[source]


def hub_url(name: str, source: str = "imagenet") -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{hub_repo(name, source)}/resolve/main/{HUB_FILE}"
