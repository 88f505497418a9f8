"""Where training memory goes: the tensors each side keeps from the forward pass for the backward.

Ours: the trainer's own forward/backward (`Loop._gradients`) traced for one fixed batch; every
forward tensor that a gradient op reads is kept until the backward pass reaches it. Summed by the
op type that made it, views (Reshape, Identity) counted once with the tensor they view, weights
apart. timm: one forward pass of the same model, then every tensor its autograd graph saved
(`grad_fn._saved_*`), summed by the backward node that saved it, storages counted once,
parameters apart. Both are static counts of what is alive when the backward pass starts, where
a training step peaks; `bench.memory` measures the peak RSS itself.

    python -m bench.profile_memory --models mobilevit_xxs
"""

from __future__ import annotations

import argparse
import collections

from bench import common

MIB = 2 ** 20
VIEWS = {"Identity", "IdentityN", "Reshape", "Squeeze", "ExpandDims", "StopGradient"}


def ancestors(ops) -> set:
    """`ops` and every op they depend on (data inputs and control inputs)."""
    seen, stack = set(), list(ops)
    while stack:
        op = stack.pop()
        if op not in seen:
            seen.add(op)
            stack.extend(t.op for t in op.inputs)
            stack.extend(op.control_inputs)
    return seen


def ours_kept(model_name: str, batch: int, size: int) -> dict[str, float]:
    """MiB of forward tensors our backward pass reads, by the op type that made them."""
    import keras
    import numpy as np
    import tensorflow as tf

    from trainer.models.head import build_classifier
    from trainer.models.mobilevit import MobileViTBackbone
    from trainer.training.loop import Loop

    model = build_classifier(MobileViTBackbone.from_preset(model_name), 10)
    loop = Loop(tf.distribute.get_strategy(), model, keras.optimizers.AdamW(1e-4), 10, batch)
    step = tf.function(loop._gradients).get_concrete_function(
        tf.TensorSpec([batch, size, size, 3], tf.float32), tf.TensorSpec([batch], tf.int32))
    grads, stats = step.structured_outputs
    # The forward pass: every op the loss and accuracy depend on. The backward pass: every other
    # op the gradients depend on (gradient_tape/..., and the tape's AddN and zeros, named apart).
    forward = ancestors([t.op for t in tf.nest.flatten(stats)])
    backward = ancestors([g.op for g in grads if g is not None]) - forward

    def root(tensor):  # a view shares its input's buffer: count the buffer once
        while tensor.op.type in VIEWS and tensor.op.inputs:
            tensor = tensor.op.inputs[0]
        return tensor

    kept = {}
    for op in backward:
        for tensor in op.inputs:
            tensor = root(tensor)
            if tensor.op in forward and tensor.op.type != "Const":
                kept[tensor.name] = tensor
    by_type: dict[str, float] = collections.defaultdict(float)
    for tensor in kept.values():
        shape = tensor.shape.as_list() if tensor.shape.rank is not None else None
        if not shape or None in shape:
            continue  # scalars and shape vectors: bytes, not MiB
        kind = "weights" if tensor.op.type == "ReadVariableOp" else tensor.op.type
        by_type[kind] += np.prod(shape) * tensor.dtype.size / MIB
    return dict(sorted(by_type.items(), key=lambda kv: -kv[1]))


def timm_kept(model_name: str, batch: int, size: int) -> dict[str, float]:
    """MiB of tensors timm's autograd graph saved for the backward pass, by backward node."""
    import torch

    timm = common.import_timm()
    model = timm.create_model(model_name, num_classes=10).train()
    x, y = torch.rand(batch, 3, size, size), torch.randint(0, 10, (batch,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, stack, storages = set(), [loss.grad_fn], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            value = getattr(node, attr)
            for tensor in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(tensor, torch.Tensor) and tensor.numel() > 1:
                    storage = tensor.untyped_storage()
                    kind = ("weights" if storage.data_ptr() in params
                            else type(node).__name__)
                    storages.setdefault(storage.data_ptr(), (kind, storage.nbytes() / MIB))
    by_type: dict[str, float] = collections.defaultdict(float)
    for kind, mib in storages.values():
        by_type[kind] += mib
    return dict(sorted(by_type.items(), key=lambda kv: -kv[1]))


def summary(kept: dict[str, float], top: int = 6) -> dict:
    activations = {k: v for k, v in kept.items() if k != "weights"}
    return {"activations_mib": round(sum(activations.values())),
            "weights_mib": round(kept.get("weights", 0.0)),
            "top": {k: round(v) for k, v in list(activations.items())[:top]}}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(common.MODELS))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    info = common.machine("cpu", 0)
    rows = []
    for name in args.models:
        ours = summary(ours_kept(name, args.batch, args.size))
        ref = summary(timm_kept(name, args.batch, args.size))
        rows.append({"task": "profile_memory", "model": name, "batch": args.batch,
                     "size": args.size, "ours_kept_mib": ours["activations_mib"],
                     "ref_kept_mib": ref["activations_mib"],
                     "ratio": round(ours["activations_mib"] / ref["activations_mib"], 2),
                     "ours_top": ours["top"], "ref_top": ref["top"]})
        print(rows[-1], flush=True)
    path = common.write("profile_memory", rows, info)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
