"""In-graph decoding: the fused JPEG decode-and-crop gives the pixels of a full decode and a slice
(inside the window; see below), eagerly and inside tf.data, for every format the pipeline decodes
itself."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from helpers import tiny_cfg

from trainer.data import decode
from trainer.data.pipeline import train_preprocess

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def encoded(fmt: str, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((120, 90), Image.BICUBIC)
    if fmt == "GIF":
        image = image.convert("P")
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def reference_crop(data: bytes, seed) -> np.ndarray:
    """Full decode, then the same window sliced out in NumPy."""
    full = decode.decode_full(tf.constant(data)).numpy()
    begin, size = (t.numpy() for t in decode.crop_window(tf.shape(full), seed, SCALE, RATIO))
    return full[begin[0]:begin[0] + size[0], begin[1]:begin[1] + size[1]]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP"])
def test_fused_crop_equals_full_decode_then_slice_eagerly_and_in_tf_data(fmt):
    data = encoded(fmt)
    seeds = [tf.constant([7, i], tf.int64) for i in range(6)]
    eager = [decode.decode_random_crop(tf.constant(data), s, SCALE, RATIO).numpy() for s in seeds]
    in_data = list(tf.data.Dataset.from_tensor_slices(tf.stack(seeds)).map(
        lambda s: decode.decode_random_crop(tf.constant(data), s, SCALE, RATIO))
        .as_numpy_iterator())
    shapes = set()
    for seed, a, b in zip(seeds, eager, in_data):
        expected = reference_crop(data, seed)
        np.testing.assert_array_equal(a, b)
        assert a.shape == expected.shape
        if fmt == "JPEG":
            # libjpeg upsamples chroma from neighbouring columns / rows; a crop has none past its
            # right and bottom edge, so that one line of pixels may differ. Inside: identical.
            np.testing.assert_array_equal(a[:-1, :-1], expected[:-1, :-1])
            assert np.abs(a.astype(int) - expected).max() < 40
        else:
            np.testing.assert_array_equal(a, expected)
        shapes.add(a.shape)
    assert len(shapes) > 3  # the windows really differ from seed to seed


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_file_a_byte_string_and_a_decoded_array_give_the_same_training_image(tmp_path, fmt):
    """The three kinds of split image (folder file, TFDS bytes, array) augment identically
    (a JPEG array up to the crop's edge line, above)."""
    cfg = tiny_cfg("aug=strong", "data.image_size=64")
    data = encoded(fmt, seed=3)
    (tmp_path / "a.jpg").write_bytes(data)
    pixels = decode.decode_full(tf.constant(data))
    seed = tf.constant([1, 5], tf.int64)
    kinds = [{"file": tf.constant(str(tmp_path / "a.jpg"))}, tf.constant(data), pixels]
    out = [train_preprocess(kind, seed, cfg.data, cfg.aug).numpy() for kind in kinds]
    assert out[0].shape == (64, 64, 3)
    np.testing.assert_array_equal(out[0], out[1])
    if fmt == "PNG":
        np.testing.assert_array_equal(out[0], out[2])
    else:
        np.testing.assert_allclose(out[0], out[2], atol=0.1)
