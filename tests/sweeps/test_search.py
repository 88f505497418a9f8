"""Optuna searches (`hparams_search=...`) and failing trials, through `python -m trainer -m`."""

from __future__ import annotations

import csv
import subprocess

import yaml
from helpers import TINY, env, make_image_folder, sweep_command, trial_dirs


def test_optuna_search_of_three_trials_reports_the_best(tmp_path):
    args = ["hparams_search=mobilevit_xxs", "hydra.sweeper.n_trials=3", *TINY,
            "trainer.export=false"]
    run = subprocess.run(sweep_command(args), cwd=tmp_path, env=env(), capture_output=True,
                         text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    trials = trial_dirs(tmp_path)
    assert len(trials) == 3
    sweep = trials[0].parent
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["status"] for r in rows] == ["finished"] * 3
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna"
    assert set(best["best_params"]) == {"optim.lr", "optim.weight_decay", "optim.label_smoothing",
                                        "model.drop_path_rate", "aug"}
    assert best["best_value"] == max(float(r["val_accuracy"]) for r in rows)
    assert f"Best value: {best['best_value']}" in out
    # Each trial ran the values Optuna proposed (log-uniform lr within the XXS range).
    for trial in trials:
        overrides = yaml.safe_load((trial / ".hydra" / "overrides.yaml").read_text())
        lr = float(next(o for o in overrides if o.startswith("optim.lr=")).split("=")[1])
        assert 3e-4 <= lr <= 3e-3

    # The same command again: the seeded sampler proposes the same trials, all found finished.
    again = subprocess.run(sweep_command(args), cwd=tmp_path, env=env(), capture_output=True,
                           text=True, timeout=600)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert out.count("already holds this finished run") == 3 and "Epoch 1/1" not in out
    assert trial_dirs(tmp_path) == trials
    assert f"Best value: {best['best_value']}" in out


def test_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    good = make_image_folder(tmp_path / "good")
    bad = tmp_path / "bad"
    for name in ("cat", "dog"):
        (bad / name).mkdir(parents=True)
        (bad / name / "0.jpg").write_bytes(b"not an image")
    args = [*TINY, "trainer.export=false", "data=folder", "data.val_fraction=0.34",
            f"data.path={bad},{good}"]
    run = subprocess.run(sweep_command(args), cwd=tmp_path, env=env(), capture_output=True,
                         text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    rows = list(csv.DictReader(open(trial_dirs(tmp_path)[0].parent / "summary.csv")))
    by_status = {r["status"]: r for r in rows}
    assert set(by_status) == {"finished", "failed"}  # the bad trial ran first, the good one after
    assert str(bad) in by_status["failed"]["overrides"]
    assert by_status["failed"]["error"].startswith("DataError: data.path=")
    assert "holds no usable images" in by_status["failed"]["error"]
    assert "failed: DataError: data.path=" in out and "the sweep goes on" in out


def test_submitit_local_runs_each_trial_in_its_own_process(tmp_path):
    args = ["launcher=submitit_local", *TINY, "trainer.export=false", "optim.lr=1e-3,3e-4"]
    run = subprocess.run(sweep_command(args), cwd=tmp_path, env=env(), capture_output=True,
                         text=True, timeout=600)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    trials = trial_dirs(tmp_path)
    assert len(trials) == 2 and all((t / "metrics.json").is_file() for t in trials)
    # submitit's per-job records: two jobs, each its own process (a local job id is its pid).
    results = sorted((trials[0].parent / ".submitit").glob("*/*_result.pkl"))
    job_ids = {p.parent.name for p in results}
    assert len(results) == 2 and len(job_ids) == 2
    for job in job_ids:
        log = next((trials[0].parent / ".submitit" / job).glob("*_log.out")).read_text()
        assert f"Starting with JobEnvironment(job_id={job}," in log
