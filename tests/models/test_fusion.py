"""The SavedModels' layers in the op patterns TensorFlow's CPU runtime fuses (trainer/models/fusion.py):
the same function as Keras' layers, and the ops grappler actually leaves in the served graph."""

from __future__ import annotations

import collections

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_folding import with_real_statistics

from trainer.models.folding import fold_batchnorm, leaf_layers
from trainer.models.fusion import FlatDense, FusableLayerNorm, for_onednn
from trainer.models.head import build_classifier
from trainer.models.mobilevit import MobileViTBackbone
from trainer.serving.savedmodel import frozen_forward


def grappler_ops(fn: tf.types.experimental.ConcreteFunction) -> collections.Counter:
    """Op types of `fn`'s graph after grappler's default passes, as the runtime would run it."""
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.grappler import tf_optimizer

    graph = fn.graph
    meta = tf.compat.v1.train.export_meta_graph(graph_def=graph.as_graph_def(), graph=graph)
    meta.collection_def["train_op"].node_list.value.extend([t.name for t in fn.outputs])
    optimized = tf_optimizer.OptimizeGraph(config_pb2.ConfigProto(), meta)
    nodes = list(optimized.node) + [n for f in optimized.library.function for n in f.node_def]
    return collections.Counter(n.op for n in nodes)


@pytest.mark.parametrize("shape,axis", [((3, 17, 24), -1), ((5, 24), -1), ((2, 4, 6, 24), -1),
                                        ((3, 24, 17), 1)])
def test_layernorm_is_keras_layernorm_eagerly_and_traced(shape, axis):
    """Rank 2 and 3 over the last axis take the fused pattern; other ranks and axes Keras' path."""
    x = np.random.default_rng(0).normal(2.0, 3.0, shape).astype("float32")
    ref = keras.layers.LayerNormalization(axis=axis, epsilon=1e-5)
    ours = FusableLayerNorm.from_config(ref.get_config())
    ref.build(shape), ours.build(shape)
    weights = [np.random.default_rng(1).uniform(0.5, 2.0, w.shape).astype("float32")
               for w in ref.weights]
    ref.set_weights(weights), ours.set_weights(weights)
    expected = ref(x).numpy()
    np.testing.assert_allclose(ours(x).numpy(), expected, atol=2e-5, rtol=0)
    spec = tf.TensorSpec((None,) + shape[1:], tf.float32)
    traced = tf.function(lambda t: ours(t), input_signature=[spec])
    np.testing.assert_allclose(traced(x).numpy(), expected, atol=2e-5, rtol=0)


def test_flat_dense_is_keras_dense_with_no_run_time_shape_ops():
    x = np.random.default_rng(0).normal(size=(6, 10, 8)).astype("float32")
    ref = keras.layers.Dense(12, activation="silu")
    ours = FlatDense.from_config(ref.get_config())
    ref.build(x.shape), ours.build(x.shape)
    ours.set_weights(ref.get_weights())
    np.testing.assert_allclose(ours(x).numpy(), ref(x).numpy(), atol=1e-5, rtol=0)
    spec = tf.TensorSpec([None, 10, 8], tf.float32)
    fn = tf.function(lambda t: ours(t)).get_concrete_function(spec)
    assert fn(tf.constant(x)).shape == (6, 10, 12)
    ops = grappler_ops(fn)
    assert not {"Shape", "GatherV2", "Prod", "ConcatV2"} & set(ops), ops  # tensordot's shape ops
    # A run-time middle dimension: Keras' own tensordot path.
    dynamic = tf.function(lambda t: ours(t))(tf.constant(x[:, :3]))
    np.testing.assert_allclose(dynamic.numpy(), ref(x[:, :3]).numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", ["mobilevit_xxs", "mobilevitv2_050"])
def test_served_copy_is_the_same_function_and_leaves_the_model_alone(preset):
    model = fold_batchnorm(with_real_statistics(
        build_classifier(MobileViTBackbone.from_preset(preset), 5)))
    copy = for_onednn(model)
    kinds = collections.Counter(type(layer) for layer in leaf_layers(copy))
    if preset == "mobilevit_xxs":  # 9 transformer layers x 2 + 3 blocks' final LayerNorm
        assert kinds[FusableLayerNorm] == 21 and kinds[keras.layers.LayerNormalization] == 0
    assert kinds[FlatDense] == sum(isinstance(layer, keras.layers.Dense)
                                   for layer in leaf_layers(model))
    assert not any(type(layer) in (FusableLayerNorm, FlatDense) for layer in leaf_layers(model))
    assert copy.count_params() == model.count_params()
    images = np.random.default_rng(2).random((2, 64, 64, 3), dtype=np.float32)
    expected = model(images, training=False).numpy()
    got = copy(images, training=False).numpy()
    assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-5
    assert for_onednn(copy).count_params() == copy.count_params()


def test_served_graph_runs_fused_layernorm():
    """The frozen forward the SavedModels serve: every LayerNorm one oneDNN op, no tensordot."""
    model = fold_batchnorm(with_real_statistics(
        build_classifier(MobileViTBackbone.from_preset("mobilevit_xxs"), 5)))
    forward = frozen_forward(model, 64)
    ops = grappler_ops(forward.get_concrete_function())
    assert ops["_MklLayerNorm"] == 21, ops
    assert ops["SquaredDifference"] == 0 and ops["Rsqrt"] == 0 and ops["Prod"] == 0, ops
    images = np.random.default_rng(3).random((3, 64, 64, 3), dtype=np.float32)
    expected = model(images, training=False).numpy()
    got = forward(tf.constant(images)).numpy()
    assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-5


def test_folding_and_swapping_in_one_copy_is_folding_then_swapping():
    """The export's single clone (fold_batchnorm with swaps) is the two clones it replaces."""
    from trainer.models.fusion import SWAPS

    model = with_real_statistics(build_classifier(MobileViTBackbone.from_preset("mobilevit_xxs"), 5))
    one = fold_batchnorm(model, swaps=SWAPS)
    two = for_onednn(fold_batchnorm(model))
    assert [type(x) for x in leaf_layers(one)] == [type(x) for x in leaf_layers(two)]
    assert not any(isinstance(x, keras.layers.BatchNormalization) for x in leaf_layers(one))
    for a, b in zip(one.weights, two.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    images = np.random.default_rng(4).random((2, 64, 64, 3), dtype=np.float32)
    np.testing.assert_array_equal(one(images, training=False).numpy(),
                                  two(images, training=False).numpy())
    assert fold_batchnorm(one, swaps=SWAPS) is one  # already folded and swapped: no copy
