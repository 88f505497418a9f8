"""Training throughput: one optimizer step (forward, backward, AdamW update) in images/s.

Ours: the trainer's own model and train step (`trainer.loop.Loop`, the `strategy.run` step inside a
`tf.function`), with and without XLA. Reference: timm's `mobilevit_*` in PyTorch eager mode with
AdamW. Same batch of random images for both, 1000 classes, same thread count, interleaved.

    python -m bench.train_speed                       # all sizes, 256 and 128, batch 32
    python -m bench.train_speed --models mobilevit_xxs --sizes 256 --repeats 5
    python -m bench.train_speed --device gpu          # mixed precision + XLA vs timm AMP on CUDA
"""

from __future__ import annotations

import argparse

import numpy as np

from bench import common

CLASSES = 1000


def ours_step(model_name: str, batch: int, size: int, xla: bool, device: str):
    """A callable running one training step of our model on a fixed batch."""
    import keras
    import tensorflow as tf

    from trainer.loop import Loop
    from trainer.models.mobilevit import MobileViTBackbone, build_classifier

    keras.mixed_precision.set_global_policy("mixed_float16" if device == "gpu" else "float32")
    model = build_classifier(MobileViTBackbone.from_preset(model_name), CLASSES)
    optimizer = keras.optimizers.AdamW(1e-4, weight_decay=0.05)
    if device == "gpu":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    images = rng.random((batch, size, size, 3), dtype=np.float32)
    labels = rng.integers(0, CLASSES, batch).astype(np.int32)
    strategy = tf.distribute.get_strategy()
    loop = Loop(strategy, model, optimizer, CLASSES, batch, jit_compile=xla)
    iterator = iter(tf.data.Dataset.from_tensors((images, labels)).repeat())
    keras.mixed_precision.set_global_policy("float32")
    return lambda: loop.train_step(iterator)["loss"].numpy()  # .numpy() waits for the step


def timm_step(model_name: str, batch: int, size: int, device: str):
    import torch

    timm = common.import_timm()

    dev = "cuda" if device == "gpu" else "cpu"
    model = timm.create_model(model_name, num_classes=CLASSES).to(dev).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=gen).to(dev)
    labels = torch.randint(0, CLASSES, (batch,), generator=gen).to(dev)
    scaler = torch.amp.GradScaler(enabled=device == "gpu")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.float16, enabled=device == "gpu"):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.item()  # waits for the step
    return step


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(common.MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 128])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1, help="steps per timed call")
    parser.add_argument("--threads", type=int, default=0, help="0: all cores")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    args = parser.parse_args(argv)
    threads = args.threads or common.os.cpu_count()
    common.set_threads(threads)
    info = common.machine(args.device, threads)
    rows = []
    for size in args.sizes:
        for name in args.models:
            runs = {"graph": ours_step(name, args.batch, size, False, args.device),
                    "xla": ours_step(name, args.batch, size, True, args.device),
                    "timm": timm_step(name, args.batch, size, args.device)}
            for fn in runs.values():  # tracing, XLA compilation, allocator warm-up
                fn(), fn()
            r = common.interleaved(runs, args.batch * args.steps, args.repeats, args.steps)
            for variant in ("graph", "xla"):
                rows.append(common.speed_row(
                    "train", name, args.batch, size, r[variant], r["timm"],
                    ours=f"tf.function{'+XLA' if variant == 'xla' else ''}"
                         + (" mixed_float16" if args.device == "gpu" else " float32"),
                    ref="timm eager" + (" AMP" if args.device == "gpu" else " float32")))
                print(rows[-1]["model"], size, variant, rows[-1]["ours_img_s"], "vs",
                      rows[-1]["ref_img_s"], flush=True)
    path = common.write("train", rows, info)
    print(common.table(rows, [("model", "model"), ("size", "size"), ("batch", "batch"),
                              ("ours", "ours"), ("ours_img_s", "img/s"),
                              ("ref_img_s", "timm img/s"), ("speedup", "speedup")]))
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
