"""Recomputed blocks (`trainer/models/recompute.py`, `MobileViTBackbone.call`): the same
training step as keeping the activations (loss, every gradient, BatchNorm's moving statistics,
stochastic depth's draws), with the blocks really run twice, and nothing new in checkpoints."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.models import recompute
from trainer.models.head import build_classifier
from trainer.models.mobilevit import MobileViTBackbone


def _step(model, images, labels):
    """One training step's loss, gradients and the non-trainable state after it (one graph)."""
    @tf.function(autograph=False)
    def step():
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                labels, logits, from_logits=True))
        return loss, tape.gradient(loss, model.trainable_variables)

    loss, grads = step()
    return (float(loss), [g.numpy() for g in grads],
            {v.path: v.numpy() for v in model.non_trainable_variables})


@pytest.mark.parametrize("name,overrides", [
    ("mobilevit_xxs", {"drop_path_rate": 0.9}),  # stochastic depth in the replayed MV2 blocks
    ("mobilevit_xxs", {"sync_bn": True}),  # Keras' own BatchNorm path (synchronised)
    ("mobilevitv2_050", {}),
], ids=["v1-drop-path", "v1-keras-batchnorm", "v2"])
def test_a_recomputed_step_is_the_step_that_keeps_its_activations(name, overrides):
    keras.utils.set_random_seed(0)
    model = build_classifier(MobileViTBackbone.from_preset(name, **overrides), 10)
    backbone = model.get_layer(name)
    images = tf.random.uniform((4, 64, 64, 3), seed=1)
    labels = tf.constant([1, 2, 3, 4])
    start = [v.numpy() for v in model.variables]  # weights, statistics and seed states

    results = {}
    for on in (False, True):
        for v, value in zip(model.variables, start):
            v.assign(value)
        backbone.recompute = on
        results[on] = _step(model, images, labels)

    (loss, grads, state), (loss_r, grads_r, state_r) = results[False], results[True]
    assert loss_r == pytest.approx(loss, rel=1e-6)
    scale = max(float(np.abs(g).max()) for g in grads)
    # Float noise of a different order of summation (1e-5 of a depthwise kernel's gradient
    # under load); a replay that computed something else differs by its whole size.
    for var, g, g_r in zip(model.trainable_variables, grads, grads_r):
        assert np.abs(g - g_r).max() <= 1e-4 * np.abs(g).max() + 1e-6 * scale, var.path
    # The moving statistics moved once: a second update in the replay would move them 0.19 of
    # the way to the batch statistics instead of 0.1 (momentum 0.9), far outside float noise.
    moved = [p for p in state if "moving" in p and not np.allclose(state[p], 0.0) and
             not np.allclose(state[p], 1.0)]
    assert moved, "the step did not update the BatchNorm statistics"
    for path in state:
        np.testing.assert_allclose(state_r[path], state[path], rtol=1e-4, atol=1e-6,
                                   err_msg=path)


def _op_count(model, op_type: str) -> int:
    images = tf.zeros((2, 64, 64, 3))

    @tf.function(autograph=False)
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(images, training=True))
        return tape.gradient(loss, model.trainable_variables)

    graph = step.get_concrete_function().graph
    return sum(op.type == op_type for op in graph.get_operations())


def test_recomputed_blocks_run_twice_and_the_rest_once():
    """The mechanism at work: with `recompute`, the step's graph runs every convolution of the
    stem and the MobileNetV2 blocks a second time in the backward pass, the MobileViT blocks'
    and the final one's once; the functional graph and inference are untouched."""
    backbone = MobileViTBackbone.from_preset("mobilevit_xxs")
    model = build_classifier(backbone, 10)
    convs = [layer for layer in backbone.layers
             if isinstance(layer, keras.layers.Conv2D | keras.layers.DepthwiseConv2D)]
    replayed = [c for c in convs if "_vit_" not in c.name and c.name != "final_conv"]
    assert 0 < len(replayed) < len(convs)
    x = tf.random.uniform((2, 64, 64, 3), seed=2)
    inference = model(x, training=False).numpy()
    plain = _op_count(model, "Conv2D") + _op_count(model, "DepthwiseConv2dNative")
    backbone.recompute = True
    again = _op_count(model, "Conv2D") + _op_count(model, "DepthwiseConv2dNative")
    assert again - plain == len(replayed)
    np.testing.assert_array_equal(model(x, training=False).numpy(), inference)


def test_recompute_adds_nothing_to_checkpoints_and_round_trips_in_the_config(tmp_path):
    def keys(on: bool) -> list[str]:
        model = build_classifier(MobileViTBackbone.from_preset("mobilevit_xxs", recompute=on), 10)
        path = tf.train.Checkpoint(model=model).write(str(tmp_path / f"ckpt-{on}"))
        return sorted(name for name, _ in tf.train.list_variables(path))

    assert keys(True) == keys(False)
    backbone = MobileViTBackbone.from_preset("mobilevit_xxs", recompute=True)
    config = backbone.get_config()
    assert config["recompute"] is True
    assert MobileViTBackbone.from_config(config).recompute is True


def test_outside_a_recomputed_block_draws_are_fresh_and_nothing_is_replaying():
    assert not recompute.replaying()
    calls = []
    assert recompute.shared(object(), lambda: calls.append(1) or tf.constant(1.0)) == 1.0
    assert recompute.shared(object(), lambda: calls.append(1) or tf.constant(2.0)) == 2.0
    assert len(calls) == 2


def test_keras_fit_trains_a_recomputing_classifier_as_one_that_keeps():
    """The library path (README: `from_preset(name, recompute=True)` with Keras' `fit`): the
    same weights after an epoch as without recomputation."""
    images = np.random.default_rng(0).random((8, 64, 64, 3), dtype=np.float32)
    labels = np.arange(8) % 4
    weights, initial = {}, None
    for on in (False, True):
        keras.utils.set_random_seed(0)
        model = build_classifier(MobileViTBackbone.from_preset("mobilevit_xxs", recompute=on), 4)
        initial = initial or [w.numpy() for w in model.weights]
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.
                      SparseCategoricalCrossentropy(from_logits=True))
        model.fit(images, labels, batch_size=4, epochs=1, shuffle=False, verbose=0)
        weights[on] = [w.numpy() for w in model.weights]
    steps = [np.abs(w - w0).max() for w, w0 in zip(weights[False], initial)]
    assert sum(step > 0 for step in steps) > 100
    # Each weight that moved moved by the same update, to float noise (a wrong gradient or a
    # statistic updated twice: by another); updates that are zero in exact arithmetic (the key
    # bias, a BatchNorm shift before a residual) are noise of ~1e-8 and are left out.
    largest = max(steps)
    worst = max(np.abs(w_r - w).max() / step for w, w_r, step in
                zip(weights[False], weights[True], steps) if step > 1e-3 * largest)
    assert worst < 1e-2, worst
