"""End-to-end train(cfg): data -> model -> loop -> evaluate -> export, on tiny inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from helpers import ROOT, make_image_folder, tiny_cfg
from omegaconf import OmegaConf

from trainer.data.pipeline import eval_preprocess
from trainer.training.train import train


def check_run_dir(run_dir: Path, metrics: dict, class_names: list[str], with_test: bool,
                  raw_images: np.ndarray) -> None:
    for path in ("metrics.json", "history.csv", "run.json", "dataset.json",
                 "checkpoints/best/checkpoint", "export/classifier/saved_model.pb",
                 "export/feature_extractor/saved_model.pb", "export/model.keras"):
        assert (run_dir / path).exists(), path
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= saved["val_accuracy"] <= 1.0 and "val_top5_accuracy" in saved
    assert ("test_accuracy" in saved) == with_test
    assert saved["val_accuracy"] == pytest.approx(metrics["val_accuracy"])
    assert saved["export_max_rel_diff"] < 1e-4
    history = (run_dir / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,loss,accuracy") and len(history) == 2

    # The exported classifier, loaded with TensorFlow alone, matches the Keras model.
    import keras
    model = keras.models.load_model(run_dir / "export" / "model.keras", compile=False)
    loaded = tf.saved_model.load(str(run_dir / "export" / "classifier"))
    info = json.loads((run_dir / "dataset.json").read_text())
    assert info["class_names"] == class_names
    crop_pct = OmegaConf.load(run_dir / "config.yaml").data.crop_pct  # the run's own config
    out = loaded.signatures["serving_default"](images=tf.constant(raw_images))
    x = eval_preprocess(tf.constant(raw_images), 32, crop_pct)
    expected = model(x, training=False).numpy()
    np.testing.assert_allclose(out["logits"].numpy(), expected, atol=1e-4 * max(1, abs(expected).max()))
    names = [n.decode() for n in out["top_k_names"].numpy()[:, 0]]
    assert names == [class_names[i] for i in expected.argmax(1)]


def test_train_digits_end_to_end_with_wandb_offline(tmp_path):
    run_dir = tmp_path / "digits"
    cfg = tiny_cfg("data=digits", "logger=wandb", "logger.mode=offline", "logger.tags=[t1]")
    metrics = train(cfg, run_dir)
    assert metrics["val_examples"] == 16  # eval_steps=2 batches of 8
    raw = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    check_run_dir(run_dir, metrics, [str(i) for i in range(10)], True, raw)
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"

    # wandb, offline: one run, id kept in the run directory, flattened config, finished.
    from trainer.run.loggers import wandb_run_id

    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline.name.endswith(run_id) and wandb_run_id(run_dir) == run_id  # a resume keeps it
    # Offline runs keep config, history and summary in the binary run-<id>.wandb record log.
    records = (offline / f"run-{run_id}.wandb").read_bytes()
    assert b"optim.lr" in records and b"model.name" in records and b"val_accuracy" in records
    debug = (offline / "logs" / "debug.log").read_text()
    assert f"finishing run mobilevit-trainer/{run_id}" in debug and "got exitcode: 0" in debug


def test_train_tfds_flowers_mock(tmp_path):
    import tensorflow_datasets as tfds

    run_dir = tmp_path / "flowers"
    with tfds.testing.mock_data(num_examples=24):
        metrics = train(tiny_cfg("data=flowers", "data.val_fraction=0.25"), run_dir)
    info = json.loads((run_dir / "dataset.json").read_text())
    assert info["class_names"] == ["dandelion", "daisy", "tulips", "sunflowers", "roses"]
    assert info["counts"]["train"] + info["counts"]["val"] == 24
    raw = np.random.default_rng(1).integers(0, 255, (2, 50, 40, 3), dtype=np.uint8)
    check_run_dir(run_dir, metrics, info["class_names"], False, raw)


def test_train_image_folder_skips_broken_files(tmp_path):
    folder = make_image_folder(tmp_path / "imgs")
    (folder / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "dog" / "empty.png").write_bytes(b"")
    (folder / "fox" / "notes.jpg").write_text("hello")
    run_dir = tmp_path / "run"
    metrics = train(tiny_cfg("data=folder", f"data.path={folder}", "data.val_fraction=0.34"),
                    run_dir)
    report = (run_dir / "skipped_files.csv").read_text().splitlines()
    assert report[0] == "file,reason" and len(report) == 4
    assert {Path(line.split(",")[0]).name for line in report[1:]} == {"broken.jpg", "empty.png",
                                                                     "notes.jpg"}
    raw = np.random.default_rng(2).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    check_run_dir(run_dir, metrics, ["cat", "dog", "fox"], False, raw)


def test_hydra_app_writes_run_directory(tmp_path):
    """The real command line: Hydra's .hydra/ config, relative paths, exit 0."""
    run_dir = tmp_path / "app-run"
    args = [sys.executable, "-m", "trainer", "data=digits", "model.pretrained=none",
            "data.image_size=32", "trainer.epochs=1", "trainer.steps_per_epoch=1",
            "trainer.batch_size=8", "trainer.eval_steps=1", "trainer.export=false",
            f"hydra.run.dir={run_dir}"]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert json.loads((run_dir / "metrics.json").read_text())["val_examples"] == 8


