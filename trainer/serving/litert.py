"""LiteRT (TFLite) files for phones: float32, float16, dynamic-range int8 and two full int8.

Each file is converted with TensorFlow's TFLiteConverter, then run in the LiteRT interpreter
(`ai-edge-litert`) on validation images and compared with the Keras model: float variants by the
largest probability difference (bar 1e-4), int8 variants by top-1 agreement (bar 99% for `int8`,
98% for the others).

The two full-int8 files, both calibrated on training images:
- `int8`, for CPUs (XNNPACK): int8 weights and activations in every convolution, dense layer,
  activation and residual add; float32 where XNNPACK has no int8 kernel or int8 costs accuracy:
  the LayerNorm / GroupNorm layers (int8 RSQRT and a variance in 8 bits), the attention's
  score matmul of two activations (BATCH_MATMUL) and SOFTMAX, and v2's fused q/k/v projection.
  Written as the whole graph in one XNNPACK partition: XXS at 256x256 runs 1.8x faster than the
  float32 file (#20).
- `int8_integer_only`, for NPUs, Edge TPUs and microcontrollers, which run nothing but integer
  kernels: every op int8. On a CPU it is slower than float32: the ops above fall back to LiteRT's
  built-in int8 kernels and cut the XNNPACK graph into ~60 pieces.
"""

from __future__ import annotations

import logging
import re
import tempfile
import warnings
from collections import Counter
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
SELECTIVE_INT8_BAR = 0.99  # top-1 agreement of `int8`, whose normalisation and attention stay float
# `int8`'s float32 parts (module docstring): op types anywhere in the converted graph, and per
# Keras layer type the op types inside such layers (None: all of them). The attention's MUL
# scales the scores between its float matmul and softmax: in int8 it had 3x the rounding error of
# any other op (rmse / scale 1.2, QuantizationDebugger's layer statistics).
FLOAT_OP_TYPES = ("BATCH_MATMUL", "SOFTMAX")
FLOAT_LAYERS = {keras.layers.LayerNormalization: None, keras.layers.GroupNormalization: None,
                keras.layers.MultiHeadAttention: ("MUL",)}
# And by name: MobileViT v2's fused q/k/v projection (trainer/models/layers_v2.py), whose one output
# tensor holds the query channel beside the keys and values; one int8 scale for all of them
# flipped 3 of 179 digits of a v2-0.5 model (top-1 agreement 0.983; float: 0.994).
FLOAT_LAYER_SUFFIXES = ("_attn_qkv",)


def convert(model: keras.Model, variant: str, image_size: int,
            calibration: np.ndarray | None = None) -> bytes:
    """One LiteRT flatbuffer: float32 [1, S, S, 3] RGB in [0, 1] -> probabilities [1, classes]."""
    if variant not in VARIANTS:
        raise ValueError(f"LiteRT variant {variant!r} is not one of {', '.join(VARIANTS)}")
    if variant.startswith("int8") and (calibration is None or not len(calibration)):
        raise ValueError(f"LiteRT {variant} needs calibration images")

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
        if variant == "int8":
            return _selective_int8(converter, calibration, _float_layer_names(model))
        return _configure(converter, variant, calibration).convert()


def _configure(converter, variant: str, calibration):
    if variant != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif variant in ("int8", "int8_integer_only"):
        converter.representative_dataset = lambda: ([image[None]] for image in calibration)
    if variant == "int8_integer_only":
        # Integer kernels for every op; float input and output for the caller's convenience.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif variant == "int8":
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                               tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter


def _selective_int8(converter, calibration: np.ndarray, float_layers: dict) -> bytes:
    """Full int8 but for FLOAT_OP_TYPES and the ops of `float_layers`.

    TensorFlow's QuantizationDebugger is the public route to a selective plan: it calibrates once,
    then quantizes with a denylist of op types and of nodes (named by their output tensors, which
    carry the Keras layer's name scope: ".../stage3_vit_tf0_norm1_1/Rsqrt")."""
    converter = _configure(converter, "int8", calibration)
    options = tf.lite.experimental.QuantizationDebugOptions
    with warnings.catch_warnings():  # the debugger's own tf.lite.Interpreter is deprecated
        warnings.simplefilter("ignore")
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=converter.representative_dataset,
            debug_options=options(denylisted_ops=list(FLOAT_OP_TYPES)))
        nodes = _nodes_in_layers(debugger.calibrated_model, float_layers)
        if nodes:
            debugger.options = options(denylisted_ops=list(FLOAT_OP_TYPES), denylisted_nodes=nodes)
        return debugger.get_nondebug_quantized_model()


def _float_layer_names(model: keras.Model) -> dict[str, tuple[str, ...] | None]:
    """{layer name: the op types that stay float in it (None: all)} for FLOAT_LAYERS' types and
    FLOAT_LAYER_SUFFIXES' names."""
    def walk(layer):
        for sub in getattr(layer, "layers", []):
            yield sub
            yield from walk(sub)
    layers = list(walk(model))
    return {**{layer.name: ops for layer in layers for kind, ops in FLOAT_LAYERS.items()
               if isinstance(layer, kind)},
            **{layer.name: None for layer in layers if layer.name.endswith(FLOAT_LAYER_SUFFIXES)}}


def _nodes_in_layers(flatbuffer: bytes, layers: dict[str, tuple[str, ...] | None]) -> list[str]:
    """Output tensor names of the ops inside the given layers (a scope "<name>" or "<name>_<k>",
    the suffix Keras adds when a layer is traced again), of the layer's op types if it has any."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    nodes = []
    for op in interpreter._get_ops_details():
        for index in op["outputs"]:
            parts = names[int(index)].split("/")
            scopes = [p for part in parts for p in (part, re.sub(r"_\d+$", "", part))]
            for layer in (s for s in scopes if s in layers):
                if layers[layer] is None or op["op_name"] in layers[layer]:
                    nodes.append(names[int(index)])
                    break
    return nodes


def float_ops(model_bytes: bytes) -> dict[str, int]:
    """Op types that compute in float32 in a LiteRT file, with their counts (QUANTIZE and
    DEQUANTIZE, the conversions at the edges of the float parts, left out)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_bytes)
    dtypes = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
    return dict(Counter(op["op_name"] for op in interpreter._get_ops_details()
                        if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE", "DELEGATE")
                        and any(dtypes.get(int(i)) == np.float32 for i in op["outputs"])))


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
            bar = SELECTIVE_INT8_BAR if variant == "int8" else INT8_BAR
            record["bar"] = f"top1_agreement >= {bar}"
            record["passed"] = record["top1_agreement"] >= bar
        if variant.startswith("int8"):
            record["float_ops"] = float_ops(data)
        if not record["passed"]:
            log.warning("LiteRT %s misses its bar (%s): %s", variant, record["bar"], record)
        records[variant] = record
        log.info("LiteRT %s: %d bytes, max |dp| %.2g, top-1 agreement %.3f", variant,
                 len(data), record["max_abs_prob_diff"], record["top1_agreement"])
    return records
