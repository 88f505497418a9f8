import os
import sys

# Quiet TensorFlow's start-up chatter and keep tests on the CPU with a fixed oneDNN setting.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _own_wandb_service(monkeypatch):
    """Each test's subprocesses start their own wandb-core, as from a fresh shell.

    A test that runs wandb in-process leaves WANDB_SERVICE (the address of its wandb-core) in
    this worker's environment; a trainer subprocess would then join that long-lived service, and a
    run killed there stays registered in it ("run ID ... is in use" when it resumes).
    """
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
