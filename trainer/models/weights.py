"""Pretrained weights: read timm / transformers checkpoints, convert them strictly, download and cache.

Where each tensor goes is written as data (`checkpoint_keys`): for every Keras layer of the
backbone, the checkpoint keys of its weights in PyTorch layout, for both naming schemes. Loading is
strict: every checkpoint tensor is used, every backbone weight is assigned, and all mismatches are
reported together by name and shape.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from trainer.atomic import replacing
from trainer.errors import CheckpointError
from trainer.models.head import build_classifier, find_backbone, head_layer
from trainer.models.presets import HUB_FILE, hub_repo, hub_url, preset

IMAGENET_CLASSES = 1000


# --------------------------------------------------------------------------- reading


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A timm or transformers checkpoint as numpy arrays (`.safetensors`, or `.bin` with torch)."""
    path = Path(path)
    if path.is_dir():  # a Hugging Face snapshot directory
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return read_checkpoint(path / name)
        raise CheckpointError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # truncated or not a safetensors file at all
            raise CheckpointError(f"cannot read {path} as safetensors: {e}") from None
    if path.suffix in (".bin", ".pt", ".pth"):
        try:
            import torch
        except ImportError:
            raise CheckpointError(
                f"{path} is a PyTorch pickle and torch is not installed; download the "
                f"model.safetensors file of the same model from the Hugging Face Hub instead "
                f"(e.g. https://huggingface.co/{hub_repo('mobilevit_xs')}) and point "
                f"model.pretrained at it") from None
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
        return {k: v.numpy() for k, v in state.items() if hasattr(v, "numpy")}
    raise CheckpointError(f"unsupported checkpoint file {path}: expected .safetensors, "
                          f".bin/.pt/.pth (PyTorch), .weights.h5 (Keras) or a run directory")


def detect_format(state: dict[str, np.ndarray]) -> str:
    if any(k.startswith(("mobilevit.", "mobilevitv2.")) for k in state):
        return "hf"
    if "stem.conv.weight" in state:
        return "timm"
    raise CheckpointError("checkpoint is neither timm MobileViT (no 'stem.conv.weight') nor "
                          "transformers MobileViT (no 'mobilevit.*' or 'mobilevitv2.*' keys)")


# --------------------------------------------------------------------------- the key table


