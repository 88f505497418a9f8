"""Faults: SIGKILL at any moment, corrupt checkpoints, NaN rollback, changed configs, full disks."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from helpers import ROOT, tiny_cfg

from trainer.errors import CheckpointError, ConfigError, NonFiniteLoss
from trainer.run import dirs as rundir
from trainer.training.state import restore_latest
from trainer.training.train import train

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
# Deterministic and tiny: 2 epochs of 3 steps, a mid-epoch checkpoint every 2 steps, dropout and
# random augmentation on (their RNG state must resume too), the export on.
RUN = ["data=digits", "model.pretrained=none", "data.image_size=32", "data.crop_pct=1.0",
       "trainer.batch_size=8", "trainer.eval_steps=1", "trainer.epochs=2",
       "trainer.steps_per_epoch=3", "trainer.checkpoint_every_steps=2", "aug=basic",
       "model.head_dropout=0.3", "logger.tensorboard=false", "export.check_images=8"]


def trainer(run_dir: Path, *extra: str, fault: tuple[str, int] | None = None):
    driver = ([str(ROOT / "tests" / "fault_driver.py"), fault[0], str(fault[1])] if fault
              else ["-m", "trainer"])
    return subprocess.run([sys.executable, *driver, *RUN, f"hydra.run.dir={run_dir}", *extra],
                          cwd=ROOT, capture_output=True, text=True, env=ENV)


def last_weights(run_dir: Path) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints" / "last"))
    tensors = {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()}
    return {k: v for k, v in tensors.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f"}


def latest_number(run_dir: Path) -> int:
    return int(tf.train.latest_checkpoint(str(run_dir / "checkpoints" / "last")).rsplit("-", 1)[1])


def epochs_in_history(run_dir: Path) -> list[str]:
    with open(run_dir / "history.csv", newline="") as f:
        return [row["epoch"] for row in csv.DictReader(f)]


def test_sigkill_mid_epoch_during_checkpoint_and_during_export_then_resume(tmp_path):
    straight = tmp_path / "straight"
    assert trainer(straight).returncode == 0

    run = tmp_path / "killed"
    # 1. Mid-epoch: before the 6th step, after the mid-epoch checkpoint of global step 5.
    killed = trainer(run, fault=("step", 6))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert latest_number(run) == 5 and epochs_in_history(run) == ["1"]

    # 2. During the next save of checkpoints/last (end of epoch 2, step 6): its files are on
    # disk, but the manager never recorded them, so step 5 stays the latest.
    killed = trainer(run, fault=("checkpoint", 1))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "resumed from" in killed.stdout and (run / "checkpoints/last/ckpt-6.index").exists()
    assert latest_number(run) == 5
    assert epochs_in_history(run) == ["1", "2"]  # written before the kill; redone on resume

    # 3. During the export: nothing named export/ and no metrics.json, a temporary dir instead.
    killed = trainer(run, fault=("export", 1))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert latest_number(run) == 6
    assert not (run / "export").exists() and not (run / "metrics.json").exists()
    assert list(run.glob(".export.tmp-*"))

    done = trainer(run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "left by a killed process" in done.stdout and not list(run.glob(".export.tmp-*"))
    assert epochs_in_history(run) == ["1", "2"]
    a, b = last_weights(straight), last_weights(run)
    assert a.keys() == b.keys()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6
    metrics_a = json.loads((straight / "metrics.json").read_text())
    metrics_b = json.loads((run / "metrics.json").read_text())
    assert metrics_b["val_accuracy"] == metrics_a["val_accuracy"]
    # Resumed after its last epoch, the run still reports the stages it trained.
    assert metrics_b["stages"] == metrics_a["stages"] and len(metrics_a["stages"]) == 1
    assert tf.saved_model.load(str(run / "export" / "classifier")).signatures["serving_default"]

    # Re-running the finished run does nothing; resuming it with another optimizer is refused.
    again = subprocess.run([sys.executable, "-m", "trainer", f"resume={run}"], cwd=ROOT,
                           capture_output=True, text=True, env=ENV)
    assert again.returncode == 0 and "already holds this finished run" in again.stdout
    changed = subprocess.run([sys.executable, "-m", "trainer", f"resume={run}", "optim.lr=0.01"],
                             cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert changed.returncode == 2
    assert "optim.lr: 0.001 -> 0.01" in changed.stderr.strip().splitlines()[-1]
    assert json.loads((run / "metrics.json").read_text()) == metrics_b


def test_kill_during_checkpoint_saves_20_times(tmp_path):
    """SIGKILL at random moments of back-to-back saves: the newest complete one always loads."""
    rng = random.Random(0)
    directory, saved = tmp_path / "ckpts", -1
    for attempt in range(20):
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "save_forever.py"),
                                 str(directory)], cwd=ROOT, env=ENV, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        lines = []
        for line in proc.stdout:
            lines.append(line.split())
            if line.startswith("saved"):
                break
        timer = threading.Timer(rng.uniform(0.0, 0.4), proc.kill)
        timer.start()
        rest = proc.stdout.read()
        proc.wait()
        timer.join()
        lines += [line.split() for line in rest.splitlines()]
        restored = [int(n) for word, n in lines if word == "restored"]
        assert restored == ([saved] if attempt else []), (attempt, lines[:2], saved)
        saved = max(int(n) for word, n in lines if word == "saved")  # complete before the kill
        newest = tf.train.latest_checkpoint(str(directory))
        reader = tf.train.load_checkpoint(newest)  # loads, every tensor intact
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
        number = int(newest.rsplit("-", 1)[1])
        # The newest listed checkpoint is the last one reported, or one whose save had written
        # everything and recorded it just before the kill; its marker says which save wrote it.
        assert number in (saved, saved + 1)
        assert reader.get_tensor("marker/.ATTRIBUTES/VARIABLE_VALUE") == number
        saved = number


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    value = tf.Variable(tf.zeros([1000]))
    ckpt = tf.train.Checkpoint(value=value)
    manager = tf.train.CheckpointManager(ckpt, str(tmp_path), max_to_keep=2)
    for n in (1, 2):
        value.assign(tf.fill([1000], float(n)))
        manager.save(checkpoint_number=n)
    data = next(tmp_path.glob("ckpt-2.data-*"))
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF  # one flipped byte inside the tensor
    data.write_bytes(bytes(raw))
    value.assign(tf.zeros([1000]))
    assert restore_latest(ckpt, tmp_path) == str(tmp_path / "ckpt-1")
    assert float(value[0]) == 1.0 and "ckpt-2 is unreadable" in caplog.text

    next(tmp_path.glob("ckpt-1.data-*")).write_bytes(b"")  # and the previous one is truncated
    with pytest.raises(CheckpointError, match="no readable checkpoint in"):
        restore_latest(ckpt, tmp_path)


def test_nan_rollback_lowers_the_learning_rate_and_finishes(tmp_path):
    diverging = ["data=digits", "optim.lr=1e30", "schedule=constant", "trainer.export=false",
                 "trainer.on_nan=rollback", "trainer.epochs=2"]
    metrics = train(tiny_cfg(*diverging, "trainer.nan_lr_factor=1e-33"), tmp_path / "saved")
    assert metrics["nan_rollbacks"] == 1 and metrics["lr_scale"] == pytest.approx(1e-33)
    assert np.isfinite(metrics["val_loss"])
    with pytest.raises(NonFiniteLoss, match=r"ckpt-0, left intact \(2 rollback\(s\) did not help"):
        train(tiny_cfg(*diverging, "trainer.max_rollbacks=2"), tmp_path / "lost")


def test_changed_config_is_refused_on_resume_unless_allowed(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "last").mkdir(parents=True)
    cfg = tiny_cfg("data=digits")
    from omegaconf import OmegaConf
    OmegaConf.save(cfg, run / "config.yaml", resolve=True)
    tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(1.0)),
                               str(run / "checkpoints" / "last"), 1).save()
    changed = tiny_cfg("data=digits", "model.name=mobilevit_xs", "trainer.batch_size=16")
    assert rundir.config_changes(OmegaConf.load(run / "config.yaml"), changed) == [
        "model.name: 'mobilevit_xxs' -> 'mobilevit_xs'", "trainer.batch_size: 8 -> 16"]
    with pytest.raises(ConfigError, match="model.name: 'mobilevit_xxs' -> 'mobilevit_xs'.*"
                                          "trainer.allow_config_change=true"):
        train(changed, run)
    rundir.check_unchanged(run, tiny_cfg("data=digits", "trainer.epochs=5"))  # allowed change
    rundir.check_unchanged(run, tiny_cfg("data=digits", "model.name=mobilevit_xs",
                                         "trainer.allow_config_change=true"))


def test_full_or_unwritable_output_is_detected_before_training(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="a-file/run' is not writable"):
        train(tiny_cfg("data=digits"), blocker / "run")

    class Usage:
        free = 5 << 20

    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(ConfigError, match=r"only 5 MiB free, the run needs about \d+ MiB"):
        train(tiny_cfg("data=digits"), tmp_path / "full")
    assert not (tmp_path / "full" / "checkpoints").exists()


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    base = str(tmp_path / "outputs" / "2026-11-24" / "10-00-00-mobilevit_xxs-digits")
    code = ("import sys; from omegaconf import OmegaConf; from trainer.run.dirs import register_resolver; "
            "register_resolver(); c = OmegaConf.create({'dir': '${unique_dir:' + sys.argv[1] + '}'}); "
            "print(c.dir); print(c.dir)")
    procs = [subprocess.Popen([sys.executable, "-c", code, base], cwd=ROOT, env=ENV, text=True,
                              stdout=subprocess.PIPE) for _ in range(4)]
    outputs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(len(set(out)) == 1 for out in outputs)  # one process keeps its directory
    dirs = {out[0] for out in outputs}
    assert dirs == {base, base + "-2", base + "-3", base + "-4"}
    assert all(Path(d).is_dir() for d in dirs)


def test_stale_temporaries_are_removed_and_a_displaced_export_put_back(tmp_path):
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    (tmp_path / f".export.old-{dead}").mkdir()
    (tmp_path / f".export.tmp-{dead}").mkdir()
    (tmp_path / f".history.csv.tmp-{dead}").write_text("epoch\n1\n")
    (tmp_path / f".metrics.json.tmp-{os.getppid()}").write_text("{}")  # a live process's
    (tmp_path / "checkpoints" / "last" / "ckpt-7_temp").mkdir(parents=True)
    removed = rundir.clean_stale(tmp_path)
    assert sorted(p.name for p in removed) == [f".export.tmp-{dead}",
                                               f".history.csv.tmp-{dead}", "ckpt-7_temp"]
    assert (tmp_path / "export").is_dir() and (tmp_path / f".metrics.json.tmp-{os.getppid()}").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 200 MiB file system of its own (tmpfs), so that filling it fills only it."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(mount_point)],
                   check=True, capture_output=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory: Path) -> Path:
    """Another job writing until the disk is full."""
    filler = directory / "another-job.bin"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass
    return filler


def test_disk_filling_during_training_stops_with_one_line_and_resumes(small_disk):
    run_dir = small_disk / "run"
    cmd = [sys.executable, "-m", "trainer", *RUN, "trainer.epochs=1",
           "trainer.steps_per_epoch=60", "trainer.checkpoint_every_steps=2",
           "trainer.log_every_steps=1", "trainer.export=false", "logger.tensorboard=false",
           f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    for line in proc.stdout:  # Hydra logs to stdout; wait for training to be under way
        if "step 3 loss" in line:
            break
    filler = fill(small_disk)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 4, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: the disk holding {run_dir} is full (No space left on device")
    assert "free some space there and run the same command to resume" in last
    intact = last.split("last complete checkpoint (")[1].rstrip(")")
    assert tf.train.load_checkpoint(intact).get_variable_to_shape_map()  # loads completely

    filler.unlink()  # space freed: the same command resumes from it and finishes
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {intact}" in done.stdout + done.stderr
    assert epochs_in_history(run_dir) == ["1"] and (run_dir / "metrics.json").is_file()


def test_out_of_memory_names_the_device_and_the_batch_size(tmp_path):
    from trainer.errors import resource_message

    oom = tf.errors.ResourceExhaustedError(
        None, None, "OOM when allocating tensor with shape[64,96,128,128] and type float on "
        "/job:localhost/replica:0/task:0/device:GPU:0 by allocator GPU_0_bfc")
    assert resource_message(oom, tmp_path, 64) == (
        "out of memory on GPU:0 at trainer.batch_size=64: start again with a smaller batch, e.g. "
        "trainer.batch_size=32 (or trainer.precision=mixed_float16 on a GPU); the last complete "
        "checkpoint is none yet")
    assert resource_message(ValueError("something else"), tmp_path, 64) is None
