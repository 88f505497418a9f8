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
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from trainer.atomic import write_json, write_text
from trainer.models.mobilevit import float32_copy
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


def _save(path: Path, endpoints: dict[str, tuple[Callable, list]]):
    archive = keras.export.ExportArchive()
    for name, (fn, signature) in endpoints.items():
        archive.add_endpoint(name, fn, input_signature=signature)
    # The frozen graph carries no variables, so there are no custom gradients worth saving (and
    # their captures would not serialise).
    archive.write_out(str(path), verbose=False,
                      options=tf.saved_model.SaveOptions(experimental_custom_gradients=False))


def frozen_forward(net: keras.Model, image_size: int) -> tf.types.experimental.GenericFunction:
    """`net`'s inference pass as one function with its weights folded in as constants.

    Why: a function that reads its ~300 variables recomputes every BatchNorm's scale and shift
    on each call; with constants, grappler folds them once. At batch 1 on CPU that is ~20% of the
    time (bench/profile_infer.py: XXS 22.9 -> 17.5 ms per image, timm eager 19.6 ms). The
    SavedModel is served, not trained: model.keras is the one to fine-tune.
    """
    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32)
    live = tf.function(lambda images: tf.cast(net(images, training=False), tf.float32))
    frozen = convert_variables_to_constants_v2(live.get_concrete_function(spec))

    @tf.function(input_signature=[spec])
    def forward(images):
        return tf.nest.flatten(frozen(images))[0]
    return forward


