"""The backbone against the PyTorch references (timm, transformers), and its Keras contract."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import reference as R
from helpers import ROOT

from trainer.errors import CheckpointError
from trainer.models import layers as L
from trainer.models import mobilevit as M
from trainer.models.weights import load_torch_state, read_checkpoint

SIZES = ["mobilevit_xxs", "mobilevit_xs", "mobilevit_s"]
TOL = 1e-4  # max |ours - ref| relative to the largest reference logit


def rel_err(ref: np.ndarray, ours: np.ndarray) -> float:
    return float(np.abs(ref - ours).max() / np.abs(ref).max())


@pytest.mark.parametrize("name,with_head,without_head", [
    ("mobilevit_xxs", 1_272_024, 951_024),
    ("mobilevit_xs", 2_317_848, 1_932_848),
    ("mobilevit_s", 5_578_632, 4_937_632),
])
def test_parameter_counts(name, with_head, without_head):
    backbone = M.MobileViTBackbone.from_preset(name)
    assert M.count_params(backbone) == without_head
    assert M.count_params(M.build_classifier(backbone, 1000)) == with_head


_PAIRS: dict = {}


def make_pair(name: str, fmt: str, tmp_path_factory):
    """(reference, ours, checkpoint path): ours loaded from the reference's saved state. Cached."""
    if (name, fmt) not in _PAIRS:
        ref = R.timm_model(name) if fmt == "timm" else R.hf_model(name)
        path = tmp_path_factory.mktemp("ckpt") / f"{name}-{fmt}.safetensors"
        R.save_state(ref, path)
        ours = M.build_classifier(M.MobileViTBackbone.from_preset(name), 1000)
        assert load_torch_state(ours, read_checkpoint(path)) is True  # 1000 classes: head loaded
        _PAIRS[(name, fmt)] = ref, ours, path
    return _PAIRS[(name, fmt)]


@pytest.mark.parametrize("fmt", ["timm", "hf"])
@pytest.mark.parametrize("name", SIZES)
@pytest.mark.parametrize("size", [256, 224])  # 224: the 7x7 last map is not divisible by 2
def test_parity_with_reference(name, fmt, size, tmp_path_factory):
    ref, ours, _ = make_pair(name, fmt, tmp_path_factory)
    images = R.test_images(6, size, seed=size)
    expected = R.reference_logits(ref, images, fmt)
    # The reference must tell images apart, or the arg-max check proves nothing.
    assert len(set(expected.argmax(1))) >= 3
    got = ours(images, training=False).numpy()
    assert rel_err(expected, got) < TOL
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
    features = R.reference_features(ref, images, fmt)
    from trainer.serving.savedmodel import feature_model
    assert rel_err(features, feature_model(ours)(images, training=False).numpy()) < TOL


