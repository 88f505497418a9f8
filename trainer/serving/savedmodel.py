"""SavedModel export: signatures that serve raw images without this project, written atomically.

Every export is built in a temporary sibling directory and renamed into place, so a crash never
leaves a half-written model that looks complete, and the previous export stays until the new one
is whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from trainer.atomic import replacing, replacing_dir, write_json
from trainer.config.schema import TOP_K
from trainer.models.folding import fold_batchnorm
from trainer.models.fusion import SWAPS
from trainer.models.head import HEAD, find_backbone
from trainer.models.mobilevit import float32_copy
from trainer.models.preprocessing import MobileViTPreprocessor
from trainer.serving import litert
from trainer.serving.model_card import ModelCard, write_model_card


def feature_model(model: keras.Model) -> keras.Model:
    """The classifier's backbone followed by global average pooling: pooled features [N, C]."""
    backbone = find_backbone(model)
    pooled = keras.layers.GlobalAveragePooling2D(name="pooled_features")(backbone.output)
    return keras.Model(backbone.input, pooled, name=f"{backbone.name}_features")


def _save(path: Path, endpoints: dict[str, tuple[Callable, list]]):
    archive = keras.export.ExportArchive()
    for name, (fn, signature) in endpoints.items():
        archive.add_endpoint(name, fn, input_signature=signature)
    # The frozen graph carries no variables, so there are no custom gradients worth saving (and
    # their captures would not serialise).
    archive.write_out(str(path), verbose=False,
                      options=tf.saved_model.SaveOptions(experimental_custom_gradients=False))


def frozen_forward(net: keras.Model, image_size: int, *, onednn_layers: bool = True
                   ) -> tf.types.experimental.GenericFunction:
    """`net`'s inference pass, BatchNorm folded, as one function with its weights as constants.

    Why: a function that reads its ~300 variables recomputes every normalisation's scale and
    shift on each call; with constants, grappler folds them once (LayerNorm's; BatchNorm is
    already folded into its convolution, `fold_batchnorm`). At batch 1 on CPU that was ~20% of
    the time (bench/profile_infer.py: XXS 22.9 -> 17.5 ms per image). LayerNorm and the token
    Dense layers are written in the patterns grappler fuses (fusion.py's SWAPS; `onednn_layers=False`
    keeps Keras' layers, which bench/profile_infer.py times beside them). The SavedModel is
    served, not trained: model.keras is the one to fine-tune.
    """
    net = fold_batchnorm(net, swaps=SWAPS if onednn_layers else None)  # one copy of the model
    return _frozen(net, [net.output], image_size)[0]


def frozen_forwards(classifier: keras.Model, image_size: int) -> dict[str, Callable]:
    """{"logits": f, "features": f}: the classifier's inference pass frozen once for both
    SavedModels (tracing and freezing is most of an export's time); features are the pooled
    features the head reads (its dropout is the identity at inference)."""
    net = fold_batchnorm(classifier, swaps=SWAPS)  # itself if already folded and swapped
    logits, features = _frozen(net, [net.output, net.get_layer(HEAD).input], image_size)
    return {"logits": logits, "features": features}


def _frozen(net: keras.Model, outputs: list, image_size: int) -> list[Callable]:
    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32)
    outputs_net = keras.Model(net.input, outputs)
    live = tf.function(lambda images: [
        tf.cast(t, tf.float32) for t in tf.nest.flatten(outputs_net(images, training=False))])
    frozen = convert_variables_to_constants_v2(live.get_concrete_function(spec))

    def output(i: int):
        @tf.function(input_signature=[spec])
        def forward(images):
            return tf.nest.flatten(frozen(images))[i]
        return forward
    return [output(i) for i in range(len(outputs))]


