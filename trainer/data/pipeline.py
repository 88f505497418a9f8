"""Train / eval preprocessing and the tf.data pipelines that apply them.

Every random op is *stateless*, seeded by (run seed, epoch, example position): the same seed gives
the same images, and a resumed run replays exactly. The evaluation preprocessing is the one the
exported SavedModels run inside their graph (`models/preprocessing.py`).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from trainer.data.augmentation import BatchMix, ImagePolicy
from trainer.models.preprocessing import eval_preprocess, to_float


def random_resized_crop(image: tf.Tensor, size: int, scale, ratio, seed: tf.Tensor) -> tf.Tensor:
    """Inception-style crop of a random area and aspect ratio, resized to size x size.

    Hand-written on `tf.image.stateless_sample_distorted_bounding_box`: Keras has no
    random-resized-crop layer, and its layers keep RNG state that a checkpoint cannot replay.
    """
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.zeros([1, 0, 4]), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=tuple(ratio), area_range=tuple(scale),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, begin, crop_size)
    image = tf.image.resize(to_float(image), (size, size), "bilinear", antialias=True)
    return tf.clip_by_value(image, 0.0, 1.0)


def interpolation(data_cfg) -> str:
    """The evaluation resize of a data config (bilinear in runs made before it was a key)."""
    return str(data_cfg.get("interpolation", "bilinear"))


def train_preprocess(image: tf.Tensor, seed: tf.Tensor, data_cfg, aug_cfg,
                     policy: ImagePolicy | None = None, size=None) -> tf.Tensor:
    """uint8 image -> float32 [size, size, 3] in [0, 1]: crop, flip, then the image policy.

    `size` (default data.image_size) may be a tensor: multi-scale batches choose it per batch.
    """
    size = data_cfg.image_size if size is None else size
    if aug_cfg.random_resized_crop:
        image = random_resized_crop(image, size, aug_cfg.scale, aug_cfg.ratio, seed)
    else:
        image = eval_preprocess(image, size, data_cfg.crop_pct, interpolation(data_cfg))
    static = size if isinstance(size, int) else None
    image = tf.ensure_shape(image, [static, static, 3])  # Keras' colour ops need the channels
    if aug_cfg.hflip:
        image = tf.image.stateless_random_flip_left_right(image, seed + 1)
    policy = policy or ImagePolicy(aug_cfg)
    return policy(image, seed)


def multiscale_plan(sizes, base_size: int, batch_size: int, seed: int, epoch: int,
                    batches: int = 64, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(size, batch) of each of `batches` batches, repeated cyclically: sizes drawn from
    `sizes` by (seed, epoch); batch x (base / size)^2 keeps pixels per batch about constant
    (ml-cvnets' variable batch sampler), rounded down to a multiple of the replica count."""
    rng = np.random.default_rng([seed, epoch, 7])
    chosen = rng.choice(np.asarray(sizes, np.int64), batches)
    counts = np.maximum(batch_size * (base_size / chosen) ** 2 // multiple, 1) * multiple
    return chosen, counts.astype(np.int64)


def train_pipeline(ds: tf.data.Dataset, data_cfg, aug_cfg, batch_size: int, seed: int,
                   epoch: int = 0, skip_batches: int = 0, num_classes: int | None = None,
                   replicas: int = 1) -> tf.data.Dataset:
    """One epoch's augmented data in global batches (a strategy splits them), endless.

    The order and every random op are functions of (seed, epoch, position) alone, so a run
    resumed at batch `skip_batches` of `epoch` sees exactly what an uninterrupted run sees.
    With mixup / cutmix the labels are soft, [batch, num_classes]. With `aug.multiscale_sizes`
    batches come at several resolutions and sizes (see `multiscale_plan`).
    """
    policy, mix = ImagePolicy(aug_cfg), BatchMix(aug_cfg, num_classes or 1)
    if mix.enabled and not num_classes:
        raise ValueError("mixup / cutmix need num_classes for their soft labels")
    multiscale = bool(aug_cfg.multiscale_sizes)
    if multiscale:
        plan_sizes, plan_counts = multiscale_plan(aug_cfg.multiscale_sizes, data_cfg.image_size,
                                                  batch_size, seed, epoch, multiple=replicas)
    else:
        plan_sizes, plan_counts = np.array([data_cfg.image_size]), np.array([batch_size])
    n, period = len(plan_counts), int(plan_counts.sum())  # the plan repeats every n batches
    ends = tf.constant(np.cumsum(plan_counts))  # example index where each planned batch ends
    sizes, counts = tf.constant(plan_sizes), tf.constant(plan_counts)
    start = skip_batches // n * period + int(plan_counts[:skip_batches % n].sum())
    ds = ds.shuffle(data_cfg.shuffle_buffer, seed=seed * 100_003 + epoch,
                    reshuffle_each_iteration=False).repeat()
    ds = ds.enumerate().skip(start)  # skip before decoding-heavy work

    def prepare(index, example):
        image, label = example
        seed_pair = tf.stack([tf.constant(seed, tf.int64), epoch * (1 << 32) + index])
        within = tf.searchsorted(ends, [index % period], side="right", out_type=tf.int64)[0]
        batch = index // period * n + within
        size = sizes[batch % n] if multiscale else None
        image = train_preprocess(image, seed_pair, data_cfg, aug_cfg, policy, size)
        return image, label, seed_pair, batch

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if multiscale:  # the consecutive examples of one planned batch -> that batch
        ds = ds.group_by_window(key_func=lambda image, label, s, batch: batch,
                                reduce_func=lambda key, window: window.batch(counts[key % n]),
                                window_size_func=lambda key: counts[key % n])
    else:
        ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(lambda images, labels, seeds, batch: (images, labels, seeds))
    if mix.enabled:  # seeded by the batch's first example: replayable like the rest
        ds = ds.map(lambda images, labels, seeds: mix(images, labels, seeds[0] + 3),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        ds = ds.map(lambda images, labels, seeds: (images, labels))
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_shard_by_data())


def _shard_by_data() -> tf.data.Options:
    """Multi-worker input: every worker runs the same deterministic pipeline and keeps its share
    of each global batch, so each example is seen once per epoch. (Sharding by file would give
    workers different example positions, and with them different augmentation seeds.)"""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def eval_pipeline(ds: tf.data.Dataset, data_cfg, batch_size: int) -> tf.data.Dataset:
    """Every example once, in order, with the evaluation preprocessing."""
    size, crop_pct, method = data_cfg.image_size, data_cfg.crop_pct, interpolation(data_cfg)
    ds = ds.map(lambda image, label: (eval_preprocess(image, size, crop_pct, method), label),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE).with_options(_shard_by_data())
