"""Inference throughput of what the trainer exports, against timm eager.

Ours: the exported classifier SavedModel (`serve_float`: float images at the model size, the
signature that matches timm's input; `serving_default` adds in-graph resize and crop from uint8)
at batch 1 and 32, and the LiteRT float32, dynamic-range int8 and both full-int8 files at batch 1
(their input is [1, S, S, 3]).
Reference: timm `mobilevit_*` in eval mode under `torch.inference_mode()`.

    python -m bench.infer_speed
    python -m bench.infer_speed --models mobilevit_xxs --repeats 5
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from bench import common

CLASSES = 1000


def exported(model_name: str, size: int, out_dir: Path, litert_variants: tuple[str, ...]):
    """Build our classifier (random weights), export it as the trainer does; return callables."""
    import tensorflow as tf

    from trainer.models.folding import fold_batchnorm
    from trainer.models.head import build_classifier
    from trainer.models.mobilevit import MobileViTBackbone
    from trainer.serving import litert
    from trainer.serving import savedmodel as export

    # With a trained model's statistics and biases (common.trained_like says why), folded as the
    # trainer's export folds it (BatchNorm into its convolution).
    model = fold_batchnorm(common.trained_like(
        build_classifier(MobileViTBackbone.from_preset(model_name), CLASSES)))
    path = export.export_classifier(model, out_dir / "classifier",
                                    [f"class_{i}" for i in range(CLASSES)], size, 0.9)
    loaded = tf.saved_model.load(str(path))
    calibration = np.random.default_rng(0).random((8, size, size, 3), dtype=np.float32)
    flatbuffers = {v: litert.convert(model, v, size, calibration) for v in litert_variants}
    return loaded, flatbuffers


def savedmodel_call(loaded, signature: str, images: np.ndarray):
    import tensorflow as tf

    fn = loaded.signatures[signature]
    tensor = tf.constant(images)
    return lambda: fn(images=tensor)["probabilities"].numpy()


def litert_call(flatbuffer: bytes, image: np.ndarray, threads: int):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer, num_threads=threads)
    interpreter.allocate_tensors()
    runner = interpreter.get_signature_runner()
    return lambda: runner(images=image)["probabilities"]


def timm_call(model_name: str, images: np.ndarray, device: str):
    import torch

    timm = common.import_timm()

    dev = "cuda" if device == "gpu" else "cpu"
    model = timm.create_model(model_name, num_classes=CLASSES).to(dev).eval()
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(dev)

    def call():
        with torch.inference_mode():
            return model(x).softmax(-1).cpu().numpy()
    return call


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(common.MODELS))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="infer", help="bench/results/OUT.json")
    common.add_machine_args(parser)
    args = parser.parse_args(argv)
    threads, info = common.setup(args)
    # LiteRT is a CPU runtime. dynamic_int8: int8 weights, float activations; int8: both int8 but
    # for the norms and attention scores (trainer/serving/litert.py); int8_integer_only: all int8.
    variants = (("float32", "dynamic_int8", "int8", "int8_integer_only") if args.device == "cpu"
                else ())
    rng = np.random.default_rng(0)
    rows = []
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            loaded, flatbuffers = exported(name, args.size, Path(tmp), variants)
            for batch in args.batches:
                images = rng.random((batch, args.size, args.size, 3), dtype=np.float32)
                uint8 = (images * 255).astype(np.uint8)
                runs = {"savedmodel": savedmodel_call(loaded, "serve_float", images),
                        "savedmodel_uint8": savedmodel_call(loaded, "serving_default", uint8),
                        "timm": timm_call(name, images, args.device)}
                if batch == 1:
                    runs.update({f"litert_{v}": litert_call(fb, images, threads)
                                 for v, fb in flatbuffers.items()})
                for fn in runs.values():
                    fn(), fn()
                calls = max(1, 8 // batch)
                r = common.interleaved(runs, batch, args.repeats, calls)
                for variant in runs:
                    if variant == "timm":
                        continue
                    rows.append(common.speed_row(
                        "infer", name, batch, args.size, r[variant], r["timm"], ours=variant,
                        ref="timm eager",
                        ours_ms_per_batch=round(1000 * batch / r[variant]["median"], 2),
                        ref_ms_per_batch=round(1000 * batch / r["timm"]["median"], 2)))
                    print(name, batch, variant, rows[-1]["ours_ms_per_batch"], "ms vs",
                          rows[-1]["ref_ms_per_batch"], "ms", flush=True)
    path = common.write(args.out, rows, info)
    print(common.table(rows, [("model", "model"), ("batch", "batch"), ("ours", "ours"),
                              ("ours_ms_per_batch", "ms/batch"),
                              ("ref_ms_per_batch", "timm ms/batch"), ("speedup", "speedup")]))
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
