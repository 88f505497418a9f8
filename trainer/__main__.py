"""`python -m trainer [overrides]`: check the config, then run train(cfg) under Hydra.

Before TensorFlow starts: `resume=RUN_DIR` becomes that run's overrides, the config is composed
and validated (one line, exit 2), and what the run would download is probed (offline: exit 2 in
seconds). Then the Hydra app trains; every error a user can cause ends as one line and an exit
status (trainer/errors.py), never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from trainer.config import compose
from trainer.errors import (
    INTERRUPTED_EXIT,
    NON_FINITE_EXIT,
    RESOURCE_EXIT,
    USAGE_EXIT,
    USER_ERRORS,
    ConfigError,
    NonFiniteLoss,
    Preempted,
    PreflightError,
    resource_message,
)
from trainer.run import dirs, preflight
from trainer.sweeps import trials

log = logging.getLogger("trainer")


def register() -> None:
    """The config schema, the recipes' search path and the resolvers of the run and trial
    directories' names."""
    compose.register()
    dirs.register_resolver()
    trials.register_resolver()


register()  # also in a launcher's worker process, which resolves the trial directory's name


def _exit(message: str, status: int, level: int | None = logging.ERROR) -> None:
    """One line on stderr (and in the run's log, once Hydra has set logging up), then exit."""
    if level is not None:
        log.log(level, "%s", message)
    print(message, file=sys.stderr)
    sys.exit(status)


# An absolute path: also found when this module is imported (not run) by a launcher or a test.
@hydra.main(config_path=compose.CONF_DIR, config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> float:
    logging.getLogger("absl").setLevel(logging.WARNING)
    # A log line that cannot be written (a full disk) is dropped, not printed with a traceback.
    logging.raiseExceptions = False
    import tensorflow as tf  # TensorFlow starts here, after the config checks

    from trainer.training.train import train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        if trials.is_multirun():
            return trials.run_trial(train, cfg, run_dir)
        return train(cfg, run_dir)["val_accuracy"]  # the objective of sweeps
    except USER_ERRORS as e:  # user mistakes: no traceback
        _exit(f"error: {e}", USAGE_EXIT)
    except Preempted as e:  # the same command resumes from the checkpoint
        _exit(str(e) if e.exit_code == INTERRUPTED_EXIT else f"preempted: {e}", e.exit_code,
              logging.WARNING)
    except NonFiniteLoss as e:
        _exit(f"error: {e}", NON_FINITE_EXIT)
    except (tf.errors.OpError, OSError) as e:  # a full disk, out of memory: one line
        message = resource_message(e, run_dir, cfg.trainer.batch_size)
        if message is None:
            raise
        _exit(f"error: {message}", RESOURCE_EXIT)


def _hydra_argv(argv: list[str]) -> list[str]:
    """The arguments Hydra gets: a sweep's content-named directory first (Hydra takes no
    overrides after a flag like --cfg, nor on both sides of -m)."""
    multirun = [a for a in argv if a in ("-m", "--multirun")]
    sweep_dir = []  # the same command resumes the same sweep
    if multirun and not any(a.startswith("hydra.sweep.dir=") for a in argv):
        sweep_dir = [f"hydra.sweep.dir={trials.sweep_dir_for(argv)}"]
    argv = multirun + sweep_dir + [a for a in argv if a not in multirun]
    if dirs.non_chief_worker():
        # Only the chief writes the run directory; Hydra would create one per process, so
        # other workers get a scratch directory and no .hydra/ output.
        shared = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
        if shared:
            os.environ[dirs.SHARED_RUN_DIR_ENV] = shared[-1]
        scratch = tempfile.mkdtemp(prefix="mobilevit-worker-")
        argv = [f"hydra.run.dir={scratch}", "hydra.output_subdir=null"] + [
            a for a in argv if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    return argv


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ chatter out
    try:
        sys.argv[1:] = dirs.resume_argv(sys.argv[1:])  # resume=RUN_DIR: that run's own overrides
        cfgs = compose.check(sys.argv[1:])
    except ConfigError as e:
        _exit(f"config error: {e}", USAGE_EXIT, level=None)
    try:  # downloads and logins, before TensorFlow starts: offline fails in seconds
        preflight.check(cfgs)
    except PreflightError as e:
        _exit(f"error: {e}", USAGE_EXIT, level=None)
    sys.argv[1:] = _hydra_argv(sys.argv[1:])
    try:
        app()
    except KeyboardInterrupt:  # Ctrl-C outside the training steps (start-up, evaluation, export)
        _exit("interrupted; run the same command to resume from the last checkpoint",
              INTERRUPTED_EXIT, level=None)


if __name__ == "__main__":
    main()
