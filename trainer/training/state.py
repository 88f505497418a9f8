"""Where a run is and what its checkpoints hold: `TrainState` saves, restores and rolls back.

The checkpoint carries the model, the optimizer (with its step, hence the schedule position),
the RNG states, the learning-rate scale that rollbacks lower, and the position: epoch, step in
the epoch, the epoch's running sums and the best score. The data order is a function of
(seed, epoch), so this is all an exact resume needs.

`tf.train.CheckpointManager` writes atomically (data first, then the `checkpoint` state file), so a
kill never leaves a half-written checkpoint listed. A file damaged afterwards (a bad disk, a copy
cut short) is still possible: then the previous checkpoint is used, with a warning.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import keras
import tensorflow as tf

from trainer.atomic import write_text
from trainer.errors import CheckpointError

log = logging.getLogger(__name__)

STAT_KEYS = ("loss", "correct", "correct_topk", "count")  # per-epoch sums, in this order


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


def copy_checkpoint(path: str, prefix: Path) -> str:
    """Copy checkpoint `path` to `prefix` and make it the only one its directory lists (the
    previous one's files removed). The state file is replaced atomically after the copy, so a
    kill leaves the previous checkpoint listed. Why by hand: a `CheckpointManager` lists only
    what it wrote itself, and writing the same state twice costs a second save."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    previous = tf.train.latest_checkpoint(str(prefix.parent))
    source = Path(path)
    for file in source.parent.glob(f"{source.name}.*"):
        shutil.copyfile(file, prefix.parent / f"{prefix.name}{file.name[len(source.name):]}")
    # The manager's state file (a CheckpointState text proto), with a relative path as the
    # manager writes it, so that the run directory can move.
    write_text(prefix.parent / "checkpoint", f'model_checkpoint_path: "{prefix.name}"\n'
                                             f'all_model_checkpoint_paths: "{prefix.name}"\n')
    if previous and Path(previous) != prefix:
        for stale in Path(previous).parent.glob(f"{Path(previous).name}.*"):
            stale.unlink()
    return str(prefix)


class TrainState:
    """The run's checkpointed state: the `last` manager (every save) and `best_dir`, a copy of
    the best epoch's end-of-epoch checkpoint.

    Build it inside the strategy's scope (its variables are mirrored like the model's).
    `work_dir` is where this process writes; `state_dir` where an earlier attempt left its
    checkpoints (the chief's directory, for a resumed worker).
    """

    def __init__(self, model: keras.Model, optimizer, lr_scale: tf.Variable, work_dir: Path,
                 state_dir: Path, keep: int):
        self.model, self.optimizer, self.lr_scale = model, optimizer, lr_scale
        self.state_dir = state_dir
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.best_score = tf.Variable(-1.0, dtype=tf.float64, trainable=False)
        self.totals = tf.Variable(tf.zeros(len(STAT_KEYS), tf.float64), trainable=False)
        # Early stopping: epochs since val_accuracy last rose by more than min_delta.
        self.stale_epochs = tf.Variable(0, dtype=tf.int64, trainable=False)
        # Dropout / stochastic-depth RNG states are variables of the model but not among its
        # weights, which is all a Keras model puts in a checkpoint.
        weight_ids = {id(w) for w in model.weights}
        rng_states = [v for v in model.variables if id(v) not in weight_ids]
        self.checkpoint = tf.train.Checkpoint(
            model=model, optimizer=optimizer, rng=rng_states, lr_scale=lr_scale,
            epoch=self.epoch, step=self.step, best=self.best_score, totals=self.totals,
            stale_epochs=self.stale_epochs)
        checkpoints = work_dir / "checkpoints"
        self.last = tf.train.CheckpointManager(self.checkpoint, str(checkpoints / "last"),
                                               max_to_keep=keep)
        self.best_dir = checkpoints / "best"  # one checkpoint, a copy of a `last` one

    @property
    def iterations(self) -> int:
        return int(self.optimizer.iterations.numpy())

    def restore_or_start(self) -> str | None:
        """Resume from the newest readable `last` checkpoint, else save the starting point (a
        rollback or a kill before the first save comes back to it). Returns the path resumed."""
        resumed = restore_latest(self.checkpoint, self.state_dir / "checkpoints" / "last")
        if resumed:
            log.info("resumed from %s at epoch %d, step %d", resumed, int(self.epoch.numpy()) + 1,
                     int(self.step.numpy()))
        else:
            self.last.save(checkpoint_number=0)
        return resumed

    def resumed_totals(self) -> dict | None:
        """The running sums of a resumed epoch (None at an epoch's start)."""
        if not int(self.step.numpy()):
            return None
        return dict(zip(STAT_KEYS, self.totals.numpy().tolist()))

    def save_last(self, step: int | None = None, totals: dict | None = None,
                  options: tf.train.CheckpointOptions | None = None) -> str:
        if step is not None:
            self.step.assign(step)
        if totals is not None:
            self.totals.assign([totals[k] for k in STAT_KEYS])
        return self.last.save(checkpoint_number=self.iterations, options=options)

    def end_epoch(self, epoch: int, score: float, min_delta: float = 0.0) -> None:
        """Epoch `epoch` (0-based) is done: the next starts at step 0; best and last saved."""
        self.epoch.assign(epoch + 1)
        self.step.assign(0)
        self.totals.assign(tf.zeros(len(STAT_KEYS), tf.float64))
        improved = score > self.best_score.numpy() + min_delta
        self.stale_epochs.assign(0 if improved else self.stale_epochs + 1)
        options = None
        if score > self.best_score.numpy():
            self.best_score.assign(score)
            # Written once, copied to best/ before last/ lists it: a kill in between resumes from
            # the previous `last` and redoes this epoch. (A copy: 4 ms; a save: 200 ms, XXS.)
            options = tf.train.CheckpointOptions(experimental_write_callbacks=[
                lambda path: copy_checkpoint(path, self.best_dir / f"ckpt-{epoch + 1}")])
        self.save_last(options=options)

    def roll_back(self, lr_factor: float) -> str:
        """Back to the last good checkpoint, with the learning rate times `lr_factor`."""
        good = self.last.latest_checkpoint
        scale = float(self.lr_scale.numpy()) * lr_factor
        self.checkpoint.restore(good).expect_partial()
        self.lr_scale.assign(scale)  # after the restore, which brought the old one back
        return good

    def restore_best(self) -> int:
        """The best epoch's weights (a resumed worker may find them only in the chief's
        directory); returns that epoch's number."""
        path = tf.train.latest_checkpoint(str(self.best_dir)) or tf.train.latest_checkpoint(
            str(self.state_dir / "checkpoints" / "best"))
        self.checkpoint.restore(path).expect_partial()
        return int(path.rsplit("-", 1)[-1])
