"""Hydra multirun sweeps, end to end through `python -m trainer -m`: a 2x2 grid killed mid-trial
and re-run (finishes only what is left, then skips everything), wandb offline per trial."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
from pathlib import Path

from helpers import TINY, env, sweep_command, trial_dirs

GRID = [*TINY, "trainer.export=false", "trainer.steps_per_epoch=4",
        "trainer.checkpoint_every_steps=1", "logger=wandb", "logger.mode=offline",
        "optim.lr=1e-3,3e-4", "seed=0,1"]


def kill_during_third_trial(cwd: Path) -> Path:
    """Start the sweep; SIGKILL it once two trials finished and a third checkpointed step 2."""
    proc = subprocess.Popen(sweep_command(GRID), cwd=cwd, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 420
    try:
        while time.time() < deadline:
            assert proc.poll() is None, "the sweep ended before it could be killed"
            trials = trial_dirs(cwd)
            done = [t for t in trials if (t / "metrics.json").is_file()]
            busy = [t for t in trials if t not in done
                    and (t / "checkpoints" / "last" / "ckpt-2.index").is_file()]
            if len(done) == 2 and busy:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return busy[0]
            time.sleep(0.2)
        raise AssertionError("the third trial never reached step 2")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_grid_sweep_killed_resumes_only_what_is_left_then_skips_all(tmp_path):
    interrupted = kill_during_third_trial(tmp_path)
    wandb_id = (interrupted / "wandb_id.txt").read_text().strip()
    assert not (interrupted / "metrics.json").exists()

    # Same command again: two trials skipped, the killed one resumed, the last one run.
    again = subprocess.run(sweep_command(GRID), cwd=tmp_path, env=env(), capture_output=True,
                           text=True, timeout=600)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert out.count("already holds this finished run") == 2
    resumed = [line for line in out.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and str(interrupted / "checkpoints" / "last") in resumed[0]
    assert "ckpt-0" not in resumed[0]  # from the mid-epoch checkpoint, not from the start

    trials = trial_dirs(tmp_path)
    assert len(trials) == 4 and len({t.parent for t in trials}) == 1  # one sweep directory
    sweep = trials[0].parent
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["status"] for r in rows] == ["finished"] * 4, [(r["trial"], r["error"]) for r in rows]
    grid = {tuple(o for o in r["overrides"].split() if o.startswith(("optim.lr=", "seed=")))
            for r in rows}
    assert grid == {(f"optim.lr={lr}", f"seed={s}") for lr in ("0.001", "0.0003") for s in (0, 1)}
    assert (sweep / "summary.md").read_text().count("| finished |") == 4
    vals = [float(r["val_accuracy"]) for r in rows]
    assert vals == sorted(vals, reverse=True)

    # wandb offline: one run per trial (the resumed trial kept its id), grouped by the sweep,
    # with the flattened config, finished with exit code 0.
    ids = set()
    for trial in trials:
        run_id = (trial / "wandb_id.txt").read_text().strip()
        ids.add(run_id)
        runs = sorted((trial / "wandb").glob("offline-run-*"))
        assert runs and all(r.name.endswith(run_id) for r in runs)
        records = (runs[-1] / f"run-{run_id}.wandb").read_bytes()
        assert b"optim.lr" in records and sweep.name.encode() in records
        assert "got exitcode: 0" in (runs[-1] / "logs" / "debug.log").read_text()
    assert len(ids) == 4 and (interrupted / "wandb_id.txt").read_text().strip() == wandb_id

    # Once more: every trial is skipped, nothing is trained.
    start = time.time()
    third = subprocess.run(sweep_command(GRID), cwd=tmp_path, env=env(), capture_output=True,
                           text=True, timeout=300)
    out = third.stdout + third.stderr
    assert third.returncode == 0, out[-3000:]
    assert out.count("already holds this finished run") == 4
    assert "Epoch 1/1" not in out and "initialised from" not in out
    assert trial_dirs(tmp_path) == trials
    print(f"re-running the finished sweep took {time.time() - start:.0f} s")