def checkpoint_keys(backbone: keras.Model, fmt: str) -> dict[str, list[str]]:
    """Keras layer name -> checkpoint keys of its weights, in the Keras weight order."""
    hf = fmt == "hf"
    root = "mobilevitv2" if is_v2(backbone) else "mobilevit"  # transformers' module name
    keys: dict[str, list[str]] = {}

    def conv_bn(keras_name: str, prefix: str) -> None:
        conv, bn = ("convolution", "normalization") if hf else ("conv", "bn")
        keys[f"{keras_name}_conv"] = [f"{prefix}.{conv}.weight"]
        keys[f"{keras_name}_bn"] = [f"{prefix}.{bn}.{p}"
                                    for p in ("weight", "bias", "running_mean", "running_var")]

    def mv2(keras_name: str, prefix: str) -> None:
        names = ("expand_1x1", "conv_3x3", "reduce_1x1") if hf else ("conv1_1x1", "conv2_kxk",
                                                                      "conv3_1x1")
        for part, torch_name in zip(("expand", "dw", "project"), names):
            conv_bn(f"{keras_name}_{part}", f"{prefix}.{torch_name}")

    def linear(keras_name: str, prefix: str) -> None:
        keys[keras_name] = [f"{prefix}.weight", f"{prefix}.bias"]

    def v1_layer(t: str, k: str) -> None:
        if hf:
            linear(f"{t}_norm1", f"{k}.layernorm_before")
            keys[f"{t}_attn"] = [f"{k}.attention.{n}.{w}" for n in (
                "attention.query", "attention.key", "attention.value", "output.dense")
                for w in ("weight", "bias")]
            linear(f"{t}_norm2", f"{k}.layernorm_after")
            linear(f"{t}_fc1", f"{k}.intermediate.dense")
            linear(f"{t}_fc2", f"{k}.output.dense")
        else:
            linear(f"{t}_norm1", f"{k}.norm1")
            keys[f"{t}_attn"] = [f"{k}.attn.qkv.weight", f"{k}.attn.qkv.bias",
                                 f"{k}.attn.proj.weight", f"{k}.attn.proj.bias"]
            linear(f"{t}_norm2", f"{k}.norm2")
            linear(f"{t}_fc1", f"{k}.mlp.fc1")
            linear(f"{t}_fc2", f"{k}.mlp.fc2")

    def v2_layer(t: str, k: str) -> None:  # 1x1 convs with bias, as Dense layers here
        conv = ".convolution" if hf else ""
        names = (("layernorm_before", "attention.qkv_proj", "attention.out_proj",
                  "layernorm_after", "ffn.conv1", "ffn.conv2") if hf else
                 ("norm1", "attn.qkv_proj", "attn.out_proj", "norm2", "mlp.fc1", "mlp.fc2"))
        for part, torch_name in zip(("norm1", "attn_qkv", "attn_out", "norm2", "fc1", "fc2"),
                                    names):
            linear(f"{t}_{part}", f"{k}.{torch_name}" + (conv if "norm" not in part else ""))

    conv_bn("stem", f"{root}.conv_stem" if hf else "stem")
    for si, stage in enumerate(backbone.stages):
        stage_prefix = f"{root}.encoder.layer.{si}" if hf else f"stages.{si}"
        if stage["type"] == "mv2":
            for bi in range(stage["depth"]):
                mv2(f"stage{si}_mv2_{bi}", f"{stage_prefix}.layer.{bi}" if hf
                    else f"{stage_prefix}.{bi}")
            continue
        mv2(f"stage{si}_mv2_0", f"{stage_prefix}.downsampling_layer" if hf
            else f"{stage_prefix}.0")
        vit, p = f"stage{si}_vit", (stage_prefix if hf else f"{stage_prefix}.1")
        conv_bn(f"{vit}_local", f"{p}.conv_kxk")
        keys[f"{vit}_to_tokens"] = [f"{p}.conv_1x1.convolution.weight" if hf
                                    else f"{p}.conv_1x1.weight"]
        for i in range(stage["depth"]):
            layer = v2_layer if stage["type"] == "vit2" else v1_layer
            layer(f"{vit}_tf{i}", f"{p}.transformer.layer.{i}" if hf else f"{p}.transformer.{i}")
        linear(f"{vit}_norm", f"{p}.layernorm" if hf else f"{p}.norm")
        conv_bn(f"{vit}_proj", f"{p}.conv_projection" if hf else f"{p}.conv_proj")
        if stage["type"] == "vit":
            conv_bn(f"{vit}_fusion", f"{p}.fusion" if hf else f"{p}.conv_fusion")
    if backbone.final_channels:
        conv_bn("final", f"{root}.conv_1x1_exp" if hf else "final_conv")
    return keys


def is_v2(backbone: keras.Model) -> bool:
    return any(stage["type"] == "vit2" for stage in backbone.stages)


def _head_keys(fmt: str) -> list[str]:
    return ["classifier.weight", "classifier.bias"] if fmt == "hf" else ["head.fc.weight",
                                                                        "head.fc.bias"]


# --------------------------------------------------------------------------- conversion