def export_float_savedmodel(model: keras.Model, path: Path, image_size: int,
                            output: str = "logits") -> Path:
    """A SavedModel whose `serving_default` takes float32 [N, S, S, 3] RGB in [0, 1].

    The contract of the TF Hub `mobilevit_*_1k_256` models (logits) and their `_fe` twins
    (`output="features"`: pooled features [N, C]).
    """
    spec = [tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")]
    forward = frozen_forward(model if output == "logits" else feature_model(model), image_size)

    def serve(images):
        return {output: forward(images)}

    return replacing_dir(path, lambda tmp: _save(tmp, {"serving_default": (serve, spec)}))


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


# --------------------------------------------------------------------------- run export

# The export against the float32 model it was built from, relative to the largest logit: a broken
# export differs at O(1), float32 rounding at 1e-6.
RELOAD_TOLERANCE = 1e-4


def _image_signatures(forward: Callable, image_size: int, crop_pct: float, interpolation: str,
                      outputs: Callable):
    """serving_default (uint8, any size), serve_bytes (JPEG/PNG), serve_float (the TF Hub one).
    `forward`: the frozen network, traced once and called by all three signatures."""
    # The public preprocessing layer: what a user's own Keras model gets from the library API.
    preprocess = MobileViTPreprocessor(image_size, crop_pct, interpolation)

    def run(images):
        return outputs(forward(images))

    def serve_uint8(images):
        return run(preprocess(images))

    def serve_bytes(images):
        def decode(data):
            image = tf.io.decode_image(data, channels=3, expand_animations=False)
            return preprocess(image)
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
                      crop_pct: float, interpolation: str = "bilinear",
                      forward: Callable | None = None) -> Path:
    """`forward`: the frozen logits of `frozen_forwards(model)`, if already traced."""
    forward = forward or frozen_forward(model, image_size)
    names = tf.constant(class_names)
    k = min(TOP_K, len(class_names))

    def outputs(logits):
        top = tf.math.top_k(logits, k=k)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits),
                "top_k_indices": top.indices, "top_k_names": tf.gather(names, top.indices)}

    endpoints = _image_signatures(forward, image_size, crop_pct, interpolation, outputs)
    return replacing_dir(path, lambda tmp: _save(tmp, endpoints))


def export_feature_extractor(model: keras.Model, path: Path, image_size: int,
                             crop_pct: float, interpolation: str = "bilinear",
                             forward: Callable | None = None) -> Path:
    """`forward`: the frozen features of `frozen_forwards(model)`, if already traced."""
    forward = forward or frozen_forward(feature_model(model), image_size)
    endpoints = _image_signatures(forward, image_size, crop_pct, interpolation,
                                  lambda f: {"features": f})
    return replacing_dir(path, lambda tmp: _save(tmp, endpoints))


def save_keras(model: keras.Model, path: Path) -> Path:
    with replacing(path) as tmp:
        model.save(tmp)
    return path


def collect_images(ds: tf.data.Dataset, count: int) -> np.ndarray:
    """Up to `count` preprocessed images from a batched (images, labels) dataset."""
    batches, total = [], 0
    for images, _ in ds:
        batches.append(images.numpy())
        total += len(batches[-1])
        if total >= count:
            break
    return np.concatenate(batches)[:count]


def export_run(model: keras.Model, class_names: list[str], export_cfg, card: ModelCard,
               run_dir: Path, val_ds: tf.data.Dataset, calib_ds: tf.data.Dataset,
               metrics: dict) -> dict:
    """Every export of a run, the reload check and the model card: `export/` appears complete.

    `card` names the model, data and preprocessing. Returns what the export measured (reload
    difference, LiteRT sizes and agreement).
    """
    size, crop, method = card.image_size, card.crop_pct, card.interpolation
    result: dict = {}

    def write(out: Path) -> None:  # into a temporary directory, swapped in when complete
        # Every served file computes in float32, whatever precision the model trained in.
        served = float32_copy(model)
        # The inference graph: each conv -> BatchNorm pair one convolution (trainer/models/folding.py),
        # LayerNorm and Dense in the patterns oneDNN fuses (trainer/models/fusion.py), one copy.
        fused = fold_batchnorm(served, swaps=SWAPS)
        forwards = frozen_forwards(fused, size)
        export_classifier(fused, out / "classifier", class_names, size, crop, method,
                          forwards["logits"])
        export_feature_extractor(fused, out / "feature_extractor", size, crop, method,
                                 forwards["features"])
        save_keras(model, out / "model.keras")  # as trained, to fine-tune further
        check = collect_images(val_ds, export_cfg.check_images)
        expected = served(check, training=False).numpy()
        if served is not model:  # trained in mixed precision (float32_copy checks the weights)
            # Recorded, not a bar: the 16-bit model's own rounding, which the copy is free of.
            trained = tf.nn.softmax(tf.cast(model(check, training=False), tf.float32)).numpy()
            copied = tf.nn.softmax(expected).numpy()
            result["float32_vs_trained"] = {
                "max_abs_prob_diff": float(np.abs(trained - copied).max()),
                "top1_agreement": float((trained.argmax(1) == copied.argmax(1)).mean())}
        result["reload_max_rel_diff"] = check_reload(out / "classifier", check, expected,
                                                     "logits", "serve_float",
                                                     atol=RELOAD_TOLERANCE)
        if export_cfg.litert:
            calibration = collect_images(calib_ds, export_cfg.calibration_images)
            # From the folded graph with Keras' own layers: the converter has no training-mode
            # batch norm (FusableLayerNorm's pattern).
            result["litert"] = litert.export_all(fold_batchnorm(served), out / "litert",
                                                 list(export_cfg.litert), size, calibration, check)
            write_json(out / "litert" / "checks.json", result["litert"])
        write_model_card(out / "README.md", card, class_names, metrics, result)

    replacing_dir(run_dir / "export", write)
    return result
