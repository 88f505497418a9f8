"""The one registry of backbone presets: architecture, pretrained weights, preprocessing.

Pure data (no TensorFlow): the config validates `model.name` against it before TensorFlow
starts, the backbone is built from its architecture table, the weights loader and the offline
pre-check read its weight sources, bench measures every preset. Preprocessing is what the
reference (timm's pretrained config of the same weights) evaluates with.

A v1 architecture: one row per stage after the stem, MobileNetV2 blocks ("mv2") or a stride-2
MV2 followed by a MobileViT block ("vit": transformer width `dim`, `depth` layers). v2 (width
multiplier 0.5 ... 2.0) has the same rows with separable-attention blocks ("vit2") and no final
1x1 conv, its widths computed as timm and ml-cvnets do.
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
    # weight source -> (image_size, crop_pct) where that source was evaluated differently
    source_preprocessing: dict[str, tuple[int, float]] = field(default_factory=dict)
    # Published multiply-accumulates per image at 256x256 (ml-cvnets / timm; bench/macs.py counts
    # ours from the layers: the same to 1%): how much work a training step is.
    macs_g: float = 0.0


def _v1(name: str, stem: int, expand: float, final: int, widths: list[tuple],
        macs_g: float) -> Preset:
    (c0, c1, (c2, d2), (c3, d3), (c4, d4)) = widths
    stages = [dict(type="mv2", channels=c0, depth=1, stride=1),
              dict(type="mv2", channels=c1, depth=3, stride=2),
              dict(type="vit", channels=c2, stride=2, dim=d2, depth=2),
              dict(type="vit", channels=c3, stride=2, dim=d3, depth=4),
              dict(type="vit", channels=c4, stride=2, dim=d4, depth=3)]
    # ImageNet-1k weights of apple/ml-cvnets, in timm's naming (top-1 from the TF Hub cards).
    return Preset(name, dict(stem_channels=stem, expand_ratio=expand, final_channels=final,
                             stages=stages),
                  weights={"imagenet": f"timm/{name}.cvnets_in1k"}, macs_g=macs_g)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Channel rounding of MobileNetV2 / ml-cvnets / timm (never more than 10% below `value`)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


def _v2(multiplier: float, macs_g: float, in22k: bool = False) -> Preset:
    """timm's `_mobilevitv2_cfg`: widths int(c * multiplier), attention width half the stage's."""
    name = f"mobilevitv2_{round(multiplier * 100):03d}"
    c = [int(w * multiplier) for w in (64, 128, 256, 384, 512)]
    stages = [dict(type="mv2", channels=c[0], depth=1, stride=1),
              dict(type="mv2", channels=c[1], depth=2, stride=2)]
    stages += [dict(type="vit2", channels=ch, stride=2, dim=make_divisible(ch * 0.5), depth=d)
               for ch, d in zip(c[2:], (2, 4, 3))]
    weights = {"imagenet": f"timm/{name}.cvnets_in1k"}
    if in22k:  # ImageNet-22k pretraining, fine-tuned on 1k at 256 and at 384
        weights.update(imagenet22k=f"timm/{name}.cvnets_in22k_ft_in1k",
                       imagenet22k_384=f"timm/{name}.cvnets_in22k_ft_in1k_384")
    return Preset(name, dict(stem_channels=int(32 * multiplier), expand_ratio=2.0,
                             final_channels=None, stages=stages),
                  weights=weights, crop_pct=0.888, macs_g=macs_g,
                  source_preprocessing={"imagenet22k_384": (384, 1.0)} if in22k else {})


PRESETS: dict[str, Preset] = {p.name: p for p in (
    # top-1 68.58 / 74.67 / 78.38; MACs ml-cvnets'
    _v1("mobilevit_xxs", 16, 2.0, 320, [16, 24, (48, 64), (64, 80), (80, 96)], 0.41),
    _v1("mobilevit_xs", 16, 4.0, 384, [32, 48, (64, 96), (80, 120), (96, 144)], 1.03),
    _v1("mobilevit_s", 16, 4.0, 640, [32, 64, (96, 144), (128, 192), (160, 240)], 2.00),
    # MobileViT v2, ImageNet-1k top-1 (ml-cvnets): 70.18 / 75.56 / 78.09 / 79.65 / 80.38 / 80.84 /
    # 81.17; MACs timm's model table (ml-cvnets' v2 paper: 0.5 G for 0.5, 1.8 G for 1.0)
    _v2(0.5, 0.48), _v2(0.75, 1.05), _v2(1.0, 1.84), _v2(1.25, 2.86),
    _v2(1.5, 4.09, in22k=True), _v2(1.75, 5.54, in22k=True), _v2(2.0, 7.22, in22k=True),
)}
MODEL_NAMES = tuple(PRESETS)


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown MobileViT preset {name!r}; allowed: {', '.join(PRESETS)}")
    return PRESETS[name]


def step_gmacs(name: str, image_size: int, batch: int) -> float:
    """Forward multiply-accumulates of one step of `batch` images at `image_size` (billions)."""
    return preset(name).macs_g * (image_size / 256) ** 2 * batch


def preprocessing(name: str, source: str = "imagenet") -> tuple[int, float, str]:
    """(image_size, crop_pct, interpolation) the preset's `source` weights were evaluated with."""
    spec = preset(name)
    size, crop = spec.source_preprocessing.get(source, (spec.image_size, spec.crop_pct))
    return size, crop, spec.interpolation


def hub_repo(name: str, source: str = "imagenet") -> str:
    """The Hugging Face Hub repository of `name`'s `source` weights."""
    weights = preset(name).weights
    if source not in weights:
        raise ValueError(f"{name} has no {source!r} weights; it has: {', '.join(weights)}")
    return weights[source]


def hub_url(name: str, source: str = "imagenet") -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{hub_repo(name, source)}/resolve/main/{HUB_FILE}"