def test_class_subset_and_few_labels_per_class():
    from trainer.data.sources import load_dataset
    from trainer.errors import DataError

    cfg = tiny_cfg("data.classes=[7,5,9]", "data.train_per_class=4").data
    dataset = load_dataset(cfg)
    assert dataset.class_names == ["7", "5", "9"] and dataset.counts["train"] == 12
    for split, ds in dataset.splits.items():
        labels = np.array([int(y) for _, y in ds.as_numpy_iterator()])
        assert set(labels) == {0, 1, 2} and len(labels) == dataset.counts[split]
        if split == "train":
            assert np.bincount(labels).tolist() == [4, 4, 4]
    # The label remapping keeps the images: class "7" (now 0) holds sevens of the full data.
    full = load_dataset(tiny_cfg().data)
    sevens = {x.tobytes() for x, y in full.splits["val"].as_numpy_iterator() if y == 7}
    assert {x.tobytes() for x, y in dataset.splits["val"].as_numpy_iterator() if y == 0} == sevens
    with pytest.raises(DataError, match=r"data.classes=\['5', 'x'\]: \['x'\] not usable"):
        load_dataset(tiny_cfg("data.classes=[5,x]").data)


def test_wandb_run_is_finished_when_training_fails(tmp_path):
    from trainer.run.loggers import EpochLoggers

    cfg = tiny_cfg("logger=wandb", "logger.mode=offline")
    with pytest.raises(RuntimeError, match="boom"):
        with EpochLoggers(cfg.logger, {}, tmp_path, chief=True, completed_epochs=0) as loggers:
            loggers.log_epoch({"epoch": 1, "loss": 2.0, "accuracy": 0.1, "val_loss": 2.1,
                               "val_accuracy": 0.1, "lr": 1e-3})
            raise RuntimeError("boom")
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    (offline,) = list((tmp_path / "wandb").glob("offline-run-*"))
    debug = (offline / "logs" / "debug.log").read_text()
    assert f"finishing run mobilevit-trainer/{run_id}" in debug and "got exitcode: 1" in debug
    assert (tmp_path / "history.csv").read_text().count("\n") == 2  # header + the epoch logged


def test_wandb_run_killed_in_a_shared_service_gets_a_clear_error(tmp_path):
    """A detached wandb-core (`wandb beta core start`, joined through WANDB_SERVICE) keeps the
    stream of a killed run open: resuming that run says what holds it and what to do."""
    import signal

    wandb_cli = str(Path(sys.executable).with_name("wandb"))
    start = subprocess.run([wandb_cli, "beta", "core", "start", "--idle-timeout", "60s"],
                           capture_output=True, text=True, timeout=60)
    assert start.returncode == 0, start.stderr
    env = {**os.environ, "WANDB_SERVICE": start.stdout.strip().splitlines()[-1],
           "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT)}
    script = ("import sys, time; from tests.helpers import tiny_cfg; "
              "from trainer.run.loggers import start_wandb; "
              "start_wandb(tiny_cfg('logger=wandb', 'logger.mode=offline').logger, {}, "
              f"__import__('pathlib').Path({str(tmp_path)!r})); print('open', flush=True); "
              "time.sleep(120)")
    try:
        first = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
        assert first.stdout.readline().strip() == "open"
        first.send_signal(signal.SIGKILL)
        first.wait()
        again = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                               text=True, timeout=120)
    finally:
        subprocess.run([wandb_cli, "beta", "core", "stop"], env=env, capture_output=True,
                       timeout=60)
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    assert again.returncode == 1
    assert (f"wandb run {run_id} ({tmp_path / 'wandb_id.txt'}) is still open in the wandb-core "
            "service this process joined through WANDB_SERVICE") in again.stderr
    assert "unset WANDB_SERVICE or restart that service" in again.stderr


def test_online_wandb_without_credentials_is_refused_before_training(tmp_path, monkeypatch):
    home = tmp_path / "home"  # no ~/.netrc, no wandb settings: never logged in
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT))
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "trainer", "logger=wandb", "logger.mode=online",
                             f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: logger=wandb logger.mode=online: no wandb API key")
    for advice in ("wandb login", "WANDB_API_KEY", "logger.mode=offline"):
        assert advice in line
    assert not run_dir.exists()

    from trainer.run import preflight

    logger = OmegaConf.create({"name": "wandb", "mode": "online"})
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef" * 2 + "01234567")
    preflight.check_wandb_login(logger)  # a key in the environment is enough
    monkeypatch.delenv("WANDB_API_KEY")
    preflight.check_wandb_login(OmegaConf.create({"name": "wandb", "mode": "offline"}))
