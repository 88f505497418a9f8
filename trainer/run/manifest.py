"""What a run was made of: code version, library versions, devices, seeds, data.

Written by the chief into `RUN_DIR/manifest.json` before training; a dirty git tree also leaves
its diff beside it (`manifest.diff`), so the exact code can be rebuilt months later.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import tensorflow as tf

from trainer.atomic import write_json, write_text

ROOT = Path(__file__).resolve().parents[2]  # the checkout
PACKAGES = ("keras", "tensorflow-datasets", "hydra-core",
            "omegaconf", "numpy", "huggingface-hub", "safetensors", "mobilevit-trainer")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def code_version() -> dict:
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": None, "note": "not a git checkout (installed package)"}
    diff = _git("diff", "HEAD") or ""
    untracked = (_git("ls-files", "--others", "--exclude-standard") or "").split()
    return {"git_commit": commit.strip(), "git_dirty": bool(diff or untracked),
            "untracked_files": untracked, "diff": diff}


def versions() -> dict:
    found = {"python": platform.python_version(), "tensorflow": tf.__version__}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def write_manifest(run_dir: Path, data_info: dict, strategy_info: dict, seed: int,
                   deterministic: bool, data_splits: dict) -> dict:
    code = code_version()
    diff = code.pop("diff", "")
    if diff:
        write_text(run_dir / "manifest.diff", diff)
        code["diff_file"] = "manifest.diff"
    manifest = {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "code": code, "versions": versions(),
        "devices": [d.name for d in tf.config.list_logical_devices()],
        "platform": platform.platform(), "strategy": strategy_info,
        "seed": seed, "deterministic": bool(deterministic),
        "data": data_info, "data_splits": dict(data_splits),
    }
    write_json(run_dir / "manifest.json", manifest)
    return manifest
