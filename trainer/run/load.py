"""A finished run as a Keras model, for people who trained with the CLI and go on in a notebook.

`load_run(RUN_DIR)` returns the run's `export/model.keras` (the weights the export serves: the
best epoch, its EMA if kept); `preprocessing=True` puts the run's own evaluation preprocessing in
front, so that it takes raw uint8 images and predicts what `export/classifier` serves.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras

from trainer.data.pipeline import interpolation
from trainer.errors import CheckpointError
from trainer.models import mobilevit  # noqa: F401  (registers the layers load_model reads)
from trainer.models.preprocessing import MobileViTPreprocessor
from trainer.run.finished import METRICS_FILE, load_config


def load_run(run_dir: str | Path, preprocessing: bool = False) -> keras.Model:
    """The trained classifier of a finished run directory (`python -m trainer ...`).

    `preprocessing=False`: float32 RGB in [0, 1], as trained (at the run's data.image_size).
    `preprocessing=True`: uint8 RGB [N, H, W, 3] of any size, resized and centre-cropped as the
    run evaluated (its data.image_size, crop_pct and interpolation).
    The class names are in `RUN_DIR/dataset.json` and on the returned model as `class_names`.
    """
    run_dir = Path(run_dir).expanduser()
    path = run_dir / "export" / "model.keras"
    if not (run_dir / METRICS_FILE).is_file() or not path.is_file():
        raise CheckpointError(f"{run_dir} is not a finished run directory (it needs "
                              f"{METRICS_FILE} and export/model.keras; a run that stopped early "
                              f"finishes with: python -m trainer resume={run_dir})")
    model = keras.models.load_model(path, compile=False)
    if preprocessing:
        data = load_config(run_dir).data
        images = keras.Input(shape=(None, None, 3), dtype="uint8", name="images")
        prep = MobileViTPreprocessor(int(data.image_size), float(data.crop_pct),
                                     interpolation(data))
        model = keras.Model(images, model(prep(images)), name=f"{model.name}_raw_images")
    info = run_dir / "dataset.json"
    model.class_names = json.loads(info.read_text())["class_names"] if info.is_file() else None
    return model
