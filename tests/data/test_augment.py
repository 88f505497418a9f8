"""Augmentation ops, eagerly and inside tf.data: shape, dtype, range, seeds, soft labels."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from helpers import tiny_cfg

from trainer.data import pipeline as augment
from trainer.data.augmentation import BatchMix, ImagePolicy

SIZE = 32
IMAGE_OPS = {  # one op at a time on top of aug=none, then the composed policies
    "color_jitter": ["aug.color_jitter=0.4"],
    "randaugment": ["aug.randaugment_ops=2", "aug.randaugment_magnitude=9"],
    "erasing": ["aug.erasing_prob=1.0"],
    "randaugment_policy": ["aug=randaugment"],
    "strong_policy": ["aug=strong"],
}


def image(seed: int) -> tf.Tensor:
    return tf.random.stateless_uniform([SIZE, SIZE, 3], [seed, 1])


@pytest.mark.parametrize("op", sorted(IMAGE_OPS))
def test_image_op_eager_equals_tf_data(op):
    cfg = tiny_cfg(*(["aug=none"] if "policy" not in op else []), *IMAGE_OPS[op])
    policy = ImagePolicy(cfg.aug)
    seeds = [tf.constant([5, i], tf.int64) for i in range(4)]
    eager = [policy(image(i), s).numpy() for i, s in enumerate(seeds)]
    ds = tf.data.Dataset.range(4).map(
        lambda i: policy(tf.random.stateless_uniform([SIZE, SIZE, 3], tf.stack([i, 1])),
                         tf.stack([tf.constant(5, tf.int64), i])),
        num_parallel_calls=4, deterministic=True)
    graph = [x.numpy() for x in ds]
    for e, g, i in zip(eager, graph, range(4)):
        assert e.shape == (SIZE, SIZE, 3) and e.dtype == g.dtype == np.float32
        assert e.min() >= 0.0 and e.max() <= 1.0
        np.testing.assert_allclose(e, g, atol=1e-5)
    # The op does something, and a different seed does something else.
    assert any(np.abs(e - image(i).numpy()).max() > 1e-3 for i, e in enumerate(eager))
    other = policy(image(0), seeds[1]).numpy()
    assert np.abs(policy(image(0), seeds[0]).numpy() - other).max() > 1e-3
    np.testing.assert_array_equal(policy(image(0), seeds[0]), eager[0])  # same seed, same image


@pytest.mark.parametrize("aug", ["basic", "none"])
def test_crop_flip_and_eval_resize_eager_equals_tf_data(aug):
    """Random resized crop + flip (aug=basic), the eval resize / centre crop (aug=none)."""
    cfg = tiny_cfg(f"aug={aug}")
    raw = [tf.cast(tf.random.stateless_uniform([40 + 8 * i, 48, 3], [i, 2], maxval=256), tf.uint8)
           for i in range(3)]

    def op(image, i):
        return augment.train_preprocess(image, tf.stack([tf.constant(5, tf.int64), i]),
                                        cfg.data, cfg.aug)

    eager = [op(image, tf.constant(i, tf.int64)).numpy() for i, image in enumerate(raw)]
    ds = tf.data.Dataset.from_generator(lambda: iter(raw), output_signature=tf.TensorSpec(
        [None, None, 3], tf.uint8)).enumerate().map(lambda i, image: op(image, i))
    for e, g in zip(eager, ds):
        assert e.shape == (SIZE, SIZE, 3) and e.dtype == np.float32
        assert e.min() >= 0.0 and e.max() <= 1.0
        np.testing.assert_allclose(e, g.numpy(), atol=1e-5)
    second = op(raw[0], tf.constant(1, tf.int64)).numpy()  # another seed
    if aug == "basic":
        assert np.abs(second - eager[0]).max() > 1e-3
    else:  # deterministic: the evaluation preprocessing, whatever the seed
        np.testing.assert_array_equal(second, eager[0])
        expected = augment.eval_preprocess(raw[0], SIZE, cfg.data.crop_pct)
        np.testing.assert_allclose(eager[0], expected, atol=1e-6)


@pytest.mark.parametrize("mix", [["aug.mixup_alpha=0.8"], ["aug.cutmix_alpha=1.0"],
                                 ["aug.mixup_alpha=0.8", "aug.cutmix_alpha=1.0"]])
def test_batch_mix_soft_labels_sum_to_one(mix):
    cfg = tiny_cfg("aug=none", *mix)
    mixer = BatchMix(cfg.aug, num_classes=5)
    images = tf.random.stateless_uniform([8, SIZE, SIZE, 3], [1, 2])
    labels = tf.constant([0, 1, 2, 3, 4, 0, 1, 2], tf.int64)
    eager = [mixer(images, labels, tf.constant([9, s], tf.int64)) for s in range(3)]
    ds = tf.data.Dataset.from_tensors((images, labels)).repeat(3).enumerate().map(
        lambda s, b: mixer(b[0], b[1], tf.stack([tf.constant(9, tf.int64), s])))
    for (e_img, e_lab), (g_img, g_lab) in zip(eager, ds):
        assert e_img.shape == images.shape and e_img.dtype == tf.float32
        assert e_lab.shape == (8, 5) and e_lab.dtype == tf.float32
        np.testing.assert_allclose(tf.reduce_sum(e_lab, -1), 1.0, atol=1e-5)
        assert float(tf.reduce_min(e_img)) >= 0.0 and float(tf.reduce_max(e_img)) <= 1.0
        np.testing.assert_allclose(e_img, g_img, atol=1e-5)
        np.testing.assert_allclose(e_lab, g_lab, atol=1e-6)
    # Mixed: labels are soft (not one-hot) and images changed.
    assert any(float(tf.reduce_min(tf.reduce_max(lab, -1))) < 0.99 for _, lab in eager)
    assert any(float(tf.reduce_max(tf.abs(img - images))) > 1e-3 for img, _ in eager)


def test_train_pipeline_strong_replays_and_yields_soft_labels():
    cfg = tiny_cfg("aug=strong")
    ds = tf.data.Dataset.from_tensor_slices((
        tf.cast(tf.random.stateless_uniform([24, 40, 48, 3], [3, 4], maxval=255), tf.uint8),
        tf.range(24, dtype=tf.int64) % 3))
    first = list(augment.train_pipeline(ds, cfg.data, cfg.aug, 8, seed=1, num_classes=3).take(3))
    again = list(augment.train_pipeline(ds, cfg.data, cfg.aug, 8, seed=1, num_classes=3).take(3))
    resumed = list(augment.train_pipeline(ds, cfg.data, cfg.aug, 8, seed=1, num_classes=3,
                                          skip_batches=2).take(1))
    for (a_img, a_lab), (b_img, b_lab) in zip(first, again):
        assert a_img.shape == (8, SIZE, SIZE, 3) and a_lab.shape == (8, 3)
        np.testing.assert_array_equal(a_img, b_img)
        np.testing.assert_array_equal(a_lab, b_lab)
    np.testing.assert_array_equal(resumed[0][0], first[2][0])  # a resumed run replays batch 2
    np.testing.assert_array_equal(resumed[0][1], first[2][1])


def test_multiscale_batches_keep_pixels_per_batch_and_train(tmp_path):
    """Batches at 16/24/32 px with 32/14/8 images (pixels per batch ~constant), replayable on
    resume, and the training step takes them all."""
    import keras

    from trainer.models.head import build_classifier
    from trainer.models.mobilevit import MobileViTBackbone
    from trainer.training.loop import Loop

    cfg = tiny_cfg("aug=basic", "aug.multiscale_sizes=[16,24,32]")
    ds = tf.data.Dataset.from_tensor_slices((
        tf.cast(tf.random.stateless_uniform([64, 40, 40, 3], [3, 4], maxval=255), tf.uint8),
        tf.range(64, dtype=tf.int64) % 3))
    batches = list(augment.train_pipeline(ds, cfg.data, cfg.aug, 8, seed=1).take(6))
    plan = augment.multiscale_plan([16, 24, 32], 32, 8, seed=1, epoch=0)
    shapes = [tuple(images.shape) for images, _ in batches]
    assert shapes == [(int(c), int(s), int(s), 3) for s, c in zip(*plan)][:6]
    assert {s: c for s, c in zip(*plan)} == {16: 32, 24: 14, 32: 8}
    assert len({shape[1] for shape in shapes}) > 1  # several resolutions in six batches
    pixels = [shape[0] * shape[1] ** 2 for shape in shapes]
    assert max(pixels) / min(pixels) < 1.05
    resumed = next(iter(augment.train_pipeline(ds, cfg.data, cfg.aug, 8, seed=1,
                                               skip_batches=4)))
    np.testing.assert_array_equal(resumed[0], batches[4][0])

    model = build_classifier(MobileViTBackbone.from_preset("mobilevit_xxs"), 3)
    optimizer = keras.optimizers.AdamW(1e-3)
    loop = Loop(tf.distribute.get_strategy(), model, optimizer, 3, 8)
    iterator = iter(augment.train_pipeline(ds, cfg.data, cfg.aug, 8, seed=1))
    losses = [float(loop.train_step(iterator)["loss"]) for _ in range(4)]
    assert int(optimizer.iterations.numpy()) == 4 and np.isfinite(losses).all()


def test_rand_augment_runs_only_the_chosen_op_with_keras_output():
    """Our switch_case RandAugment == Keras' own where-chain, for the same draws."""
    import keras

    from trainer.data.augmentation import rand_augment, seeded_transformation

    layer = keras.layers.RandAugment(value_range=(0, 1), num_ops=2, factor=0.9)
    images = tf.random.stateless_uniform([1, SIZE, SIZE, 3], [4, 2])
    for s in range(6):
        seed = tf.constant([3, s], tf.int64)
        ours = rand_augment(layer, images, seeded_transformation(layer, images, seed))
        keras_own = layer.transform_images(images, seeded_transformation(layer, images, seed))
        np.testing.assert_allclose(ours, keras_own, atol=1e-6)


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_augmentation_computes_in_float32_under_a_mixed_model_policy(precision):
    """The pipeline is not the model: same images and labels as under float32, in float32."""
    import keras

    cfg = tiny_cfg("aug=strong", "aug.color_jitter=0.4")
    images, labels = tf.stack([image(i) for i in range(4)]), tf.constant([0, 1, 2, 1])
    seed = tf.constant([5, 6], tf.int64)

    def run():
        policy, mix = ImagePolicy(cfg.aug), BatchMix(cfg.aug, 3)
        one = tf.stack([policy(images[i], seed + i) for i in range(4)])
        return (one, *mix(one, labels, seed))

    expected = run()
    keras.mixed_precision.set_global_policy(precision)
    try:
        got = run()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    for e, g in zip(expected, got):
        assert g.dtype == tf.float32
        np.testing.assert_array_equal(e.numpy(), g.numpy())


