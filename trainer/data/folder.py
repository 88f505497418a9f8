"""Image folders at real scale: a scan that costs a stat per file, and each file decoded in the graph.

The scan reads headers only: Pillow parses the header (format, mode, size, its pixel limit), and a
JPEG or PNG must hold its end marker (a truncated download lacks it). Files TensorFlow decodes
itself (8-bit grey / RGB JPEG, 8-bit PNG, GIF, RGB BMP) are handed to the pipeline as paths and
decoded there (`data/decode.py`); any other readable file (CMYK JPEG, 16-bit PNG, WebP, TIFF,
palette BMP...) is converted once, by Pillow, to a PNG in the cache.

Verdicts are cached per folder under `data.cache_dir` (default: the user's cache directory, since
data folders are often read-only), keyed by each file's size and mtime: a repeated scan is a walk
and a stat per file, and a file that changed, appeared or disappeared is seen by that walk.
Hand-written because neither TFDS nor Keras scans folders lazily or caches the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from trainer import atomic
from trainer.data.files import IMAGE_SUFFIXES
from trainer.errors import DataError

log = logging.getLogger(__name__)

CACHE_VERSION = 1
NATIVE, CONVERT, SKIP = "native", "convert", "skip"
_NATIVE_MODES = {"JPEG": {"L", "RGB"}, "PNG": {"L", "LA", "P", "RGB", "RGBA"},
                 "GIF": {"L", "P", "RGB", "RGBA"}, "BMP": {"RGB", "RGBA"}}
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}


def cache_dir(configured: str | None) -> Path:
    """data.cache_dir, else $XDG_CACHE_HOME/mobilevit-trainer, else ~/.cache/mobilevit-trainer."""
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mobilevit-trainer"


def inspect(path: Path, size: int) -> tuple[str, str]:
    """(NATIVE | CONVERT, "") for a usable image, (SKIP, why) otherwise. Headers and tail only."""
    from PIL import Image, UnidentifiedImageError

    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return SKIP, "not an image suffix"
    if size == 0:
        return SKIP, "empty file"
    try:
        with Image.open(path) as img:  # parses the header; pixels are not decoded
            if img.width < 1 or img.height < 1:
                return SKIP, "zero-sized image"
            fmt, mode = img.format, img.mode
    except UnidentifiedImageError:
        return SKIP, "not an image"
    except Image.DecompressionBombError as e:  # Pillow's pixel limit (about 179 megapixels)
        return SKIP, f"image too large: {e}"
    except (OSError, SyntaxError, ValueError) as e:
        return SKIP, f"cannot decode: {e}"
    marker = _END_MARKERS.get(fmt)
    if marker:
        with open(path, "rb") as f:
            f.seek(max(size - 1024, 0))
            if marker not in f.read():  # 0xFFD9 only appears as a marker in JPEG data
                return SKIP, f"cannot decode: truncated {fmt} (no end marker)"
    return (NATIVE if mode in _NATIVE_MODES.get(fmt, ()) else CONVERT), ""


def convert(path: Path, size: int, mtime_ns: int, converted_dir: Path) -> tuple[str, str]:
    """Decode with Pillow once, write a PNG into the cache; (CONVERT, that file) or (SKIP, why)."""
    from PIL import Image

    key = hashlib.sha1(f"{path.resolve()}|{size}|{mtime_ns}".encode()).hexdigest()
    target = converted_dir / f"{key}.png"
    if not target.is_file():
        try:
            pixels = decode_with_pillow(str(path).encode())
        except (OSError, SyntaxError, ValueError) as e:
            return SKIP, f"cannot decode: {e}"
        converted_dir.mkdir(parents=True, exist_ok=True)
        with atomic.replacing(target) as partial:  # a concurrent trial never reads half a file
            Image.fromarray(pixels).save(partial, "PNG", compress_level=1)
    return CONVERT, str(target)


def decode_with_pillow(path: bytes) -> np.ndarray:
    """Any Pillow-readable file (CMYK, 16-bit, palette, alpha, WebP, TIFF...) -> RGB uint8.

    Alpha is dropped (as the exported models' decoders do); 16-bit grey is scaled to 8 bits,
    where Pillow's own conversion would clip it to white.
    """
    from PIL import Image

    with Image.open(path.decode()) as img:
        if img.mode.startswith("I;16") or img.mode == "I":
            grey = (np.asarray(img, dtype=np.float32) * (255.0 / 65535.0)).round()
            return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _walk(directory: str, out: dict) -> None:
    """Every non-hidden file under `directory`: relative path -> (size, mtime_ns). One stat each."""
    stack = [directory]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    stack.append(entry.path)
                elif entry.is_file():
                    st = entry.stat()
                    out[entry.path] = (st.st_size, st.st_mtime_ns)


class FolderScan:
    """The usable files of one folder tree, with verdicts cached between runs."""

    def __init__(self, root: Path, configured_cache: str | None):
        base = cache_dir(configured_cache)
        self.root = root.resolve()
        digest = hashlib.sha1(str(self.root).encode()).hexdigest()[:20]
        self.index_file = base / "folders" / f"{digest}.json"
        self.converted_dir = base / "converted"
        self.cached = self._read_index()
        self.verdicts: dict[str, list] = {}
        self.checked = 0  # files inspected (not served from the cache) by this scan

    def _read_index(self) -> dict:
        try:
            index = json.loads(self.index_file.read_text())
        except (OSError, ValueError):
            return {}
        ok = index.get("version") == CACHE_VERSION and index.get("root") == str(self.root)
        return index.get("files", {}) if ok else {}

    def verdict(self, path: str, size: int, mtime_ns: int) -> list:
        """[size, mtime_ns, kind, detail] of one file, from the cache when it is unchanged."""
        hit = self.cached.get(path)
        if hit and hit[0] == size and hit[1] == mtime_ns and (
                hit[2] != CONVERT or os.path.isfile(hit[3])):
            return hit
        self.checked += 1
        kind, detail = inspect(Path(path), size)
        if kind == CONVERT:
            kind, detail = convert(Path(path), size, mtime_ns, self.converted_dir)
        return [size, mtime_ns, kind, detail]

    def classes(self, directory: Path, on_error: str,
                skipped: list) -> dict[str, list[str]]:
        """class name -> the files to read (a converted copy where needed), sorted by path."""
        out = {}
        for class_dir in sorted(p for p in directory.iterdir()
                                if p.is_dir() and not p.name.startswith(".")):
            files: dict[str, tuple[int, int]] = {}
            _walk(str(class_dir), files)
            good = []
            for path in sorted(files):
                v = self.verdicts[path] = self.verdict(path, *files[path])
                if v[2] == NATIVE:
                    good.append(path)
                elif v[2] == CONVERT:
                    good.append(v[3])
                elif on_error == "fail":
                    self.save()  # what was checked so far is not checked again
                    raise DataError(f"{path}: {v[3]} (data.on_error=fail; use skip to leave it out)")
                else:
                    skipped.append((path, v[3]))
            out[class_dir.name] = good
        return out

    def save(self) -> None:
        """Write the index when anything changed (atomically: concurrent trials may scan too)."""
        if not self.checked and len(self.verdicts) == len(self.cached):
            return
        self.index_file.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.index_file, json.dumps(
            {"version": CACHE_VERSION, "root": str(self.root), "files": self.verdicts},
            separators=(",", ":")))

