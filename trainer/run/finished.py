"""Finished runs: the file that marks one, and the config a run directory carries.

`metrics.json` is written last: its presence (for the same number of epochs) marks a finished
run, which a repeated command or sweep trial then skips.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

METRICS_FILE = "metrics.json"


def finished_metrics(run_dir: Path, epochs: int) -> dict | None:
    """The metrics of a run finished for `epochs` epochs, else None. A run finished for fewer
    epochs loses its metrics.json: asked for more, it goes on and will write a new one."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    if metrics.get("epochs") == epochs:
        return metrics
    path.unlink()
    return None


def load_config(run_dir: Path) -> DictConfig:
    return OmegaConf.load(run_dir / "config.yaml")
