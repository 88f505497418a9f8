"""Data sources -> raw `tf.data` splits of (uint8 image [H, W, 3], int label) + dataset info.

Sources: TFDS datasets (real split names), image folders and scikit-learn's bundled digits.
A dataset without a validation split gets a deterministic, stratified one carved from train.
Class names and counts always come from the data, never from the config.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class Dataset:
    """What the data stage hands on: raw splits and what the model and report need to know."""

    name: str
    class_names: list[str]
    splits: dict[str, tf.data.Dataset]  # "train", "val" and maybe "test"
    counts: dict[str, int]
    version: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def info(self) -> dict:
        return {"name": self.name, "version": self.version, "num_classes": self.num_classes,
                "class_names": self.class_names, "counts": self.counts,
                "skipped_files": len(self.skipped)}


class DataError(ValueError):
    """Data that cannot be used; the message names the dataset, split or path."""


# --------------------------------------------------------------------------- splitting


def stratified_split(labels: np.ndarray, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Indices of the leading fractions of each class (deterministic); the rest goes last.

    Returns len(fractions) + 1 index arrays, every class represented in each part it fits into.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for i, frac in enumerate(fractions):
            n = int(round(frac * len(idx)))
            if frac > 0 and n == 0 and len(idx) - start > 1:
                n = 1
            parts[i] += idx[start:start + n].tolist()
            start += n
        parts[-1] += idx[start:].tolist()
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def _select(ds: tf.data.Dataset, indices: np.ndarray, total: int) -> tf.data.Dataset:
    mask = np.zeros(total, bool)
    mask[indices] = True
    mask = tf.constant(mask)
    return ds.enumerate().filter(lambda i, _: tf.gather(mask, i)).map(lambda _, x: x)


# --------------------------------------------------------------------------- sources


def load_digits(cfg) -> Dataset:
    """scikit-learn's bundled 8x8 digits as RGB uint8, split stratified into train / val / test."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = np.repeat((bunch.images / 16.0 * 255.0).round().astype(np.uint8)[..., None], 3, -1)
    labels = bunch.target.astype(np.int64)
    val_idx, test_idx, train_idx = stratified_split(labels, [cfg.val_fraction,
                                                             cfg.test_fraction], seed=1234)
    parts = {"train": train_idx, "val": val_idx}
    if len(test_idx):
        parts["test"] = test_idx
    splits = {k: tf.data.Dataset.from_tensor_slices((images[v], labels[v])) for k, v in parts.items()}
    return Dataset("digits", [str(i) for i in range(10)], splits,
                   {k: len(v) for k, v in parts.items()}, version="sklearn")


def load_tfds(cfg) -> Dataset:
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(cfg.tfds_name, data_dir=cfg.data_dir)
        if cfg.download:
            builder.download_and_prepare()
    except Exception as e:
        raise DataError(f"data.tfds_name={cfg.tfds_name!r}: cannot load or download it "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"set data.data_dir to a prepared TFDS directory") from None
    info = builder.info
    class_names = list(info.features["label"].names)
    available = set(info.splits.keys())
    for key in ("train_split", "val_split", "test_split"):
        split = cfg[key]
        if split is not None and split.split("[")[0] not in available:
            raise DataError(f"data.{key}={split!r} is not a split of {cfg.tfds_name}; it has "
                            f"{', '.join(sorted(available))}")

    def read(split: str, decode: bool = True) -> tf.data.Dataset:
        decoders = None if decode else {"image": tfds.decode.SkipDecoding()}
        ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                                read_config=tfds.ReadConfig(shuffle_seed=0))
        if not decode:
            return ds
        return ds.map(lambda e: (e["image"], tf.cast(e["label"], tf.int64)))

    splits, counts = {}, {}
    train = read(cfg.train_split)
    n_train = info.splits[cfg.train_split].num_examples
    if cfg.val_split is None:  # carve a stratified validation split out of train
        labels = np.fromiter((int(e["label"]) for e in read(cfg.train_split, decode=False)
                              .as_numpy_iterator()), np.int64)
        val_idx, train_idx = stratified_split(labels, [cfg.val_fraction], seed=1234)
        splits["train"], splits["val"] = _select(train, train_idx, n_train), _select(train, val_idx, n_train)
        counts["train"], counts["val"] = len(train_idx), len(val_idx)
    else:
        splits["train"], counts["train"] = train, n_train
        splits["val"], counts["val"] = read(cfg.val_split), info.splits[cfg.val_split].num_examples
    if cfg.test_split:
        splits["test"], counts["test"] = read(cfg.test_split), info.splits[cfg.test_split].num_examples
    return Dataset(cfg.tfds_name, class_names, splits, counts, version=str(info.version))