def test_erasing_and_cutmix_work_on_sizes_known_only_at_run_time():
    """Multi-scale batches: the same seed gives the same result as with a static size."""
    cfg = tiny_cfg("aug=none", "aug.erasing_prob=1.0", "aug.cutmix_alpha=1.0", "aug.mix_prob=1.0")
    policy, mix = ImagePolicy(cfg.aug), BatchMix(cfg.aug, 3)
    images, labels = tf.random.stateless_uniform([4, 24, 40, 3], [1, 2]), tf.constant([0, 1, 2, 1])
    seed = tf.constant([3, 4], tf.int64)

    def erase_and_mix(batch):
        erased = tf.stack([policy(batch[i], seed + i) for i in range(4)])
        return (erased, *mix(erased, labels, seed))

    dynamic = tf.function(erase_and_mix, input_signature=[
        tf.TensorSpec([4, None, None, 3], tf.float32)])(images)
    static = tf.function(erase_and_mix)(images)
    for d, s in zip(dynamic, static):
        np.testing.assert_allclose(d.numpy(), s.numpy(), atol=1e-6)
    assert np.abs(dynamic[0].numpy() - images.numpy()).max() > 0.1  # something was erased
    soft = dynamic[2].numpy()
    np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-6)
    assert (soft.max(1) < 1.0).sum() >= 3  # cutmix mixed the labels (of differing classes)


def test_eval_resize_takes_a_per_batch_size_tensor():
    """aug=none with multi-scale: the size comes as an int64 tensor chosen per batch."""
    raw = tf.cast(tf.random.stateless_uniform([40, 56, 3], [1, 1]) * 255, tf.uint8)
    expected = augment.eval_preprocess(raw, 24, 0.9).numpy()
    eager = augment.eval_preprocess(raw, tf.constant(24, tf.int64), 0.9).numpy()
    graph = tf.function(lambda image, size: augment.eval_preprocess(image, size, 0.9))(
        raw, tf.constant(24, tf.int64)).numpy()
    assert eager.shape == (24, 24, 3)
    np.testing.assert_array_equal(eager, expected)
    np.testing.assert_allclose(graph, expected, atol=1e-5)  # as eager vs tf.data above