def test_parity_bar_catches_known_bugs(monkeypatch):
    """A one-pixel shift of stride-2 padding, or a wrong unfold order, must break the bar."""
    ref = R.timm_model("mobilevit_xxs")
    ours = M.build_classifier(M.MobileViTBackbone.from_preset("mobilevit_xxs"), 1000)
    load_torch_state(ours, {k: v.numpy() for k, v in ref.state_dict().items()})
    images = R.test_images(6, 256, seed=7)
    expected = R.reference_logits(ref, images, "timm")
    assert rel_err(expected, ours(images, training=False).numpy()) < TOL

    pad = ours.get_layer("mobilevit_xxs").get_layer("stem_pad")
    pad.padding = ((0, 2), (0, 2))  # what Keras "same" does on even inputs: a one-pixel shift
    assert rel_err(expected, ours(images, training=False).numpy()) > 10 * TOL
    pad.padding = ((1, 1), (1, 1))

    def unfold_within_patches(x, patch):  # a classic mistake: the wrong axis grouping
        b, h, w, c = keras.ops.shape(x)[0], keras.ops.shape(x)[1], keras.ops.shape(x)[2], x.shape[-1]
        x = keras.ops.reshape(x, (b, h // patch, patch, w // patch, patch, c))
        x = keras.ops.transpose(x, (0, 1, 3, 2, 4, 5))
        return keras.ops.reshape(x, (b * patch * patch, (h // patch) * (w // patch), c))

    def fold_within_patches(t, h, w, patch):
        b, c = keras.ops.shape(t)[0] // (patch * patch), t.shape[-1]
        x = keras.ops.reshape(t, (b, h // patch, w // patch, patch, patch, c))
        return keras.ops.reshape(keras.ops.transpose(x, (0, 1, 3, 2, 4, 5)), (b, h, w, c))

    monkeypatch.setattr(L, "unfold_patches", unfold_within_patches)
    monkeypatch.setattr(L, "fold_patches", fold_within_patches)
    assert rel_err(expected, ours(images, training=False).numpy()) > 10 * TOL


def test_batchnorm_moves_by_keras_momentum():
    """One training step: moving = 0.9 * moving + 0.1 * batch statistic (PyTorch's 0.1)."""
    keras.utils.set_random_seed(0)
    model = M.build_classifier(M.MobileViTBackbone.from_preset("mobilevit_xxs"), 3)
    bn = model.get_layer("mobilevit_xxs").get_layer("stem_bn")
    assert bn.momentum == 0.9 and bn.epsilon == 1e-5
    images = R.test_images(4, 64, seed=1)
    before_mean, before_var = bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()
    stem = keras.Model(model.get_layer("mobilevit_xxs").input,
                       model.get_layer("mobilevit_xxs").get_layer("stem_conv").output)
    conv_out = stem(images).numpy()
    batch_mean, batch_var = conv_out.mean((0, 1, 2)), conv_out.var((0, 1, 2))
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="sparse_categorical_crossentropy")
    model.train_on_batch(images, np.array([0, 1, 2, 0]))
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.9 * before_mean + 0.1 * batch_mean,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), 0.9 * before_var + 0.1 * batch_var,
                               rtol=1e-3, atol=1e-5)


def test_keras_file_roundtrip(tmp_path):
    backbone = M.MobileViTBackbone.from_preset("mobilevit_xxs", dropout=0.1, drop_path_rate=0.1)
    model = M.build_classifier(backbone, 5, dropout=0.2)
    images = R.test_images(2, 96, seed=2)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    restored = loaded.get_layer("mobilevit_xxs")
    assert isinstance(restored, M.MobileViTBackbone)
    assert restored.get_config() == backbone.get_config()
    np.testing.assert_allclose(loaded(images, training=False), model(images, training=False),
                               atol=1e-6)


def test_silu_equals_keras_silu_in_value_and_gradient():
    """Our SiLU (x * sigmoid(x), with a gradient from sigmoid(x) and the output) against Keras'
    "silu": values and gradients to float32 rounding (a few ulps: another kernel order), eagerly
    and traced; every activation of the backbone is ours."""
    import tensorflow as tf

    x = tf.constant(np.random.default_rng(0).normal(0, 4, (4, 1000)).astype(np.float32))

    def value_and_grad(fn):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        return y, tape.gradient(y, x)

    for wrap in (lambda f: f, lambda f: tf.function(lambda t: f(t))):
        ours, ours_grad = value_and_grad(wrap(L.silu))
        theirs, theirs_grad = value_and_grad(wrap(keras.activations.silu))
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(ours_grad.numpy(), theirs_grad.numpy(), rtol=1e-6, atol=1e-7)
    model = M.MobileViTBackbone.from_preset("mobilevit_xxs")
    activations = [layer.activation for layer in model._flatten_layers()
                   if getattr(layer, "activation", None) not in (None, keras.activations.linear)]
    # 25 conv-BN-SiLU blocks and the MLPs of the 9 transformer layers
    assert len(activations) == 25 + 9 and all(a is L.silu for a in activations)


def test_silu_backward_reads_the_sigmoid_and_output_not_the_input():
    """What the custom gradient is for: the backward pass needs no copy of SiLU's input, so a
    training step keeps one activation-sized tensor fewer per SiLU (bench.profile_memory)."""
    import tensorflow as tf

    @tf.function
    def value_and_grad(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = L.silu(x)
        return y, tape.gradient(y, x, output_gradients=dy)

    spec = tf.TensorSpec([8, 16], tf.float32)
    graph = value_and_grad.get_concrete_function(spec, spec).graph
    x, dy = graph.inputs[:2]

    def upstream(tensors):  # ops the tensors depend on
        seen, stack = set(), [t.op for t in tensors]
        while stack:
            op = stack.pop()
            if op not in seen:
                seen.add(op)
                stack.extend(t.op for t in op.inputs)
        return seen

    y, grad = graph.outputs[:2]
    backward = upstream([grad]) - upstream([y])  # ops that run only for the gradient
    read = {t.op.type for op in backward for t in op.inputs if t.op not in backward}
    assert x.op not in {t.op for op in backward for t in op.inputs}
    assert read >= {"Sigmoid", "Mul"}, read  # sigmoid(x) and y = x * sigmoid(x)
    values = tf.constant(np.linspace(-20, 20, 128, dtype=np.float32).reshape(8, 16))
    out, g = value_and_grad(values, tf.ones_like(values))
    s = 1 / (1 + np.exp(-values.numpy().astype(np.float64)))
    np.testing.assert_allclose(g.numpy(), s * (1 + values.numpy() * (1 - s)), rtol=1e-5,
                               atol=1e-6)


def test_any_input_size_and_pyramid():
    backbone = M.MobileViTBackbone.from_preset("mobilevit_xxs")
    for size in (64, 100, 130):
        assert backbone(np.zeros((1, size, size, 3), "float32")).shape[-1] == 320
    strides = {k: v.shape[-1] for k, v in backbone.pyramid_outputs.items()}
    assert strides == {"P1": 16, "P2": 24, "P3": 48, "P4": 64, "P5": 320}


def test_argument_errors_show_the_value():
    with pytest.raises(ValueError, match="drop_path_rate.*1.5"):
        M.MobileViTBackbone.from_preset("mobilevit_xxs", drop_path_rate=1.5)
    with pytest.raises(ValueError, match="unknown MobileViT preset 'mobilevit_m'"):
        M.MobileViTBackbone.from_preset("mobilevit_m")


def test_strict_loading_reports_names_and_shapes(tmp_path, tmp_path_factory):
    _, ours, path = make_pair("mobilevit_xxs", "timm", tmp_path_factory)
    state = read_checkpoint(path)
    # A truncated file.
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: 10_000])
    with pytest.raises(CheckpointError, match="cannot read .*cut.safetensors"):
        read_checkpoint(cut)
    # A missing tensor and a stray one.
    broken = dict(state)
    del broken["stages.2.1.conv_1x1.weight"]
    broken["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError) as err:
        load_torch_state(ours, broken)
    assert "missing tensor 'stages.2.1.conv_1x1.weight'" in str(err.value)
    assert "unexpected tensor 'extra.weight' (3,)" in str(err.value)
    # A checkpoint of another size: shape mismatches by name.
    xs = M.build_classifier(M.MobileViTBackbone.from_preset("mobilevit_xs"), 1000)
    with pytest.raises(CheckpointError, match=r"shape mismatch for Keras layer 'stage0_mv2_0"):
        load_torch_state(xs, state)
    # A new head for another class count: backbone loads, head does not.
    small = M.build_classifier(M.MobileViTBackbone.from_preset("mobilevit_xxs"), 7)
    assert load_torch_state(small, state) is False


@pytest.mark.parametrize("name,fmt", [("mobilevit_xxs", "timm"), ("mobilevit_xs", "hf"),
                                      ("mobilevit_s", "timm"), ("mobilevitv2_050", "timm"),
                                      ("mobilevitv2_050", "hf")])
def test_convert_cli_savedmodels_match(name, fmt, tmp_path, tmp_path_factory):
    """`python -m trainer.convert`, then the SavedModels loaded without this project."""
    ref, _, path = make_pair(name, fmt, tmp_path_factory)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "trainer.convert", f"model={name}",
                    f"checkpoint={path}", f"output={out}"], check=True, env=env, capture_output=True)
    assert (out / f"{name}.weights.h5").is_file()
    images = R.test_images(4, 256, seed=11)
    np.save(tmp_path / "x.npy", images)
    script = textwrap.dedent(f"""
        import numpy as np, sys, tensorflow as tf
        assert not any(m.startswith("trainer") for m in sys.modules)
        x = tf.constant(np.load({str(tmp_path / 'x.npy')!r}))
        c = tf.saved_model.load({str(out / 'classifier')!r}).signatures["serving_default"]
        f = tf.saved_model.load({str(out / 'feature_extractor')!r}).signatures["serving_default"]
        np.save({str(tmp_path / 'logits.npy')!r}, c(images=x)["logits"].numpy())
        np.save({str(tmp_path / 'feats.npy')!r}, f(images=x)["features"].numpy())
    """)
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script], check=True, env=clean_env, cwd=tmp_path)
    logits = np.load(tmp_path / "logits.npy")
    expected = R.reference_logits(ref, images, fmt)
    assert rel_err(expected, logits) < TOL
    np.testing.assert_array_equal(logits.argmax(1), expected.argmax(1))
    assert rel_err(R.reference_features(ref, images, fmt), np.load(tmp_path / "feats.npy")) < TOL


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_float32_copy_of_a_mixed_model_is_that_model_built_in_float32(precision):
    """What exports serve: the trained weights, every layer computing in float32."""
    keras.utils.set_random_seed(3)
    reference = M.build_classifier(M.MobileViTBackbone.from_preset("mobilevit_xxs",
                                                                   drop_path_rate=0.1), 4, 0.2)
    keras.mixed_precision.set_global_policy(precision)
    try:
        mixed = M.build_classifier(M.MobileViTBackbone.from_preset("mobilevit_xxs",
                                                                   drop_path_rate=0.1), 4, 0.2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    mixed.set_weights(reference.get_weights())
    copy = M.float32_copy(mixed)
    assert copy is not mixed and M.float32_copy(reference) is reference
    assert {layer.compute_dtype for layer in copy._flatten_layers()} == {"float32"}
    assert any(layer.compute_dtype != "float32" for layer in mixed._flatten_layers())
    assert all(np.array_equal(a, b) for a, b in zip(copy.get_weights(), reference.get_weights()))
    images = R.test_images(2, 64, seed=4)
    expected = reference(images, training=False).numpy()
    got = copy(images, training=False).numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max())
    # ...whereas the 16-bit model itself is off by its rounding (the bar above can fail).
    off = np.abs(mixed(images, training=False).numpy().astype(np.float32) - expected).max()
    assert off > 1e-5 * np.abs(expected).max()
