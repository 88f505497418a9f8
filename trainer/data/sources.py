"""Data sources -> raw `tf.data` splits of (uint8 image [H, W, 3], int label) + dataset info.

Sources: TFDS datasets (real split names), image folders and scikit-learn's bundled digits.
A dataset without a validation split gets a deterministic, stratified one carved from train.
Class names and counts always come from the data, never from the config.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import tensorflow as tf

from trainer.data.folder import FolderScan
from trainer.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Dataset:
    """What the data stage hands on: raw splits and what the model and report need to know."""

    name: str
    class_names: list[str]
    splits: dict[str, tf.data.Dataset]  # "train", "val" and maybe "test"
    counts: dict[str, int]
    version: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    class_counts: list[int] | None = None  # training examples per class (counted when needed)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def info(self) -> dict:
        return {"name": self.name, "version": self.version, "num_classes": self.num_classes,
                "class_names": self.class_names, "counts": self.counts,
                "skipped_files": len(self.skipped),
                **({"train_class_counts": self.class_counts} if self.class_counts else {})}

    def class_weights(self) -> list[float]:
        """n / (classes x n_c) per class (scikit-learn's "balanced"): 1 for every class of a
        balanced split; a class with no training example gets 0."""
        counts = np.asarray(self.class_counts, np.float64)
        weights = np.divide(counts.sum(), len(counts) * counts, out=np.zeros_like(counts),
                            where=counts > 0)
        return weights.tolist()


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

    def read(split: str):
        # Images stay encoded: the pipeline decodes them in the graph (a JPEG only where the
        # random crop looks), on the worker that trains on them.
        decoders = {"image": tfds.decode.SkipDecoding()}
        try:
            return tfds.load(cfg.tfds_name, split=split, data_dir=cfg.data_dir,
                             download=cfg.download, shuffle_files=False, decoders=decoders,
                             with_info=True)
        except Exception as e:
            raise DataError(tfds_failure(cfg, split, e)) from None

    def pairs(ds: tf.data.Dataset) -> tf.data.Dataset:
        return ds.map(lambda e: (e["image"], tf.cast(e["label"], tf.int64)))

    def count(ds: tf.data.Dataset, info, split: str) -> int:
        if split in info.splits:
            return info.splits[split].num_examples
        return int(ds.reduce(np.int64(0), lambda n, _: n + 1))

    train, info = read(cfg.train_split)
    class_names = list(info.features["label"].names)
    splits, counts = {}, {}
    if cfg.val_split is None:  # carve a stratified validation split out of train
        labels_ds, _ = read(cfg.train_split)
        labels = np.fromiter((int(e["label"]) for e in labels_ds.as_numpy_iterator()), np.int64)
        val_idx, train_idx = stratified_split(labels, [cfg.val_fraction], seed=1234)
        splits["train"] = pairs(_select(train, train_idx, len(labels)))
        splits["val"] = pairs(_select(train, val_idx, len(labels)))
        counts["train"], counts["val"] = len(train_idx), len(val_idx)
    else:
        splits["train"], counts["train"] = pairs(train), count(train, info, cfg.train_split)
        val, _ = read(cfg.val_split)
        splits["val"], counts["val"] = pairs(val), count(val, info, cfg.val_split)
    if cfg.test_split:
        test, _ = read(cfg.test_split)
        splits["test"], counts["test"] = pairs(test), count(test, info, cfg.test_split)
    return Dataset(cfg.tfds_name, class_names, splits, counts, version=str(info.version))


def tfds_failure(cfg, split: str, e: Exception) -> str:
    """One line saying what actually failed when TFDS could not load or prepare a split."""
    import requests
    import tensorflow_datasets as tfds

    from trainer.data.files import tfds_advice

    name = cfg.tfds_name
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, ModuleNotFoundError):
        return (f"preparing TFDS {name} needs the Python package {e.name!r}, which is not "
                f"installed: pip install {e.name}")
    if isinstance(e, (tfds.download.DownloadError, requests.RequestException)):
        return (f"cannot download TFDS {name} ({type(e).__name__}: {text}); "
                f"{tfds_advice(name, cfg.data_dir)}")
    if "split" in text.lower():
        return (f"data.tfds_name={name!r} split {split!r}: {text}; check the split name "
                f"(data.train_split, data.val_split, data.test_split)")
    if not cfg.download:
        return (f"TFDS {name} is not prepared under data.data_dir={cfg.data_dir!r} and "
                f"data.download=false ({text}); {tfds_advice(name, cfg.data_dir)}")
    return f"data.tfds_name={name!r} split {split!r}: cannot load it ({type(e).__name__}: {text})"


def _file_dataset(files: list[str], labels: list[int]) -> tf.data.Dataset:
    """({"file": path}, label): the pipeline reads and decodes each file in the graph."""
    return tf.data.Dataset.from_tensor_slices(({"file": files}, np.array(labels, np.int64)))


def load_folder(cfg) -> Dataset:
    root = Path(cfg.path)
    skipped: list[tuple[str, str]] = []
    split_dirs = {s: root / d for s, d in (("train", "train"), ("val", "val"), ("test", "test"))
                  if (root / d).is_dir()}
    scan = FolderScan(root, cfg.get("cache_dir"))
    started = time.perf_counter()
    if "train" in split_dirs:
        scanned = {s: scan.classes(p, cfg.on_error, skipped) for s, p in split_dirs.items()}
    else:
        scanned = {"train": scan.classes(root, cfg.on_error, skipped)}
    scan.save()
    log.info("scanned %d files in %s in %.2f s (%d checked, the rest unchanged since the scan "
             "cached in %s)", len(scan.verdicts), root, time.perf_counter() - started,
             scan.checked, scan.index_file)
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


# --------------------------------------------------------------------------- subsets


def _labels(ds: tf.data.Dataset) -> np.ndarray:
    """Every label of a split (a pass over it: cheap for digits, a full read for TFDS)."""
    return np.fromiter((int(y) for y in ds.map(lambda x, y: y).as_numpy_iterator()), np.int64)


def select_classes(dataset: Dataset, classes: list[str]) -> Dataset:
    """Only `classes`, relabelled 0..k-1 in the order given (data.classes)."""
    unknown = [c for c in classes if c not in dataset.class_names]
    if unknown or len(set(classes)) != len(classes):
        raise DataError(f"data.classes={list(classes)}: {unknown or 'duplicates'} not usable; "
                        f"the classes of {dataset.name!r} are {dataset.class_names}")
    table = np.full(len(dataset.class_names), -1, np.int64)
    table[[dataset.class_names.index(c) for c in classes]] = np.arange(len(classes))
    table = tf.constant(table)
    splits = {k: ds.filter(lambda x, y: tf.gather(table, y) >= 0)
                   .map(lambda x, y: (x, tf.gather(table, y)))
              for k, ds in dataset.splits.items()}
    counts = {k: len(_labels(ds)) for k, ds in splits.items()}
    return replace(dataset, class_names=list(classes), splits=splits, counts=counts)


def few_labels(dataset: Dataset, per_class: int) -> Dataset:
    """A seeded, stratified `per_class` training examples of each class (data.train_per_class)."""
    labels = _labels(dataset.splits["train"])
    rng = np.random.default_rng(1234)
    keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                                   for c in range(dataset.num_classes)]))
    splits = {**dataset.splits, "train": _select(dataset.splits["train"], keep, len(labels))}
    return replace(dataset, splits=splits, counts={**dataset.counts, "train": len(keep)})


def _mock_split(num_examples: int):
    """Random (image, label) examples for `tfds.testing.mock_data`.

    TFDS' own mock fills every feature at random, which some datasets refuse (oxford_iiit_pet's
    bounding boxes come out with min > max); the trainer reads only the image and the label.
    """
    def as_dataset(builder, split, decoders=None, read_config=None, **kwargs):
        rng = np.random.default_rng(zlib.crc32(str(split).encode()))
        images = rng.integers(0, 256, (num_examples, 48, 64, 3), dtype=np.uint8)
        classes = builder.info.features["label"].num_classes
        labels = rng.integers(0, classes, num_examples)
        ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
        if decoders and "image" in decoders:  # encoded, as TFDS stores them (PNG for these)
            ds = ds.map(lambda e: {**e, "image": tf.io.encode_png(e["image"])})
        return ds
    return as_dataset


def load_dataset(cfg) -> Dataset:
    loader = {"digits": load_digits, "tfds": load_tfds, "folder": load_folder}[cfg.source]
    if cfg.source == "tfds" and cfg.mock_examples:
        import tensorflow_datasets as tfds

        # The dataset's real class names and splits, random images; nothing is downloaded.
        with tfds.testing.mock_data(num_examples=cfg.mock_examples,
                                    as_dataset_fn=_mock_split(cfg.mock_examples)):
            dataset = loader(cfg)
    else:
        dataset = loader(cfg)
    if cfg.classes:
        dataset = select_classes(dataset, list(cfg.classes))
    if cfg.train_per_class:
        dataset = few_labels(dataset, cfg.train_per_class)
    if cfg.get("class_balance", "none") != "none":  # a pass over the labels, when they matter
        labels = _labels(dataset.splits["train"])
        dataset = replace(dataset, class_counts=np.bincount(
            labels, minlength=dataset.num_classes).tolist())
    for split in ("train", "val"):
        if dataset.counts.get(split, 0) == 0:
            raise DataError(f"data {dataset.name!r}: the {split} split is empty")
    return dataset
