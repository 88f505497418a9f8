"""train(cfg, run_dir) -> metrics: the spine of a run, its stages in the order they happen.

run directory -> strategy and seed -> data -> model, optimizer, checkpoints -> epochs ->
final evaluation -> export. Start-up order: resume the run directory's own last checkpoint if
there is one, else initialise from `model.pretrained` (ImageNet, a checkpoint or an earlier run;
a new head when the class count differs), else from scratch.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import keras
import tensorflow as tf
from omegaconf import DictConfig

from trainer.atomic import write_json
from trainer.config.compose import flatten
from trainer.config.schema import stage_plan
from trainer.config.validate import validate
from trainer.data.pipeline import Unreadable, eval_pipeline, train_pipeline
from trainer.data.sources import load_dataset
from trainer.models.mobilevit import build_model
from trainer.models.presets import step_gmacs
from trainer.models.weights import load_weights
from trainer.run import dirs
from trainer.run.loggers import EpochLoggers
from trainer.run.manifest import write_manifest
from trainer.serving.model_card import ModelCard
from trainer.serving.savedmodel import export_run
from trainer.training import distribute
from trainer.training.distill import load_teacher
from trainer.training.epochs import train_epochs
from trainer.training.loop import Loop
from trainer.training.optim import ema_pairs, finalize_ema, make_run_optimizer, scaled_lr
from trainer.training.stages import apply_stage
from trainer.training.state import TrainState

log = logging.getLogger(__name__)


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    validate(cfg)
    # ------------------------------------------------------------------ run directory
    finished = dirs.open_run(run_dir, cfg)
    if finished is not None:
        return finished

    # ------------------------------------------------------------------ strategy and seed
    t = cfg.trainer
    update_batch = t.batch_size * t.accumulate_steps  # what one optimizer update averages over
    largest = max([cfg.data.image_size, *cfg.aug.multiscale_sizes])
    gmacs = step_gmacs(cfg.model.name, largest, t.batch_size)
    strategy, jit_compile, recompute = distribute.setup(t, cfg.seed, gmacs)
    chief = distribute.is_chief(strategy)
    # Non-chief workers must still write their checkpoint copies: to a scratch directory.
    work_dir = run_dir if chief else Path(tempfile.mkdtemp(prefix="mobilevit-worker-"))
    run_info = {**distribute.describe(strategy, t.batch_size, t.precision, jit_compile),
                "recompute": recompute,
                "accumulate_steps": t.accumulate_steps, "update_batch": update_batch,
                "peak_lr": scaled_lr(cfg.optim, update_batch)}
    dirs.record_start(work_dir, cfg, run_info)  # config.yaml (resume rebuilds from it), run.json

    # ------------------------------------------------------------------ input pipeline
    dataset = load_dataset(cfg.data)
    if chief:
        write_manifest(run_dir, dataset.info(), run_info, cfg.seed, t.deterministic,
                       {s: cfg.data[f"{s}_split"] for s in ("train", "val", "test")})
        if dataset.skipped:
            dirs.write_skipped_report(dataset.skipped, run_dir / "skipped_files.csv")
    # Steps count optimizer updates (each of accumulate_steps micro-batches of batch_size).
    steps_per_epoch = t.steps_per_epoch or max(dataset.counts["train"] // update_batch, 1)
    eval_ds = {s: eval_pipeline(dataset.splits[s], cfg.data, t.batch_size)
               for s in ("val", "test") if s in dataset.splits}
    log.info("data %s: %s, %d classes; %d steps of %d per epoch", dataset.name, dataset.counts,
             dataset.num_classes, steps_per_epoch, update_batch)

    unreadable = Unreadable(cfg.data.on_error)  # files that fail to decode in the pipeline
    epoch_data = epoch_iterators(strategy, dataset, cfg, unreadable)

    # ------------------------------------------------------------------ model, optimizer, state
    stages = stage_plan(cfg)
    with strategy.scope():
        model = build_model(cfg.model, dataset.num_classes, recompute=recompute)
        source = load_weights(model, cfg.model.pretrained, cfg.model.name,
                                 cfg.model.checkpoint_format, dataset.class_names)
        optimizer, lr_scale = make_run_optimizer(cfg.optim, cfg.schedule, stages, steps_per_epoch,
                                                 update_batch, model, t.precision)
        state = TrainState(model, optimizer, lr_scale, work_dir, dirs.state_dir(run_dir),
                           t.keep_checkpoints)
        teacher = load_teacher(cfg.distill, dataset.num_classes) if cfg.distill.teacher else None
    log.info("model %s (%d classes) initialised from %s", cfg.model.name, dataset.num_classes,
             source)
    if chief:  # enough disk for the checkpoints and exports, before hours of training
        slots = len(optimizer.variables) // max(len(model.trainable_variables), 1)
        dirs.check_free_space(run_dir, dirs.checkpoint_bytes(model.count_params(), slots))
    state.restore_or_start()

    # ------------------------------------------------------------------ epochs
    ema = ema_pairs(optimizer)
    loop = make_loop(cfg, strategy, model, optimizer, dataset, teacher, jit_compile)
    # Loggers (history.csv, curves, TensorBoard, wandb) close properly even if training fails.
    with EpochLoggers(cfg.logger, flatten(cfg), run_dir, chief,
                      int(state.epoch.numpy())) as loggers:
        with unreadable.named_on_failure():
            progress = train_epochs(loop, state, stages, epoch_data, t, steps_per_epoch,
                                    eval_ds["val"], ema, loggers, chief, select_metric(cfg))
        if unreadable.gaps and chief:
            dataset.skipped += unreadable.files()
            dirs.write_skipped_report(dataset.skipped, run_dir / "skipped_files.csv")

        # -------------------------------------------------------------- final evaluation
        metrics = evaluate_best(loop, state, stages, ema, eval_ds, t.eval_steps)
        metrics = {**metrics, "epochs": t.epochs, **progress, "skipped_files": len(dataset.skipped)}
        log.info("final: %s", metrics)

        # -------------------------------------------------------------- export
        if not chief:
            shutil.rmtree(work_dir, ignore_errors=True)
            return metrics
        write_json(run_dir / "dataset.json", dataset.info())
        if t.export:
            calib_ds = eval_pipeline(dataset.splits["train"], cfg.data, t.batch_size)
            metrics.update(export(model, dataset.class_names, cfg, run_dir, eval_ds["val"],
                                  calib_ds, metrics))
        loggers.log_final(metrics)
        write_json(run_dir / "metrics.json", metrics)  # last: it marks the run finished
    return metrics


def select_metric(cfg) -> str:
    """What picks the best epoch: with class balancing on, the balanced accuracy (mean recall);
    plain accuracy would favour predicting the common classes."""
    return "val_accuracy" if cfg.data.class_balance == "none" else "val_balanced_accuracy"


def epoch_iterators(strategy: tf.distribute.Strategy, dataset, cfg, unreadable: Unreadable):
    """epoch_data(epoch, skip_updates): the distributed training iterator of an epoch, each
    worker building the pipeline of its own share (`shard`), resumed after `skip_updates`."""
    t = cfg.trainer

    def epoch_data(epoch: int, skip_updates: int):
        def per_worker(context: tf.distribute.InputContext) -> tf.data.Dataset:
            return train_pipeline(
                dataset.splits["train"], cfg.data, cfg.aug, t.batch_size, cfg.seed, epoch,
                skip_batches=skip_updates * t.accumulate_steps,  # micro-batches, not updates
                num_classes=dataset.num_classes, replicas=strategy.num_replicas_in_sync,
                shard=(context.input_pipeline_id, context.num_input_pipelines),
                unreadable=unreadable)
        return iter(strategy.distribute_datasets_from_function(per_worker))
    return epoch_data


def make_loop(cfg, strategy, model, optimizer, dataset, teacher, jit_compile: bool) -> Loop:
    t = cfg.trainer
    weights = dataset.class_weights() if cfg.data.class_balance == "weighted_loss" else None
    return Loop(strategy, model, optimizer, dataset.num_classes, t.batch_size,
                cfg.optim.label_smoothing, jit_compile=jit_compile,
                log_every_steps=t.log_every_steps, accumulate_steps=t.accumulate_steps,
                class_weights=weights, teacher=teacher, distill_cfg=cfg.distill)


def evaluate_best(loop: Loop, state: TrainState, stages: list, ema, eval_ds: dict,
                  eval_steps: int | None) -> dict:
    """The best epoch's weights (their EMA, if kept) on every evaluation split."""
    best_epoch = state.restore_best()
    finalize_ema(state.optimizer, ema)  # the checkpoints keep the raw weights; the rest the EMA
    # The whole plan (a resumed attempt applied only the stages it reached); this leaves the
    # last stage's trainable flags, as an uninterrupted run does.
    trained_sets = [apply_stage(state.model, s) for s in stages]
    metrics = {"best_epoch": best_epoch,
               "best_val_accuracy_during_training": float(state.best_score.numpy()),
               "lr_scale": float(state.lr_scale.numpy()), "ema": ema is not None,
               "stages": trained_sets}
    for split, ds in eval_ds.items():
        metrics.update(loop.evaluate(ds, eval_steps, f"{split}_"))
    return metrics


def export(model: keras.Model, class_names: list[str], cfg: DictConfig, run_dir: Path,
           val_ds: tf.data.Dataset, calib_ds: tf.data.Dataset, metrics: dict) -> dict:
    """export/ (SavedModels, model.keras, LiteRT, model card); returns the export's metrics."""
    result = export_run(model, class_names, cfg.export, ModelCard.from_config(cfg), run_dir,
                        val_ds, calib_ds, metrics)
    log.info("exported %s (reload check: max relative difference %.2g)", run_dir / "export",
             result["reload_max_rel_diff"])
    out = {"export_max_rel_diff": result["reload_max_rel_diff"]}
    if "float32_vs_trained" in result:  # trained in mixed precision
        out["export_float32_vs_trained"] = result["float32_vs_trained"]
    return out
