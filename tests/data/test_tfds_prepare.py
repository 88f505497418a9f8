"""Every TFDS data option through its real builder: generated archives in the layout the builder
downloads, the builder's own download-and-prepare code (only the network replaced, by
`tests/fake_downloads.py`), then the trainer trains a few steps and exports. Offline, each option
fails within seconds with one line naming the URL and `data.data_dir`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import tensorflow as tf
from helpers import ROOT, tiny_cfg
from tfds_archives import ARCHIVES

from trainer.data import sources as data

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SMALL = ["model.pretrained=none", "data.image_size=32", "trainer.epochs=1",
         "trainer.steps_per_epoch=2", "trainer.batch_size=8", "trainer.eval_steps=2",
         "logger.tensorboard=false", "export.check_images=8"]


@pytest.mark.parametrize("option", sorted(ARCHIVES))
def test_data_option_prepares_through_its_real_builder_trains_and_exports(option, tmp_path):
    tfds_name, write_archives = ARCHIVES[option]
    archives, data_dir, run_dir = tmp_path / "archives", tmp_path / "tfds", tmp_path / "run"
    archives.mkdir()
    counts = write_archives(archives)
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fake_downloads.py"), str(archives),
         f"data={option}", f"data.data_dir={data_dir}", *SMALL, f"hydra.run.dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]

    # The builder prepared every split with every generated example.
    info = json.loads(next((data_dir / tfds_name).glob("*/dataset_info.json")).read_text())
    prepared = {s["name"]: sum(int(n) for n in s["shardLengths"]) for s in info["splits"]}
    assert prepared == counts
    # The trainer read it with the builder's class names, carved or took its splits, exported.
    dataset = json.loads((run_dir / "dataset.json").read_text())
    assert dataset["name"] == tfds_name and dataset["version"] == info["version"]
    assert dataset["num_classes"] == len(dataset["class_names"]) > 2
    assert sum(dataset["counts"].values()) == sum(counts.values())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["export_max_rel_diff"] < 1e-4
    classifier = tf.saved_model.load(str(run_dir / "export" / "classifier"))
    assert "serve_bytes" in classifier.signatures

    # A wrong split name of a prepared dataset still gets the split-name hint.
    cfg = tiny_cfg(f"data={option}", f"data.data_dir={data_dir}", "data.train_split=trian")
    with pytest.raises(data.DataError, match="split 'trian'.*check the split name"):
        data.load_dataset(cfg.data)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def offline_env(proxy_port: int, tmp_path: Path) -> dict:
    """Every HTTP(S) request goes to 127.0.0.1:proxy_port: the network boundary, on loopback."""
    proxy = f"http://127.0.0.1:{proxy_port}"
    env = {k: v for k, v in ENV.items() if k.lower() not in ("no_proxy", "hf_hub_offline")}
    return {**env, "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy,
            "https_proxy": proxy, "HF_HUB_CACHE": str(tmp_path / "hf"),
            "TFDS_DATA_DIR": str(tmp_path / "tfds-default")}


def run_offline(args: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT,
                            capture_output=True, text=True, env=env, timeout=120)
    return result, time.monotonic() - start


@pytest.mark.parametrize("option", sorted(ARCHIVES))
def test_offline_data_option_fails_fast_with_one_line(option, tmp_path):
    tfds_name = ARCHIVES[option][0]
    empty = tmp_path / "empty"
    run_dir = tmp_path / "run"
    result, seconds = run_offline([f"data={option}", f"data.data_dir={empty}",
                                   "model.pretrained=none", f"hydra.run.dir={run_dir}"],
                                  offline_env(closed_port(), tmp_path))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith(f"error: cannot download TFDS dataset {tfds_name}: http")
    assert f"data.data_dir=DIR (now {empty})" in lines[0] and f"tfds build {tfds_name}" in lines[0]
    assert not run_dir.exists() and not empty.exists()  # nothing was written
    print(f"{option}: failed offline in {seconds:.1f} s")


def test_offline_headline_command_names_both_downloads(tmp_path):
    """`python -m trainer model=mobilevit_xs data=flowers` on a machine without network."""
    result, seconds = run_offline(["model=mobilevit_xs", "data=flowers"],
                                  offline_env(closed_port(), tmp_path))
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert "cannot download TFDS dataset tf_flowers" in line and "data.data_dir=" in line
    assert ("cannot download the ImageNet weights of mobilevit_xs: "
            "https://huggingface.co/timm/mobilevit_xs.cvnets_in1k/resolve/main/model.safetensors"
            in line)
    assert "model.pretrained=/path/to/model.safetensors" in line
    print(f"headline command failed offline in {seconds:.1f} s")


def test_a_network_that_never_answers_is_given_up_on_after_the_probe_timeout(tmp_path):
    """A proxy that accepts and then says nothing: the probe's timeout, not the libraries' retries."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    stop = threading.Event()

    def accept_and_hold():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept_and_hold, daemon=True)
    thread.start()
    try:
        result, seconds = run_offline(["data=flowers", "model.pretrained=imagenet"],
                                      offline_env(server.getsockname()[1], tmp_path))
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.count("no answer within 3 s") == 2  # both URLs probed, in parallel
    assert held  # the requests really reached the (silent) network
    print(f"silent network: failed in {seconds:.1f} s")


def test_tfds_failures_say_what_failed():
    import requests
    import tensorflow_datasets as tfds

    cfg = tiny_cfg("data=flowers", "data.data_dir=/data/tfds").data
    missing = ModuleNotFoundError("No module named 'importlib_resources'",
                                  name="importlib_resources")
    assert data.tfds_failure(cfg, "train", missing) == (
        "preparing TFDS tf_flowers needs the Python package 'importlib_resources', which is not "
        "installed: pip install importlib_resources")
    for error in (tfds.download.DownloadError("Failed to get url x. HTTP code: 503."),
                  requests.ConnectionError("Max retries exceeded")):
        message = data.tfds_failure(cfg, "train", error)
        assert message.startswith("cannot download TFDS tf_flowers (")
        assert "data.data_dir=DIR (now /data/tfds)" in message and "split" not in message
    not_prepared = tiny_cfg("data=flowers", "data.download=false").data
    assert "data.download=false" in data.tfds_failure(
        not_prepared, "train", AssertionError("Dataset tf_flowers: could not find data"))
