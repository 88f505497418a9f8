"""train(cfg) -> metrics: seed -> strategy -> data -> model -> restore -> loop -> evaluate -> export.

Start-up order: resume the run directory's own last checkpoint if there is one, else initialise
from `model.pretrained` (ImageNet, a checkpoint or an earlier run; a new head when the class count
differs), else from scratch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import keras
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from trainer import augment, data, export, finetune, manifest, rundir
from trainer.atomic import write_json
from trainer.checkpoints import restore_latest
from trainer.config import check_writable, stage_plan, validate, ConfigError
from trainer.loggers import EpochLoggers
from trainer.distribute import is_chief, make_strategy, strategy_name, use_xla
from trainer.loop import (STAT_KEYS, Loop, NonFiniteLoss, Preempted, Timer,
                          preemption_handler)
from trainer.models.mobilevit import MobileViTBackbone, build_classifier
from trainer.models.weights import load_pretrained
from trainer.optim import (ScaledSchedule, StagedSchedule, current_lr, ema_pairs, make_optimizer,
                           make_schedule, scaled_lr)

log = logging.getLogger(__name__)


def build_model(model_cfg, num_classes: int) -> keras.Model:
    backbone = MobileViTBackbone.from_preset(
        model_cfg.name, dropout=model_cfg.dropout, drop_path_rate=model_cfg.drop_path_rate,
        sync_bn=model_cfg.sync_bn)
    return build_classifier(backbone, num_classes, dropout=model_cfg.head_dropout)


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    validate(cfg)
    check_writable(run_dir)
    # Where an earlier attempt of this run left its state (the chief's directory, for workers).
    state_dir = Path(os.environ.get(rundir.SHARED_RUN_DIR_ENV) or run_dir)
    if tf.train.get_checkpoint_state(str(state_dir / "checkpoints" / "last")):
        rundir.check_unchanged(state_dir, cfg)
    finished = _finished_metrics(run_dir, cfg)
    if finished is not None:
        log.info("%s already holds this finished run: nothing to do", run_dir)
        return finished
    for path in rundir.clean_stale(run_dir):
        log.info("removed %s, left by a killed process", path)

    # ------------------------------------------------------------------ strategy and seed
    strategy = make_strategy(cfg.trainer.strategy, cfg.trainer.cpu_replicas)
    replicas = strategy.num_replicas_in_sync
    if cfg.trainer.batch_size % replicas:
        raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} is not divisible by the "
                          f"{replicas} replicas of {strategy_name(strategy)}")
    chief = is_chief(strategy)
    keras.mixed_precision.set_global_policy(cfg.trainer.precision)
    jit_compile = use_xla(cfg.trainer.jit_compile)
    # Non-chief workers must still write their checkpoint copies: to a scratch directory.
    work_dir = run_dir if chief else Path(tempfile.mkdtemp(prefix="mobilevit-worker-"))
    keras.utils.set_random_seed(cfg.seed)  # Python, NumPy and TensorFlow
    if cfg.trainer.deterministic:  # slower kernels, bit-identical results
        tf.config.experimental.enable_op_determinism()
    # The run carries its resolved config: evaluate, export and resume rebuild from it.
    OmegaConf.save(cfg, work_dir / "config.yaml", resolve=True)
    run_info = {"strategy": strategy_name(strategy), "replicas": replicas,
                "global_batch": cfg.trainer.batch_size,
                "per_replica_batch": cfg.trainer.batch_size // replicas,
                "precision": cfg.trainer.precision, "jit_compile": jit_compile,
                "peak_lr": scaled_lr(cfg.optim, cfg.trainer.batch_size)}
    write_json(work_dir / "run.json", run_info)

    # ------------------------------------------------------------------ input pipeline
    dataset = data.load_dataset(cfg.data)
    if chief:
        manifest.write_manifest(run_dir, cfg, dataset, run_info)
    if dataset.skipped and chief:
        data.write_skipped_report(dataset, run_dir / "skipped_files.csv")
        log.warning("%d file(s) skipped as unusable; see %s", len(dataset.skipped),
                    run_dir / "skipped_files.csv")
    batch = cfg.trainer.batch_size
    steps_per_epoch = cfg.trainer.steps_per_epoch or max(dataset.counts["train"] // batch, 1)
    eval_ds = {s: augment.eval_pipeline(dataset.splits[s], cfg.data, batch)
               for s in ("val", "test") if s in dataset.splits}
    log.info("data %s: %s, %d classes; %d steps of %d per epoch", dataset.name, dataset.counts,
             dataset.num_classes, steps_per_epoch, batch)

    # ------------------------------------------------------------------ model and optimizer
    stages = stage_plan(cfg)
    with strategy.scope():
        model = build_model(cfg.model, dataset.num_classes)
        source = load_pretrained(model, cfg.model.pretrained, cfg.model.name,
                                 cfg.model.checkpoint_format, dataset.class_names)
        lr_scale = tf.Variable(1.0, dtype=tf.float32, trainable=False)  # lowered by rollbacks
        schedule = ScaledSchedule(make_stage_schedules(cfg, stages, steps_per_epoch), lr_scale)
        optimizer = make_optimizer(cfg.optim, schedule, model,
                                   finetune.layer_decay_factors(model, cfg.optim.layer_decay))
        if cfg.trainer.precision == "mixed_float16":  # dynamic loss scaling
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        # Built on every weight any stage trains (all of them: nothing is frozen yet).
        optimizer.build(model.trainable_variables)
        # Where the run is: epoch, step in the epoch, the epoch's running sums, best score.
        position = {"epoch": tf.Variable(0, dtype=tf.int64, trainable=False),
                    "step": tf.Variable(0, dtype=tf.int64, trainable=False),
                    "best": tf.Variable(-1.0, dtype=tf.float64, trainable=False),
                    "totals": tf.Variable(tf.zeros(len(STAT_KEYS), tf.float64), trainable=False)}
    ema = ema_pairs(optimizer)
    log.info("model %s (%d classes) initialised from %s", cfg.model.name, dataset.num_classes,
             source)
    if chief:  # enough disk for the checkpoints and exports, before hours of training
        slots = len(optimizer.variables) // max(len(model.trainable_variables), 1)
        rundir.check_free_space(run_dir, rundir.checkpoint_bytes(model.count_params(), slots))

    # ------------------------------------------------------------------ checkpoints
    # The checkpoint carries the model, optimizer (with its step, hence the schedule position),
    # the RNG states and the position; the data order is a function of (seed, epoch).
    # Dropout / stochastic-depth RNG states are variables of the model but not among its
    # weights, which is all a Keras model puts in a checkpoint.
    weight_ids = {id(w) for w in model.weights}
    rng_states = [v for v in model.variables if id(v) not in weight_ids]
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, rng=rng_states,
                               lr_scale=lr_scale, **position)
    last = tf.train.CheckpointManager(ckpt, str(work_dir / "checkpoints" / "last"),
                                        max_to_keep=cfg.trainer.keep_checkpoints)
    best = tf.train.CheckpointManager(ckpt, str(work_dir / "checkpoints" / "best"), max_to_keep=1)
    resumed = restore_latest(ckpt, state_dir / "checkpoints" / "last")
    if resumed:
        log.info("resumed from %s at epoch %d, step %d", resumed,
                 int(position["epoch"].numpy()) + 1, int(position["step"].numpy()))
    else:  # the starting point: a rollback or a kill before the first save comes back here
        last.save(checkpoint_number=0)

    # ------------------------------------------------------------------ train loop
    loop = Loop(strategy, model, optimizer, dataset.num_classes, batch, cfg.optim.label_smoothing,
                jit_compile=jit_compile, log_every_steps=cfg.trainer.log_every_steps)
    every = cfg.trainer.checkpoint_every_steps

    def on_step(step: int, totals: dict) -> None:
        position["step"].assign(step)
        if (every and step % every == 0) or preemption.requested:
            position["totals"].assign([totals[k] for k in STAT_KEYS])
            last.save(checkpoint_number=int(optimizer.iterations.numpy()))
        if preemption.requested:
            raise Preempted(preemption.requested, int(optimizer.iterations.numpy()),
                            last.latest_checkpoint)

    # Loggers (history.csv, curves, TensorBoard, wandb) close properly even if training fails.
    with EpochLoggers(cfg, run_dir, chief, int(position["epoch"].numpy())) as loggers:
        rollbacks, stage = 0, None
        with Timer() as train_time, preemption_handler() as preemption:
            while (epoch := int(position["epoch"].numpy())) < cfg.trainer.epochs:
                if finetune.stage_at(stages, epoch) != stage:
                    stage = finetune.stage_at(stages, epoch)
                    trains = finetune.apply_stage(model, stage)
                    loop.reset()  # a traced step would keep the old trainable set
                    log.info("stage %r from epoch %d: %s", stage.name, epoch + 1, trains)
                start_step = int(position["step"].numpy())
                totals = (dict(zip(STAT_KEYS, position["totals"].numpy().tolist())) if start_step
                          else None)
                epoch_ds = augment.train_pipeline(
                    dataset.splits["train"], cfg.data, cfg.aug, batch, cfg.seed, epoch,
                    skip_batches=start_step, num_classes=dataset.num_classes, replicas=replicas)
                iterator = iter(strategy.experimental_distribute_dataset(epoch_ds))
                with Timer() as epoch_time:
                    try:
                        row = loop.train_epoch(iterator, steps_per_epoch, epoch, cfg.trainer.epochs,
                                               chief, start_step, totals, on_step)
                    except NonFiniteLoss as e:
                        good = last.latest_checkpoint
                        retry = rollbacks < cfg.trainer.max_rollbacks
                        if cfg.trainer.on_nan == "rollback" and retry:
                            rollbacks += 1
                            scale = float(lr_scale.numpy()) * cfg.trainer.nan_lr_factor
                            ckpt.restore(good).expect_partial()
                            lr_scale.assign(scale)  # after the restore, which brought the old one
                            log.warning("%s: rolled back to %s, learning rate x%g (rollback %d of "
                                        "%d)", e, good, scale, rollbacks, cfg.trainer.max_rollbacks)
                            continue
                        raise NonFiniteLoss(f"{e}; the last good checkpoint is {good}, left intact"
                                            + (f" ({rollbacks} rollback(s) did not help)"
                                               if rollbacks else "")) from None
                    with finetune.ema_swapped(ema):  # validate (and choose the best by) the EMA
                        row.update(loop.evaluate(eval_ds["val"], cfg.trainer.eval_steps, "val_"))
                row = {"epoch": epoch + 1, **row, "lr": current_lr_value(optimizer),
                       "seconds": round(epoch_time.seconds, 2)}
                loggers.log_epoch(row)
                log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) if isinstance(v, float) else v
                                                     for k, v in row.items()})
                position["epoch"].assign(epoch + 1)
                position["step"].assign(0)
                position["totals"].assign(tf.zeros(len(STAT_KEYS), tf.float64))
                if row["val_accuracy"] > position["best"].numpy():
                    position["best"].assign(row["val_accuracy"])
                    best.save(checkpoint_number=epoch + 1)
                last.save(checkpoint_number=int(optimizer.iterations.numpy()))
                if preemption.requested:  # it came during validation: the epoch is saved
                    raise Preempted(preemption.requested, int(optimizer.iterations.numpy()),
                                    last.latest_checkpoint)

        # ------------------------------------------------------------------ final evaluation
        # The best epoch's weights (a resumed worker may find them only in the chief's directory).
        best_path = best.latest_checkpoint or tf.train.latest_checkpoint(
            str(state_dir / "checkpoints" / "best"))
        ckpt.restore(best_path).expect_partial()
        finetune.use_ema(ema)  # the checkpoints keep the raw weights; evaluation and export the EMA
        # The whole plan (a resumed attempt applied only the stages it reached); this leaves the
        # last stage's trainable flags, as an uninterrupted run does.
        trained_sets = [finetune.apply_stage(model, s) for s in stages]
        metrics = {"best_epoch": int(best_path.rsplit("-", 1)[-1]),
                   "best_val_accuracy_during_training": float(position["best"].numpy()),
                   "epochs": cfg.trainer.epochs, "train_seconds": round(train_time.seconds, 2),
                   "nan_rollbacks": rollbacks, "lr_scale": float(lr_scale.numpy()),
                   "skipped_files": len(dataset.skipped), "ema": ema is not None,
                   "stages": trained_sets}
        for split, ds in eval_ds.items():
            metrics.update(loop.evaluate(ds, cfg.trainer.eval_steps, f"{split}_"))
        log.info("final: %s", metrics)

        # ------------------------------------------------------------------ export
        if chief:
            write_json(run_dir / "dataset.json", dataset.info())
            if cfg.trainer.export:
                calib_ds = augment.eval_pipeline(dataset.splits["train"], cfg.data, batch)
                result = export.export_run(model, dataset.class_names, cfg, run_dir, eval_ds["val"],
                                           calib_ds, metrics)
                metrics["export_max_rel_diff"] = result["reload_max_rel_diff"]
                if "float32_vs_trained" in result:  # trained in mixed precision
                    metrics["export_float32_vs_trained"] = result["float32_vs_trained"]
                log.info("exported %s (reload check: max relative difference %.2g)",
                         run_dir / "export", result["reload_max_rel_diff"])
            loggers.log_final(metrics)
            write_json(run_dir / "metrics.json", metrics)
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    return metrics


def make_stage_schedules(cfg, stages, steps_per_epoch: int):
    """One schedule per stage, each restarting at the stage's first step."""
    schedules = [make_schedule(cfg.optim, cfg.schedule, steps_per_epoch, s.epochs,
                               cfg.trainer.batch_size, lr=s.lr) for s in stages]
    if len(stages) == 1:
        return schedules[0]
    return StagedSchedule([s.start_epoch * steps_per_epoch for s in stages], schedules)


def _finished_metrics(run_dir: Path, cfg) -> dict | None:
    """metrics.json, written last, marks a finished run (for the same number of epochs)."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    if metrics.get("epochs") == cfg.trainer.epochs:
        return metrics
    path.unlink()  # more epochs asked for: the run goes on and will write a new one
    return None


def current_lr_value(optimizer) -> float:
    return round(current_lr(optimizer), 8)


