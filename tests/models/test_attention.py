"""TokenAttention (trainer/models/attention.py) against Keras' MultiHeadAttention."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.models.attention import TokenAttention


def pair(dropout: float = 0.0, tokens: int = 9):
    """Keras' layer and ours with the same weights (random, biases included)."""
    x = np.random.default_rng(0).normal(0.5, 1.5, (6, tokens, 24)).astype("float32")
    theirs = keras.layers.MultiHeadAttention(4, 6, dropout=dropout, name="attn")
    ours = TokenAttention(4, 6, dropout=dropout, name="attn")
    theirs(x, x), ours(x, x)
    rng = np.random.default_rng(1)
    for a, b in zip(theirs.weights, ours.weights, strict=True):
        assert (a.path, a.shape) == (b.path, b.shape)  # checkpoints and weight files carry over
        value = rng.normal(0.0, 0.3, a.shape).astype("float32")
        a.assign(value), b.assign(value)
    return theirs, ours, tf.constant(x)


def forward_and_gradients(layer, x, run, training=None):
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, x, training=training)
            loss = tf.reduce_sum(tf.sin(y) * y)  # a gradient that depends on y
        return [y, *tape.gradient(loss, [x, *layer.trainable_weights])]
    return [t.numpy() for t in run(step)(x)]


@pytest.mark.parametrize("mode", ["eager", "tf.function"])
def test_token_attention_equals_keras_in_value_and_gradients(mode):
    theirs, ours, x = pair()
    run = (lambda f: f) if mode == "eager" else tf.function
    names = ["output", "input gradient"] + [w.path for w in ours.trainable_weights]
    for name, a, b in zip(names, forward_and_gradients(theirs, x, run),
                          forward_and_gradients(ours, x, run), strict=True):
        scale = np.abs(a).max()
        assert np.abs(a - b).max() <= 1e-5 * scale, f"{name}: {np.abs(a - b).max()} of {scale}"


@pytest.mark.parametrize("mode", ["eager", "tf.function"])
def test_training_with_many_tokens_recomputes_probabilities_with_keras_values_and_gradients(mode):
    """At >= RECOMPUTE_MIN_KEYS tokens in training, the backward pass computes the attention
    probabilities again (bench.profile_memory: the largest tensors a step keeps): the same
    values and gradients as Keras, and no forward softmax output read by the backward pass."""
    from trainer.models.attention import RECOMPUTE_MIN_KEYS

    theirs, ours, x = pair(tokens=RECOMPUTE_MIN_KEYS)
    run = (lambda f: f) if mode == "eager" else tf.function
    names = ["output", "input gradient"] + [w.path for w in ours.trainable_weights]
    for name, a, b in zip(names, forward_and_gradients(theirs, x, run, training=True),
                          forward_and_gradients(ours, x, run, training=True), strict=True):
        scale = np.abs(a).max()
        assert np.abs(a - b).max() <= 1e-5 * scale, f"{name}: {np.abs(a - b).max()} of {scale}"

    def softmax_read_by_gradient(layer, x):
        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(tf.square(layer(x, x, training=True)))
            return tape.gradient(loss, x)
        graph = step.get_concrete_function(x).graph
        return [c.type for op in graph.get_operations() if op.type == "Softmax"
                for c in op.outputs[0].consumers() if "gradient" in c.name.lower()
                or c.type == "SoftmaxGrad"]

    assert softmax_read_by_gradient(theirs, x)  # sanity: Keras keeps them for SoftmaxGrad
    assert softmax_read_by_gradient(ours, x) == []
    few = pair(tokens=RECOMPUTE_MIN_KEYS // 4)[2]  # fewer tokens: Keras' attention as it is
    assert softmax_read_by_gradient(ours, few)


def test_each_kernel_gradient_is_one_matmul_not_a_batched_product_summed_over_the_batch():
    """What the layer is for (#20): Keras' einsum projects [B, T, C] tokens by a batched matmul
    against the kernel broadcast over B, whose gradient is B products summed over B."""
    theirs, ours, x = pair()

    def gradient_ops(layer):
        fn = tf.function(lambda x: tf.gradients(tf.reduce_sum(layer(x, x)),
                                                layer.trainable_weights))
        return [op.type for op in fn.get_concrete_function(x).graph.get_operations()]

    keras_ops, our_ops = gradient_ops(theirs), gradient_ops(ours)
    assert keras_ops.count("BatchMatMulV2") == 12  # sanity: Keras' four projections, 3 each
    assert our_ops.count("BatchMatMulV2") == 0
    assert our_ops.count("MatMul") == 12  # four projections: forward, input and kernel gradient
    # The attention itself (scores, context) is Keras' in both: the same ops.
    assert our_ops.count("Einsum") == keras_ops.count("Einsum")
    assert our_ops.count("Sum") <= keras_ops.count("Sum") - 4  # no kernel gradient summed over B


def test_masks_and_scores_take_keras_path():
    theirs, ours, x = pair()
    mask = np.tril(np.ones((6, 9, 9), bool))
    a, scores_a = theirs(x, x, attention_mask=mask, return_attention_scores=True)
    b, scores_b = ours(x, x, attention_mask=mask, return_attention_scores=True)
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores_b.numpy(), scores_a.numpy(), rtol=1e-5, atol=1e-6)


def test_attention_dropout_in_training_and_config_round_trip():
    _, ours, x = pair(dropout=0.5)
    keras.utils.set_random_seed(0)
    dropped = ours(x, x, training=True).numpy()
    np.testing.assert_raises(AssertionError, np.testing.assert_allclose, dropped,
                             ours(x, x, training=False).numpy())
    clone = TokenAttention.from_config(ours.get_config())
    assert clone.get_config() == ours.get_config()
    assert type(keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(ours))) is TokenAttention
