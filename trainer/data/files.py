"""Facts about files on disk, known without importing TensorFlow (the offline pre-check and the
commands run before it starts): which image files are read, where TFDS keeps a dataset and what
it downloads (from TFDS' own checksum files)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# What the exported model's `serve_bytes` decodes (tf.io.decode_image), and what the training
# data may hold besides (Pillow reads them).
SERVED_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp"}
IMAGE_SUFFIXES = SERVED_SUFFIXES | {".webp", ".tif", ".tiff"}


def tfds_data_dir(data_dir: str | None) -> Path:
    """The directory TFDS prepares into: data.data_dir, else $TFDS_DATA_DIR, else its default."""
    return Path(data_dir or os.environ.get("TFDS_DATA_DIR")
                or Path.home() / "tensorflow_datasets").expanduser()


def tfds_prepared(name: str, data_dir: str | None) -> bool:
    """A prepared TFDS dataset has `<data_dir>/<name>/[<config>/]<version>/dataset_info.json`."""
    root = tfds_data_dir(data_dir) / name
    return any(root.glob("*/dataset_info.json")) or any(root.glob("*/*/dataset_info.json"))


def tfds_urls(name: str) -> tuple[str, ...]:
    """The URLs TFDS downloads for `name`, from the checksum file its package ships."""
    spec = importlib.util.find_spec("tensorflow_datasets")  # finds the package, imports nothing
    if spec is None or not spec.submodule_search_locations:
        return ()
    package = Path(list(spec.submodule_search_locations)[0])
    candidates = [package / "url_checksums" / f"{name}.txt",
                  *package.glob(f"*/{name}/checksums.tsv")]
    for path in candidates:
        if path.is_file():
            return tuple(line.split("\t")[0] for line in path.read_text().splitlines()
                         if line.strip() and not line.startswith("#"))
    return ()


def tfds_advice(name: str, data_dir: str | None) -> str:
    """What to do when TFDS `name` cannot be downloaded here."""
    return (f"where there is internet run `tfds build {name} --data_dir DIR` (or this command), "
            f"copy DIR here and set data.data_dir=DIR (now {tfds_data_dir(data_dir)})")
