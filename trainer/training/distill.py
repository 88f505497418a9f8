"""Knowledge distillation: a frozen teacher's soft targets mixed into the student's loss.

`distill.teacher` is a preset name (with `distill.teacher_weights`, any weights `from_preset`
takes), a finished run directory, a Keras `.keras` file or a SavedModel directory. Every model
here takes float RGB in [0, 1]; a teacher trained at another resolution gets the student's
(augmented) batch resized to its own input size. The teacher runs in inference mode in the same
step, on the same replicas, and is never trained.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import keras
import tensorflow as tf

from trainer.errors import ConfigError

log = logging.getLogger(__name__)


def distillation_loss(student_logits: tf.Tensor, teacher_logits: tf.Tensor,
                      temperature: float) -> tf.Tensor:
    """Per-example KL(teacher || student) of the temperature-softened distributions, times T^2
    (Hinton et al. 2015: keeps the soft term's gradients on the label loss's scale)."""
    t = float(temperature)
    teacher = tf.nn.softmax(teacher_logits / t, axis=-1)
    log_teacher = tf.nn.log_softmax(teacher_logits / t, axis=-1)
    log_student = tf.nn.log_softmax(student_logits / t, axis=-1)
    return tf.reduce_sum(teacher * (log_teacher - log_student), axis=-1) * (t * t)


class Teacher:
    """images (float32 [N, S, S, 3] in [0, 1], the student's size) -> logits [N, classes]."""

    def __init__(self, fn: Callable, input_size: int | None, description: str,
                 model: keras.Model | None = None):
        self.fn, self.input_size, self.description, self.model = fn, input_size, description, model

    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        if self.input_size:
            images = tf.image.resize(images, (self.input_size, self.input_size), "bilinear",
                                     antialias=True)
        return tf.stop_gradient(tf.cast(self.fn(images), tf.float32))


def load_teacher(distill_cfg, num_classes: int) -> Teacher:
    """The configured teacher (build inside the strategy's scope), checked for its class count."""
    spec = str(distill_cfg.teacher)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "export" / "model.keras").is_file():
        from trainer.run.finished import load_config
        from trainer.run.load import load_run

        model = load_run(path, preprocessing=False)
        teacher = _keras_teacher(model, f"run {path}")
        teacher.input_size = int(load_config(path).data.image_size)  # what it was trained at
    elif path.suffix == ".keras" and path.is_file():
        teacher = _keras_teacher(keras.models.load_model(path, compile=False), f"file {path}")
    elif path.is_dir() and (path / "saved_model.pb").is_file():
        teacher = _savedmodel_teacher(path)
    else:
        from trainer.models.classifier import MobileViTClassifier
        from trainer.models.presets import PRESETS

        if spec not in PRESETS:
            raise ConfigError(
                f"distill.teacher={spec!r} is not a finished run directory, a .keras file, a "
                f"SavedModel directory or a preset ({', '.join(PRESETS)})")
        model = MobileViTClassifier.from_preset(spec, weights=distill_cfg.teacher_weights,
                                                num_classes=num_classes)
        teacher = _keras_teacher(model, f"preset {spec} ({distill_cfg.teacher_weights})")
    classes = int(teacher(tf.zeros([1, teacher.input_size or 32, teacher.input_size or 32, 3]))
                  .shape[-1])
    if classes != num_classes:
        raise ConfigError(f"distill.teacher={spec!r} predicts {classes} classes; the data has "
                          f"{num_classes} (the teacher must be trained on the same classes)")
    log.info("distilling from %s (temperature %g, alpha %g)", teacher.description,
             distill_cfg.temperature, distill_cfg.alpha)
    return teacher


def _keras_teacher(model: keras.Model, description: str) -> Teacher:
    model.trainable = False
    shape = model.input_shape
    size = shape[1] if shape[1] is not None and shape[1] == shape[2] else None  # else: any size
    return Teacher(lambda images: model(images, training=False), size, description, model)


def _savedmodel_teacher(path: Path) -> Teacher:
    """A SavedModel: our export's `serve_float` (or the `serving_default` of another), float
    images in; its `logits` output, else the log of its `probabilities`."""
    loaded = tf.saved_model.load(str(path))
    name = "serve_float" if "serve_float" in loaded.signatures else "serving_default"
    signature = loaded.signatures[name]
    arg = next(iter(signature.structured_input_signature[1]))
    shape = signature.structured_input_signature[1][arg].shape
    size = int(shape[1]) if shape.rank == 4 and shape[1] is not None else None

    def run(images):
        out = signature(**{arg: images})
        if "logits" in out:
            return out["logits"]
        return tf.math.log(out["probabilities"] + 1e-12)  # softmax of these = the probabilities
    teacher = Teacher(run, size, f"SavedModel {path} ({name})")
    teacher.loaded = loaded  # keep the functions alive
    return teacher
