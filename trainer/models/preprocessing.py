"""What a MobileViT sees: RGB in [0, 1], the short side resized to size / crop_pct, centre-cropped.

`eval_preprocess` is the one evaluation preprocessing of the project: the trainer's evaluation
pipeline, every exported SavedModel signature and `MobileViTPreprocessor` (the same op as a Keras
layer, for people who build their own model from raw images) all run it. MobileViT takes no
mean / std normalisation (ml-cvnets and timm: mean 0, std 1).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from trainer.models.presets import preprocessing

INTERPOLATIONS = ("bilinear", "bicubic")


def to_float(image: tf.Tensor) -> tf.Tensor:
    """uint8 RGB -> float32 RGB in [0, 1], the input of every model here."""
    return tf.image.convert_image_dtype(image, tf.float32)


def eval_preprocess(image: tf.Tensor, size, crop_pct: float,
                    interpolation: str = "bilinear") -> tf.Tensor:
    """Resize the short side to size / crop_pct (antialiased), centre-crop size x size.

    Works on one image [H, W, 3] or a batch [N, H, W, 3] of one size; uint8 in (scaled by 1/255)
    or float in [0, 1]; float32 in [0, 1] out. `size` may be a tensor (multi-scale batches).
    """
    image, size = resize_short_side(image, size, crop_pct, interpolation)
    shape = tf.shape(image)
    top, left = (shape[-3] - size) // 2, (shape[-2] - size) // 2
    return image[..., top:top + size, left:left + size, :]


def resize_short_side(image: tf.Tensor, size, crop_pct: float,
                      interpolation: str = "bilinear") -> tuple[tf.Tensor, tf.Tensor]:
    """(the image resized so its short side is size / crop_pct, float32 in [0, 1]; size as int32)
    -- what the evaluation crops (the centre one, or several for test-time augmentation) cut."""
    image = to_float(image) if image.dtype == tf.uint8 else tf.cast(image, tf.float32)
    if isinstance(size, tf.Tensor):  # multi-scale batches choose it per batch (an int64 tensor)
        size = tf.cast(size, tf.int32)
    shape = tf.shape(image)
    h, w = tf.cast(shape[-3], tf.float32), tf.cast(shape[-2], tf.float32)
    short = tf.math.ceil(tf.cast(size, tf.float32) / crop_pct)
    scale = short / tf.minimum(h, w)
    new_h = tf.maximum(tf.cast(tf.round(h * scale), tf.int32), size)
    new_w = tf.maximum(tf.cast(tf.round(w * scale), tf.int32), size)
    image = tf.image.resize(image, tf.stack([new_h, new_w]), interpolation, antialias=True)
    return tf.clip_by_value(image, 0.0, 1.0), size


@keras.saving.register_keras_serializable(package="mobilevit")
class MobileViTPreprocessor(keras.layers.Layer):
    """Raw images -> a MobileViT's input: `eval_preprocess` as a Keras layer.

    Input: uint8 RGB [N, H, W, 3] of any size (or float RGB in [0, 1]); output float32
    [N, image_size, image_size, 3] in [0, 1]. `from_preset(name)` carries the preprocessing the
    preset's pretrained weights were evaluated with (size, crop fraction, interpolation).
    """

    def __init__(self, image_size: int = 256, crop_pct: float = 0.9,
                 interpolation: str = "bilinear", **kwargs):
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"`image_size` must be a positive int, got {image_size!r}")
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"`crop_pct` must be in (0, 1], got {crop_pct!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"`interpolation` must be one of {', '.join(INTERPOLATIONS)}, "
                             f"got {interpolation!r}")
        kwargs.setdefault("name", "preprocessor")
        kwargs.setdefault("dtype", "float32")  # [0, 1] images, whatever the model's precision
        super().__init__(**kwargs)
        self.image_size, self.crop_pct, self.interpolation = image_size, crop_pct, interpolation

    @classmethod
    def from_preset(cls, name: str, source: str = "imagenet", **overrides
                    ) -> MobileViTPreprocessor:
        """What the preset's `source` weights were evaluated with (e.g. 384 px, crop 1.0 for
        "imagenet22k_384")."""
        size, crop, interpolation = preprocessing(name, source)
        return cls(**{"image_size": size, "crop_pct": crop, "interpolation": interpolation,
                      **overrides})

    def call(self, images):
        return eval_preprocess(images, self.image_size, self.crop_pct, self.interpolation)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-3], self.image_size, self.image_size, 3)

    def get_config(self) -> dict:
        return {**super().get_config(), "image_size": self.image_size,
                "crop_pct": self.crop_pct, "interpolation": self.interpolation}
