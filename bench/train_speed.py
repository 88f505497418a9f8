"""Training throughput: one optimizer step (forward, backward, AdamW update) in images/s.

Ours: the trainer's own model, optimizer and train step (`trainer.training.loop.Loop`,
the `strategy.run` step inside a `tf.function`), with and without XLA, on the trainer's threads
(`trainer.intra_op_threads=auto`: one per op for a small CPU step, the rest in parallel ops).
Reference: timm's `mobilevit_*` in PyTorch eager mode with AdamW. Same batch of random images for
both, 1000 classes, same cores (TensorFlow's op pools and PyTorch's threads), interleaved.

    python -m bench.train_speed                       # all sizes, 256 and 128, batch 32
    python -m bench.train_speed --sizes 64 32 --steps 10 --repeats 5 --out train_small
    python -m bench.train_speed --models mobilevit_xxs --sizes 256 --repeats 5
    python -m bench.train_speed --models mobilevitv2_050 mobilevitv2_100 --sizes 128 --out train_v2
    python -m bench.train_speed --device gpu          # mixed precision + XLA vs timm AMP on CUDA
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np

from bench import common

CLASSES = 1000


def ours_step(model_name: str, batch: int, size: int, xla: bool, device: str):
    """A callable running one training step of our model on a fixed batch."""
    import keras
    import tensorflow as tf

    from trainer.models.head import build_classifier
    from trainer.models.mobilevit import MobileViTBackbone
    from trainer.training.fused import FusedAdamW
    from trainer.training.loop import Loop

    keras.mixed_precision.set_global_policy("mixed_float16" if device == "gpu" else "float32")
    # As the trainer builds it: the convolutional blocks recomputed for a large CPU step.
    recompute = device == "cpu" and common.trainer_recompute(model_name, size, batch, xla)
    model = build_classifier(MobileViTBackbone.from_preset(model_name, recompute=recompute),
                             CLASSES)
    optimizer = FusedAdamW(1e-4, weight_decay=0.05)  # the trainer's optim=adamw
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
    return recompute, lambda: loop.train_step(iterator)["loss"].numpy()  # .numpy() waits


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


def measure(name: str, size: int, variant: str, args) -> dict:
    """One row: one of our step variants ("graph" or "xla") against timm, interleaved."""
    recompute, ours = ours_step(name, args.batch, size, variant == "xla", args.device)
    runs = {variant: ours, "timm": timm_step(name, args.batch, size, args.device)}
    for fn in runs.values():  # tracing, XLA compilation, allocator warm-up
        fn(), fn()
    r = common.interleaved(runs, args.batch, args.repeats, args.steps)
    precision = " mixed_float16" if args.device == "gpu" else " float32"
    return common.speed_row(
        "train", name, args.batch, size, r[variant], r["timm"],
        ours=f"tf.function{'+XLA' if variant == 'xla' else ''}{precision}"
             f"{', recomputed blocks' if recompute else ''}",
        ref="timm eager" + (" AMP" if args.device == "gpu" else " float32"))


def child_rows(name: str, size: int, variant: str, threads: int, args) -> list[dict]:
    """One process per model, size and variant: at 256x256, S training side by side with S on
    XLA and timm's S (all three in one process before) ran out of 23 GB."""
    flags = ["--batch", str(args.batch), "--repeats", str(args.repeats), "--steps",
             str(args.steps), "--threads", str(threads), "--device", args.device]
    out = subprocess.run([sys.executable, "-m", "bench.train_speed", "--one", name, str(size),
                          variant, *flags], cwd=common.ROOT, capture_output=True, text=True)
    found = [line for line in out.stdout.splitlines() if line.startswith("ROWS ")]
    if out.returncode != 0 or not found:
        raise SystemExit(f"{name} at {size} ({variant}): exit {out.returncode}\n"
                         f"{out.stderr[-3000:]}")
    return json.loads(found[-1][5:])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(common.MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 128])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1, help="steps per timed call")
    parser.add_argument("--threads", type=int, default=0, help="0: all cores")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--out", default="train", help="bench/results/OUT.json")
    parser.add_argument("--variants", nargs="+", choices=["graph", "xla"], default=["graph", "xla"])
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "SIZE", "VARIANT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    threads = args.threads or common.os.cpu_count()
    common.set_threads(threads)
    if args.one:  # a child process: one model, size and variant, its row as JSON on stdout
        name, size, variant = args.one[0], int(args.one[1]), args.one[2]
        # TensorFlow's ops split as the trainer splits them: one thread each for a small step,
        # the inter-op pool running ops side by side on the same cores as timm's threads.
        intra = common.trainer_threads(name, size, args.batch) if args.device == "cpu" else 0
        row = {**measure(name, size, variant, args), "ours_intra_op_threads": intra or threads}
        print("ROWS " + json.dumps([row]))
        return []
    rows = []
    for size in args.sizes:
        for name in args.models:
            for variant in args.variants:
                rows += child_rows(name, size, variant, threads, args)
                row = rows[-1]
                print(name, size, row["ours"], row["ours_img_s"], "vs", row["ref_img_s"],
                      flush=True)
    path = common.write(args.out, rows, common.machine(args.device, threads))
    print(common.table(rows, [("model", "model"), ("size", "size"), ("batch", "batch"),
                              ("ours", "ours"), ("ours_img_s", "img/s"),
                              ("ref_img_s", "timm img/s"), ("speedup", "speedup")]))
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
