"""Keras' MultiHeadAttention with its four projections computed as 2-D matrix products.

Why hand-written (#20): Keras' TensorFlow backend computes a projection's einsum
("abc,cde->abde": tokens [B, T, C] times the kernel [C, heads, head_dim]) as one batched matmul
of the 3-D tokens against the kernel broadcast over B. The kernel's gradient is then B separate
[C, heads x head_dim] products summed over B (a `Sum` over a [B, C, heads x head_dim] tensor):
in a MobileViT-S step at 32x32, 36 such Sums took 60 ms of the step's ~150 and the batched
products most of another 85. Flattening the tokens to [B x T, C] first makes it one matmul each
way, as PyTorch's `nn.Linear` does. Everything else is Keras': the layer's weights, their names
and shapes, its config, masks and the attention itself (`_compute_attention`).
"""

from __future__ import annotations

import keras
from keras import layers, ops


def _project_in(dense, x):
    """x [B, T, C] @ kernel [C, N, H] + bias [N, H] -> [B, T, N, H], as a 2-D matmul."""
    c, n, h = dense.kernel.shape
    y = ops.matmul(ops.reshape(x, (-1, c)), ops.reshape(dense.kernel, (c, n * h)))
    if dense.bias is not None:
        y = y + ops.reshape(dense.bias, (n * h,))
    return ops.reshape(y, (ops.shape(x)[0], ops.shape(x)[1], n, h))


def _project_out(dense, x):
    """x [B, T, N, H] @ kernel [N, H, E] + bias [E] -> [B, T, E], as a 2-D matmul."""
    n, h, e = dense.kernel.shape
    y = ops.matmul(ops.reshape(x, (-1, n * h)), ops.reshape(dense.kernel, (n * h, e)))
    if dense.bias is not None:
        y = y + dense.bias
    return ops.reshape(y, (ops.shape(x)[0], ops.shape(x)[1], e))


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
        output, _ = self._compute_attention(
            _project_in(self._query_dense, query), _project_in(self._key_dense, key),
            _project_in(self._value_dense, value), None, training)
        return _project_out(self._output_dense, output)
