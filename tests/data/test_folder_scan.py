"""Image folders at scale: a cached, header-only scan; files TensorFlow cannot decode converted
once; undecodable files found in the pipeline skipped and reported; each worker reading only its
own share of every global batch."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import make_image_folder, tiny_cfg

from trainer.data import folder
from trainer.data.pipeline import Unreadable, example_positions, train_pipeline
from trainer.data.sources import load_folder
from trainer.errors import DataError
from trainer.training.train import train


def scan(root: Path, cache: Path) -> tuple[folder.FolderScan, dict, list]:
    result = folder.FolderScan(root, str(cache))
    skipped: list = []
    classes = result.classes(root, "skip", skipped)
    result.save()
    return result, classes, skipped


def test_a_repeated_scan_opens_no_file_and_sees_every_change(tmp_path, monkeypatch):
    from PIL import Image

    root = make_image_folder(tmp_path / "data", per_class=4)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8)).convert("CMYK").save(
        root / "cat" / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8)).save(root / "dog" / "w.webp")
    (root / "fox" / "notes.txt").write_text("not an image")
    before = sorted(p for p in root.rglob("*"))
    first, classes, skipped = scan(root, tmp_path / "cache")
    assert first.checked == 15 and skipped == [(str(root / "fox" / "notes.txt"),
                                                "not an image suffix")]
    assert sorted(p for p in root.rglob("*")) == before  # nothing written into the data folder

    # Converted once, into the cache, with Pillow's pixels; native files are read where they are.
    converted = [f for f in classes["cat"] + classes["dog"] if not f.startswith(str(root))]
    assert len(converted) == 2 and all(f.startswith(str(tmp_path / "cache")) for f in converted)
    cmyk = next(f for f in classes["cat"] if f in converted)
    np.testing.assert_array_equal(np.asarray(Image.open(cmyk)), folder.decode_with_pillow(
        str(root / "cat" / "cmyk.jpg").encode()))

    # Again: every verdict from the cache, no image opened.
    monkeypatch.setattr(folder, "inspect", lambda *a: pytest.fail("a file was inspected again"))
    again, classes_again, skipped_again = scan(root, tmp_path / "cache")
    assert again.checked == 0 and classes_again == classes and skipped_again == skipped
    monkeypatch.undo()

    # A changed, an added and a deleted file: only the first two are looked at.
    os.utime(root / "cat" / "0.jpg", ns=(1, 1))
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8)).save(root / "fox" / "new.png")
    (root / "dog" / "1.png").unlink()
    changed, classes3, _ = scan(root, tmp_path / "cache")
    assert changed.checked == 2
    assert str(root / "fox" / "new.png") in classes3["fox"]
    assert str(root / "dog" / "1.png") not in classes3["dog"]


def _corrupt_png(path: Path) -> None:
    """A PNG with a valid header and end marker whose pixel data is garbage: it passes the
    header-only scan and fails in the pipeline."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(buf, "PNG", compress_level=0)
    raw = bytearray(buf.getvalue())
    start = raw.find(b"IDAT") + 40
    raw[start:start + 400] = bytes(range(200)) * 2
    path.write_bytes(bytes(raw))


def test_a_file_that_fails_in_the_pipeline_is_skipped_and_reported_or_named(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root / "train", per_class=6)
    make_image_folder(root / "val", per_class=2, seed=1)
    _corrupt_png(root / "train" / "dog" / "corrupt.png")
    args = ["data=folder", f"data.path={root}", "trainer.export=false",  # 19 training images
            "trainer.batch_size=4", "trainer.steps_per_epoch=6", "data.shuffle_buffer=64"]
    dataset = load_folder(tiny_cfg(*args).data)
    assert not dataset.skipped  # the header and the end marker are fine

    metrics = train(tiny_cfg(*args), tmp_path / "run")
    with open(tmp_path / "run" / "skipped_files.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["file"], r["reason"]) for r in rows] == [
        (str(root / "train" / "dog" / "corrupt.png"), "cannot decode: failed in the input pipeline")]
    assert metrics["skipped_files"] == 1 and np.isfinite(metrics["val_loss"])

    with pytest.raises(DataError, match=r"dog/corrupt.png: cannot decode \(data.on_error=fail"):
        train(tiny_cfg(*args, "data.on_error=fail"), tmp_path / "run_fail")


def test_each_worker_reads_only_its_share_of_every_global_batch(tmp_path):
    """Two workers x one replica each: worker w's batches are the w-th halves of the one-worker
    run's global batches, and a worker never opens the other worker's files (deleted here)."""
    # 40 per class: the 20 positions checked, plus the pipeline's read-ahead, stay inside the first
    # epoch, so worker 1 never reaches a later epoch where the deleted files are its own.
    root = make_image_folder(tmp_path / "data", per_class=40)
    cfg = tiny_cfg("data=folder", f"data.path={root}", "data.val_fraction=0.01",
                   "data.image_size=32", "aug=basic")
    train_split = load_folder(cfg.data).splits["train"]

    def batches(shard, unreadable=None, count=5):
        ds = train_pipeline(train_split, cfg.data, cfg.aug, 8, seed=3, epoch=1, replicas=2,
                            shard=shard, unreadable=unreadable)
        return [(x.numpy(), y.numpy()) for x, y in ds.take(count)]

    whole = batches((0, 1), count=10)  # per-replica batches: replica 0, 1, 0, 1, ...
    mine = example_positions(train_split, cfg.data, cfg.aug, 8, 3, 1, replicas=2, shard=(1, 2))
    theirs = example_positions(train_split, cfg.data, cfg.aug, 8, 3, 1, replicas=2, shard=(0, 2))
    mine_files = {e[1][1][0]["file"].decode() for e in mine.take(20).as_numpy_iterator()}
    their_files = {e[1][1][0]["file"].decode() for e in theirs.take(20).as_numpy_iterator()}
    for f in their_files - mine_files:
        Path(f).unlink()

    unreadable = Unreadable()
    second = batches((1, 2), unreadable)
    assert not unreadable.gaps  # every file it read was there
    for (x, y), (x_ref, y_ref) in zip(second, whole[1::2]):
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(x, x_ref)
    # Each worker handles half of the examples of every global batch.
    indices = [int(e[1][0]) for e in mine.take(20).as_numpy_iterator()]
    assert indices == [b * 8 + 4 + i for b in range(5) for i in range(4)]


def test_scan_cache_directory_is_configurable_and_checked(tmp_path):
    from trainer.config.validate import validate
    from trainer.errors import ConfigError

    root = make_image_folder(tmp_path / "data", per_class=2)
    cache = tmp_path / "my-cache"
    load_folder(tiny_cfg("data=folder", f"data.path={root}", f"data.cache_dir={cache}").data)
    assert len(list((cache / "folders").glob("*.json"))) == 1
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match=r"data.cache_dir='.*a-file' is a file"):
        validate(tiny_cfg("data=folder", f"data.path={root}", f"data.cache_dir={tmp_path / 'a-file'}"))
