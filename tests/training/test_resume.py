"""Never lose a run: exact mid-epoch resume, SIGTERM, non-finite loss."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from helpers import ROOT, tiny_cfg

from trainer.training.loop import Loop
from trainer.training.train import train

RESUMABLE = ["data=digits", "trainer.epochs=2", "trainer.steps_per_epoch=3",
             "trainer.checkpoint_every_steps=2", "trainer.export=false", "aug=basic",
             "data.image_size=32", "model.head_dropout=0.3", "data.crop_pct=1.0"]


def weights(run_dir: Path) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints" / "last"))
    tensors = {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()}
    return {k: v for k, v in tensors.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f"}


def history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_crash_mid_epoch_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    train(tiny_cfg(*RESUMABLE), tmp_path / "straight")

    original = Loop.train_step
    calls = {"n": 0}

    def crash_at_sixth_step(self, iterator):
        calls["n"] += 1
        if calls["n"] == 6:  # epoch 2, after its mid-epoch checkpoint at global step 5
            raise KeyboardInterrupt("simulated kill")
        return original(self, iterator)

    monkeypatch.setattr(Loop, "train_step", crash_at_sixth_step)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(*RESUMABLE), tmp_path / "resumed")
    assert tf.train.latest_checkpoint(str(tmp_path / "resumed" / "checkpoints" / "last")).endswith("-5")
    monkeypatch.setattr(Loop, "train_step", original)
    train(tiny_cfg(*RESUMABLE), tmp_path / "resumed")  # the same run directory: resume

    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6
    rows_a, rows_b = history(tmp_path / "straight"), history(tmp_path / "resumed")
    assert [r["epoch"] for r in rows_b] == ["1", "2"]  # each epoch exactly once
    for ra, rb in zip(rows_a, rows_b):
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), abs=1e-6)
        assert ra["val_accuracy"] == rb["val_accuracy"]


def trainer_cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trainer", "data=digits", "model.pretrained=none",
            "data.image_size=32", "trainer.batch_size=8", "trainer.eval_steps=1",
            "trainer.export=false", "logger.tensorboard=false", f"hydra.run.dir={run_dir}", *extra]


def test_sigterm_saves_and_resume_finishes(tmp_path):
    run_dir = tmp_path / "run"
    cmd = trainer_cmd(run_dir, "trainer.epochs=1", "trainer.steps_per_epoch=150",
                      "trainer.log_every_steps=1")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    output = []
    for line in proc.stdout:  # wait until training is under way, mid-epoch
        output.append(line)
        if "step 3 loss" in line:
            break
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, "".join(output) + rest
    assert time.monotonic() - sent < 10
    assert "preempted: stopped by SIGTERM at step" in rest
    saved = tf.train.latest_checkpoint(str(run_dir / "checkpoints" / "last"))
    step = int(saved.rsplit("-", 1)[1])
    assert 3 <= step < 150 and not (run_dir / "history.csv").exists()

    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from {saved}" in done.stdout + done.stderr
    assert [r["epoch"] for r in history(run_dir)] == ["1"]
    assert tf.train.latest_checkpoint(str(run_dir / "checkpoints" / "last")).endswith("-150")


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "nan"
    result = subprocess.run(
        trainer_cmd(run_dir, "trainer.epochs=4", "trainer.steps_per_epoch=1", "optim.lr=1e30",
                    "schedule=constant"),
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 3, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: non-finite loss at step ")
    good = message.split("the last good checkpoint is ")[1].split(",")[0]
    assert Path(good + ".index").is_file()
    reader = tf.train.load_checkpoint(good)  # intact and loadable
    assert reader.get_variable_to_shape_map()
    assert not (run_dir / "metrics.json").exists()


def default_sigint():
    """A child started from a background shell inherits SIGINT as ignored: restore Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_and_wait_for(cmd: list[str], text: str) -> tuple[subprocess.Popen, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, preexec_fn=default_sigint)
    output = []
    for line in proc.stdout:
        output.append(line)
        if text in line:
            return proc, output
    raise AssertionError(f"{text!r} never came:\n" + "".join(output)[-3000:])


