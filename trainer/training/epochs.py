"""The epochs of a run: stage switches, one pass of training, validation, checkpoints, and what
happens when the loss turns non-finite (stop, or roll back and lower the learning rate) or a
signal arrives (checkpoint, then `Preempted`)."""

from __future__ import annotations

import logging
import threading

import tensorflow as tf

from trainer.errors import NonFiniteLoss, Preempted
from trainer.run.loggers import EpochLoggers
from trainer.training import stages as stage_lib
from trainer.training.loop import Loop, Timer, preemption_handler
from trainer.training.optim import current_lr, ema_swapped
from trainer.training.state import TrainState

log = logging.getLogger(__name__)


def train_epochs(loop: Loop, state: TrainState, stages: list, epoch_data, trainer_cfg,
                 steps_per_epoch: int, val_ds: tf.data.Dataset, ema, loggers: EpochLoggers,
                 chief: bool, select: str = "val_accuracy") -> dict:
    """Train from the state's position to `trainer.epochs`; returns how it went.

    `epoch_data(epoch, skip_batches)` is the distributed training iterator of an epoch.
    `select`: the validation metric that picks the best epoch and drives early stopping.
    """
    t, every = trainer_cfg, trainer_cfg.checkpoint_every_steps
    rollbacks, stage = 0, None
    patience = t.early_stopping.patience

    def on_step(step: int, totals: dict) -> None:
        # Read once: a signal that arrives during this call is handled after the next step.
        requested = preemption.requested
        if (every and step % every == 0) or requested:
            state.save_last(step, totals)
        else:
            state.step.assign(step)
        if requested:
            raise Preempted(requested, state.iterations, state.last.latest_checkpoint)

    releases: list[threading.Thread] = []
    with Timer() as train_time, preemption_handler() as preemption:
        while (epoch := int(state.epoch.numpy())) < t.epochs:
            if patience and int(state.stale_epochs.numpy()) >= patience:  # also on a resume
                break
            if stage_lib.stage_at(stages, epoch) != stage:
                stage = stage_lib.stage_at(stages, epoch)
                trains = stage_lib.apply_stage(loop.model, stage)
                loop.reset()  # a traced step would keep the old trainable set
                log.info("stage %r from epoch %d: %s", stage.name, epoch + 1, trains)
            start_step = int(state.step.numpy())
            with Timer() as epoch_time:
                iterator = [epoch_data(epoch, start_step)]  # the only reference: see release()
                try:
                    row = loop.train_epoch(iterator[0], steps_per_epoch, epoch, t.epochs, chief,
                                           start_step, state.resumed_totals(), on_step)
                except NonFiniteLoss as e:
                    if t.on_nan == "rollback" and rollbacks < t.max_rollbacks:
                        rollbacks += 1
                        good = state.roll_back(t.nan_lr_factor)
                        log.warning("%s: rolled back to %s, learning rate x%g (rollback %d of %d)",
                                    e, good, float(state.lr_scale.numpy()), rollbacks,
                                    t.max_rollbacks)
                        continue
                    raise NonFiniteLoss(
                        f"{e}; the last good checkpoint is {state.last.latest_checkpoint}, left "
                        f"intact" + (f" ({rollbacks} rollback(s) did not help)" if rollbacks
                                     else "")) from None
                finally:
                    releases.append(release(iterator))
                with ema_swapped(ema):  # validate (and choose the best by) the EMA
                    row.update(loop.evaluate(val_ds, t.eval_steps, "val_"))
            row = {"epoch": epoch + 1, **row, "lr": round(current_lr(loop.optimizer), 8),
                   "seconds": round(epoch_time.seconds, 2)}
            loggers.log_epoch(row)
            log.info("epoch %d: %s", epoch + 1,
                     {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
            state.end_epoch(epoch, row[select], t.early_stopping.min_delta)
            if preemption.requested:  # it came during validation: the epoch is saved
                raise Preempted(preemption.requested, state.iterations,
                                state.last.latest_checkpoint)
    for thread in releases:
        thread.join()
    progress = {"train_seconds": round(train_time.seconds, 2), "nan_rollbacks": rollbacks,
                "epochs_trained": int(state.epoch.numpy())}
    if patience and int(state.stale_epochs.numpy()) >= patience:
        progress["stopped_early"] = (
            f"after epoch {progress['epochs_trained']} of {t.epochs}: {select} did not rise by "
            f"more than {t.early_stopping.min_delta} for {patience} epoch(s) "
            f"(trainer.early_stopping)")
        log.info("early stopping %s", progress["stopped_early"])
    return progress


def release(holder: list) -> threading.Thread:
    """Drop the finished epoch's iterator (`holder`'s only element, its last reference) on
    another thread. Why: deleting a tf.data iterator waits for its autotuning thread to wind
    down, which took 2.0-4.6 s in 3 of the quickstart's 8 epochs (seen with py-spy in
    `RootDataset::Iterator::~Iterator`), time the next epoch need not wait for."""
    thread = threading.Thread(target=holder.clear, name="release-epoch-iterator")
    thread.start()
    return thread
