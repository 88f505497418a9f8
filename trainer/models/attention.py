"""Keras' MultiHeadAttention with its four projections computed as 2-D matrix products.

Why hand-written (#20): Keras' TensorFlow backend computes a projection's einsum
("abc,cde->abde": tokens [B, T, C] times the kernel [C, heads, head_dim]) as one batched matmul
of the 3-D tokens against the kernel broadcast over B. The kernel's gradient is then B separate
[C, heads x head_dim] products summed over B (a `Sum` over a [B, C, heads x head_dim] tensor):
in a MobileViT-S step at 32x32, 36 such Sums took 60 ms of the step's ~150 and the batched
products most of another 85. Flattening the tokens to [B x T, C] first makes it one matmul each
way, as PyTorch's `nn.Linear` does. Everything else is Keras': the layer's weights, their names
and shapes, its config, masks and the attention itself (`_compute_attention`); in training
with many tokens, `_attention` computes Keras' attention with a leaner backward pass.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers, ops

# Recompute in the backward pass only where the probabilities are large (per example: heads x
# queries x keys): 256 keys are MobileViT's first transformer stage at 256x256 input, 2 x 128 MiB in
# XXS's step at batch 32. Smaller ones cost their recomputation and save little.
RECOMPUTE_MIN_KEYS = 256


def _probabilities(query, key, scale: float):
    """softmax(q k^T x scale) over the keys, as Keras' TensorFlow backend: float32 logits."""
    logits = tf.cast(tf.einsum("BTNH,BSNH->BNTS", query, key), tf.float32) * scale
    return tf.cast(tf.nn.softmax(logits, axis=-1), query.dtype)


def _attention(query, key, value, scale: float):
    """Keras' dot-product attention (q, k, v [B, T, N, H] -> [B, T, N, H]) whose backward pass
    computes the probabilities again instead of keeping them. Why hand-written (#20): autodiff
    keeps the [B, N, T, S] probabilities of every layer until the backward pass reaches it, the
    largest tensors of a MobileViT step (XXS at 256x256, batch 32: 290 MiB of the 2,270 kept;
    `python -m bench.profile_memory`); PyTorch's fused attention keeps none. The cost: the
    scores' matmul and softmax once more per layer in the backward pass (XXS at 256x256: a
    training step about 5% longer, 240 MiB lower peak RSS)."""

    @tf.custom_gradient
    def attend(q, k, v):
        out = tf.einsum("BNTS,BSNH->BTNH", _probabilities(q, k, scale), v)

        def grad(d_out):
            # After d_out exists, so that grappler cannot merge it with the forward's copy.
            with tf.control_dependencies([d_out]):
                probs = _probabilities(q, k, scale)
            d_v = tf.einsum("BNTS,BTNH->BSNH", probs, d_out)
            d_probs = tf.cast(tf.einsum("BTNH,BSNH->BNTS", d_out, v), tf.float32)
            p = tf.cast(probs, tf.float32)  # softmax's gradient, then the scale's
            d_logits = p * (d_probs - tf.reduce_sum(d_probs * p, -1, keepdims=True)) * scale
            d_logits = tf.cast(d_logits, q.dtype)
            return (tf.einsum("BNTS,BSNH->BTNH", d_logits, k),
                    tf.einsum("BNTS,BTNH->BSNH", d_logits, q), d_v)

        return out, grad

    return attend(query, key, value)


def _tokens(x):
    """The token count: static where known, so that a reshape needs no shape ops at run time."""
    return x.shape[1] if x.shape[1] is not None else ops.shape(x)[1]


def _project_in(dense, x):
    """x [B, T, C] @ kernel [C, N, H] + bias [N, H] -> [B, T, N, H], as a 2-D matmul."""
    c, n, h = dense.kernel.shape
    y = ops.matmul(ops.reshape(x, (-1, c)), ops.reshape(dense.kernel, (c, n * h)))
    if dense.bias is not None:
        y = y + ops.reshape(dense.bias, (n * h,))
    return ops.reshape(y, (-1, _tokens(x), n, h))


def _project_out(dense, x):
    """x [B, T, N, H] @ kernel [N, H, E] + bias [E] -> [B, T, E], as a 2-D matmul."""
    n, h, e = dense.kernel.shape
    y = ops.matmul(ops.reshape(x, (-1, n * h)), ops.reshape(dense.kernel, (n * h, e)))
    if dense.bias is not None:
        y = y + dense.bias
    return ops.reshape(y, (-1, _tokens(x), e))


@keras.saving.register_keras_serializable(package="mobilevit")
class TokenAttention(layers.MultiHeadAttention):
    """`layers.MultiHeadAttention` (same arguments, weights and config) for [B, T, C] tokens."""

    def call(self, query, value, key=None, query_mask=None, value_mask=None, key_mask=None,
             attention_mask=None, return_attention_scores=False, training=None,
             use_causal_mask=False):
        key = value if key is None else key
        plain = (query_mask is None and value_mask is None and key_mask is None
                 and attention_mask is None and not return_attention_scores
                 and not use_causal_mask and not getattr(self, "_use_gate", False)
                 and self._output_shape is None and len(query.shape) == 3
                 and all(getattr(t, "_keras_mask", None) is None for t in (query, value, key)))
        if not plain:  # masks, scores, a gate or another output shape: Keras' own path
            return super().call(
                query, value, key, query_mask=query_mask, value_mask=value_mask,
                key_mask=key_mask, attention_mask=attention_mask, training=training,
                return_attention_scores=return_attention_scores, use_causal_mask=use_causal_mask)
        q, k, v = (_project_in(self._query_dense, query), _project_in(self._key_dense, key),
                   _project_in(self._value_dense, value))
        keys = k.shape[1]
        if training and self._dropout == 0.0 and keys is not None and keys >= RECOMPUTE_MIN_KEYS:
            output = _attention(q, k, v, float(self._inverse_sqrt_key_dim))
        else:
            output, _ = self._compute_attention(q, k, v, None, training)
        return _project_out(self._output_dense, output)
