"""One table of all trials of a sweep (`python -m trainer.summarize`, and every sweep's end).

Every run directory under SWEEP_DIR (a Hydra multirun directory, or any folder of runs) becomes a
row: its overrides, metrics, status and path, best objective first. The table is printed and
written as `SWEEP_DIR/summary.md` and `SWEEP_DIR/summary.csv`.

Status: `finished` (metrics.json, written last), `failed` (failed.json, with the error, from a
trial that raised), `interrupted` (checkpoints but neither: the same command resumes it),
`not started` (none of these). A sweep writes this table itself when it ends
(`SweepSummary`, a Hydra callback).
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from trainer.atomic import write_text
from trainer.sweeps.trials import trial_status

log = logging.getLogger(__name__)

METRICS = ("val_accuracy", "test_accuracy", "val_loss", "best_epoch", "train_seconds")


def find_runs(sweep_dir: Path) -> list[Path]:
    """Directories holding a Hydra run record (.hydra/overrides.yaml), sorted by path."""
    return sorted(p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml"))


def trial_row(run_dir: Path, sweep_dir: Path) -> dict:
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    hidden = ("hydra.", "resume=")  # run-time keys, not what the trial is about
    row = {"trial": str(run_dir.relative_to(sweep_dir)) or ".",
           "overrides": " ".join(o for o in overrides if not o.startswith(hidden))}
    status, details = trial_status(run_dir)
    row["status"] = status
    if status == "finished":
        row.update({k: details.get(k) for k in METRICS})
    elif status == "failed":
        row["error"] = details["error"]
    row["run_dir"] = str(run_dir)
    return row


def summarize(sweep_dir: Path, objective: str = "val_accuracy") -> list[dict]:
    rows = [trial_row(r, sweep_dir) for r in find_runs(sweep_dir)]
    # Best first; trials without the objective (not finished) last.
    rows.sort(key=lambda r: (r.get(objective) is None, -(r.get(objective) or 0.0)))
    return rows


def shared_overrides(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """The rows with only the overrides that tell trials apart, and those all trials share."""
    split = [r["overrides"].split() for r in rows]
    shared = [o for o in split[0] if all(o in s for s in split[1:])] if len(rows) > 1 else []
    rows = [{**r, "overrides": " ".join(o for o in s if o not in shared)}
            for r, s in zip(rows, split)]
    return rows, shared


def markdown(rows: list[dict], shared: list[str], columns: list[str]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = [f"All trials: {' '.join(shared)}", ""] if shared else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


COLUMNS = ["trial", "overrides", *METRICS, "status", "error", "run_dir"]


def write_summary(sweep_dir: Path, objective: str = "val_accuracy") -> list[dict]:
    """summary.md and summary.csv in SWEEP_DIR; returns the rows, best first."""
    rows = summarize(sweep_dir, objective)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(sweep_dir / "summary.md", markdown(*shared_overrides(rows), COLUMNS))
    write_text(sweep_dir / "summary.csv", out.getvalue())
    return rows


class SweepSummary(Callback):
    """At the end of a multirun: write and print the summary table, say what failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir)
        failed = [r for r in rows if r["status"] != "finished"]
        log.info("sweep %s: %d trial(s), %d finished; summary in %s", sweep_dir, len(rows),
                 len(rows) - len(failed), sweep_dir / "summary.md")
        for row in failed:
            log.warning("trial %s %s: %s", row["trial"], row["status"], row.get("error") or "")
