"""The one training loop, for every strategy: `strategy.run(step)` inside a `tf.function`.

Hand-written because Keras 3 `Model.fit` fails under MultiWorkerMirroredStrategy
(keras-team/keras#20585), and because a loop of our own lets a checkpoint carry the exact step.
Keras still supplies the model, optimizer, schedule and loss. Each replica returns *sums*
(loss, correct top-1 / top-5, examples), reduced with SUM across replicas: exact under any
replica count, including partial last evaluation batches.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
import types
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from trainer.config.schema import TOP_K
from trainer.errors import NonFiniteLoss
from trainer.training.distill import distillation_loss
from trainer.training.state import STAT_KEYS

log = logging.getLogger(__name__)




def zero_totals() -> dict:
    return dict.fromkeys(STAT_KEYS, 0.0)


@contextlib.contextmanager
def preemption_handler():
    """SIGTERM and Ctrl-C (SIGINT) become a flag checked after each step (main thread only).

    `state.requested` is then the signal number. A second Ctrl-C gets the default disposition:
    the process stops at once, even inside a long TensorFlow op (a checkpoint being written
    then is never taken for complete: saves are atomic).
    """
    state = types.SimpleNamespace(requested=0)

    def handle(signum, frame):
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            log.warning("Ctrl-C: saving a checkpoint after this step, then exiting "
                        "(Ctrl-C again to abort at once)")
        else:
            log.warning("SIGTERM: saving a checkpoint after this step, then exiting")
        state.requested = state.requested or signum

    try:
        previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread
        yield state
        return
    try:
        yield state
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Loop:
    def __init__(self, strategy: tf.distribute.Strategy, model: keras.Model,
                 optimizer: keras.optimizers.Optimizer, num_classes: int, global_batch: int,
                 label_smoothing: float = 0.0, jit_compile: bool = False,
                 log_every_steps: int = 0, accumulate_steps: int = 1,
                 class_weights: list[float] | None = None, teacher=None,
                 distill_cfg=None):
        self.strategy, self.model, self.optimizer = strategy, model, optimizer
        self.log_every_steps, self.jit_compile = log_every_steps, jit_compile
        self.accumulate_steps = accumulate_steps
        # data.class_balance=weighted_loss: each example's loss times its class's weight.
        self.class_weights = (tf.constant(class_weights, tf.float32) if class_weights is not None
                              else None)
        self.num_classes, self.global_batch = num_classes, global_batch
        self.top_k = min(TOP_K, num_classes)
        self.loss_fn = keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=label_smoothing, reduction=None)
        # Knowledge distillation: a frozen teacher's soft targets mixed into the loss.
        self.teacher, self.distill_cfg = teacher, distill_cfg
        self.reset()

    def reset(self) -> None:
        """Forget the traced steps: the next call traces for the current trainable set."""
        # XLA for the forward/backward pass only: applying gradients all-reduces across replicas.
        self._compute_gradients = (tf.function(self._gradients, jit_compile=True)
                                   if self.jit_compile else self._gradients)
        self._train_step = None
        self._eval_steps: dict[str, Callable] = {}  # one per evaluation dataset's element spec
        self._micro_step = self._apply_step = None
        self._accumulators: list[tf.Variable] = []

    # ----------------------------------------------------------------- per-replica work
    def _targets(self, labels):
        """Class indices -> one-hot; mixup / cutmix batches already carry soft labels."""
        if labels.shape.rank == 2:
            return tf.cast(labels, tf.float32)
        return tf.one_hot(tf.cast(labels, tf.int32), self.num_classes)

    def _stats(self, logits, labels, per_example_loss):
        if labels.shape.rank == 2:  # soft labels: accuracy against their largest class
            labels = tf.argmax(labels, -1)
        labels = tf.cast(labels, tf.int32)
        top1 = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)
        topk = tf.cast(tf.math.in_top_k(labels, logits, self.top_k), tf.float32)
        return {"loss": tf.reduce_sum(per_example_loss), "correct": tf.reduce_sum(top1),
                "correct_topk": tf.reduce_sum(topk),
                "count": tf.cast(tf.shape(labels)[0], tf.float32)}

    def _gradients(self, images, labels):
        onehot = self._targets(labels)
        with tf.GradientTape() as tape:
            logits = tf.cast(self.model(images, training=True), tf.float32)
            per_example = self.loss_fn(onehot, logits)
            if self.class_weights is not None:  # soft labels weigh by their mix of classes
                per_example *= tf.linalg.matvec(onehot, self.class_weights)
            if self.teacher is not None:  # same replica, same augmented images, no gradient
                d = self.distill_cfg
                soft = distillation_loss(logits, self.teacher(images), d.temperature)
                per_example = d.alpha * soft + (1.0 - d.alpha) * per_example
            # Mean over the *global* batch (this replica's batch x replicas; multi-scale batches
            # vary in size): the cross-replica gradient sum is then the mean.
            loss = tf.nn.compute_average_loss(per_example)
            scaled = self.optimizer.scale_loss(loss)  # loss scaling under mixed_float16
        grads = tape.gradient(scaled, self.model.trainable_variables)
        return grads, self._stats(logits, labels, per_example)

    def _replica_train(self, images, labels):
        grads, stats = self._compute_gradients(images, labels)
        # Outside any XLA cluster: applying gradients all-reduces them across replicas.
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
        return stats

    # Gradient accumulation (trainer.accumulate_steps=K): each replica sums its micro-batch
    # gradients into local (ON_READ) variables; one update applies their mean over the K
    # micro-batches, all-reduced once, as a K-times larger global batch would.
    def _replica_accumulate(self, images, labels):
        grads, stats = self._compute_gradients(images, labels)
        for acc, g in zip(self._accumulators, grads):
            acc.assign_add(g)
        return stats

    def _replica_apply(self):
        k = float(self.accumulate_steps)
        grads = [acc.read_value() / k for acc in self._accumulators]
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
        for acc in self._accumulators:
            acc.assign(tf.zeros_like(acc))

    def _make_accumulators(self) -> None:
        with self.strategy.scope():
            self._accumulators = [
                tf.Variable(tf.zeros(v.shape, tf.float32), trainable=False,
                            synchronization=tf.VariableSynchronization.ON_READ,
                            aggregation=tf.VariableAggregation.SUM)
                for v in self.model.trainable_variables]

    def _accumulated_step(self, iterator) -> dict:
        """One update from `accumulate_steps` micro-batches (each its own compiled call: XLA
        and multi-scale shapes as for a plain step)."""
        if self._micro_step is None:
            self._make_accumulators()
            self._micro_step = tf.function(
                lambda batch: self._reduce(self.strategy.run(self._replica_accumulate,
                                                             args=batch)),
                reduce_retracing=not self.jit_compile, autograph=False)
            self._apply_step = tf.function(lambda: self.strategy.run(self._replica_apply),
                                           autograph=False)
        totals = None
        for _ in range(self.accumulate_steps):
            stats = self._micro_step(next(iterator))
            totals = stats if totals is None else {k: totals[k] + v for k, v in stats.items()}
        self._apply_step()
        return totals

    def _replica_eval(self, images, labels):
        onehot = self._targets(labels)
        logits = tf.cast(self.model(images, training=False), tf.float32)
        stats = self._stats(logits, labels, self.loss_fn(onehot, logits))
        # Per class, for the balanced accuracy (the mean recall) of imbalanced data.
        classes = tf.cast(labels, tf.int32)
        hit = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), classes), tf.float32)
        stats["class_correct"] = tf.math.unsorted_segment_sum(hit, classes, self.num_classes)
        stats["class_count"] = tf.math.unsorted_segment_sum(tf.ones_like(hit), classes,
                                                            self.num_classes)
        return stats

    def _reduce(self, per_replica: dict) -> dict:
        return {k: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                for k, v in per_replica.items()}

    # ----------------------------------------------------------------- compiled steps
    def train_step(self, iterator):
        if self.accumulate_steps > 1:
            return self._accumulated_step(iterator)
        if self._train_step is None:  # traced once per trainable set
            self._train_step = self.make_train_step()
        return self._train_step(iterator)

    def make_train_step(self) -> Callable:
        """The compiled step, a function of the iterator, not yet traced (bench/first_step.py
        times its trace and first run apart)."""
        if self.jit_compile:
            # XLA compiles static shapes only: the batch comes in as an argument, so each
            # planned batch shape (multi-scale) gets its own trace and compiled step.
            @tf.function(autograph=False)
            def step(batch):
                return self._reduce(self.strategy.run(self._replica_train, args=batch))
            return lambda it: step(next(it))

        # reduce_retracing: multi-scale batches differ in shape; one relaxed trace serves all,
        # and the batch is fetched inside the graph. No autograph: the step has no tensor-
        # dependent Python control flow, and converting its code cost 0.3 s of every trace.
        @tf.function(reduce_retracing=True, autograph=False)
        def step(it):
            return self._reduce(self.strategy.run(self._replica_train, args=next(it)))
        return step

    def eval_step_for(self, spec) -> Callable:
        """The compiled evaluation step for batches of `spec`, a distributed dataset's element
        spec with its batch size unknown: one trace serves full and partial last batches
        (traced on the first shape, a partial batch would trace the step a second time: 1.3 s
        in the quickstart's first epoch)."""
        key = repr(spec)
        if key not in self._eval_steps:
            def step(b):
                return self._reduce(self.strategy.run(self._replica_eval, args=b))
            self._eval_steps[key] = tf.function(step, input_signature=[spec], autograph=False)
        return self._eval_steps[key]

    # ----------------------------------------------------------------- epochs
    def train_epoch(self, iterator, steps: int, epoch: int, epochs: int, verbose: bool,
                    start_step: int = 0, totals: dict | None = None,
                    on_step: Callable[[int, dict], None] | None = None) -> dict:
        """Steps start_step..steps-1 of an epoch; `totals` carries a resumed epoch's sums."""
        bar = keras.utils.Progbar(steps, stateful_metrics=["loss", "acc"], verbose=1 if verbose else 0)
        totals = dict(totals or zero_totals())
        if verbose:
            print(f"Epoch {epoch + 1}/{epochs}")
        for i in range(start_step, steps):
            stats = {k: float(v) for k, v in self.train_step(iterator).items()}
            step_number = int(self.optimizer.iterations.numpy())
            if not math.isfinite(stats["loss"]):
                raise NonFiniteLoss(f"non-finite loss at step {step_number} (epoch {epoch + 1})")
            for k in totals:
                totals[k] += stats[k]
            if self.log_every_steps and step_number % self.log_every_steps == 0:
                log.info("step %d loss %.8f", step_number, stats["loss"] / stats["count"])
            bar.update(i + 1, [("loss", totals["loss"] / totals["count"]),
                               ("acc", totals["correct"] / totals["count"])])
            if on_step is not None:
                on_step(i + 1, totals)
        return _summarise(totals, "")

    def evaluate(self, dataset: tf.data.Dataset, max_steps: int | None = None,
                 prefix: str = "val_") -> dict:
        totals = zero_totals()
        distributed = self.strategy.experimental_distribute_dataset(dataset)
        step = self.eval_step_for(distributed.element_spec)
        for i, batch in enumerate(distributed):
            if max_steps is not None and i >= max_steps:
                break
            for k, v in step(batch).items():
                totals[k] = totals.get(k, 0.0) + v.numpy().astype(np.float64)
        return _summarise(totals, prefix)


def _summarise(totals: dict, prefix: str) -> dict:
    n = max(float(totals["count"]), 1.0)
    out = {f"{prefix}loss": float(totals["loss"]) / n,
           f"{prefix}accuracy": float(totals["correct"]) / n,
           f"{prefix}top5_accuracy": float(totals["correct_topk"]) / n,
           f"{prefix}examples": int(totals["count"])}
    if "class_count" in totals:  # evaluation: the mean recall over the classes present
        seen = totals["class_count"] > 0
        recall = totals["class_correct"][seen] / totals["class_count"][seen]
        out[f"{prefix}balanced_accuracy"] = float(recall.mean()) if seen.any() else 0.0
    return out


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
