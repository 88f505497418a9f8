"""Time to the first training step, by phase: Python tracing, graph optimisation + first run.

The trainer's own model, optimizer (`optim=adamw`) and step (`trainer.training.loop.Loop`) on a
fixed batch, as the quickstart trains (XXS, 10 classes, 32x32, batch 32). Phases:
- trace: `get_concrete_function` (Keras layers, the tape's gradient, the optimizer's update, as
  Python building graph ops); `ops` is the traced graph's size.
- first call: grappler's passes over that graph, then the first execution.
- steady step: the median of the next 20 steps.
Each configuration runs in a fresh process (TensorFlow caches traces and optimised graphs).

    python -m bench.first_step
    python -m bench.first_step --optimizer keras     # Keras' own AdamW, for comparison
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

from bench import common


def measure(model_name: str, size: int, batch: int, optimizer: str) -> dict:
    start = time.perf_counter()
    import keras
    import tensorflow as tf

    from trainer.models.head import build_classifier
    from trainer.models.mobilevit import MobileViTBackbone
    from trainer.training.fused import FusedAdamW
    from trainer.training.loop import Loop

    imported = time.perf_counter()
    model = build_classifier(MobileViTBackbone.from_preset(model_name), 10)
    cls = FusedAdamW if optimizer == "trainer" else keras.optimizers.AdamW
    opt = cls(1e-3, weight_decay=0.01)
    opt.build(model.trainable_variables)
    built = time.perf_counter()
    rng = np.random.default_rng(0)
    images = rng.random((batch, size, size, 3), dtype=np.float32)
    labels = rng.integers(0, 10, batch).astype(np.int32)
    iterator = iter(tf.data.Dataset.from_tensors((images, labels)).repeat())
    loop = Loop(tf.distribute.get_strategy(), model, opt, 10, batch)

    step = loop.make_train_step()  # the trainer's own step, traced here apart from its first run
    t0 = time.perf_counter()
    graph = step.get_concrete_function(iterator).graph
    t1 = time.perf_counter()
    step(iterator)["loss"].numpy()
    t2 = time.perf_counter()
    steps = []
    for _ in range(20):
        s = time.perf_counter()
        step(iterator)["loss"].numpy()
        steps.append(time.perf_counter() - s)
    return {"task": "first_step", "model": model_name, "size": size, "batch": batch,
            "optimizer": "trainer (fused AdamW)" if optimizer == "trainer" else "Keras AdamW",
            "import_s": round(imported - start, 2), "build_s": round(built - imported, 2),
            "trace_s": round(t1 - t0, 2), "ops": len(graph.get_operations()),
            "first_call_s": round(t2 - t1, 2),
            "first_step_s": round(t2 - t0, 2),  # after the model is built
            "steady_step_ms": round(1000 * float(np.median(steps)), 1)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(common.MODELS))
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--optimizer", nargs="+", choices=["trainer", "keras"],
                        default=["trainer", "keras"])
    parser.add_argument("--threads", type=int, default=0, help="0: all cores")
    parser.add_argument("--out", default="first_step", help="bench/results/OUT.json")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "OPTIMIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    threads = args.threads or common.os.cpu_count()
    common.set_threads(threads)
    if args.one:
        intra = common.trainer_threads(args.one[0], args.size, args.batch)  # as the trainer
        row = measure(args.one[0], args.size, args.batch, args.one[1])
        print("ROW " + json.dumps({**row, "intra_op_threads": intra or threads}))
        return []
    rows = []
    for name in args.models:
        for optimizer in args.optimizer:
            out = subprocess.run([sys.executable, "-m", "bench.first_step", "--one", name,
                                  optimizer, "--size", str(args.size), "--batch", str(args.batch),
                                  "--threads", str(threads)], cwd=common.ROOT,
                                 capture_output=True, text=True)
            found = [line for line in out.stdout.splitlines() if line.startswith("ROW ")]
            if out.returncode != 0 or not found:
                raise SystemExit(f"{name} {optimizer}: exit {out.returncode}\n{out.stderr[-3000:]}")
            rows.append(json.loads(found[-1][4:]))
            print(rows[-1], flush=True)
    path = common.write(args.out, rows, common.machine("cpu", threads))
    print(common.table(rows, [("model", "model"), ("optimizer", "optimizer"), ("ops", "ops"),
                              ("trace_s", "trace s"), ("first_call_s", "first call s"),
                              ("first_step_s", "first step s"),
                              ("steady_step_ms", "steady step ms")]))
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
