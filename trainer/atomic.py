"""Atomic writes of files and directories: write a temporary sibling, then rename it into place.

A kill at any moment leaves either the old file (or directory) or the new one, never half of one.
The temporary names `.<name>.tmp-<pid>...` and `.<name>.old-<pid>` are what `run/dirs.py`'s
`clean_stale` tidies after a kill. Every file the trainer writes goes through here.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """`with replacing(p) as tmp:` write tmp (keeping p's suffixes); it becomes p on success."""
    path = Path(path)
    stem, dot, suffixes = path.name.partition(".")  # model.weights.h5 keeps .weights.h5
    tmp = path.with_name(f".{stem}.tmp-{os.getpid()}{dot}{suffixes}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: Path, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: dict | list) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def replacing_dir(path: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` into a fresh temporary directory, then swap it in for `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if path.exists():
        os.replace(path, old)  # the previous version stays intact until the new one is complete
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path
