"""The training loop's own mechanics: evaluation traced once for every batch size, exact sums over
a partial last batch (also on two replicas), the finished epoch's iterator released off the main
thread."""

from __future__ import annotations

import threading
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import ROOT, run_python

from trainer.config.compose import compose_config
from trainer.models.mobilevit import build_model
from trainer.training.distribute import make_strategy
from trainer.training.epochs import release
from trainer.training.loop import Loop


def evaluate_partial_batches(replicas: int) -> dict:
    """10 images in batches of 4 (4, 4, 2) evaluated twice: the sums against the model's own
    predictions on all 10, and how many times the evaluation step was traced."""
    cfg = compose_config(["model.pretrained=none", "model.head_dropout=0"])
    strategy = make_strategy("mirrored" if replicas > 1 else "default", cpu_replicas=replicas)
    rng = np.random.default_rng(0)
    images = rng.random((10, 32, 32, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_model(cfg.model, 3)
        loop = Loop(strategy, model, keras.optimizers.SGD(0.0), 3, 4)
    logits = model(images, training=False).numpy()
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    runs = [loop.evaluate(dataset, prefix="val_") for _ in range(2)]  # the second reuses the trace
    return {"runs": runs, "traces": [f.experimental_get_tracing_count()
                                     for f in loop._eval_steps.values()],
            "accuracy": float((logits.argmax(-1) == labels).mean()),
            "loss": float(keras.losses.sparse_categorical_crossentropy(
                labels, logits, from_logits=True).numpy().mean())}


def check_partial_batches(result: dict) -> None:
    assert result["traces"] == [1]  # one trace for the batches of 4 and the batch of 2
    for metrics in result["runs"]:
        assert metrics["val_examples"] == 10
        assert metrics["val_accuracy"] == pytest.approx(result["accuracy"], abs=1e-9)
        assert metrics["val_loss"] == pytest.approx(result["loss"], rel=1e-5)


def test_evaluation_traces_once_and_counts_a_partial_last_batch_exactly():
    check_partial_batches(evaluate_partial_batches(replicas=1))


def test_evaluation_on_two_replicas_splits_the_partial_batch_and_still_traces_once():
    """The last batch of 2 goes 1 + 1 to the replicas (2 logical CPUs: a fresh process)."""
    result = run_python(f"""
        import importlib.util, sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        spec = importlib.util.spec_from_file_location("t", {str(Path(__file__).resolve())!r})
        t = importlib.util.module_from_spec(spec); spec.loader.exec_module(t)
        print("RESULT", repr(t.evaluate_partial_batches(replicas=2)))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    check_partial_batches(eval(result.stdout.split("RESULT", 1)[1]))


def test_a_finished_epochs_iterator_is_deleted_on_another_thread():
    """release() drops the holder's only reference on its own thread (deleting a tf.data iterator
    can wait seconds for its autotuning thread), and the object is gone once it is joined."""
    deleted_on = []

    class Tracked:
        def __del__(self):
            deleted_on.append(threading.current_thread().name)

    holder = [Tracked()]
    thread = release(holder)
    thread.join(timeout=10)
    assert holder == [] and deleted_on == ["release-epoch-iterator"]

    # A real (endless, prefetching) tf.data iterator half consumed, as an epoch leaves it.
    iterator = iter(tf.data.Dataset.range(10**9).map(lambda x: x * 2,
                                                     num_parallel_calls=tf.data.AUTOTUNE)
                    .prefetch(tf.data.AUTOTUNE))
    assert [int(next(iterator)) for _ in range(3)] == [0, 2, 4]
    holder = [iterator]
    del iterator
    thread = release(holder)
    thread.join(timeout=60)
    assert not thread.is_alive() and holder == []
