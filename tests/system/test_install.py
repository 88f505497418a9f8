"""Packaging: every install resolves exactly one TensorFlow distribution, with what TFDS needs.

`pip install --dry-run --report` resolves an install against the package index without
installing it (about a minute each): two TensorFlow distributions would write the same
`tensorflow/` package, and a missing `importlib_resources` breaks every TFDS download.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

TENSORFLOWS = {"tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-intel",
               "tensorflow-macos", "tensorflow-rocm", "intel-tensorflow", "tf-nightly",
               "tf-nightly-cpu", "tf-nightly-gpu"}


def resolve(spec: str, report: Path) -> set[str]:
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run",
                             "--ignore-installed", "--quiet", "--report", str(report), "-e", spec],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return {re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower()
            for item in json.loads(report.read_text())["install"]}


@pytest.mark.parametrize("extra", ["", "gpu", "test"])
def test_every_install_resolves_exactly_one_tensorflow(extra, tmp_path):
    names = resolve(f".[{extra}]" if extra else ".", tmp_path / "report.json")
    assert names & TENSORFLOWS == {"tensorflow"}
    assert {"tensorflow-datasets", "importlib-resources", "scipy", "keras"} <= names
    cuda = {n for n in names if n.startswith("nvidia-")}
    if extra == "gpu":  # TensorFlow's own CUDA libraries come only with the gpu extra
        assert {"nvidia-cudnn-cu12", "nvidia-cublas-cu12"} <= cuda
    else:
        assert not cuda
