"""tf.distribute on CPU: mirrored replicas, two workers on loopback, mixed precision and XLA."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from helpers import ROOT

COMMON = ["data=digits", "model.pretrained=none", "data.image_size=32", "trainer.epochs=1",
          "trainer.steps_per_epoch=3", "trainer.batch_size=16", "trainer.eval_steps=1",
          "model.head_dropout=0", "aug=none", "logger.tensorboard=false",
          "trainer.log_every_steps=1"]


def run_trainer(args: list[str], env: dict | None = None, wait: bool = True):
    cmd = [sys.executable, "-m", "trainer", *args]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    if wait:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=full_env)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=full_env)


def step_losses(output: str) -> list[float]:
    return [float(m) for m in re.findall(r"step \d+ loss ([0-9.]+)", output)]


def checkpoint_tensors(run_dir: Path, number: int) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(run_dir / "checkpoints" / "last" / f"ckpt-{number}"))
    tensors = {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()}
    return {k: v.astype(np.float64) for k, v in tensors.items()
            if isinstance(v, np.ndarray) and v.dtype.kind == "f"}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and len(a) > 50
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_mirrored_sync_bn_matches_single_replica(tmp_path):
    """2 logical CPU replicas + synchronized BN == 1 replica with the same global batch.

    SGD at a constant rate, not Adam: some weights have an exactly-zero true gradient (attention
    key biases), and Adam turns float rounding noise in them into full-size steps of random sign.
    """
    args = [*COMMON, "optim=sgd", "optim.lr=0.002", "schedule=constant", "trainer.epochs=2",
            "trainer.steps_per_epoch=1", "trainer.export=false", "model.sync_bn=true",
            "trainer.keep_checkpoints=5"]  # ckpt-0, the starting point, is kept
    single = run_trainer([*args, "trainer.strategy=default", f"hydra.run.dir={tmp_path / 'one'}"])
    assert single.returncode == 0, single.stderr[-3000:]
    mirrored = run_trainer([*args, "trainer.strategy=mirrored", "trainer.cpu_replicas=2",
                            f"hydra.run.dir={tmp_path / 'two'}"])
    assert mirrored.returncode == 0, mirrored.stderr[-3000:]
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert (run["strategy"], run["replicas"], run["per_replica_batch"]) == ("MirroredStrategy", 2, 8)
    one, two = checkpoint_tensors(tmp_path / "one", 2), checkpoint_tensors(tmp_path / "two", 2)
    start = checkpoint_tensors(tmp_path / "one", 0)
    # Two replicas sum gradients in another order than one, and oneDNN picks kernels by CPU: the
    # bar is relative to what two SGD steps moved (float32 rounding of a reduction scales with
    # it), not an absolute number. Measured: 1.1e-4 of the largest update on an AMD EPYC (6.7e-6
    # absolute; an Intel Xeon gave 1.25e-5, ~2e-4); BatchNorm *not* synchronised gives 1.4.
    # Moving statistics the same way: Keras' synchronized BN computes the cross-replica variance
    # as E[x^2] - E[x]^2 in float32, single-device BN uses two-pass moments (2.2e-5 measured).
    for keys in ([k for k in one if "moving_" not in k], [k for k in one if "moving_" in k]):
        update = max(float(np.abs(one[k] - start[k]).max()) for k in keys)
        assert update > 1e-3  # the bar can fail: the steps moved these tensors
        assert max_diff({k: one[k] for k in keys}, {k: two[k] for k in keys}) < 2e-3 * update
    # Per-step losses (logged to 8 decimals): step 1 to float32 rounding; step 2 also carries the
    # first update's difference, the batch variance's E[x^2] - E[x]^2 above included. Measured
    # relative difference at step 2: 8.8e-6, and 1.2e-5 after the SiLU became x * sigmoid(x)
    # (2026-11-30; other rounding in the gradient); unsynchronised BN is orders of magnitude off.
    losses_one = step_losses(single.stdout + single.stderr)
    losses_two = step_losses(mirrored.stdout + mirrored.stderr)
    np.testing.assert_allclose(losses_one[0], losses_two[0], rtol=1e-6)
    np.testing.assert_allclose(losses_one, losses_two, rtol=3e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_workers(args: list[str], worker_log: Path) -> list[subprocess.Popen]:
    """Chief (stdout piped) and one more worker (output to a file) on fresh loopback ports."""
    cluster = {"worker": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]}
    procs = []
    for index in range(2):
        env = {"TF_CONFIG": json.dumps({"cluster": cluster,
                                        "task": {"type": "worker", "index": index}})}
        if index == 0:
            procs.append(run_trainer(args, env=env, wait=False))
        else:
            with open(worker_log, "w") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "trainer", *args], cwd=ROOT, stdout=out,
                    stderr=subprocess.STDOUT, text=True,
                    env={**os.environ, "PYTHONPATH": str(ROOT), **env}))
    return procs


def numbered_losses(output: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"step (\d+) loss ([0-9.]+)", output)}


def test_two_workers_killed_and_restarted(tmp_path):
    """Two workers on 127.0.0.1: SIGKILL the non-chief mid-epoch, then the (now stuck) chief;
    restart both. The run resumes from the chief's last checkpoint, ends at the planned step
    count with the same per-step losses, and only the chief ever wrote the run directory."""
    run_dir = tmp_path / "run"
    args = [*COMMON, "trainer.strategy=auto", "trainer.steps_per_epoch=6",
            "trainer.checkpoint_every_steps=2", f"hydra.run.dir={run_dir}"]
    chief, worker = start_workers(args, tmp_path / "worker-1.log")
    before = ""
    try:
        for line in chief.stdout:  # until step 3 is done: the step-2 checkpoint exists
            before += line
            if "step 3 loss" in line:
                break
        else:
            raise AssertionError(f"chief ended before step 3: {before[-3000:]}")
        worker.kill()
        worker.wait()
        chief.kill()  # blocked in a collective with the dead worker
        chief.wait()
    finally:
        for p in (chief, worker):
            p.kill()
    saved = tf.train.latest_checkpoint(str(run_dir / "checkpoints" / "last"))
    resume_step = int(saved.rsplit("-", 1)[-1])
    assert resume_step in (2, 4), saved

    chief, worker = start_workers(args, tmp_path / "worker-2.log")
    chief_out = chief.communicate(timeout=900)[0]
    worker.wait(timeout=300)
    worker_out = (tmp_path / "worker-2.log").read_text()
    assert [chief.returncode, worker.returncode] == [0, 0], worker_out[-3000:] + chief_out[-3000:]
    assert "MultiWorkerMirroredStrategy with 2 replica(s)" in chief_out
    assert f"at epoch 1, step {resume_step}" in chief_out and \
        f"at epoch 1, step {resume_step}" in worker_out
    # Both workers ran exactly the remaining steps, in lockstep, and the steps that ran twice
    # (after the checkpoint, before the kill) gave the same losses both times.
    after = numbered_losses(chief_out)
    assert sorted(after) == list(range(resume_step + 1, 7)) and after == numbered_losses(worker_out)
    overlap = numbered_losses(before).keys() & after.keys()
    assert all(numbered_losses(before)[s] == after[s] for s in overlap)
    # The planned step count, and only the chief's files in the run directory.
    assert tf.train.latest_checkpoint(str(run_dir / "checkpoints" / "last")).endswith("ckpt-6")
    written = sorted(p.name for p in run_dir.iterdir() if p.name != "manifest.diff")  # dirty tree
    assert written == [".hydra", "__main__.log", "checkpoints", "config.yaml", "curves.png",
                       "dataset.json", "export", "history.csv", "manifest.json", "metrics.json",
                       "run.json"]
    assert len((run_dir / "history.csv").read_text().splitlines()) == 2  # header + epoch 1
    loaded = tf.saved_model.load(str(run_dir / "export" / "classifier"))
    out = loaded.signatures["serving_default"](images=tf.zeros([2, 32, 32, 3], tf.uint8))
    assert out["probabilities"].shape == (2, 10)


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_gpu_settings_run_on_cpu_mixed_precision_xla_default_aug_export_float32(precision,
                                                                               tmp_path):
    """What a GPU user runs first: mixed precision + XLA + the default augmentation, end to end
    (the command line, export and LiteRT included), slowly but correctly on this CPU. At 64 px:
    smaller sizes are refused on a CPU (tests/system/test_matrix.py, REFUSED)."""
    run_dir = tmp_path / precision
    result = run_trainer([*COMMON, "data.image_size=64", "aug=basic", f"trainer.precision={precision}",
                          "trainer.jit_compile=true", "trainer.epochs=2",
                          "export.litert=[float32]", "export.check_images=8",
                          f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((run_dir / "run.json").read_text())
    assert (run["precision"], run["jit_compile"]) == (precision, True)
    losses = step_losses(result.stdout + result.stderr)
    assert len(losses) == 6 and np.isfinite(losses).all()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["export_max_rel_diff"] < 1e-4  # the float32 export against its float32 copy
    agreement = metrics["export_float32_vs_trained"]  # that copy against the 16-bit model
    assert set(agreement) == {"max_abs_prob_diff", "top1_agreement"}  # recorded, not a bar
    assert agreement["max_abs_prob_diff"] < 0.1
    # The export serves float32 from a model that computed in 16 bits.
    loaded = tf.saved_model.load(str(run_dir / "export" / "classifier"))
    sig = loaded.signatures["serve_float"]
    assert sig.structured_input_signature[1]["images"].dtype == tf.float32
    out = sig(images=tf.random.uniform([2, 64, 64, 3]))
    assert out["logits"].dtype == tf.float32 and out["probabilities"].dtype == tf.float32
    litert = json.loads((run_dir / "export" / "litert" / "checks.json").read_text())
    assert litert["float32"]["max_abs_prob_diff"] <= 1e-4 and litert["float32"]["passed"]


def test_devices_are_logged_and_an_unseen_nvidia_gpu_is_warned_about(tmp_path, monkeypatch,
                                                                     caplog):
    from trainer.training import distribute

    assert not tf.config.list_physical_devices("GPU")  # this CPU machine, TensorFlow's view
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi, no /dev/nvidia0: no warning
    with caplog.at_level("INFO", logger="trainer.training.distribute"):
        assert distribute.report_devices() == ["CPU:0"]
    assert "devices: CPU:0" in caplog.text and "NVIDIA" not in caplog.text

    # The driver's tool on the PATH, as on a GPU machine with a CPU-only TensorFlow.
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100'\n")
    smi.chmod(0o755)
    caplog.clear()
    with caplog.at_level("INFO", logger="trainer.training.distribute"):
        distribute.report_devices()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "this machine has an NVIDIA GPU but TensorFlow sees none" in warnings[0]
    assert "pip install -e '.[gpu]'" in warnings[0]


def test_a_large_cpu_step_recomputes_its_convolutional_blocks(monkeypatch):
    """trainer.recompute=auto: on from RECOMPUTE_STEP_GMACS of forward work per step on a CPU
    without XLA (memory: tests/models/test_recompute.py, bench/memory.py), off below it and on
    any machine with a GPU; true / false as given. The matrix records it in run.json."""
    from trainer.models.presets import step_gmacs
    from trainer.training import distribute

    for name in ("mobilevit_xxs", "mobilevit_xs", "mobilevit_s"):  # the memory target's step
        assert distribute.recompute("auto", step_gmacs(name, 256, 32)) is True
    assert distribute.recompute("auto", step_gmacs("mobilevit_xs", 128, 32)) is True  # 8.2 G
    assert distribute.recompute("auto", step_gmacs("mobilevit_xxs", 128, 32)) is False  # 3.3 G
    assert distribute.recompute("auto", step_gmacs("mobilevit_s", 64, 32)) is False  # 4.0 G
    assert distribute.recompute("auto", step_gmacs("mobilevit_xxs", 32, 32)) is False
    assert distribute.recompute("auto", 50.0, jit_compile="true") is False
    assert distribute.recompute("True", 0.1) is True and distribute.recompute("false", 50.0) is False
    physical = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: (
        ["GPU:0"] if kind == "GPU" else physical(kind)))
    assert distribute.recompute("auto", 50.0) is False


def test_a_small_cpu_step_runs_one_thread_per_op(monkeypatch, caplog):
    """trainer.intra_op_threads=auto: one thread per op below SMALL_STEP_GMACS of forward work
    per step on a CPU (measured faster there: distribute.py), TensorFlow's default above it and
    on any machine with a GPU; a number as given. Subprocess runs record it in run.json
    (tests/system/test_matrix.py); here, the choice and what happens once TensorFlow runs."""
    from trainer.models.presets import step_gmacs
    from trainer.training import distribute

    assert step_gmacs("mobilevit_xxs", 256, 1) == pytest.approx(0.41)
    assert step_gmacs("mobilevit_xxs", 32, 32) == pytest.approx(0.205)  # the quickstart's step
    assert distribute.intra_op_threads("auto", step_gmacs("mobilevit_xxs", 32, 32)) == 1
    assert distribute.intra_op_threads("auto", step_gmacs("mobilevit_s", 32, 32)) == 1  # 1.0 G
    assert distribute.intra_op_threads("auto", step_gmacs("mobilevit_xs", 64, 32)) == 0  # 2.1 G
    assert distribute.intra_op_threads("auto", step_gmacs("mobilevit_xxs", 256, 32)) == 0
    assert distribute.intra_op_threads("auto", 0.2, jit_compile="true") == 0  # XLA: default
    assert distribute.intra_op_threads("3", 0.2) == 3 and distribute.intra_op_threads(0, 0.2) == 0
    tf.constant(1.0).numpy()  # TensorFlow is running in this process: the count cannot change
    current = tf.config.threading.get_intra_op_parallelism_threads()
    with caplog.at_level("INFO", logger="trainer.training.distribute"):
        assert distribute.set_intra_op_threads(current + 1) == current
    assert f"intra-op threads stay at {current}" in caplog.text
    # A GPU machine (the device this one lacks): the CPU threads feed the GPU; default.
    physical = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: (
        ["GPU:0"] if kind == "GPU" else physical(kind)))
    assert distribute.intra_op_threads("auto", 0.2) == 0
