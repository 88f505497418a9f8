"""Restore the newest readable checkpoint of a directory, falling back to older ones.

`tf.train.CheckpointManager` writes atomically (data first, then the `checkpoint` state file), so a
kill never leaves a half-written checkpoint listed. A file damaged afterwards (a bad disk, a copy
cut short) is still possible: then the previous checkpoint is used, with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

import tensorflow as tf

from trainer.models.weights import CheckpointError

log = logging.getLogger(__name__)


def listed(directory: Path) -> list[str]:
    """The checkpoints a manager's state file lists in `directory`, oldest first."""
    state = tf.train.get_checkpoint_state(str(directory))
    if state is None:
        return []
    paths = list(state.all_model_checkpoint_paths) or [state.model_checkpoint_path]
    return [p if Path(p).is_absolute() else str(Path(directory) / p) for p in paths]


def restore_latest(checkpoint: tf.train.Checkpoint, directory: Path) -> str | None:
    """Restore the newest checkpoint that reads back completely; None if there is none."""
    paths = listed(directory)
    for path in reversed(paths):
        try:
            # Reading every tensor verifies its CRC32C; a damaged file raises here.
            reader = tf.train.load_checkpoint(path)
            for name in reader.get_variable_to_shape_map():
                reader.get_tensor(name)
            checkpoint.restore(path).expect_partial()
            return path
        except (tf.errors.OpError, ValueError, IndexError) as e:  # IndexError: cut short
            log.warning("checkpoint %s is unreadable (%s: %s); trying the previous one", path,
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
    if paths:
        raise CheckpointError(f"no readable checkpoint in {directory} (tried {', '.join(paths)}); "
                              f"move the directory away to start the run afresh")
    return None
