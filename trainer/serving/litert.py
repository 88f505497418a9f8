"""LiteRT (TFLite) files for phones: float32, float16, dynamic-range int8 and full int8.

Each file is converted with TensorFlow's TFLiteConverter, then run in the LiteRT interpreter
(`ai-edge-litert`) on validation images and compared with the Keras model: float variants by the
largest probability difference (bar 1e-4), int8 variants by top-1 agreement (bar 98%).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from trainer.atomic import write_bytes
from trainer.config.schema import LiteRTVariant

log = logging.getLogger(__name__)

VARIANTS = tuple(LiteRTVariant)  # the config's choices
FLOAT_BAR = 1e-4  # max |diff| of probabilities
INT8_BAR = 0.98  # top-1 agreement


def convert(model: keras.Model, variant: str, image_size: int,
            calibration: np.ndarray | None = None) -> bytes:
    """One LiteRT flatbuffer: float32 [1, S, S, 3] RGB in [0, 1] -> probabilities [1, classes]."""

    def probabilities(images):
        return {"probabilities": tf.nn.softmax(tf.cast(model(images, training=False), tf.float32))}

    # Through a SavedModel: converting a concrete function directly leaves Keras 3 variables
    # unfrozen (READ_VARIABLE ops, NaN outputs).
    with tempfile.TemporaryDirectory() as tmp:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint("serving_default", probabilities, input_signature=[
            tf.TensorSpec([1, image_size, image_size, 3], tf.float32, name="images")])
        archive.write_out(tmp, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        return _configure(converter, variant, calibration).convert()


def _configure(converter, variant: str, calibration):
    if variant == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "dynamic_int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif variant == "int8":
        if calibration is None or not len(calibration):
            raise ValueError("full int8 needs calibration images")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[None]] for image in calibration)
        # Integer kernels for every op; float input and output for the caller's convenience.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif variant != "float32":
        raise ValueError(f"LiteRT variant {variant!r} is not one of {', '.join(VARIANTS)}")
    return converter


def run(model_bytes: bytes, images: np.ndarray) -> np.ndarray:
    """Probabilities from the LiteRT interpreter, one image at a time."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_bytes)
    interpreter.allocate_tensors()
    runner = interpreter.get_signature_runner()
    return np.concatenate([runner(images=image[None].astype(np.float32))["probabilities"]
                           for image in images])


def export_all(model: keras.Model, out_dir: Path, variants: list[str], image_size: int,
               calibration: np.ndarray, check_images: np.ndarray) -> dict:
    """Convert, write atomically, check against the Keras model; returns the record per file."""
    expected = tf.nn.softmax(tf.cast(model(check_images, training=False), tf.float32)).numpy()
    out_dir.mkdir(parents=True, exist_ok=True)
    records = {}
    for variant in variants:
        data = convert(model, variant, image_size, calibration)
        path = out_dir / f"model_{variant}.tflite"
        write_bytes(path, data)
        got = run(data, check_images)
        record = {"file": path.name, "bytes": len(data), "images": len(check_images),
                  "max_abs_prob_diff": float(np.abs(got - expected).max()),
                  "top1_agreement": float((got.argmax(1) == expected.argmax(1)).mean())}
        if variant in ("float32", "float16"):
            record["bar"] = f"max_abs_prob_diff <= {FLOAT_BAR}"
            record["passed"] = record["max_abs_prob_diff"] <= FLOAT_BAR
        else:
            record["bar"] = f"top1_agreement >= {INT8_BAR}"
            record["passed"] = record["top1_agreement"] >= INT8_BAR
        if not record["passed"]:
            log.warning("LiteRT %s misses its bar (%s): %s", variant, record["bar"], record)
        records[variant] = record
        log.info("LiteRT %s: %d bytes, max |dp| %.2g, top-1 agreement %.3f", variant,
                 len(data), record["max_abs_prob_diff"], record["top1_agreement"])
    return records
