"""BatchNorm folded into the convolution before it: the inference graph the exports serve.

At inference a BatchNorm is an affine map per channel, y = x * s + (beta - mean * s) with
s = gamma / sqrt(var + eps); after a bias-free convolution it folds into the convolution's kernel
(times s, per output channel) and a new bias: the folded graph has no BatchNorm arithmetic left
for any runtime (LiteRT, TF Serving, a converter) to execute or fold. On TensorFlow's CPU
runtime it serves no faster than the unfolded graph with its weights frozen in as constants,
which grappler folds as well (bench/profile_infer.py). The Keras model and the checkpoints keep
the trainable form; only exports are folded. Hand-written: Keras has no BN folding, and the
TF Model Optimization toolkit folds only inside its quantisation-aware wrappers.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

CONVS = (layers.Conv2D, layers.DepthwiseConv2D)


def conv_bn_pairs(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """BatchNorm layer name -> the convolution it directly follows, when that convolution has no
    bias and no other consumer (every `conv_bn` of the MobileViT builders), in nested models too."""
    pairs = {}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            pairs.update(conv_bn_pairs(layer))
            continue
        if not isinstance(layer, layers.BatchNormalization) or len(layer._inbound_nodes) != 1:
            continue
        (parent,) = layer._inbound_nodes[0].parent_nodes or (None,)
        conv = parent.operation if parent is not None else None
        if (isinstance(conv, CONVS) and not conv.use_bias and len(conv._inbound_nodes) == 1
                and len(conv._outbound_nodes) == 1 and layer.axis in (-1, 3)):
            pairs[layer.name] = conv
    return pairs


def folded_weights(conv, bn) -> tuple[np.ndarray, np.ndarray]:
    """The kernel and bias of conv followed by bn (in inference mode), as one convolution."""
    gamma = bn.gamma.numpy() if bn.scale else 1.0
    beta = bn.beta.numpy() if bn.center else 0.0
    mean, var = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    scale = (gamma / np.sqrt(var + bn.epsilon)).astype(np.float64)
    kernel = conv.kernel.numpy().astype(np.float64)
    if isinstance(conv, layers.DepthwiseConv2D):  # [kh, kw, channels, multiplier]
        kernel = kernel * scale.reshape(1, 1, kernel.shape[2], kernel.shape[3])
    else:  # [kh, kw, in, out]
        kernel = kernel * scale
    bias = beta - mean * scale
    return kernel.astype(np.float32), bias.astype(np.float32)


def fold_batchnorm(model: keras.Model, swaps: dict[type, type] | None = None) -> keras.Model:
    """A copy of `model` with each conv -> BN pair as one convolution with a bias; every other
    layer and weight as it is. Outputs equal the original's in inference up to float rounding.

    `swaps` ({layer class: subclass with the same config and weights}, e.g.
    trainer/models/fusion.py's SWAPS): those layers are built as the subclass in the same copy,
    which saves the export a second clone of the model (about a second on 2 cores)."""
    pairs = conv_bn_pairs(model)
    swaps = swaps or {}
    if not pairs and not any(type(layer) in swaps for layer in leaf_layers(model)):
        return model
    folded_convs = {conv.name: bn_name for bn_name, conv in pairs.items()}

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if layer.name in pairs:
            return layers.Identity(name=layer.name, dtype=layer.dtype_policy.name)
        if layer.name in folded_convs:
            config["use_bias"] = True
        return swaps.get(type(layer), type(layer)).from_config(config)

    def call(layer, *args, **kwargs):  # BN's node passes `mask`, which Identity does not take
        if isinstance(layer, layers.Identity) and layer.name in pairs:
            return layer(args[0])
        return layer(*args, **kwargs)

    copy = keras.models.clone_model(model, clone_function=clone, call_function=call,
                                    recursive=True)
    source = {layer.name: layer for layer in leaf_layers(model)}
    for layer in leaf_layers(copy):
        if layer.name in folded_convs:
            bn = source[folded_convs[layer.name]]
            layer.set_weights(list(folded_weights(source[layer.name], bn)))
        elif layer.weights:
            layer.set_weights([w.numpy() for w in source[layer.name].weights])
    return copy


def leaf_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers of `model` that are not models, nested models flattened, in order."""
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out += leaf_layers(layer)
        else:
            out.append(layer)
    return out
