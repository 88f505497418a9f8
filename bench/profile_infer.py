"""Why batch-1 inference trails timm on CPU: an op-level profile, and the variants tried.

For one backbone at batch 1 this times, interleaved: the exported SavedModel (`serve_float`), the
same export with Keras' LayerNorm and Dense layers (before trainer/models/fusion.py), the same
forward pass as a plain `tf.function`, the same with XLA (`jit_compile=True`), the same with
its variables frozen into constants (what grappler can then fold), and timm eager.
It then traces the SavedModel with `tf.profiler` and sums the host trace per op type: how many
TensorFlow ops one image runs through and where their time goes (about 200; the `tf.function`
ran ~1,000, a third of them the elementwise Mul / AddV2 of BatchNorm and LayerNorm reading their
variables, which freezing the weights into constants lets grappler fold).

    python -m bench.profile_infer --models mobilevit_xxs
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path

import numpy as np

from bench import common
from bench.infer_speed import CLASSES, exported, savedmodel_call, timm_call


def op_profile(fn, calls: int) -> dict:
    """Per-op-type totals from a tf.profiler host trace of `calls` calls of `fn`."""
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(calls):
            fn()
        tf.profiler.experimental.stop()
        (path,) = Path(logdir).glob("**/*.xplane.pb")
        space = xplane_pb2.XSpace.FromString(path.read_bytes())
    per_type: dict[str, list[float]] = collections.defaultdict(list)
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        names = {k: m.name for k, m in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = names.get(event.metadata_id, "")
                # Executor op events are "<node name>:<op type>" (oneDNN kernels "_Mkl..."); the
                # executor's own events ("ExecutorState::Process") are what lies between them.
                op_type = name.rsplit(":", 1)[-1].strip()
                if ":" in name and "::" not in name and not op_type.startswith("__inference"):
                    per_type[op_type].append(event.duration_ps / 1e9)  # ms
    ops = {t: {"count": len(d) / calls, "ms": sum(d) / calls} for t, d in per_type.items()}
    return dict(sorted(ops.items(), key=lambda kv: -kv[1]["ms"]))


def main(argv: list[str] | None = None) -> list[dict]:
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilevit_xxs"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=8, help="calls per timing")
    common.add_machine_args(parser)
    args = parser.parse_args(argv)
    threads, info = common.setup(args)
    image = np.random.default_rng(0).random((1, args.size, args.size, 3), dtype=np.float32)
    rows = []
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            loaded, _ = exported(name, args.size, Path(tmp), ())
            from trainer.models.folding import fold_batchnorm
            from trainer.models.head import build_classifier
            from trainer.models.mobilevit import MobileViTBackbone
            from trainer.serving.savedmodel import export_classifier, frozen_forward

            model = common.trained_like(
                build_classifier(MobileViTBackbone.from_preset(name), CLASSES))
            x = tf.constant(image)
            graph_fn = tf.function(lambda t: model(t, training=False))
            xla_fn = tf.function(lambda t: model(t, training=False), jit_compile=True)
            frozen_fn = convert_variables_to_constants_v2(graph_fn.get_concrete_function(x))
            # The export before trainer/models/fusion.py: the same SavedModel, Keras' layers.
            folded = fold_batchnorm(model)
            before = tf.saved_model.load(str(export_classifier(
                folded, Path(tmp) / "keras_layers", [str(i) for i in range(CLASSES)], args.size,
                0.9, forward=frozen_forward(folded, args.size, onednn_layers=False))))
            runs = {"savedmodel": savedmodel_call(loaded, "serve_float", image),
                    "savedmodel, Keras layers": savedmodel_call(before, "serve_float", image),
                    "tf.function": lambda: graph_fn(x).numpy(),
                    "tf.function+XLA": lambda: xla_fn(x).numpy(),
                    "frozen constants": lambda: frozen_fn(x)[0].numpy(),
                    "timm": timm_call(name, image, args.device)}
            for fn in runs.values():
                fn(), fn()
            r = common.interleaved(runs, 1, args.repeats, args.calls)
            ms = {k: round(1000 / v["median"], 2) for k, v in r.items()}
            ops = op_profile(runs["savedmodel"], args.calls)
        compute = sum(o["ms"] for o in ops.values())
        row = {"task": "profile_infer", "model": name, "batch": 1, "size": args.size,
               "ms": ms, "ops_per_image": round(sum(o["count"] for o in ops.values())),
               "op_compute_ms": round(compute, 2),  # summed over the executor's threads
               "top_ops": {k: {"count": round(v["count"]), "ms": round(v["ms"], 2)}
                           for k, v in list(ops.items())[:12]}}
        rows.append(row)
        print(f"{name} batch 1: " + ", ".join(f"{k} {v} ms" for k, v in ms.items()))
        print(f"  {row['ops_per_image']} TensorFlow ops per image in the SavedModel, "
              f"{compute:.1f} ms inside them "
              f"(summed over the executor's threads, which run independent ops in parallel)")
        for op_type, o in row["top_ops"].items():
            print(f"  {op_type:28s} x{o['count']:<5d} {o['ms']:7.2f} ms")
    path = common.write("profile_infer", rows, info)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