def _check_image(path: Path) -> str | None:
    """Why `path` is not a usable image, or None. Uses Pillow, which reads every common format."""
    from PIL import Image, UnidentifiedImageError

    if path.stat().st_size == 0:
        return "empty file"
    try:
        with Image.open(path) as img:
            img.load()  # a full decode: catches truncated files that verify() lets through
            if img.width < 1 or img.height < 1:
                return "zero-sized image"
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError) as e:
        return f"cannot decode: {e}"
    return None


def _scan_classes(root: Path, on_error: str, skipped: list) -> dict[str, list[Path]]:
    classes = {}
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        good = []
        for f in sorted(class_dir.rglob("*")):
            if not f.is_file() or f.name.startswith("."):
                continue
            reason = ("not an image suffix" if f.suffix.lower() not in IMAGE_SUFFIXES
                      else _check_image(f))
            if reason is None:
                good.append(f)
            elif on_error == "fail":
                raise DataError(f"{f}: {reason} (data.on_error=fail; use skip to leave it out)")
            else:
                skipped.append((str(f), reason))
        classes[class_dir.name] = good
    return classes


def _decode_with_pillow(path: bytes) -> np.ndarray:
    """Any Pillow-readable file (CMYK, 16-bit, palette, alpha, WebP, TIFF...) -> RGB uint8."""
    from PIL import Image

    with Image.open(path.decode()) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _file_dataset(files: list[Path], labels: list[int]) -> tf.data.Dataset:
    def load(path, label):
        image = tf.numpy_function(_decode_with_pillow, [path], tf.uint8, stateful=False)
        image.set_shape([None, None, 3])
        return image, label

    ds = tf.data.Dataset.from_tensor_slices(([str(f) for f in files], np.array(labels, np.int64)))
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def load_folder(cfg) -> Dataset:
    root = Path(cfg.path)
    skipped: list[tuple[str, str]] = []
    split_dirs = {s: root / d for s, d in (("train", "train"), ("val", "val"), ("test", "test"))
                  if (root / d).is_dir()}
    if "train" in split_dirs:
        scanned = {s: _scan_classes(p, cfg.on_error, skipped) for s, p in split_dirs.items()}
    else:
        scanned = {"train": _scan_classes(root, cfg.on_error, skipped)}
    class_names = sorted(c for c, files in scanned["train"].items() if files)
    if not class_names:
        raise DataError(f"data.path={str(root)!r} holds no usable images in class "
                        f"sub-directories (expected DIR/<class>/*.jpg or DIR/train/<class>/...)")
    empty = sorted(c for c, files in scanned["train"].items() if not files)
    if empty:
        log.warning("classes with no usable training image are left out: %s", ", ".join(empty))
    index = {c: i for i, c in enumerate(class_names)}

    def flat(split_classes):
        pairs = [(f, index[c]) for c, files in split_classes.items() if c in index for f in files]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    splits, counts = {}, {}
    files, labels = flat(scanned["train"])
    if "val" not in scanned:
        val_idx, train_idx = stratified_split(np.array(labels), [cfg.val_fraction], seed=1234)
        scanned_val = ([files[i] for i in val_idx], [labels[i] for i in val_idx])
        files, labels = [files[i] for i in train_idx], [labels[i] for i in train_idx]
    else:
        scanned_val = flat(scanned["val"])
    for split, (f, l) in (("train", (files, labels)), ("val", scanned_val),
                          *((("test", flat(scanned["test"])),) if "test" in scanned else ())):
        splits[split], counts[split] = _file_dataset(f, l), len(f)
    if skipped:
        log.warning("skipped %d unusable file(s) in %s (listed in skipped_files.csv)",
                    len(skipped), root)
    return Dataset(root.name, class_names, splits, counts, version="folder", skipped=skipped)


def load_dataset(cfg) -> Dataset:
    loader = {"digits": load_digits, "tfds": load_tfds, "folder": load_folder}[cfg.source]
    dataset = loader(cfg)
    for split in ("train", "val"):
        if dataset.counts.get(split, 0) == 0:
            raise DataError(f"data {dataset.name!r}: the {split} split is empty")
    return dataset


def write_skipped_report(dataset: Dataset, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "reason"])
        writer.writerows(dataset.skipped)
