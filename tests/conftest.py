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


# --------------------------------------------------------------------------- two workers
# pytest-xdist (`-n 2 --dist loadfile`, pyproject.toml) sends each test file to one worker, so its
# module fixtures (a trained run, say) are built once. The option matrix's cases, a minute or more
# each and independent, go one by one instead: as one file they were half the suite, all on one
# worker. (xdist's own `loadgroup` does not group under pytest 9: it reads the nodeids before its
# group suffix is applied.)


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadFileScheduling

    class FilesAndMatrixCases(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return nodeid if "test_matrix.py::test_case_" in nodeid else super()._split_scope(nodeid)

    return FilesAndMatrixCases(config, log)


# --------------------------------------------------------------------------- the option matrix
# tests/system/test_matrix.py writes one JSON file per case into MATRIX_RESULTS (set here, in the
# controlling process, before pytest-xdist starts its workers, which inherit it); the table of
# cases and results is printed at the end of the session.


def pytest_configure(config):
    if not hasattr(config, "workerinput"):
        import tempfile

        os.environ["MATRIX_RESULTS"] = tempfile.mkdtemp(prefix="matrix-results-")
        # The folder scan's cache (data.cache_dir's default) goes here, not into the user's home.
        os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="test-cache-")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    import json
    from pathlib import Path

    if hasattr(config, "workerinput") or not os.environ.get("MATRIX_RESULTS"):
        return
    rows = [json.loads(p.read_text())
            for p in sorted(Path(os.environ["MATRIX_RESULTS"]).glob("*.json"))]
    if not rows:
        return
    terminalreporter.write_sep("-", f"option matrix: {len(rows)} cases")
    for row in rows:
        outcome = "ok" if row["rc"] == 0 else ("refused" if row["case"] == "refused" and
                                               row["rc"] == 2 else f"FAILED rc={row['rc']}")
        terminalreporter.write_line(f"{row['case']:>8} {outcome:<8} {row['seconds']:>6.1f} s  "
                                    + " ".join(row["values"]))


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput") and os.environ.get("MATRIX_RESULTS"):
        import shutil

        shutil.rmtree(os.environ.pop("MATRIX_RESULTS"), ignore_errors=True)


@pytest.fixture(scope="session")
def timm_xxs(tmp_path_factory):
    """(timm MobileViT-XXS with discriminative random weights, its model.safetensors on disk)."""
    import reference as R

    ref = R.timm_model("mobilevit_xxs", seed=3)
    path = tmp_path_factory.mktemp("timm-xxs") / "model.safetensors"
    R.save_state(ref, path)
    return ref, path
