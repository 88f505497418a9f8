"""`python -m trainer [overrides]`: check the config, then run train(cfg) under Hydra."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from trainer import preflight, sweeps
from trainer.config import ConfigError, register
from trainer.failures import (INTERRUPTED_EXIT, NON_FINITE_EXIT, RESOURCE_EXIT,
                              resource_message)
from trainer.precheck import CONF_DIR, check, searchpath_override
from trainer.rundir import SHARED_RUN_DIR_ENV, resume_argv


register()  # also in a launcher's worker process, which resolves the trial directory's name


# An absolute path: also found when this module is imported (not run) by a launcher or a test.
@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> float:
    import logging

    logging.getLogger("absl").setLevel(logging.WARNING)
    # A log line that cannot be written (a full disk) is dropped, not printed with a traceback.
    logging.raiseExceptions = False
    from trainer.train import train  # TensorFlow starts here, after the config checks
    import tensorflow as tf
    from trainer.data import DataError
    from trainer.loop import NonFiniteLoss, Preempted
    from trainer.models.weights import CheckpointError

    log = logging.getLogger("trainer")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if sweeps.is_multirun():
        return _trial(cfg, run_dir, log)
    try:
        metrics = train(cfg, run_dir)
    except (ConfigError, DataError, CheckpointError) as e:  # user mistakes: no traceback
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Preempted as e:  # the same command resumes from the checkpoint
        log.warning("%s", e)
        print(e if e.exit_code == INTERRUPTED_EXIT else f"preempted: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except NonFiniteLoss as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(NON_FINITE_EXIT)
    except (tf.errors.OpError, OSError) as e:  # a full disk, out of memory: one line
        message = resource_message(e, run_dir, cfg.trainer.batch_size)
        if message is None:
            raise
        log.error("%s", message)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(RESOURCE_EXIT)
    return metrics["val_accuracy"]  # the objective of sweeps


def _trial(cfg: DictConfig, run_dir: Path, log) -> float:
    """One trial of a sweep: a failure is recorded (failed.json) and the sweep goes on."""
    import keras

    from trainer.loop import Preempted
    from trainer.train import train

    (run_dir / sweeps.FAILED_FILE).unlink(missing_ok=True)  # a re-run tries it again
    keras.backend.clear_session()  # nothing of the previous in-process trial is kept
    try:
        return train(cfg, run_dir)["val_accuracy"]
    except Preempted as e:  # SIGTERM or Ctrl-C stops the whole sweep; the same command resumes it
        log.warning("%s", e)
        sys.exit(e.exit_code)
    except Exception as e:
        sweeps.record_failure(run_dir, e)
        log.error("trial %s failed: %s: %s (recorded in %s; the sweep goes on)", run_dir.name,
                  type(e).__name__, e, run_dir / sweeps.FAILED_FILE)
        if sweeps.optuna_sweep():  # Optuna's sweeper records a raising trial as FAIL
            raise sweeps.TrialFailed(f"{type(e).__name__}: {e}") from None
        return float("nan")  # Hydra's basic sweeper ignores the value


def _non_chief_worker() -> bool:
    """From TF_CONFIG: is this process a worker other than the chief of a cluster?"""
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    task, cluster = tf_config.get("task", {}), tf_config.get("cluster", {})
    if not task or not cluster:
        return False
    if "chief" in cluster:
        return task.get("type") != "chief"
    return not (task.get("type") == "worker" and int(task.get("index", 0)) == 0)


def _sweep_dir_override(argv: list[str]) -> list[str]:
    """A multirun's directory named by its overrides: the same command resumes the same sweep."""
    if not {"-m", "--multirun"} & set(argv) or any(a.startswith("hydra.sweep.dir=") for a in argv):
        return []
    return [f"hydra.sweep.dir={sweeps.sweep_dir_for(argv)}"]


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ chatter out
    try:
        sys.argv[1:] = resume_argv(sys.argv[1:])  # resume=RUN_DIR: that run's own overrides
        cfgs = check(sys.argv[1:])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    try:  # downloads and logins, before TensorFlow starts: offline fails in seconds
        preflight.check(cfgs)
    except preflight.PreflightError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # Extra overrides go first (after -m): Hydra's parser takes no overrides after a flag like
    # --cfg, nor overrides on both sides of -m.
    argv = sys.argv[1:]
    multirun = [a for a in argv if a in ("-m", "--multirun")]
    extra = searchpath_override(argv) + _sweep_dir_override(argv)
    sys.argv[1:] = multirun + extra + [a for a in argv if a not in multirun]
    if _non_chief_worker():
        # Only the chief writes the run directory; Hydra would create one per process, so
        # other workers get a scratch directory and no .hydra/ output.
        scratch = tempfile.mkdtemp(prefix="mobilevit-worker-")
        shared = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("hydra.run.dir=")]
        if shared:
            os.environ[SHARED_RUN_DIR_ENV] = shared[-1]
        sys.argv[1:] = [f"hydra.run.dir={scratch}", "hydra.output_subdir=null"] + [
            a for a in sys.argv[1:] if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    register()
    try:
        app()
    except KeyboardInterrupt:  # Ctrl-C outside the training steps (start-up, evaluation, export)
        print("interrupted; run the same command to resume from the last checkpoint",
              file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT)


if __name__ == "__main__":
    main()
