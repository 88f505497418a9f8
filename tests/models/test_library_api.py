"""The backbone as a Keras library (`from trainer import ...`), used the way TF Hub users used
`mobilevit_*_1k_256[_fe]`: from_preset with weights, a new head, compile / fit, save / load,
freezing, MirroredStrategy. (A finished run through `load_run`: tests/serving/test_export.py.)"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import reference as R
from helpers import fake_hub_cache, run_python

import trainer
from trainer.errors import CheckpointError
from trainer.models.mobilevit import count_params

# timm 1.0.31 / transformers 5.23 (random init): with the 1000-class head / without it.
PARAMS = {"mobilevit_xxs": (1_272_024, 951_024), "mobilevit_xs": (2_317_848, 1_932_848),
          "mobilevit_s": (5_578_632, 4_937_632),
          "mobilevitv2_050": (1_370_593, 1_113_593), "mobilevitv2_075": (2_866_009, 2_481_009),
          "mobilevitv2_100": (4_901_841, 4_388_841), "mobilevitv2_125": (7_478_089, 6_837_089),
          "mobilevitv2_150": (10_594_753, 9_825_753),
          "mobilevitv2_175": (14_251_833, 13_354_833),
          "mobilevitv2_200": (18_449_329, 17_424_329)}


def digits_32(n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as 32x32 RGB floats in [0, 1] (nearest-neighbour upscaled)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.repeat(np.repeat(digits.images / 16.0, 4, axis=1), 4, axis=2)
    images = np.repeat(images[..., None], 3, axis=-1).astype("float32")
    return images[:n], digits.target[:n]


def test_every_preset_builds_from_the_top_level_with_exact_parameter_counts():
    assert set(trainer.PRESETS) == set(PARAMS)
    for name, (with_head, without_head) in PARAMS.items():
        assert count_params(trainer.MobileViTBackbone.from_preset(name)) == without_head
        assert count_params(trainer.MobileViTClassifier.from_preset(name)) == with_head
        five = trainer.MobileViTClassifier.from_preset(name, num_classes=5)
        features = five.backbone.feature_channels
        assert count_params(five) == without_head + features * 5 + 5


def test_tf_hub_fine_tuning_flow_rewritten_on_the_library(timm_xxs, tmp_path):
    """What people wrote with TF Hub, now on this library:

        backbone = hub.KerasLayer(".../mobilevit_xxs_1k_256_fe", trainable=True)
        model = keras.Sequential([backbone, keras.layers.Dense(10)])
        model.compile(...); model.fit(...); model.save(...)
    """
    ref, checkpoint = timm_xxs
    images, labels = digits_32()

    # --- the user's script -----------------------------------------------------------------
    model = trainer.MobileViTClassifier.from_preset("mobilevit_xxs", weights=str(checkpoint),
                                                    num_classes=10)
    model.compile(optimizer=keras.optimizers.AdamW(2e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    history = model.fit(images, labels, batch_size=32, epochs=1, verbose=0)
    model.save(tmp_path / "digits.keras")
    reloaded = keras.models.load_model(tmp_path / "digits.keras")
    # -----------------------------------------------------------------------------------------

    assert isinstance(reloaded, trainer.MobileViTClassifier)
    assert reloaded.get_config()["backbone"] == model.get_config()["backbone"]
    np.testing.assert_array_equal(reloaded.predict(images[:64], verbose=0),
                                  model.predict(images[:64], verbose=0))
    assert history.history["accuracy"][-1] > 0.3  # 10 classes: chance is 0.1

    # In a new process, as a notebook would: importing the class registers what load_model needs.
    np.save(tmp_path / "x.npy", images[:64])
    code = f"""
        import keras, numpy as np
        from trainer import MobileViTClassifier
        model = keras.models.load_model({str(tmp_path / 'digits.keras')!r})
        assert isinstance(model, MobileViTClassifier)
        np.save({str(tmp_path / 'y.npy')!r}, model.predict(np.load({str(tmp_path / 'x.npy')!r})))
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), model.predict(images[:64], verbose=0))


def test_weights_reach_the_backbone_and_the_head_is_new_unless_1000_classes(timm_xxs):
    """The backbone computes timm's features; a 1000-class classifier timm's logits."""
    ref, checkpoint = timm_xxs
    images = R.test_images(3, 96, seed=4)
    backbone = trainer.MobileViTBackbone.from_preset("mobilevit_xxs", weights=str(checkpoint))
    pooled = keras.Sequential([backbone, keras.layers.GlobalAveragePooling2D()])  # the "_fe" model
    expected = R.reference_features(ref, images, "timm")
    got = pooled(images, training=False).numpy()
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4

    full = trainer.MobileViTClassifier.from_preset("mobilevit_xxs", weights=str(checkpoint))
    logits = R.reference_logits(ref, images, "timm")
    got = full(images, training=False).numpy()
    assert np.abs(got - logits).max() / np.abs(logits).max() < 1e-4
    assert (got.argmax(1) == logits.argmax(1)).all()

    new = trainer.MobileViTClassifier.from_preset("mobilevit_xxs", weights=str(checkpoint),
                                                  num_classes=5)
    np.testing.assert_array_equal(new.backbone.get_weights()[0], full.backbone.get_weights()[0])
    np.testing.assert_array_equal(new.get_layer("head").bias.numpy(), np.zeros(5))

    maps = keras.Model(backbone.input, backbone.pyramid_outputs)(images)  # dense tasks
    assert {k: v.shape[1] for k, v in maps.items()} == {"P1": 48, "P2": 24, "P3": 12, "P4": 6,
                                                        "P5": 3}


