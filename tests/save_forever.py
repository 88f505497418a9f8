"""Save checkpoints of a MobileViT-XXS classifier and its AdamW state in a loop, until killed.

usage: python tests/save_forever.py DIR
Resumes the numbering from the newest readable checkpoint in DIR (printing "restored N"), then
prints "saved N" after each complete save. A `marker` variable holds N inside checkpoint N, so a
checkpoint mixing two saves would show.
"""

from __future__ import annotations

import sys
from pathlib import Path

import keras
import tensorflow as tf

from trainer.models.head import build_classifier
from trainer.models.mobilevit import MobileViTBackbone
from trainer.training.state import restore_latest


def main() -> None:
    directory = Path(sys.argv[1])
    model = build_classifier(MobileViTBackbone.from_preset("mobilevit_xxs"), 10)
    optimizer = keras.optimizers.AdamW(1e-3)
    optimizer.build(model.trainable_variables)
    marker = tf.Variable(-1, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, marker=marker)
    manager = tf.train.CheckpointManager(ckpt, str(directory), max_to_keep=2)
    restored = restore_latest(ckpt, directory)
    number = int(marker.numpy())
    if restored is not None:
        assert restored.endswith(f"-{number}"), (restored, number)
        print(f"restored {number}", flush=True)
    while True:
        number += 1
        marker.assign(number)
        model.trainable_variables[0].assign_add(tf.ones_like(model.trainable_variables[0]))
        manager.save(checkpoint_number=number)
        print(f"saved {number}", flush=True)


if __name__ == "__main__":
    main()
