"""Resumable sweeps: where a multirun and its trials live, and what a failed trial leaves.

Hydra names a multirun by the time it started and its trials by their number, so re-running a
sweep starts from nothing. Here both names are derived from content instead, which is all it
takes for the trainer's own resume logic to do the rest:

- the sweep directory is `multirun/sweep-<hash of the command's overrides>` (unless
  `hydra.sweep.dir` is given), so the same command finds the same directory;
- each trial directory is `<sweep dir>/<hash of the trial's resolved config>`, minus the run-time
  keys below, so the same trial finds the same directory: a finished one (metrics.json) is
  skipped, an interrupted one resumes from its checkpoints (trainer/training/train.py).

A failing trial writes `failed.json` (the error) and the sweep goes on; `summary.md` / `.csv` are
written when the sweep ends (`sweeps/summary.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trainer.atomic import write_json
from trainer.config.compose import flatten
from trainer.errors import Preempted
from trainer.run.finished import METRICS_FILE

log = logging.getLogger(__name__)

# What does not change a trial's result: where it runs, logging, checkpoint cadence, its label.
RUNTIME_KEYS = ("hydra", "launcher", "name", "recipe", "logger", "trainer.log_every_steps",
                "trainer.checkpoint_every_steps", "trainer.keep_checkpoints",
                "trainer.allow_config_change")
FAILED_FILE = "failed.json"


def _digest(value: Any, length: int = 10) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _runtime(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") or key.startswith(k + "/")
               for k in RUNTIME_KEYS)


def trial_key(cfg: DictConfig) -> str:
    """Hash of the resolved config without the run-time keys."""
    # Resolved without the hydra node: that node holds the directory being named (recursion).
    plain = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    plain.pop("hydra", None)
    leaves = flatten(OmegaConf.create(plain))
    return _digest({k: v for k, v in leaves.items() if not _runtime(k)})


def sweep_dir_for(argv: list[str]) -> str:
    """`multirun/sweep-<hash>` of the command's overrides (order and run-time keys ignored)."""
    overrides = sorted(a.lstrip("+") for a in argv
                       if "=" in a and not a.startswith("-") and not _runtime(a.split("=")[0]))
    return f"multirun/sweep-{_digest(overrides)}"


def register_resolver() -> None:
    """`${trial_key:}` (used by hydra.sweep.subdir) hashes the config it is resolved in."""
    if not OmegaConf.has_resolver("trial_key"):
        OmegaConf.register_new_resolver("trial_key", lambda _root_: trial_key(_root_))


# --------------------------------------------------------------------------- trials


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def optuna_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return "optuna" in str(HydraConfig.get().sweeper.get("_target_", ""))


def record_failure(run_dir: Path, error: BaseException) -> None:
    """failed.json: what went wrong, for the summary; removed when the trial is run again."""
    write_json(run_dir / FAILED_FILE, {
        "error": f"{type(error).__name__}: {error}",
        "traceback": traceback.format_exception(type(error), error, error.__traceback__)[-6:]})


def trial_status(run_dir: Path) -> tuple[str, dict]:
    """`finished` (metrics.json, written last; with the metrics), `failed` (failed.json; with the
    error), `interrupted` (checkpoints but neither: the same command resumes it), `not started`."""
    if (run_dir / METRICS_FILE).is_file():
        return "finished", json.loads((run_dir / METRICS_FILE).read_text())
    if (run_dir / FAILED_FILE).is_file():
        return "failed", json.loads((run_dir / FAILED_FILE).read_text())
    if any((run_dir / "checkpoints" / "last").glob("ckpt-*.index")):
        return "interrupted", {}
    return "not started", {}


class TrialFailed(Exception):
    """Raised for an Optuna trial, which the sweeper then records as FAIL and goes on."""


def run_trial(train, cfg: DictConfig, run_dir: Path) -> float:
    """One trial of a sweep, `train(cfg, run_dir)`: a failure is recorded (failed.json) and the
    sweep goes on; SIGTERM or Ctrl-C (`Preempted`) stops the whole sweep, which the same command
    resumes."""
    import keras

    (run_dir / FAILED_FILE).unlink(missing_ok=True)  # a re-run tries it again
    keras.backend.clear_session()  # nothing of the previous in-process trial is kept
    try:
        return train(cfg, run_dir)["val_accuracy"]
    except Preempted:
        raise
    except Exception as e:
        record_failure(run_dir, e)
        log.error("trial %s failed: %s: %s (recorded in %s; the sweep goes on)", run_dir.name,
                  type(e).__name__, e, run_dir / FAILED_FILE)
        if optuna_sweep():  # Optuna's sweeper records a raising trial as FAIL
            raise TrialFailed(f"{type(e).__name__}: {e}") from None
        return float("nan")  # Hydra's basic sweeper ignores the value
