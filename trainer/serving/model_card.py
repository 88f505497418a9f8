"""export/README.md: what the exported model is, how well it does, and how to serve it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.atomic import write_text
from trainer.data.pipeline import interpolation


@dataclass(frozen=True)
class ModelCard:
    """What the card says about the run, and the preprocessing every signature applies."""

    model: str  # the preset name
    pretrained: str  # where the weights started from
    data: str  # the dataset's name
    source: str  # tfds | folder | digits
    image_size: int
    crop_pct: float
    interpolation: str = "bilinear"

    @classmethod
    def from_config(cls, cfg) -> ModelCard:
        return cls(cfg.model.name, cfg.model.pretrained, cfg.data.name, cfg.data.source,
                   cfg.data.image_size, cfg.data.crop_pct,
                   interpolation(cfg.data))


def write_model_card(path: Path, card: ModelCard, class_names: list[str], metrics: dict,
                     result: dict) -> None:
    size, crop = card.image_size, card.crop_pct
    shown = ", ".join(class_names[:20]) + (" ..." if len(class_names) > 20 else "")
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items()
                     if isinstance(v, float) and k.startswith(("val_", "test_")))
    lite = "".join(f"| `litert/{r['file']}` | {r['bytes']:,} | {r['max_abs_prob_diff']:.2g} | "
                   f"{r['top1_agreement']:.3f} | {'yes' if r['passed'] else 'no'} ({r['bar']}) |\n"
                   for r in result.get("litert", {}).values())
    text = f"""# {card.model} fine-tuned on {card.data}

- Model: MobileViT ({card.model}), initialised from `{card.pretrained}`, new
  {len(class_names)}-class head.
- Data: `{card.data}` ({card.source}); classes: {shown}
- Preprocessing (inside every signature): RGB; resize the short side to
  ceil({size} / {crop}) pixels ({card.interpolation}, antialiased), centre-crop {size}x{size}, scale to [0, 1].

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
{lite or "| (none: set export.litert=[float32,float16,dynamic_int8,int8,int8_integer_only]) | | | | |"}
`int8`: int8 but for LayerNorm and the attention's scores (float32), the fastest on a CPU or phone
(XNNPACK); `int8_integer_only`: integer kernels only, for NPUs, Edge TPUs and microcontrollers.

## Keras

`model.keras` continues fine-tuning: `from trainer import load_run; model = load_run("RUN_DIR")`
(`preprocessing=True`: raw uint8 images in), or `keras.models.load_model("export/model.keras")`
after `import trainer.models.mobilevit` (registers the layers).
"""
    write_text(path, text)
