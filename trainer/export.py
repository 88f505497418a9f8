"""SavedModel export: signatures that serve images without this project, written atomically.

Every export is built in a temporary sibling directory and renamed into place, so a crash never
leaves a half-written model that looks complete, and the previous export stays until the new one
is whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from trainer.models.weights import find_backbone


def atomic_dir(path: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` into a fresh temporary directory, then swap it in for `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if path.exists():
        os.replace(path, old)  # the previous export stays intact until the new one is complete
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def feature_model(model: keras.Model) -> keras.Model:
    """The classifier's backbone followed by global average pooling: pooled features [N, C]."""
    backbone = find_backbone(model)
    pooled = keras.layers.GlobalAveragePooling2D(name="pooled_features")(backbone.output)
    return keras.Model(backbone.input, pooled, name=f"{backbone.name}_features")


def _save(module_model: keras.Model, path: Path, endpoints: dict[str, tuple[Callable, list]]):
    archive = keras.export.ExportArchive()
    archive.track(module_model)
    for name, (fn, signature) in endpoints.items():
        archive.add_endpoint(name, fn, input_signature=signature)
    archive.write_out(str(path), verbose=False)


def export_float_savedmodel(model: keras.Model, path: Path, image_size: int,
                            output: str = "logits") -> Path:
    """A SavedModel whose `serving_default` takes float32 [N, S, S, 3] RGB in [0, 1].

    The contract of the TF Hub `mobilevit_*_1k_256` models (logits) and their `_fe` twins
    (`output="features"`: pooled features [N, C]).
    """
    net = model if output == "logits" else feature_model(model)
    spec = [tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")]

    def serve(images):
        return {output: tf.cast(net(images, training=False), tf.float32)}

    return atomic_dir(path, lambda tmp: _save(net, tmp, {"serving_default": (serve, spec)}))


def check_reload(path: Path, images: np.ndarray, expected: np.ndarray, key: str,
                 signature: str = "serving_default", atol: float = 1e-4) -> float:
    """Reload an exported SavedModel and compare one signature's output; raise on mismatch."""
    loaded = tf.saved_model.load(str(path))
    got = loaded.signatures[signature](images=tf.constant(images))[key].numpy()
    scale = max(float(np.abs(expected).max()), 1.0)
    err = float(np.abs(got - expected).max()) / scale
    if not np.isfinite(err) or err > atol:
        raise RuntimeError(f"exported model {path} ({signature}) differs from the in-memory model: "
                           f"max relative difference {err:.3g} > {atol:g}")
    return err


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temporary file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- run export

TOP_K = 5


def _image_signatures(net: keras.Model, image_size: int, crop_pct: float, outputs: Callable):
    """serving_default (uint8, any size), serve_bytes (JPEG/PNG), serve_float (the TF Hub one)."""
    from trainer.augment import eval_preprocess

    # Traced once and called by all three signatures: each would otherwise trace the network.
    @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32)])
    def forward(images):
        return tf.cast(net(images, training=False), tf.float32)

    def run(images):
        return outputs(forward(images))

    def serve_uint8(images):
        return run(eval_preprocess(images, image_size, crop_pct))

    def serve_bytes(images):
        def decode(data):
            image = tf.io.decode_image(data, channels=3, expand_animations=False)
            return eval_preprocess(image, image_size, crop_pct)
        return run(tf.map_fn(decode, images, fn_output_signature=tf.TensorSpec(
            [image_size, image_size, 3], tf.float32)))

    def serve_float(images):
        return run(images)

    return {
        "serving_default": (serve_uint8, [tf.TensorSpec([None, None, None, 3], tf.uint8,
                                                        name="images")]),
        "serve_bytes": (serve_bytes, [tf.TensorSpec([None], tf.string, name="images")]),
        "serve_float": (serve_float, [tf.TensorSpec([None, image_size, image_size, 3],
                                                    tf.float32, name="images")]),
    }


def export_classifier(model: keras.Model, path: Path, class_names: list[str], image_size: int,
                      crop_pct: float) -> Path:
    names = tf.constant(class_names)
    k = min(TOP_K, len(class_names))

    def outputs(logits):
        top = tf.math.top_k(logits, k=k)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits),
                "top_k_indices": top.indices, "top_k_names": tf.gather(names, top.indices)}

    endpoints = _image_signatures(model, image_size, crop_pct, outputs)
    return atomic_dir(path, lambda tmp: _save(model, tmp, endpoints))


def export_feature_extractor(model: keras.Model, path: Path, image_size: int,
                             crop_pct: float) -> Path:
    net = feature_model(model)
    endpoints = _image_signatures(net, image_size, crop_pct, lambda f: {"features": f})
    return atomic_dir(path, lambda tmp: _save(net, tmp, endpoints))


def save_keras(model: keras.Model, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.keras")
    model.save(tmp)
    os.replace(tmp, path)
    return path
