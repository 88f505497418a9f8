"""Small files in the exact layout each TFDS builder downloads, for its real preparation code.

One function per data option, each writing into a directory the files named as the last part of
the builder's URLs (what `tests/fake_downloads.py` answers the downloads with) and returning the
example counts per split that the prepared dataset must then have. The layouts are read from the
builders in tensorflow_datasets 4.9.10 (and match the dummy data of TFDS' own builder tests).
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def _jpeg(rng: np.random.Generator, shape=(40, 48), tint: int = 0) -> bytes:
    image = rng.integers(0, 100, (*shape, 3), dtype=np.uint8)
    image[..., tint % 3] += 120  # a class-dependent colour: something to learn
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG")
    return buffer.getvalue()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _tar(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))


def _zip(path: Path, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)


def tf_flowers(out: Path) -> dict[str, int]:
    """flower_photos.tgz: flower_photos/<class>/*.jpg (one split, train)."""
    rng = np.random.default_rng(0)
    classes = ["dandelion", "daisy", "tulips", "sunflowers", "roses"]
    files = {f"flower_photos/{c}/{c}_{i}.jpg": _jpeg(rng, tint=k)
             for k, c in enumerate(classes) for i in range(5)}
    files["flower_photos/LICENSE.txt"] = b"generated for a test\n"
    _tar(out / "flower_photos.tgz", files)
    return {"train": 25}


def oxford_flowers102(out: Path) -> dict[str, int]:
    """102flowers.tgz (jpg/image_%05d.jpg), imagelabels.mat (labels 1..102), setid.mat."""
    from scipy.io import savemat

    rng = np.random.default_rng(1)
    n = 30
    labels = np.array([1 + i % 3 for i in range(n)], np.uint8)  # classes 1-3 of 102
    _tar(out / "102flowers.tgz", {f"jpg/image_{i:05d}.jpg": _jpeg(rng, tint=int(labels[i - 1]))
                                  for i in range(1, n + 1)})
    savemat(out / "imagelabels.mat", {"labels": labels[None, :]})
    ids = np.arange(1, n + 1, dtype=np.uint16)
    savemat(out / "setid.mat", {"trnid": ids[None, :18], "valid": ids[None, 18:24],
                                "tstid": ids[None, 24:]})
    return {"train": 18, "validation": 6, "test": 6}


def oxford_iiit_pet(out: Path) -> dict[str, int]:
    """images.tar.gz (images/*.jpg); annotations.tar.gz (lists, trimaps, some head-box XMLs)."""
    rng = np.random.default_rng(2)
    breeds = [("Abyssinian", 1, 1), ("american_bulldog", 2, 2), ("Bengal", 6, 1)]
    images, annotations, lists = {}, {}, {"trainval": [], "test": []}
    for breed, class_id, species in breeds:
        for i in range(1, 9):
            name = f"{breed}_{i}"
            images[f"images/{name}.jpg"] = _jpeg(rng, tint=class_id)
            trimap = rng.integers(1, 4, (40, 48), dtype=np.uint8)  # 1 pet, 2 background, 3 edge
            annotations[f"annotations/trimaps/{name}.png"] = _png(trimap)
            if i % 2:  # the builder uses an empty head box where the XML is missing
                annotations[f"annotations/xmls/{name}.xml"] = (
                    b"<annotation><size><width>48</width><height>40</height></size><object>"
                    b"<bndbox><xmin>5</xmin><ymin>4</ymin><xmax>30</xmax><ymax>25</ymax></bndbox>"
                    b"</object></annotation>")
            lists["trainval" if i <= 6 else "test"].append(f"{name} {class_id} {species} 1")
    for split, lines in lists.items():
        annotations[f"annotations/{split}.txt"] = ("\n".join(lines) + "\n").encode()
    _tar(out / "images.tar.gz", images)
    _tar(out / "annotations.tar.gz", annotations)
    return {"train": 18, "test": 6}


def cifar10(out: Path) -> dict[str, int]:
    """cifar-10-binary.tar.gz: cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin + names."""
    rng = np.random.default_rng(3)

    def batch(n: int, offset: int) -> bytes:
        records = []
        for i in range(n):
            label = (i + offset) % 10
            image = rng.integers(0, 100, (3, 32, 32), dtype=np.uint8)
            image[label % 3] += 120
            records.append(bytes([label]) + image.tobytes())  # label byte, then R, G, B planes
        return b"".join(records)

    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    files = {f"cifar-10-batches-bin/data_batch_{k}.bin": batch(6, 6 * k) for k in range(1, 6)}
    files["cifar-10-batches-bin/test_batch.bin"] = batch(10, 0)
    files["cifar-10-batches-bin/batches.meta.txt"] = ("\n".join(names) + "\n").encode()
    _tar(out / "cifar-10-binary.tar.gz", files)
    return {"train": 30, "test": 10}


def beans(out: Path) -> dict[str, int]:
    """train.zip, validation.zip, test.zip: <split>/<class>/*.jpg, 500x500 (the feature's shape)."""
    rng = np.random.default_rng(4)
    classes = ["angular_leaf_spot", "bean_rust", "healthy"]
    counts = {"train": 6, "validation": 2, "test": 2}
    for split, per_class in counts.items():
        _zip(out / f"{split}.zip", {f"{split}/{c}/{c}_{i}.jpg": _jpeg(rng, (500, 500), k)
                                    for k, c in enumerate(classes) for i in range(per_class)})
    return {split: 3 * n for split, n in counts.items()}


def food101(out: Path) -> dict[str, int]:
    """food-101.tar.gz: food-101/images/<class>/<id>.jpg and food-101/meta/{train,test}.json."""
    rng = np.random.default_rng(5)
    classes = ["apple_pie", "baby_back_ribs", "baklava"]
    files, meta = {}, {"train": {}, "test": {}}
    for k, c in enumerate(classes):
        for i in range(9):
            files[f"food-101/images/{c}/{100 + i}.jpg"] = _jpeg(rng, tint=k)
            meta["train" if i < 7 else "test"].setdefault(c, []).append(f"{c}/{100 + i}")
    for split, entries in meta.items():
        files[f"food-101/meta/{split}.json"] = json.dumps(entries).encode()
    _tar(out / "food-101.tar.gz", files)
    return {"train": 21, "validation": 6}


# data option -> (TFDS name, archive writer)
ARCHIVES = {"flowers": ("tf_flowers", tf_flowers),
            "flowers102": ("oxford_flowers102", oxford_flowers102),
            "pets": ("oxford_iiit_pet", oxford_iiit_pet),
            "cifar10": ("cifar10", cifar10),
            "beans": ("beans", beans),
            "food101": ("food101", food101)}
