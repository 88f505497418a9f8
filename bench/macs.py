"""Multiply-accumulates per image, counted from our Keras model's own layers, and the fraction of
the machine's measured float32 matmul throughput that training achieves.

Counted per layer from its static shapes (convolutions, depthwise convolutions, dense layers,
attention projections and the two attention products); norms, activations and adds are left out,
as in the published figures (XXS 0.41 G, XS 1.03 G, S 2.00 G at 256x256, from ml-cvnets / timm).
Training costs about 3x the forward pass (forward, gradient w.r.t. activations and w.r.t.
weights), 2 FLOPs per MAC; training images/s come from bench/results/train.json.

    python -m bench.macs
"""

from __future__ import annotations

import argparse
import json
import math
import time

from bench import common
from trainer.models.presets import PRESETS


def layer_macs(layer) -> int:
    from keras import layers

    if isinstance(layer, layers.MultiHeadAttention):
        q_shape = layer.output.shape  # = the query's: (batch, tokens, dim), attention over tokens
        tokens, dim = q_shape[-2], q_shape[-1]
        groups = math.prod(q_shape[1:-2])
        heads, key_dim = layer.num_heads, layer.key_dim
        projections = 4 * groups * tokens * dim * heads * key_dim  # q, k, v, output
        products = 2 * groups * heads * tokens * tokens * key_dim  # q k^T and attention @ v
        return projections + products
    if isinstance(layer, layers.DepthwiseConv2D):
        out = layer.output.shape
        return math.prod(out[1:]) * math.prod(layer.kernel_size)
    if isinstance(layer, layers.Conv2D):
        out = layer.output.shape
        cin = layer.input.shape[-1] // layer.groups
        return math.prod(out[1:]) * math.prod(layer.kernel_size) * cin
    if isinstance(layer, layers.Dense):
        return math.prod(layer.output.shape[1:-1]) * layer.input.shape[-1] * layer.units
    return 0


def count_macs(model_name: str, size: int, classes: int = 1000) -> int:
    from trainer.models.head import build_classifier
    from trainer.models.mobilevit import MobileViTBackbone

    backbone = MobileViTBackbone.from_preset(model_name, image_shape=(size, size, 3))
    model = build_classifier(backbone, classes)
    from trainer.models.layers import PatchFold, PatchUnfold

    total, sequences = 0, 1  # token sequences per image: unfolding puts patches on the batch axis
    for layer in backbone.layers:  # topological order: a block's transformer sits between the two
        if isinstance(layer, PatchUnfold):
            sequences = layer.patch_size ** 2
        elif isinstance(layer, PatchFold):
            sequences = 1
        total += sequences * layer_macs(layer)
    return total + layer_macs(model.get_layer("head"))


def matmul_flops(n: int = 2048, repeats: int = 10) -> float:
    """float32 FLOP/s of one n x n matmul on this machine, TensorFlow, best of `repeats`."""
    import tensorflow as tf

    a = tf.random.uniform([n, n])
    b = tf.random.uniform([n, n])
    tf.matmul(a, b).numpy()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        tf.matmul(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    common.add_machine_args(parser)
    args = parser.parse_args(argv)
    threads, info = common.setup(args)
    peak = matmul_flops()
    train_path = common.result_path("train", args.device)
    train_rows = json.loads(train_path.read_text()) if train_path.is_file() else []
    rows = []
    for name in common.MODELS + common.MODELS_V2:
        macs = count_macs(name, args.size)
        same = [r for r in train_rows if r["model"] == name and r["size"] == args.size]
        rates, refs = [r["ours_img_s"] for r in same], [r["ref_img_s"] for r in same]
        row = {"task": "macs", "model": name, "size": args.size, "macs_g": round(macs / 1e9, 3),
               "published_g": PRESETS[name].macs_g if args.size == 256 else None,
               "matmul_gflop_s": round(peak / 1e9, 1)}
        if rates:
            achieved = max(rates) * 6 * macs
            row.update(train_img_s=max(rates), achieved_gflop_s=round(achieved / 1e9, 2),
                       fraction_of_matmul=round(achieved / peak, 3),
                       ref_fraction_of_matmul=round(max(refs) * 6 * macs / peak, 3))
        rows.append(row)
        print(row, flush=True)
    path = common.write("macs", rows, info)
    print(common.table(rows, [("model", "model"), ("macs_g", "GMACs"),
                              ("published_g", "published"), ("train_img_s", "train img/s"),
                              ("achieved_gflop_s", "GFLOP/s"),
                              ("fraction_of_matmul", "of matmul peak"),
                              ("ref_fraction_of_matmul", "timm: of peak")]))
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
