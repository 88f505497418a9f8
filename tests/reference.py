"""Test-only PyTorch references (timm, transformers) with weights that make parity discriminative.

Randomly initialised MobileViTs are nearly blind to their input: logits are dominated by biases and
a wrong model can pass a parity bar. `make_discriminative` fixes that: BatchNorm statistics are
calibrated on images in train mode, attention is made peaky and the head strong, so that different
images get different arg-max classes.
"""

from __future__ import annotations

import numpy as np

from bench.timm_import import import_timm

HF_CONFIGS = {  # transformers' MobileViTConfig for apple/mobilevit-{xx-small, x-small, small}
    "mobilevit_xxs": dict(hidden_sizes=[64, 80, 96], neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320],
                          expand_ratio=2.0),
    "mobilevit_xs": dict(hidden_sizes=[96, 120, 144], neck_hidden_sizes=[16, 32, 48, 64, 80, 96, 384]),
    "mobilevit_s": dict(hidden_sizes=[144, 192, 240],
                        neck_hidden_sizes=[16, 32, 64, 96, 128, 160, 640]),
}


def test_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Structured RGB images in [0, 1] (smooth blobs, stripes, edges), NHWC float32."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        img = np.zeros((size, size, 3))
        for _ in range(6):
            cy, cx, r = rng.uniform(0, 1, 3)
            img += rng.uniform(-1, 1, 3) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.02 + 0.1 * r))[..., None]
        f, ph = rng.uniform(3, 20), rng.uniform(0, 6.28)
        img += 0.3 * np.sin(2 * np.pi * f * (xx * np.cos(ph) + yy * np.sin(ph)))[..., None] * rng.uniform(-1, 1, 3)
        img += 0.05 * rng.standard_normal((size, size, 3))
        out[i] = (img - img.min()) / (img.max() - img.min())
    return out


def make_discriminative(model, fmt: str, seed: int = 0):
    """Randomise affine BN params, sharpen attention and the head, calibrate BN statistics."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.momentum = None  # cumulative average over the calibration passes
                m.reset_running_stats()
            elif isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        for name, p in model.named_parameters():
            if fmt == "timm" and name.endswith("attn.qkv.weight"):
                d = p.shape[1]
                p[: 2 * d] *= 4.0  # peaky attention: q and k scaled -> logits x16
            if fmt == "hf" and (name.endswith("attention.query.weight") or name.endswith("attention.key.weight")):
                p *= 4.0
            # v2's query channel is left as initialised: sharpened, it makes the float32
            # references themselves drift (timm's reached 2.6e-4 of its float64 logits).
    model.train()
    with torch.no_grad():
        for i in range(3):
            x = torch.from_numpy(test_images(8, 128, seed=100 + i)).permute(0, 3, 1, 2)
            model(x if fmt == "timm" else x.flip(1))
    model.eval()
    # A head on whitened features: logits follow what differs between images, not the mean.
    feats = torch.from_numpy(reference_features(model, test_images(16, 128, seed=200), fmt))
    mu, sd = feats.mean(0), feats.std(0) + 1e-3
    head = model.head.fc if fmt == "timm" else model.classifier
    with torch.no_grad():
        w = torch.randn(head.weight.shape, generator=g) * 3.0 / head.weight.shape[1] ** 0.5 / sd
        head.weight.copy_(w)
        head.bias.copy_(-(w @ mu))
    return model


def timm_model(name: str, seed: int = 0):
    timm = import_timm()
    import torch

    torch.manual_seed(seed)
    return make_discriminative(timm.create_model(name, pretrained=False), "timm", seed)


def hf_model(name: str, seed: int = 0):
    import torch
    from transformers import (
        MobileViTConfig,
        MobileViTForImageClassification,
        MobileViTV2Config,
        MobileViTV2ForImageClassification,
    )

    torch.manual_seed(seed)
    if name.startswith("mobilevitv2_"):  # apple/mobilevitv2-{0.5..2.0}-imagenet1k-256
        config = MobileViTV2Config(num_labels=1000, width_multiplier=int(name[-3:]) / 100)
        model = MobileViTV2ForImageClassification(config)
    else:
        model = MobileViTForImageClassification(MobileViTConfig(num_labels=1000, **HF_CONFIGS[name]))
    return make_discriminative(model, "hf", seed)


def reference_logits(model, images: np.ndarray, fmt: str, float64: bool = False) -> np.ndarray:
    """Logits of the PyTorch reference for RGB NHWC images (transformers gets them as BGR).

    `float64`: the reference's exact function, free of its own float32 rounding (which reaches
    2.6e-4 of the largest logit for timm's MobileViT v2 with these weights)."""
    import copy

    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    if float64:
        model, x = copy.deepcopy(model).double(), x.double()
    with torch.no_grad():
        if fmt == "timm":
            return model(x).numpy()
        return model(pixel_values=x.flip(1)).logits.numpy()


def reference_features(model, images: np.ndarray, fmt: str) -> np.ndarray:
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        if fmt == "timm":
            return model.forward_head(model.forward_features(x), pre_logits=True).numpy()
        body = model.mobilevitv2 if hasattr(model, "mobilevitv2") else model.mobilevit
        return body(pixel_values=x.flip(1)).pooler_output.numpy()


def save_state(model, path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