def _to_keras(layer: keras.layers.Layer, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """PyTorch layout -> the layer's Keras layout."""
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return [arrays[0].transpose(2, 3, 0, 1)]  # (C, 1, kh, kw) -> (kh, kw, C, 1)
    if isinstance(layer, keras.layers.Conv2D):
        return [arrays[0].transpose(2, 3, 1, 0)]  # (out, in, kh, kw) -> (kh, kw, in, out)
    if isinstance(layer, keras.layers.Dense):  # a Linear, or a 1x1 Conv2d (out, in, 1, 1)
        return [arrays[0].reshape(arrays[0].shape[0], -1).T, arrays[1]]
    if isinstance(layer, keras.layers.MultiHeadAttention):
        if len(arrays) == 4:  # timm's fused qkv: rows are [q; k; v]
            qkv_w, qkv_b, out_w, out_b = arrays
            arrays = [a for i in range(3) for a in (np.split(qkv_w, 3)[i], np.split(qkv_b, 3)[i])]
            arrays += [out_w, out_b]
        heads, dim = layer.num_heads, layer.key_dim
        out = []
        for w, b in zip(arrays[0:6:2], arrays[1:6:2]):  # (heads*dim, d) -> (d, heads, dim)
            out += [w.T.reshape(-1, heads, dim), b.reshape(heads, dim)]
        return out + [arrays[6].T.reshape(heads, dim, -1), arrays[7]]
    return list(arrays)  # BatchNorm, LayerNorm: same layout


def load_torch_state(model: keras.Model, state: dict[str, np.ndarray], fmt: str | None = None,
                     source: str = "checkpoint") -> bool:
    """Assign a timm/transformers state dict to `model` (a backbone or a classifier), strictly.

    The head is loaded only when the model has a 1000-class head. transformers checkpoints take
    BGR images (its image processor flips the channels, for v1 and v2 alike; its v2 documentation
    says so too): the flip is folded into the stem so the model takes RGB. For v2 this follows
    transformers' documentation, not a comparison of weights: `bench/hf_channel_order.py` checks
    it where the published checkpoints can be downloaded.
    Returns whether the head was loaded.
    """
    fmt = fmt or detect_format(state)
    if fmt not in ("timm", "hf"):
        raise CheckpointError(f"checkpoint format must be 'timm' or 'hf', got {fmt!r}")
    backbone = find_backbone(model)
    head = head_layer(model)
    table = checkpoint_keys(backbone, fmt)
    targets = {name: backbone.get_layer(name) for name in table}
    load_head = head is not None and head.units == IMAGENET_CLASSES
    if load_head:
        table["head"], targets["head"] = _head_keys(fmt), head

    problems: list[str] = []
    unassigned = sorted(l.name for l in backbone.layers if l.weights and l.name not in table)
    problems += [f"Keras layer {n!r} has no checkpoint tensor" for n in unassigned]
    used: set[str] = set()
    values: dict[str, list[np.ndarray]] = {}
    for name, keys in table.items():
        missing = [k for k in keys if k not in state]
        problems += [f"missing tensor {k!r} (for Keras layer {name!r})" for k in missing]
        if missing:
            continue
        used.update(keys)
        arrays = [np.asarray(state[k], dtype=np.float32) for k in keys]
        if fmt == "hf" and name == "stem_conv":
            arrays[0] = arrays[0][:, ::-1]  # BGR-trained stem -> RGB input
        try:
            converted = _to_keras(targets[name], arrays)
        except ValueError as e:
            problems.append(f"{keys[0]} {arrays[0].shape}: cannot convert for {name!r}: {e}")
            continue
        expected = [tuple(w.shape) for w in targets[name].weights]
        got = [a.shape for a in converted]
        if got != expected:
            shapes = ", ".join(f"{k} {state[k].shape}" for k in keys)
            problems.append(f"shape mismatch for Keras layer {name!r}: expected {expected}, "
                            f"checkpoint gives {shapes}")
            continue
        values[name] = converted
    ignorable = set(_head_keys(fmt)) if not load_head else set()
    unused = sorted(k for k in state if k not in used and k not in ignorable
                    and not k.endswith("num_batches_tracked"))
    problems += [f"unexpected tensor {k!r} {tuple(state[k].shape)}" for k in unused]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(f"{source} ({fmt} format) does not fit {backbone.name}: "
                              f"{len(problems)} problem(s)\n  {shown}{more}")
    for name, arrays in values.items():
        targets[name].set_weights(arrays)
    return load_head


# --------------------------------------------------------------------------- pretrained specs


def cache_dir() -> Path:
    return Path(os.environ.get("MOBILEVIT_CACHE", Path.home() / ".cache" / "mobilevit-trainer"))


def download_checkpoint(name: str, source: str = "imagenet") -> Path:
    """`model.safetensors` of the preset's `source` weights (timm/<name>.cvnets_in1k for
    "imagenet") through the Hugging Face cache."""
    from huggingface_hub import hf_hub_download

    repo = hub_repo(name, source)
    try:
        return Path(hf_hub_download(repo, HUB_FILE))
    except Exception as e:  # offline, no network, not cached, hub down: all need the same advice
        raise CheckpointError(
            f"cannot get the {source} weights of {name}: {HUB_FILE} of {repo} is not in the "
            f"Hugging Face cache and could not be downloaded ({type(e).__name__}). Fetch "
            f"{hub_url(name, source)} where there is internet and "
            f"set model.pretrained=/path/to/{HUB_FILE} (or model.pretrained=none)") from None


def _donor(backbone: keras.Model) -> keras.Model:
    """A 1000-class classifier of the same architecture, the shape of our `.weights.h5` files."""
    config = {**backbone.get_config(), "drop_path_rate": 0.0, "sync_bn": False}
    return build_classifier(type(backbone).from_config(config), IMAGENET_CLASSES)


def _copy_from(donor: keras.Model, model: keras.Model, keep_head: bool = True) -> bool:
    find_backbone(model).set_weights(find_backbone(donor).get_weights())
    head = head_layer(model)
    donor_head = head_layer(donor)
    if keep_head and head is not None and donor_head is not None and head.units == donor_head.units:
        head.set_weights(donor_head.get_weights())
        return True
    return False


def load_keras_weights(model: keras.Model, path: str | os.PathLike) -> bool:
    """A `.weights.h5` written by `trainer.convert` (a 1000-class classifier of the same size)."""
    donor = _donor(find_backbone(model))
    try:
        with warnings.catch_warnings():  # Keras warns about weightless containers it skips
            warnings.filterwarnings("ignore", message="Skipping nested container")
            donor.load_weights(str(path))
    except Exception as e:
        raise CheckpointError(f"{path} does not fit {find_backbone(model).name} "
                              f"(expected the .weights.h5 of a 1000-class classifier written by "
                              f"python -m trainer.convert): {e}") from None
    return _copy_from(donor, model)


def load_run_weights(model: keras.Model, run_dir: Path, class_names: list[str] | None = None
                     ) -> bool:
    """Backbone (and head, if it was trained on the same classes) of a finished run's model.

    Another dataset with as many classes (digits 0-4, then 5-9) gets a new head.
    """
    path = run_dir / "export" / "model.keras"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a finished run: {path} does not exist")
    donor = keras.models.load_model(path, compile=False)
    src, dst = find_backbone(donor), find_backbone(model)
    if [w.shape for w in src.weights] != [w.shape for w in dst.weights]:
        raise CheckpointError(f"run {run_dir} trained {src.name}, which does not fit {dst.name}")
    info = run_dir / "dataset.json"
    same = (class_names is None or not info.is_file()
            or json.loads(info.read_text())["class_names"] == list(class_names))
    return _copy_from(donor, model, keep_head=same)


def restore_best_checkpoint(model: keras.Model, run_dir: Path) -> str:
    """A run directory's best checkpoint (checkpoints/best) into `model`, built from the run's
    config; returns the checkpoint's path."""
    manager_dir = run_dir / "checkpoints" / "best"
    latest = tf.train.latest_checkpoint(str(manager_dir))
    if latest is None:
        raise CheckpointError(f"{manager_dir} holds no checkpoint")
    tf.train.Checkpoint(model=model).restore(latest).expect_partial()
    return latest


def load_weights(model: keras.Model, spec: str | None, name: str, fmt: str | None = None,
                 class_names: list[str] | None = None) -> str:
    """Initialise `model` (a backbone or a classifier of preset `name`) from `spec`: a weight
    source of the preset ('imagenet', ...), 'none', a checkpoint file or a run directory.

    `class_names`: the classes being trained; a run's head is kept only if it had the same.

    Returns a one-line description of what was loaded, for the log.
    """
    if spec in ("none", "", None):
        return "random initialisation"
    if spec in preset(name).weights:
        source = download_checkpoint(name, spec)
        digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:12]
        cached = cache_dir() / f"{hub_repo(name, spec).split('/')[-1]}-{digest}.weights.h5"
        if cached.is_file():
            head = load_keras_weights(model, cached)
        else:
            donor = _donor(find_backbone(model))
            load_torch_state(donor, read_checkpoint(source), "timm", source=str(source))
            cached.parent.mkdir(parents=True, exist_ok=True)
            with replacing(cached) as tmp:  # a crash never leaves a half-written cache entry
                donor.save_weights(str(tmp))
            head = _copy_from(donor, model)
        return f"{spec} weights of {hub_repo(name, spec)} (head {'kept' if head else 'new'})"
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "export" / "model.keras").is_file():
        head = load_run_weights(model, path, class_names)
    elif path.name.endswith(".weights.h5"):
        if not path.is_file():
            raise CheckpointError(f"checkpoint file not found: {path}")
        head = load_keras_weights(model, path)
    else:
        head = load_torch_state(model, read_checkpoint(path), fmt, source=str(path))
    return f"weights of {path} (head {'kept' if head else 'new'})"
