"""Shared test helpers: the real composed config, shrunk to a few steps."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from trainer.config.compose import compose_config

ROOT = Path(__file__).resolve().parent.parent  # the repository
TINY = ["model.pretrained=none", "data.image_size=32", "trainer.epochs=1",
        "trainer.steps_per_epoch=2", "trainer.batch_size=8", "trainer.eval_steps=2",
        "data.shuffle_buffer=16", "logger.tensorboard=false"]


def tiny_cfg(*overrides: str):
    """The config `python -m trainer` composes, shrunk to a few steps of tiny images."""
    return compose_config([*TINY, *overrides])


def make_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 6,
                      seed: int = 0) -> Path:
    """DIR/<class>/*.jpg|png of random sizes, class-dependent colour so there is signal."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(24, 80, 2)
            img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
            img[..., c] += 150
            suffix = ".png" if i % 2 else ".jpg"
            Image.fromarray(img).save(root / name / f"{i}{suffix}")
    return root


def fake_hub_cache(root: Path, checkpoint: Path, repo_id: str = "timm/mobilevit_xxs.cvnets_in1k"
                   ) -> Path:
    """The on-disk layout huggingface_hub uses for `repo_id`, holding `checkpoint`."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(checkpoint.read_bytes())
    return root


# --------------------------------------------------------------------------- sweeps
def sweep_command(args: list[str]) -> list[str]:
    """`python -m trainer -m ARGS`: a multirun, as a user starts one."""
    return [sys.executable, "-m", "trainer", "-m", *args]


def env() -> dict:
    """The environment of a trainer subprocess: this checkout importable, wandb quiet."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true"}


def trial_dirs(root: Path) -> list[Path]:
    """The trial directories of the sweeps under `root`/multirun."""
    return sorted(p.parent.parent for p in root.glob("multirun/*/*/.hydra/overrides.yaml"))


def run_python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`code` (dedented) in a new Python process with this checkout importable, as a user's
    script runs."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
