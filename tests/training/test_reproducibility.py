"""Determinism, the run manifest, training curves, and the sweep summary table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from helpers import ROOT

from trainer import summarize

RUN = ["data=digits", "model.pretrained=none", "data.image_size=32", "trainer.epochs=1",
       "trainer.steps_per_epoch=3", "trainer.batch_size=16", "trainer.eval_steps=1",
       "model.head_dropout=0.3", "model.drop_path_rate=0.1", "aug=basic",
       "logger.tensorboard=false", "trainer.export=false", "trainer.deterministic=true"]


def final_weights(run_dir: Path) -> dict[str, np.ndarray]:
    last = tf.train.latest_checkpoint(str(run_dir / "checkpoints" / "last"))
    reader = tf.train.load_checkpoint(last)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()}


def test_deterministic_runs_are_bit_identical_and_carry_a_manifest(tmp_path):
    # Subprocesses: op determinism is process-wide and cannot be switched off again.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("a", "b"):
        out = subprocess.run([sys.executable, "-m", "trainer", *RUN,
                              f"hydra.run.dir={tmp_path / name}"],
                             cwd=ROOT, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) > 100
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)

    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["deterministic"] is True and manifest["seed"] == 0
    assert manifest["versions"]["tensorflow"].startswith("2.21")
    assert {"keras", "hydra-core", "tensorflow-datasets", "python"} <= manifest["versions"].keys()
    assert len(manifest["code"]["git_commit"]) == 40 and "git_dirty" in manifest["code"]
    assert manifest["data"]["name"] == "digits" and sum(manifest["data"]["counts"].values()) == 1797
    assert manifest["devices"] and manifest["strategy"]["replicas"] == 1
    assert (tmp_path / "a" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _trial(sweep: Path, name: str, overrides: list[str], metrics: dict | None = None,
           checkpoint: bool = False) -> Path:
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    if checkpoint:
        (run / "checkpoints" / "last").mkdir(parents=True)
        (run / "checkpoints" / "last" / "ckpt-4.index").write_bytes(b"")
    return run


def test_summarize_sorts_trials_and_writes_markdown_and_csv(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _trial(sweep, "0", ["optim.lr=0.001", "hydra.run.dir=x"],
           {"val_accuracy": 0.5, "test_accuracy": 0.4, "best_epoch": 2})
    _trial(sweep, "1", ["optim.lr=0.0003"], {"val_accuracy": 0.9, "test_accuracy": 0.8,
                                              "best_epoch": 3})
    _trial(sweep, "2", ["optim.lr=0.01"], checkpoint=True)
    failed = _trial(sweep, "3", ["optim.lr=1.0"], checkpoint=True)
    (failed / "failed.json").write_text(json.dumps({"error": "NonFiniteLoss: loss is nan"}))
    _trial(sweep, "4", ["optim.lr=2.0"])
    assert summarize.main([f"sweep={sweep}"]) == 0
    rows = list(__import__("csv").DictReader(open(sweep / "summary.csv")))
    assert [r["trial"] for r in rows] == ["1", "0", "2", "3", "4"]
    assert [r["status"] for r in rows] == ["finished", "finished", "interrupted", "failed",
                                           "not started"]
    assert rows[3]["error"] == "NonFiniteLoss: loss is nan"
    assert rows[1]["overrides"] == "optim.lr=0.001"  # run-time keys left out
    table = (sweep / "summary.md").read_text()
    assert table.splitlines()[2].startswith("| 1 | optim.lr=0.0003 | 0.9000 | 0.8000 |")
    assert table in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        summarize.main([f"sweep={tmp_path / 'empty'}"])
    assert exit_.value.code == 2
