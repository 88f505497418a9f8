"""python -m trainer.summarize sweep=SWEEP_DIR [objective=val_accuracy]: one table of all trials.

Every run directory under SWEEP_DIR (a Hydra multirun directory, or any folder of runs) becomes a
row: its overrides, metrics, status (finished, failed, interrupted, not started) and path, best
objective first. Printed, and written as `SWEEP_DIR/summary.md` and `SWEEP_DIR/summary.csv`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config.args import fail, parse_args
from trainer.sweeps.summary import METRICS, find_runs, write_summary

USAGE = "python -m trainer.summarize sweep=SWEEP_DIR [objective=val_accuracy]"


@dataclass
class Args:
    sweep: str = "???"
    objective: str = field(default="val_accuracy", metadata={"choices": METRICS})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(Args, argv, USAGE)
    sweep_dir = Path(args.sweep)
    if not sweep_dir.is_dir():
        fail(f"sweep={args.sweep!r} is not a directory")
    if not find_runs(sweep_dir):
        fail(f"sweep={args.sweep!r}: no runs under it (no .hydra/overrides.yaml found)")
    rows = write_summary(sweep_dir, args.objective)
    print((sweep_dir / "summary.md").read_text(), end="")
    print(f"{len(rows)} trial(s); wrote {sweep_dir / 'summary.md'} and summary.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
