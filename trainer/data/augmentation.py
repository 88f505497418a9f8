"""Augmentation policies from Keras' own preprocessing layers, driven by stateless seeds.

Keras' layers (RandAugment, RandomColorJitter, RandomErasing, MixUp, CutMix) draw their randomness
from a `SeedGenerator` *variable*: inside `tf.data` that state depends on how many images went
before, so a resumed run could not replay its batches. `StatelessSeed` is the one hand-written
piece: a `SeedGenerator` whose draws are functions of a per-image (or per-batch) seed tensor, which
`augment.py` derives from (run seed, epoch, position). Keras still does all the image work.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras.src.random.seed_generator import SeedGenerator

from trainer.models.mobilevit import float32_policy

VALUE_RANGE = (0.0, 1.0)  # images here are float32 RGB in [0, 1]


class _RunTimeSizes:
    """For Keras' RandomErasing and CutMix on images whose size is known only when the step runs
    (multi-scale batches): Keras multiplies float ratios by the image height and width, int32
    tensors there. Casting them to the layer's float dtype first is the whole change."""

    def _compute_crop_bounds(self, batch_size, image_length, crop_ratio, seed):
        length = self.backend.cast(image_length, self.compute_dtype)
        return super()._compute_crop_bounds(batch_size, length, crop_ratio, seed)


class RandomErasing(_RunTimeSizes, keras.layers.RandomErasing):
    pass


class CutMix(_RunTimeSizes, keras.layers.CutMix):
    def _generate_batch_mask(self, images_shape, box_corners):
        shape = list(images_shape)  # height and width as floats: the mix weight divides by them
        for axis in (self.height_axis, self.width_axis):
            shape[axis] = self.backend.cast(shape[axis], self.compute_dtype)
        return super()._generate_batch_mask(shape, box_corners)


class StatelessSeed(SeedGenerator):
    """Draw i returns fold_in(seed, i): deterministic in the seed tensor, no variable."""

    def __init__(self, seed: tf.Tensor):  # no super().__init__: it would create the variable
        self._seed, self._draws = tf.cast(seed, tf.int64), 0

    def next(self, ordered: bool = True):
        self._draws += 1
        return tf.random.experimental.stateless_fold_in(self._seed, self._draws)


def seeded_transformation(layer: keras.layers.Layer, images: tf.Tensor, seed: tf.Tensor):
    """The layer's random draws (and its sub-layers'), made from `seed`."""
    for sub in layer._flatten_layers(include_self=True):
        if hasattr(sub, "generator"):
            sub.generator = StatelessSeed(seed)  # set while tracing: bound to this seed tensor
    return layer.get_random_transformation(images, training=True)


def _run(layer: keras.layers.Layer, images: tf.Tensor, seed: tf.Tensor, labels=None):
    """Apply a Keras preprocessing layer with draws from `seed`."""
    transform = seeded_transformation(layer, images, seed)
    if isinstance(layer, keras.layers.RandAugment):
        return rand_augment(layer, images, transform)
    out = layer.transform_images(images, transform, training=True)
    if labels is None:
        return out
    return out, layer.transform_labels(labels, transform, training=True)


def rand_augment(layer: keras.layers.RandAugment, images: tf.Tensor, transform: dict):
    """Keras' RandAugment with its own draws and sub-layers, but only the chosen op computed.

    Keras runs all 11 ops for each of the N picks and keeps one with `where` (22 image ops per
    image for N=2); `switch_case` runs the chosen branch only. Same output (tested).
    """
    names, per_op = list(transform["transforms"]), transform["transforms"]
    images = tf.cast(images, layer.compute_dtype)
    for i in range(layer.num_ops):
        branches = [lambda name=name, x=images: tf.cast(
            getattr(layer, name).transform_images(x, per_op[name]), layer.compute_dtype)
            for name in names]
        images = tf.switch_case(tf.cast(transform["layer_idxes"][i], tf.int32), branches)
    return images


class ImagePolicy:
    """Per-image colour jitter, RandAugment and random erasing, as configured (any may be off)."""

    def __init__(self, aug_cfg):
        # The input pipeline is not the model: its layers compute in float32 whatever the model's
        # precision (under mixed_float16 Keras' image ops would build float16 `Range`s, which
        # TensorFlow has no kernel for). RandAugment makes its sub-layers itself: a policy scope.
        with float32_policy():
            self.layers = self._make(aug_cfg)

    @staticmethod
    def _make(aug_cfg) -> list[keras.layers.Layer]:
        cj, layers = aug_cfg.color_jitter, []
        if cj > 0:
            # Saturation x m with m in [1 - cj, 1 + cj]: Keras' factor f maps to m = f / (1 - f).
            layers.append(keras.layers.RandomColorJitter(
                value_range=VALUE_RANGE, brightness_factor=cj / 2, contrast_factor=cj,
                saturation_factor=((1 - cj) / (2 - cj), (1 + cj) / (2 + cj))))
        if aug_cfg.randaugment_ops:
            layers.append(keras.layers.RandAugment(
                value_range=VALUE_RANGE, num_ops=aug_cfg.randaugment_ops,
                factor=aug_cfg.randaugment_magnitude / 10.0))  # timm's M is on a 0..10 scale
        if aug_cfg.erasing_prob > 0:
            p = aug_cfg.erasing_prob
            layers.append(RandomErasing(factor=(p, p), value_range=VALUE_RANGE))
        return layers

    def __call__(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """image [H, W, 3] float32 in [0, 1] -> same shape, dtype and range."""
        if not self.layers:
            return image
        batch = image[None]  # some Keras layers return a batch for a single image
        for i, layer in enumerate(self.layers):
            batch = _run(layer, batch, tf.random.experimental.stateless_fold_in(seed, 7 + i))
        return tf.clip_by_value(tf.cast(batch[0], tf.float32), *VALUE_RANGE)


class BatchMix:
    """Mixup or cutmix of a whole batch, with the soft labels to match (Keras' layers)."""

    def __init__(self, aug_cfg, num_classes: int):
        self.num_classes = num_classes
        with float32_policy():  # as ImagePolicy's
            self.mixup = (keras.layers.MixUp(alpha=aug_cfg.mixup_alpha)
                          if aug_cfg.mixup_alpha > 0 else None)
            self.cutmix = (CutMix(factor=(aug_cfg.cutmix_alpha,) * 2)
                           if aug_cfg.cutmix_alpha > 0 else None)
        self.mix_prob, self.switch_prob = aug_cfg.mix_prob, aug_cfg.switch_prob

    @property
    def enabled(self) -> bool:
        return self.mixup is not None or self.cutmix is not None

    def __call__(self, images: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor):
        """images [B, H, W, 3], int labels [B] -> mixed images, soft labels [B, classes]."""
        onehot = tf.one_hot(tf.cast(labels, tf.int32), self.num_classes)
        u = tf.random.stateless_uniform([2], seed)
        options = [m for m in (self.mixup, self.cutmix) if m is not None]
        mixed = [_run(m, images, tf.random.experimental.stateless_fold_in(seed, 11 + i), onehot)
                 for i, m in enumerate(options)]
        if len(mixed) == 2:  # cutmix with probability switch_prob, else mixup
            use_cut = u[1] < self.switch_prob
            mixed = [(tf.where(use_cut, mixed[1][0], mixed[0][0]),
                      tf.where(use_cut, mixed[1][1], mixed[0][1]))]
        out_images, out_labels = mixed[0]
        apply = u[0] < self.mix_prob
        return (tf.where(apply, tf.cast(out_images, tf.float32), images),
                tf.where(apply, tf.cast(out_labels, tf.float32), onehot))
