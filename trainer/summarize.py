"""`python -m trainer.summarize SWEEP_DIR [--objective val_accuracy]`: one table of all trials.

Every run directory under SWEEP_DIR (a Hydra multirun directory, or any folder of runs) becomes a
row: its overrides, metrics, status and path, best objective first. The table is printed and
written as `SWEEP_DIR/summary.md` and `SWEEP_DIR/summary.csv`.

Status: `finished` (metrics.json, written last), `interrupted` (checkpoints but no metrics: the
same command resumes it), `failed` (neither).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

import yaml

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
    elif any((run_dir / "checkpoints" / "last").glob("ckpt-*.index")):
        row["status"] = "interrupted"
    else:
        row["status"] = "failed"
    row["run_dir"] = str(run_dir)
    return row


def summarize(sweep_dir: Path, objective: str = "val_accuracy") -> list[dict]:
    rows = [trial_row(r, sweep_dir) for r in find_runs(sweep_dir)]
    # Best first; trials without the objective (not finished) last.
    rows.sort(key=lambda r: (r.get(objective) is None, -(r.get(objective) or 0.0)))
    return rows


def markdown(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.summarize",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--objective", default="val_accuracy", choices=METRICS)
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: {str(args.sweep_dir)!r} is not a directory", file=sys.stderr)
        return 2
    rows = summarize(args.sweep_dir, args.objective)
    if not rows:
        print(f"error: no runs under {str(args.sweep_dir)!r} (no .hydra/overrides.yaml found)",
              file=sys.stderr)
        return 2
    columns = ["trial", "overrides", *METRICS, "status", "run_dir"]
    table = markdown(rows, columns)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(args.sweep_dir / "summary.md", table)
    _write_atomic(args.sweep_dir / "summary.csv", out.getvalue())
    print(table, end="")
    print(f"{len(rows)} trial(s); wrote {args.sweep_dir / 'summary.md'} and summary.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
