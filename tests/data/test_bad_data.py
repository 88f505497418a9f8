"""Messy image folders: every usable image is used (as RGB), every broken one is listed."""

from __future__ import annotations

import csv
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_cfg

from trainer.data.folder import decode_with_pillow
from trainer.data.sources import load_folder
from trainer.errors import DataError
from trainer.training.train import train


def _image(rng, h=48, w=64):
    img = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
    img[..., 0] += 130
    return img


def _bomb_png() -> bytes:
    """A valid PNG whose header claims 40000 x 40000 pixels (1.6 gigapixels)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    raw[16:24] = struct.pack(">II", 40000, 40000)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


def make_messy_folder(root: Path) -> tuple[set[str], int]:
    """DIR/<class>/ with every kind of file a real folder holds; returns (broken files, usable)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    cat, dog, empty, broken = (root / n for n in ("cat", "dog", "empty", "only_broken"))
    for d in (cat, dog, empty, broken):
        d.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(_image(rng)).save(cat / f"good{i}.jpg")
    for i in range(6):
        Image.fromarray(_image(rng)[..., ::-1].copy()).save(dog / f"good{i}.png")
    rgba = np.concatenate([_image(rng), np.full((48, 64, 1), 128, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(cat / "alpha.png")
    Image.fromarray((rng.integers(0, 65535, (48, 64))).astype(np.uint16)).save(cat / "deep16.png")
    Image.fromarray(_image(rng)[..., 0]).save(cat / "grey.jpg")
    Image.fromarray(_image(rng)).convert("CMYK").save(cat / "cmyk.jpg")
    Image.fromarray(_image(rng)).convert("P").save(cat / "palette.gif")
    Image.fromarray(_image(rng)).save(cat / "bitmap.bmp")
    Image.fromarray(_image(rng)).save(cat / "web.webp")
    gradient = np.linspace(0, 255, 6000, dtype=np.uint8)[None, :, None]
    Image.fromarray(np.broadcast_to(gradient, (4000, 6000, 3)).copy()).save(cat / "huge.jpg")
    usable = 4 + 6 + 8

    good_jpeg = io.BytesIO()
    Image.fromarray(_image(rng)).save(good_jpeg, "JPEG")
    (cat / "truncated.jpg").write_bytes(good_jpeg.getvalue()[:300])
    (cat / "zero.jpg").write_bytes(b"")
    (cat / "notes.jpg").write_text("not an image, whatever the suffix says\n")
    (dog / "bomb.png").write_bytes(_bomb_png())
    (broken / "cut.jpg").write_bytes(good_jpeg.getvalue()[:200])
    (broken / "empty.png").write_bytes(b"")
    broken_files = {cat / "truncated.jpg", cat / "zero.jpg", cat / "notes.jpg", dog / "bomb.png",
                    broken / "cut.jpg", broken / "empty.png"}
    return {str(p) for p in broken_files}, usable


def test_decoding_every_usable_format_gives_rgb_uint8(tmp_path):
    _, _ = make_messy_folder(tmp_path)
    for name in ("alpha.png", "deep16.png", "grey.jpg", "cmyk.jpg", "palette.gif", "bitmap.bmp",
                 "web.webp"):
        image = decode_with_pillow(str(tmp_path / "cat" / name).encode())
        assert image.dtype == np.uint8 and image.shape == (48, 64, 3), name
    deep = decode_with_pillow(str(tmp_path / "cat" / "deep16.png").encode())
    assert 100 < deep.mean() < 155  # scaled from 16 bits, not clipped to white


def test_messy_folder_trains_and_reports_exactly_the_broken_files(tmp_path, caplog):
    broken, usable = make_messy_folder(tmp_path / "data")
    dataset = load_folder(tiny_cfg("data=folder", f"data.path={tmp_path / 'data'}").data)
    assert dataset.class_names == ["cat", "dog"]  # the empty and the all-broken class left out
    assert sum(dataset.counts.values()) == usable
    caplog.set_level("INFO")
    run = tmp_path / "run"
    metrics = train(tiny_cfg("data=folder", f"data.path={tmp_path / 'data'}",
                             "trainer.export=false", "trainer.batch_size=4"), run)
    with open(run / "skipped_files.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["file"] for r in rows} == broken
    reasons = {Path(r["file"]).name: r["reason"] for r in rows}
    assert reasons["zero.jpg"] == "empty file" and reasons["notes.jpg"] == "not an image"
    assert reasons["bomb.png"].startswith("image too large")
    assert reasons["truncated.jpg"].startswith("cannot decode")
    assert metrics["skipped_files"] == len(broken) and np.isfinite(metrics["val_loss"])
    assert f"{len(broken)} file(s) skipped as unusable" in caplog.text
    assert "classes with no usable training image are left out: empty, only_broken" in caplog.text


def test_on_error_fail_names_the_first_broken_file(tmp_path):
    make_messy_folder(tmp_path)
    cfg = tiny_cfg("data=folder", f"data.path={tmp_path}", "data.on_error=fail")
    with pytest.raises(DataError, match=r"cat/notes.jpg: not an image \(data.on_error=fail"):
        load_folder(cfg.data)