def export_float_savedmodel(model: keras.Model, path: Path, image_size: int,
                            output: str = "logits") -> Path:
    """A SavedModel whose `serving_default` takes float32 [N, S, S, 3] RGB in [0, 1].

    The contract of the TF Hub `mobilevit_*_1k_256` models (logits) and their `_fe` twins
    (`output="features"`: pooled features [N, C]).
    """
    net = model if output == "logits" else feature_model(model)
    spec = [tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")]
    forward = frozen_forward(net, image_size)

    def serve(images):
        return {output: forward(images)}

    return atomic_dir(path, lambda tmp: _save(tmp, {"serving_default": (serve, spec)}))


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

TOP_K = 5
# The export against the float32 model it was built from, relative to the largest logit: a broken
# export differs at O(1), float32 rounding at 1e-6.
RELOAD_TOLERANCE = 1e-4


def _image_signatures(net: keras.Model, image_size: int, crop_pct: float, outputs: Callable):
    """serving_default (uint8, any size), serve_bytes (JPEG/PNG), serve_float (the TF Hub one)."""
    from trainer.augment import eval_preprocess

    # Traced once and called by all three signatures: each would otherwise trace the network.
    forward = frozen_forward(net, image_size)

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
    return atomic_dir(path, lambda tmp: _save(tmp, endpoints))


def export_feature_extractor(model: keras.Model, path: Path, image_size: int,
                             crop_pct: float) -> Path:
    net = feature_model(model)
    endpoints = _image_signatures(net, image_size, crop_pct, lambda f: {"features": f})
    return atomic_dir(path, lambda tmp: _save(tmp, endpoints))


def save_keras(model: keras.Model, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.keras")
    model.save(tmp)
    os.replace(tmp, path)
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


def export_run(model: keras.Model, class_names: list[str], cfg, run_dir: Path,
               val_ds: tf.data.Dataset, calib_ds: tf.data.Dataset, metrics: dict) -> dict:
    """Every export of a run, the reload check and the model card: `export/` appears complete.

    Returns what the export measured (reload difference, LiteRT sizes and agreement).
    """
    from trainer import litert

    size, crop = cfg.data.image_size, cfg.data.crop_pct
    result: dict = {}

    def write(out: Path) -> None:  # into a temporary directory, swapped in when complete
        # Every served file computes in float32, whatever precision the model trained in.
        served = float32_copy(model)
        export_classifier(served, out / "classifier", class_names, size, crop)
        export_feature_extractor(served, out / "feature_extractor", size, crop)
        save_keras(model, out / "model.keras")  # as trained, to fine-tune further
        check = collect_images(val_ds, cfg.export.check_images)
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
        if cfg.export.litert:
            calibration = collect_images(calib_ds, cfg.export.calibration_images)
            result["litert"] = litert.export_all(served, out / "litert", list(cfg.export.litert),
                                                 size, calibration, check)
            write_json(out / "litert" / "checks.json", result["litert"])
        write_model_card(out / "README.md", cfg, class_names, metrics, result)

    atomic_dir(run_dir / "export", write)
    return result


def write_model_card(path: Path, cfg, class_names: list[str], metrics: dict, result: dict):
    size, crop = cfg.data.image_size, cfg.data.crop_pct
    shown = ", ".join(class_names[:20]) + (" ..." if len(class_names) > 20 else "")
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items()
                     if isinstance(v, float) and k.startswith(("val_", "test_")))
    lite = "".join(f"| `litert/{r['file']}` | {r['bytes']:,} | {r['max_abs_prob_diff']:.2g} | "
                   f"{r['top1_agreement']:.3f} | {'yes' if r['passed'] else 'no'} ({r['bar']}) |\n"
                   for r in result.get("litert", {}).values())
    text = f"""# {cfg.model.name} fine-tuned on {cfg.data.name}

- Model: MobileViT ({cfg.model.name}), initialised from `{cfg.model.pretrained}`, new
  {len(class_names)}-class head.
- Data: `{cfg.data.name}` ({cfg.data.source}); classes: {shown}
- Preprocessing (inside every signature): RGB; resize the short side to
  ceil({size} / {crop}) pixels (bilinear, antialiased), centre-crop {size}x{size}, scale to [0, 1].

## Metrics

| metric | value |
|---|---|
{rows}

## Signatures of `classifier/` (and `feature_extractor/`, which returns `features`)

| signature | input | output |
|---|---|---|
| `serving_default` | `images`: uint8 `[N, H, W, 3]`, any size | `logits`, `probabilities`, `top_k_indices`, `top_k_names` |
| `serve_bytes` | `images`: string `[N]`, encoded JPEG / PNG / GIF / BMP | same |
| `serve_float` | `images`: float32 `[N, {size}, {size}, 3]`, RGB in [0, 1] | same |

## Python (TensorFlow only)

```python
import tensorflow as tf
model = tf.saved_model.load("export/classifier")
data = tf.io.read_file("photo.jpg")
out = model.signatures["serve_bytes"](images=tf.stack([data]))
print(out["top_k_names"][0].numpy(), out["probabilities"][0].numpy().max())
```

## TF Serving (REST)

```bash
docker run -p 8501:8501 -v "$PWD/export/classifier:/models/classifier/1" \\
    -e MODEL_NAME=classifier tensorflow/serving
curl -X POST localhost:8501/v1/models/classifier:predict -d '{{
  "signature_name": "serve_bytes",
  "instances": [{{"b64": "'"$(base64 -w0 photo.jpg)"'"}}]
}}'
```

## LiteRT (TFLite)

```python
import numpy as np
from ai_edge_litert.interpreter import Interpreter
interpreter = Interpreter(model_path="export/litert/model_float32.tflite")
runner = interpreter.get_signature_runner()
image = np.zeros((1, {size}, {size}, 3), np.float32)  # preprocessed as above
print(runner(images=image)["probabilities"].argmax())
```

| file | bytes | max abs prob. diff vs Keras | top-1 agreement | meets bar |
|---|---|---|---|---|
{lite or "| (none: set export.litert=[float32,float16,dynamic_int8,int8]) | | | | |"}

## Keras

`model.keras` continues fine-tuning: `import trainer.models.mobilevit` (registers the layers),
then `keras.models.load_model("export/model.keras")`.
"""
    write_text(path, text)


def main(argv: list[str] | None = None) -> int:
    """python -m trainer.export run=RUN_DIR: export an existing run again (best checkpoint)."""
    import sys

    from trainer import augment, data
    from trainer.runs import load_config, load_model, parse_args, run_dir_arg

    usage = "python -m trainer.export run=RUN_DIR"
    args = parse_args(sys.argv[1:] if argv is None else argv, {"run": "required"}, usage)
    run_dir = run_dir_arg(args["run"][0])
    cfg = load_config(run_dir)
    dataset = data.load_dataset(cfg.data)
    model = load_model(run_dir, cfg, dataset.num_classes)
    batch = cfg.trainer.batch_size
    val_ds = augment.eval_pipeline(dataset.splits["val"], cfg.data, batch)
    calib_ds = augment.eval_pipeline(dataset.splits["train"], cfg.data, batch)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    result = export_run(model, dataset.class_names, cfg, run_dir, val_ds, calib_ds, metrics)
    print(f"exported {run_dir / 'export'} (reload check {result['reload_max_rel_diff']:.2g})")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
