"""Per-epoch logging, chief only: history.csv, curves.png, TensorBoard, Weights & Biases.

wandb (`logger=wandb`, `logger.mode=online|offline|disabled`): the resolved, flattened config is
the run's config; the run id is kept in `RUN_DIR/wandb_id.txt`, so a resumed run continues the same
wandb run; in a Hydra multirun every trial is its own run, grouped by the sweep directory; the run
is finished (with a failure exit code) even when training raises.
"""

from __future__ import annotations

import csv
import logging
import os
import time
import uuid
from pathlib import Path

import tensorflow as tf

from trainer.atomic import replacing, write_text
from trainer.run.curves import plot_curves

log = logging.getLogger(__name__)


class History:
    """Per-epoch rows appended to history.csv (one row per finished epoch).

    On resume, rows of epochs after the restored checkpoint are dropped, so that every epoch
    appears exactly once.
    """

    def __init__(self, path: Path | None, completed_epochs: int = 0):
        self.path, self.rows = path, []
        if path is not None and path.exists():
            with open(path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= completed_epochs]

    def append(self, row: dict) -> None:
        """Rewrite the whole (small) file and rename it into place: a kill never cuts a row."""
        self.rows.append(row)
        if self.path is None:
            return
        with replacing(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)



def sweep_group() -> str | None:
    """The multirun's sweep directory name, when running under Hydra multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):  # not under Hydra (a test, a notebook)
        return None
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return Path(hydra_cfg.sweep.dir).name
    return None


def wandb_run_id(run_dir: Path) -> str:
    """The run's wandb id, created once and kept in the run directory (resume keeps it)."""
    path = run_dir / "wandb_id.txt"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]  # wandb accepts any short [a-z0-9] id
    write_text(path, run_id)
    return run_id


def start_wandb(lc, config: dict, run_dir: Path):
    """A wandb run for `logger` config `lc`, logging the run's flattened `config`."""
    import wandb

    run_id = wandb_run_id(run_dir)
    try:
        return wandb.init(project=lc.project, entity=lc.entity, group=lc.group or sweep_group(),
                          tags=list(lc.tags), name=run_dir.name, id=run_id, resume="allow",
                          dir=str(run_dir), mode=lc.mode, config=config)
    except Exception as e:
        # A shared wandb-core (WANDB_SERVICE, inherited from a parent process) still holds the
        # stream of a killed attempt of this run: say so, rather than wandb's bare message.
        if "is in use" in str(e) and os.environ.get("WANDB_SERVICE"):
            raise RuntimeError(
                f"wandb run {run_id} ({run_dir / 'wandb_id.txt'}) is still open in the wandb-core "
                f"service this process joined through WANDB_SERVICE (a killed attempt of this run "
                f"left it there): unset WANDB_SERVICE or restart that service, then re-run") from e
        raise


# A plot costs about 0.6 s (matplotlib): at most once a minute, and when training ends; a
# quickstart epoch takes 4 s.
PLOT_EVERY_S = 60.0


class EpochLoggers:
    """`with EpochLoggers(...) as loggers:` log each epoch; wandb is finished on the way out."""

    def __init__(self, logger_cfg, config: dict, run_dir: Path, chief: bool,
                 completed_epochs: int):
        """`config`: the run's flattened config ({"optim.lr": 0.001, ...}), wandb's run config."""
        self.run_dir, self.chief = run_dir, chief
        self.history = History(run_dir / "history.csv" if chief else None, completed_epochs)
        self.writer = (tf.summary.create_file_writer(str(run_dir / "tensorboard"))
                       if chief and logger_cfg.tensorboard else None)
        self.wandb = (start_wandb(logger_cfg, config, run_dir)
                      if chief and logger_cfg.name == "wandb" else None)
        self._plotted_at, self._plotted_rows = time.monotonic(), 0

    def __enter__(self) -> EpochLoggers:
        return self

    def log_epoch(self, row: dict) -> None:
        self.history.append(row)
        if not self.chief:
            return
        if time.monotonic() - self._plotted_at >= PLOT_EVERY_S:
            self._plot()
        if self.writer:
            with self.writer.as_default(step=row["epoch"]):
                for k, v in row.items():
                    tf.summary.scalar(k, v)
        if self.wandb:
            self.wandb.log(row, step=row["epoch"])

    def log_final(self, metrics: dict) -> None:
        if self.wandb:
            self.wandb.summary.update({k: v for k, v in metrics.items()
                                       if isinstance(v, (int, float, str, bool))})

    def _plot(self) -> None:
        plot_curves(self.history.rows, self.run_dir / "curves.png")
        self._plotted_at, self._plotted_rows = time.monotonic(), len(self.history.rows)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.chief and len(self.history.rows) > self._plotted_rows:
            self._plot()  # the last epochs, however training ended
        if self.writer:
            self.writer.flush()
        if self.wandb:
            self.wandb.finish(exit_code=0 if exc_type is None else 1)