def test_ctrl_c_checkpoints_the_step_and_resumes_to_the_uninterrupted_weights(tmp_path):
    cmd = lambda run: trainer_cmd(run, "trainer.epochs=2", "trainer.steps_per_epoch=40",  # noqa: E731
                                  "trainer.log_every_steps=1", "aug=basic", "model.head_dropout=0.3")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    straight = subprocess.run(cmd(tmp_path / "straight"), cwd=ROOT, capture_output=True,
                              text=True, env=env)
    assert straight.returncode == 0, straight.stderr[-2000:]

    run_dir = tmp_path / "run"
    proc, output = start_and_wait_for(cmd(run_dir), "step 3 loss")  # mid-epoch 1
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(output) + rest
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest
    last = rest.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and "run the same command to resume" in last
    step = int(last.split("interrupted at step ")[1].split(";")[0])
    saved = tf.train.latest_checkpoint(str(run_dir / "checkpoints" / "last"))
    assert 3 <= step < 40 and saved.endswith(f"-{step}")  # the checkpoint is at that step
    assert saved in last

    done = subprocess.run(cmd(run_dir), cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from {saved}" in done.stdout + done.stderr
    a, b = weights(tmp_path / "straight"), weights(run_dir)
    assert a.keys() == b.keys()
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    print(f"Ctrl-C at step {step}, resumed: max |weight difference| {diff:.3g}")
    assert diff <= 1e-6
    assert [r["epoch"] for r in history(run_dir)] == ["1", "2"]


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    # Steps of a second or more (XS at 256x256), so the second Ctrl-C lands inside one.
    cmd = trainer_cmd(tmp_path / "run", "model=mobilevit_xs", "model.pretrained=none",
                      "data.image_size=256", "trainer.epochs=1", "trainer.steps_per_epoch=20",
                      "trainer.log_every_steps=1")
    proc, output = start_and_wait_for(cmd, "step 1 loss")
    proc.send_signal(signal.SIGINT)
    for line in proc.stdout:  # the first one is acknowledged...
        output.append(line)
        if "Ctrl-C again to abort at once" in line:
            break
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)  # ...the second one stops the process in the middle of a step
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT, "".join(output) + rest
    assert time.monotonic() - sent < 5


def small_state(directory: Path):
    from trainer.training.state import TrainState

    model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(2)])
    optimizer = tf.keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)
    return TrainState(model, optimizer, tf.Variable(1.0), directory, directory, keep=2)


def test_each_epoch_end_is_one_save_and_best_is_its_copy(tmp_path):
    state = small_state(tmp_path)
    state.restore_or_start()
    best_dir, last_dir = tmp_path / "checkpoints" / "best", tmp_path / "checkpoints" / "last"
    for epoch, score, best in [(0, 0.5, 1), (1, 0.4, 1), (2, 0.7, 3)]:
        state.model.layers[0].kernel.assign_add(tf.ones((3, 2)))  # a different state each epoch
        state.optimizer.iterations.assign_add(1)  # which numbers the `last` checkpoint
        saves = int(state.checkpoint.save_counter.numpy())
        state.end_epoch(epoch, score)
        assert int(state.checkpoint.save_counter.numpy()) == saves + 1  # written once
        assert tf.train.latest_checkpoint(str(best_dir)) == str(best_dir / f"ckpt-{best}")
        assert f'"ckpt-{best}"' in (best_dir / "checkpoint").read_text()  # relative, as a manager
        assert sorted(p.name for p in best_dir.glob("ckpt-*")) == [
            f"ckpt-{best}.data-00000-of-00001", f"ckpt-{best}.index"]  # the old best removed
    # The best copy is the best epoch's end-of-epoch checkpoint, byte for byte.
    last = Path(tf.train.latest_checkpoint(str(last_dir)))
    for suffix in (".index", ".data-00000-of-00001"):
        assert (best_dir / f"ckpt-3{suffix}").read_bytes() == Path(f"{last}{suffix}").read_bytes()
    assert state.restore_best() == 3


def test_a_kill_inside_the_best_copy_keeps_the_previous_best_and_last(tmp_path, monkeypatch):
    state = small_state(tmp_path)
    state.restore_or_start()
    state.optimizer.iterations.assign_add(1)
    state.end_epoch(0, 0.5)
    state.optimizer.iterations.assign_add(1)
    last_before = tf.train.latest_checkpoint(str(tmp_path / "checkpoints" / "last"))
    copies = []
    original_copy = shutil.copyfile

    def copy_then_die(source, target):
        if copies:
            raise KeyboardInterrupt("killed during the copy")
        copies.append(target)
        return original_copy(source, target)

    monkeypatch.setattr(shutil, "copyfile", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        state.end_epoch(1, 0.9)
    monkeypatch.setattr(shutil, "copyfile", original_copy)
    assert len(copies) == 1  # one file of the two copied
    # Neither directory lists the half-done epoch: the resumed run redoes epoch 2.
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints" / "best")).endswith("ckpt-1")
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints" / "last")) == last_before
    resumed = small_state(tmp_path)
    resumed.restore_or_start()
    assert int(resumed.epoch.numpy()) == 1 and float(resumed.best_score.numpy()) == 0.5
    resumed.end_epoch(1, 0.9)
    assert resumed.restore_best() == 2
