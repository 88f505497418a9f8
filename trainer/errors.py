"""Every error a user can meet, its exit status, and one line for a resource that ran out.

A leaf module (no imports of the trainer): every layer raises these, the commands catch them.

Exit statuses: 2 a config, data, checkpoint or download problem (nothing started), 3 a
non-finite loss, 4 a full disk or out of memory, 130 Ctrl-C and 143 SIGTERM (128 + the signal,
as shells and schedulers expect; `Preempted`; the same command resumes).

A full disk and an accelerator out of memory both reach us as TensorFlow's
`ResourceExhaustedError` (a full disk met by Python is an `OSError` with ENOSPC); the user needs
to know which one, where, and how to go on. Nothing is lost either way: checkpoints are written
atomically, so the last complete one is intact.
"""

from __future__ import annotations

import errno
import re
import shutil
import signal
from pathlib import Path

USAGE_EXIT = 2
NON_FINITE_EXIT = 3
RESOURCE_EXIT = 4
INTERRUPTED_EXIT = 128 + signal.SIGINT


class ConfigError(ValueError):
    """A config mistake: the message names the key, the value and what is allowed."""


class DataError(ValueError):
    """Data that cannot be used; the message names the dataset, split or path."""


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the keys or shapes."""


class PreflightError(RuntimeError):
    """Something the run needs from outside (a download, a login) is not there; one line."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last checkpoint."""


class Preempted(RuntimeError):
    """SIGTERM or Ctrl-C arrived; a checkpoint was written and the same command resumes."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        self.exit_code = 128 + signum  # what shells and schedulers expect: 143, 130
        if signum == signal.SIGINT:
            text = (f"interrupted at step {step}; run the same command to resume "
                    f"(checkpoint {checkpoint})")
        else:
            text = f"stopped by SIGTERM at step {step}; checkpoint {checkpoint}"
        super().__init__(text)


# User mistakes: one line, no traceback, USAGE_EXIT.
USER_ERRORS = (ConfigError, DataError, CheckpointError, PreflightError)


def _last_checkpoint(run_dir: Path) -> str:
    import tensorflow as tf

    return tf.train.latest_checkpoint(str(run_dir / "checkpoints" / "last")) or "none yet"


def resource_message(exc: BaseException, run_dir: Path, batch_size: int) -> str | None:
    """The one line for a full disk or an out-of-memory error, or None for anything else."""
    import tensorflow as tf

    text = str(exc)
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left on device" in text:
        free_mib = shutil.disk_usage(run_dir).free / 2**20
        return (f"the disk holding {run_dir} is full (No space left on device; {free_mib:.0f} MiB "
                f"free now): free some space there and run the same command to resume from the "
                f"last complete checkpoint ({_last_checkpoint(run_dir)})")
    if isinstance(exc, tf.errors.ResourceExhaustedError):
        device = re.search(r"device:([A-Z]+:\d+)", text)
        where = f" on {device.group(1)}" if device else ""
        return (f"out of memory{where} at trainer.batch_size={batch_size}: start again with a "
                f"smaller batch, e.g. trainer.batch_size={max(batch_size // 2, 1)} (or "
                f"trainer.precision=mixed_float16 on a GPU); the last complete checkpoint is "
                f"{_last_checkpoint(run_dir)}")
    return None