def test_preprocessor_in_front_takes_raw_uint8_images_of_any_size():
    preprocessor = trainer.MobileViTPreprocessor.from_preset("mobilevit_xs")
    assert (preprocessor.image_size, preprocessor.crop_pct, preprocessor.interpolation) == (
        256, 0.9, "bicubic")  # timm's pretrained configuration of these weights
    raw = np.random.default_rng(0).integers(0, 256, (2, 300, 410, 3), dtype=np.uint8)
    out = preprocessor(raw).numpy()
    assert out.shape == (2, 256, 256, 3) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0

    model = trainer.MobileViTClassifier.from_preset("mobilevit_xxs", num_classes=3,
                                                    preprocessing=True)
    assert model.input.dtype == "uint8"
    assert model.preprocessor.get_config() == {
        **trainer.MobileViTPreprocessor.from_preset("mobilevit_xxs").get_config(),
        "name": model.preprocessor.name}
    after = keras.Sequential([model.backbone, keras.layers.GlobalAveragePooling2D(),
                              model.get_layer("head")])
    np.testing.assert_allclose(model.predict(raw, verbose=0),
                               after.predict(model.preprocessor(raw), verbose=0),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="crop_pct.*1.5"):
        trainer.MobileViTPreprocessor(224, crop_pct=1.5)


def test_freezing_the_backbone_as_keras_documents_it():
    """`backbone.trainable = False`: its weights and BatchNorm statistics stay (BN runs in
    inference mode), only the head trains."""
    model = trainer.MobileViTClassifier.from_preset("mobilevit_xxs", num_classes=4)
    model.backbone.trainable = False
    before = [w.numpy().copy() for w in model.backbone.weights]
    head_before = model.get_layer("head").kernel.numpy().copy()
    images, labels = digits_32(32)
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(images, labels % 4, batch_size=16, epochs=1, verbose=0)
    assert len(model.trainable_weights) == 2  # the head's kernel and bias
    for w, b in zip(model.backbone.weights, before):
        np.testing.assert_array_equal(w.numpy(), b, err_msg=w.path)
    assert not np.array_equal(model.get_layer("head").kernel.numpy(), head_before)


def test_weights_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint file not found: .*nope.safetensors"):
        trainer.MobileViTBackbone.from_preset("mobilevit_xxs",
                                              weights=str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match="unknown MobileViT preset 'mobilevit_m'; allowed: "):
        trainer.MobileViTClassifier.from_preset("mobilevit_m")
    with pytest.raises(ValueError, match="num_classes.*0"):
        trainer.MobileViTClassifier.from_preset("mobilevit_xxs", num_classes=0)
    with pytest.raises(CheckpointError, match="is not a finished run directory"):
        trainer.load_run(tmp_path)


def test_imagenet_weights_through_the_hugging_face_cache(timm_xxs, tmp_path):
    """`weights="imagenet"`: timm/mobilevit_xxs.cvnets_in1k from the Hub cache (offline here)."""
    ref, checkpoint = timm_xxs
    hub = fake_hub_cache(tmp_path / "hub", checkpoint)
    images = R.test_images(2, 64, seed=6)
    np.save(tmp_path / "x.npy", images)
    code = f"""
        import numpy as np
        from trainer import MobileViTClassifier
        m = MobileViTClassifier.from_preset("mobilevit_xxs", weights="imagenet")
        np.save({str(tmp_path / 'out.npy')!r}, m(np.load({str(tmp_path / 'x.npy')!r})).numpy())
    """
    result = run_python(code, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub),
                               "MOBILEVIT_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    expected = R.reference_logits(ref, images, "timm")
    got = np.load(tmp_path / "out.npy")
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4


def test_compile_and_fit_under_mirrored_strategy(tmp_path):
    """Two logical CPU replicas (as two GPUs would be), the Keras way: scope, build, fit."""
    code = """
        import numpy as np, tensorflow as tf, keras
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from trainer import MobileViTClassifier
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            model = MobileViTClassifier.from_preset("mobilevit_xxs", num_classes=3)
            model.compile(optimizer="adamw", metrics=["accuracy"],
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        rng = np.random.default_rng(0)
        x, y = rng.random((32, 32, 32, 3), dtype=np.float32), rng.integers(0, 3, 32)
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        print("replicas", strategy.num_replicas_in_sync, "losses", history.history["loss"])
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("replicas 2 losses")
    losses = json.loads(line.split("losses", 1)[1])
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_model_export_writes_a_savedmodel_that_serves_the_same(tmp_path):
    """`model.export(path)`, as Keras documents it: a SavedModel with the model's outputs."""
    import tensorflow as tf

    model = trainer.MobileViTClassifier.from_preset("mobilevit_xxs", num_classes=4,
                                                    preprocessing=True)
    raw = np.random.default_rng(1).integers(0, 256, (2, 200, 300, 3), dtype=np.uint8)
    model.export(str(tmp_path / "saved"), verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "saved"))  # kept: it owns the variables
    served = loaded.serve(tf.constant(raw)).numpy()
    np.testing.assert_allclose(served, model.predict(raw, verbose=0), rtol=1e-5, atol=1e-5)
