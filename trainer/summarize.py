"""`python -m trainer.summarize SWEEP_DIR [--objective val_accuracy]`: one table of all trials.

Every run directory under SWEEP_DIR (a Hydra multirun directory, or any folder of runs) becomes a
row: its overrides, metrics, status and path, best objective first. The table is printed and
written as `SWEEP_DIR/summary.md` and `SWEEP_DIR/summary.csv`.

Status: `finished` (metrics.json, written last), `failed` (failed.json, with the error, from a
trial that raised), `interrupted` (checkpoints but neither: the same command resumes it),
`not started` (none of these). A sweep writes this table itself when it ends
(trainer.sweeps.SweepSummary).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import yaml

from trainer.atomic import write_text
from trainer.sweeps import FAILED_FILE

METRICS = ("val_accuracy", "test_accuracy", "val_loss", "best_epoch", "train_seconds")


def find_runs(sweep_dir: Path) -> list[Path]:
    """Directories holding a Hydra run record (.hydra/overrides.yaml), sorted by path."""
    return sorted(p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml"))


def trial_row(run_dir: Path, sweep_dir: Path) -> dict:
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    hidden = ("hydra.", "resume=")  # run-time keys, not what the trial is about
    row = {"trial": str(run_dir.relative_to(sweep_dir)) or ".",
           "overrides": " ".join(o for o in overrides if not o.startswith(hidden))}
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        row.update(status="finished", **{k: metrics.get(k) for k in METRICS})
    elif (run_dir / FAILED_FILE).is_file():
        row.update(status="failed", error=json.loads((run_dir / FAILED_FILE).read_text())["error"])
    elif any((run_dir / "checkpoints" / "last").glob("ckpt-*.index")):
        row["status"] = "interrupted"
    else:
        row["status"] = "not started"
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.summarize",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--objective", default="val_accuracy", choices=METRICS)
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: {str(args.sweep_dir)!r} is not a directory", file=sys.stderr)
        return 2
    if not find_runs(args.sweep_dir):
        print(f"error: no runs under {str(args.sweep_dir)!r} (no .hydra/overrides.yaml found)",
              file=sys.stderr)
        return 2
    rows = write_summary(args.sweep_dir, args.objective)
    print((args.sweep_dir / "summary.md").read_text(), end="")
    print(f"{len(rows)} trial(s); wrote {args.sweep_dir / 'summary.md'} and summary.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
