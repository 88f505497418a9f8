"""Images into pixels inside the tf.data graph: no Python, no GIL, and JPEGs decoded only where
the random crop looks.

A split's image is one of three things (`sources.py`): a uint8 [H, W, 3] array (digits, tests), a
tf.string of encoded bytes (TFDS with its decoding skipped), or `{"file": path}` (image folders: the
file is read only by the worker that trains on it). JPEG training crops are decoded with
`tf.image.decode_and_crop_jpeg` on a window drawn from the header's shape (as Model Garden and
big_vision do): the same window, hence the same pixels, as a full decode and a slice. Other formats
(PNG, GIF, BMP) go through `tf.io.decode_image`.
"""

from __future__ import annotations

import tensorflow as tf


def encoded(image) -> tf.Tensor | None:
    """The encoded bytes of a split's image (reading its file), or None for a decoded array."""
    if isinstance(image, dict):
        return tf.io.read_file(image["file"])
    return image if image.dtype == tf.string else None


def decode_full(image) -> tf.Tensor:
    """The whole image, uint8 [H, W, 3] (the first frame of a GIF)."""
    data = encoded(image)
    if data is None:
        return image
    pixels = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    return tf.ensure_shape(pixels, [None, None, 3])


def crop_window(shape: tf.Tensor, seed: tf.Tensor, scale, ratio) -> tuple[tf.Tensor, tf.Tensor]:
    """(offset [y, x], size [h, w]) of an Inception-style random crop of an image of `shape`.

    On `tf.image.stateless_sample_distorted_bounding_box`: Keras has no random-resized-crop layer,
    and its layers keep RNG state that a checkpoint cannot replay.
    """
    shape = tf.concat([tf.cast(shape[:2], tf.int32), [3]], 0)  # a JPEG header may say 1 or 4
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.zeros([1, 0, 4]), seed=seed, min_object_covered=0.0,
        aspect_ratio_range=tuple(ratio), area_range=tuple(scale), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return begin[:2], size[:2]


def decode_random_crop(image, seed: tf.Tensor, scale, ratio) -> tf.Tensor:
    """The random crop's pixels, uint8 [h, w, 3]; a JPEG is decoded only inside the window."""
    def sliced(pixels):
        begin, size = crop_window(tf.shape(pixels), seed, scale, ratio)
        return tf.slice(pixels, tf.concat([begin, [0]], 0), tf.concat([size, [3]], 0))

    data = encoded(image)
    if data is None:
        return sliced(image)

    def jpeg():
        begin, size = crop_window(tf.io.extract_jpeg_shape(data), seed, scale, ratio)
        return tf.image.decode_and_crop_jpeg(data, tf.concat([begin, size], 0), channels=3)

    return tf.ensure_shape(tf.cond(tf.io.is_jpeg(data), jpeg, lambda: sliced(decode_full(data))),
                           [None, None, 3])
