"""Fine-tuning methods: gradient accumulation, knowledge distillation, class imbalance and early
stopping (test-time augmentation is tested with the evaluate command, tests/serving)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from helpers import ROOT, run_python, tiny_cfg

from trainer.errors import ConfigError
from trainer.training.train import train

HERE = Path(__file__).resolve()


# --------------------------------------------------------------------------- accumulation


def accumulated_weights(replicas: int, accumulate: int, batch: int, updates: int = 2) -> list:
    """The weights of a tiny MobileViT after `updates` SGD updates of accumulate x batch digits
    (BatchNorm frozen: its statistics would see micro-batches), under `replicas` replicas."""
    import keras

    from trainer.config.compose import compose_config
    from trainer.data.sources import load_digits
    from trainer.models.mobilevit import build_model
    from trainer.models.preprocessing import eval_preprocess
    from trainer.training.distribute import make_strategy
    from trainer.training.loop import Loop

    cfg = compose_config(["model.pretrained=none", "model.head_dropout=0"])
    strategy = make_strategy("mirrored" if replicas > 1 else "default", cpu_replicas=replicas)
    digits = load_digits(cfg.data).splits["train"].take(max(updates, 1) * 64)
    images = np.stack([eval_preprocess(x, 32, 1.0).numpy() for x, _ in digits])
    labels = np.array([int(y) for _, y in digits])
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_model(cfg.model, 10)
        model.build((None, 32, 32, 3))
        for layer in model._flatten_layers():
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
        optimizer = keras.optimizers.SGD(0.05)
    data = strategy.distribute_datasets_from_function(
        lambda ctx: tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch // replicas))
    loop = Loop(strategy, model, optimizer, 10, batch, accumulate_steps=accumulate)
    iterator = iter(data)
    for _ in range(updates):
        loop.train_step(iterator)
    assert int(optimizer.iterations.numpy()) == updates
    return [w.numpy() for w in model.trainable_weights]


def max_difference(a: list, b: list) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def test_accumulating_4_batches_of_16_is_one_batch_of_64_on_one_replica():
    accumulated = accumulated_weights(replicas=1, accumulate=4, batch=16)
    whole = accumulated_weights(replicas=1, accumulate=1, batch=64)
    start = accumulated_weights(replicas=1, accumulate=1, batch=64, updates=0)
    assert max_difference(accumulated, start) > 1e-3  # it trained
    assert max_difference(accumulated, whole) <= 1e-5


def test_accumulating_on_two_replicas_is_one_large_batch():
    result = run_python(f"""
        import importlib.util, sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        spec = importlib.util.spec_from_file_location("methods", {str(HERE)!r})
        methods = importlib.util.module_from_spec(spec); spec.loader.exec_module(methods)
        two = methods.accumulated_weights(replicas=2, accumulate=4, batch=16)
        one = methods.accumulated_weights(replicas=1, accumulate=1, batch=64)
        print("DIFF", methods.max_difference(two, one))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    diff = float(result.stdout.split("DIFF")[-1])
    assert diff <= 1e-5


def test_a_kill_between_micro_batches_resumes_exactly(tmp_path, monkeypatch):
    from trainer.training.loop import Loop

    args = ["data=digits", "trainer.epochs=2", "trainer.steps_per_epoch=3",
            "trainer.batch_size=4", "trainer.accumulate_steps=2", "trainer.export=false",
            "trainer.checkpoint_every_steps=1",
            "aug=basic", "model.head_dropout=0.3", "data.crop_pct=1.0"]
    straight = train(tiny_cfg(*args), tmp_path / "straight")
    assert straight["epochs_trained"] == 2
    history = list(csv.DictReader(open(tmp_path / "straight" / "history.csv")))
    assert [r["epoch"] for r in history] == ["1", "2"]
    run = json.loads((tmp_path / "straight" / "run.json").read_text())
    assert run["accumulate_steps"] == 2 and run["update_batch"] == 8

    micro = {"n": 0}
    original_step = Loop._accumulated_step

    def kill_after_first_micro_batch_of_update_5(self, iterator):
        micro["n"] += 1
        if micro["n"] == 5:  # epoch 2, after the checkpoint of update 4
            self._micro_step(next(iterator))  # half of the update's micro-batches, then a kill
            raise KeyboardInterrupt("simulated kill")
        return original_step(self, iterator)

    monkeypatch.setattr(Loop, "_accumulated_step", kill_after_first_micro_batch_of_update_5)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(*args), tmp_path / "resumed")
    monkeypatch.setattr(Loop, "_accumulated_step", original_step)
    resumed_from = tf.train.latest_checkpoint(str(tmp_path / "resumed" / "checkpoints" / "last"))
    assert resumed_from.endswith("-4")
    train(tiny_cfg(*args), tmp_path / "resumed")

    def weights(run_dir):
        reader = tf.train.load_checkpoint(str(run_dir / "checkpoints" / "last"))
        tensors = {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()}
        return {k: v for k, v in tensors.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f"}
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6


# --------------------------------------------------------------------------- distillation


def test_distillation_loss_against_a_hand_computed_case():
    from trainer.training.distill import distillation_loss

    student = np.array([[1.0, 0.0, -1.0]])
    teacher = np.array([[2.0, 0.5, 0.0]])
    t = 2.0
    p = np.exp(teacher / t) / np.exp(teacher / t).sum()
    q = np.exp(student / t) / np.exp(student / t).sum()
    expected = (p * np.log(p / q)).sum() * t * t
    got = distillation_loss(tf.constant(student), tf.constant(teacher), t).numpy()
    np.testing.assert_allclose(got, [expected], rtol=1e-6)
    same = distillation_loss(tf.constant(teacher), tf.constant(teacher), t).numpy()
    np.testing.assert_allclose(same, [0.0], atol=1e-6)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A finished run at 48x48 (the students train at 32: the teacher's input is resized)."""
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    train(tiny_cfg("data=digits", "data.image_size=48", "trainer.epochs=1",
                   "trainer.steps_per_epoch=20", "trainer.batch_size=32", "aug=none",
                   "data.crop_pct=1.0"), run_dir)
    return run_dir


def test_the_teacher_runs_frozen_in_the_step_and_its_soft_targets_are_in_the_loss(teacher_run):
    import keras

    from trainer.config.compose import compose_config
    from trainer.models.mobilevit import build_model
    from trainer.training.distill import distillation_loss, load_teacher
    from trainer.training.loop import Loop

    cfg = compose_config(["model.pretrained=none", "model.head_dropout=0", "data.image_size=32",
                          f"distill.teacher={teacher_run}", "distill.temperature=3",
                          "distill.alpha=0.7"])
    teacher = load_teacher(cfg.distill, 10)
    assert teacher.input_size == 48
    before = [w.numpy().copy() for w in teacher.model.weights]  # BN statistics included
    keras.utils.set_random_seed(0)
    student = build_model(cfg.model, 10)
    optimizer = keras.optimizers.SGD(0.01)
    rng = np.random.default_rng(0)
    images = rng.random((8, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 8)
    loop = Loop(tf.distribute.get_strategy(), student, optimizer, 10, 8, teacher=teacher,
                distill_cfg=cfg.distill)

    student_logits = student(images, training=True).numpy()  # no dropout: the step's logits
    teacher_logits = teacher(tf.constant(images)).numpy()
    ce = keras.losses.sparse_categorical_crossentropy(labels, student_logits, from_logits=True)
    soft = distillation_loss(tf.constant(student_logits), tf.constant(teacher_logits), 3.0)
    expected = float(np.mean(0.7 * soft.numpy() + 0.3 * ce.numpy()))
    iterator = iter(tf.data.Dataset.from_tensors((images, labels)).repeat())
    stats = loop.train_step(iterator)
    assert float(stats["loss"]) / float(stats["count"]) == pytest.approx(expected, rel=1e-4)
    for _ in range(3):
        loop.train_step(iterator)
    after = [w.numpy() for w in teacher.model.weights]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))  # bit-identical


def test_distillation_trains_end_to_end_and_checks_its_teacher(teacher_run, tmp_path):
    metrics = train(tiny_cfg("data=digits", "data.image_size=32", f"distill.teacher={teacher_run}",
                             "trainer.export=false"), tmp_path / "student")
    assert np.isfinite(metrics["val_loss"])
    with pytest.raises(ConfigError, match=r"predicts 10 classes; the data has 3"):
        train(tiny_cfg("data=digits", "data.classes=[0,1,2]", f"distill.teacher={teacher_run}"),
              tmp_path / "mismatch")


# --------------------------------------------------------------------------- class imbalance


def imbalanced_folder(root: Path) -> Path:
    """150 handwritten zeros ('common') against 15 ones ('rare'), from scikit-learn's digits."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for name, digit, count in (("common", 0, 150), ("rare", 1, 15)):
        (root / name).mkdir(parents=True)
        for i, image in enumerate(digits.images[digits.target == digit][:count]):
            pixels = (image / 16 * 255).astype(np.uint8)
            Image.fromarray(pixels).resize((24, 24)).save(root / name / f"{i}.png")
    return root


def test_class_weights_and_sampler_frequencies_follow_the_counts(tmp_path):
    from trainer.data.pipeline import example_positions
    from trainer.data.sources import load_dataset

    root = imbalanced_folder(tmp_path / "data")
    cfg = tiny_cfg("data=folder", f"data.path={root}", "data.val_fraction=0.3",
                   "data.class_balance=sampler")
    dataset = load_dataset(cfg.data)
    counts = dataset.class_counts
    assert counts == [105, 11] and dataset.info()["train_class_counts"] == counts
    total = sum(counts)
    np.testing.assert_allclose(dataset.class_weights(), [total / (2 * 105), total / (2 * 11)])

    labels = [int(e[1][1][1]) for e in example_positions(
        dataset.splits["train"], cfg.data, cfg.aug, 8, 0, 0, num_classes=2)
        .take(4000).as_numpy_iterator()]
    assert abs(np.mean(labels) - 0.5) < 0.03  # each class drawn equally often
    again = [int(e[1][1][1]) for e in example_positions(
        dataset.splits["train"], cfg.data, cfg.aug, 8, 0, 0, num_classes=2)
        .take(200).as_numpy_iterator()]
    assert again == labels[:200]  # a function of the seed: resumable


def minority_recall(run_dir: Path) -> float:
    from trainer import evaluate

    assert evaluate.main([f"run={run_dir}", "split=val"]) == 0
    rows = {r["class"]: r for r in csv.DictReader(open(run_dir / "eval" / "val" / "per_class.csv"))}
    return float(rows["rare"]["recall"])


def test_weighted_loss_weighs_each_example_by_its_class():
    import keras

    from trainer.config.compose import compose_config
    from trainer.models.mobilevit import build_model
    from trainer.training.loop import Loop

    cfg = compose_config(["model.pretrained=none", "model.head_dropout=0"])
    rng = np.random.default_rng(0)
    images = rng.random((8, 32, 32, 3)).astype(np.float32)
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    losses = {}
    for weights in (None, [0.5, 5.0]):
        keras.utils.set_random_seed(0)
        model = build_model(cfg.model, 2)
        loop = Loop(tf.distribute.get_strategy(), model, keras.optimizers.SGD(0.0), 2, 8,
                    class_weights=weights)
        per_example = keras.losses.sparse_categorical_crossentropy(
            labels, model(images, training=True), from_logits=True).numpy()
        stats = loop.train_step(iter(tf.data.Dataset.from_tensors((images, labels)).repeat()))
        losses[str(weights)] = (float(stats["loss"]) / 8, per_example)
    plain, per_example = losses["None"]
    assert plain == pytest.approx(per_example.mean(), rel=1e-5)
    weighted, per_example = losses["[0.5, 5.0]"]
    expected = (per_example * np.where(labels == 1, 5.0, 0.5)).mean()
    assert weighted == pytest.approx(expected, rel=1e-5)


def test_minority_recall_rises_with_the_sampler(tmp_path):
    root = imbalanced_folder(tmp_path / "data")
    args = ["data=folder", f"data.path={root}", "data.val_fraction=0.3", "data.image_size=24",
            "data.crop_pct=1.0", "aug=none", "trainer.epochs=4", "trainer.steps_per_epoch=12",
            "trainer.eval_steps=null", "schedule.warmup_epochs=0", "trainer.batch_size=16",
            "optim.lr=3e-3", "export.litert=[]", "model.head_dropout=0"]
    recall = {}
    for balance in ("none", "sampler"):
        run = tmp_path / balance
        train(tiny_cfg(*args, f"data.class_balance={balance}"), run)
        recall[balance] = minority_recall(run)
    # Without balancing the best epoch predicts 'common' for everything (val accuracy 0.92).
    assert recall["none"] == 0.0, recall
    assert recall["sampler"] >= 0.5, recall  # 0.75 measured


# --------------------------------------------------------------------------- early stopping


def test_early_stopping_stops_at_the_right_epoch_and_resumes_with_its_count(tmp_path,
                                                                          monkeypatch):
    from trainer.training.loop import Loop

    scores = iter([0.5, 0.6, 0.6, 0.59, 0.9, 0.95])  # best at 2; 3 and 4 do not improve

    def evaluate(self, dataset, max_steps=None, prefix="val_"):
        return {f"{prefix}loss": 1.0, f"{prefix}accuracy": next(scores),
                f"{prefix}top5_accuracy": 1.0, f"{prefix}examples": 10}

    args = ["data=digits", "trainer.epochs=6", "trainer.steps_per_epoch=1",
            "trainer.early_stopping.patience=2", "trainer.early_stopping.min_delta=0.01",
            "trainer.export=false"]
    monkeypatch.setattr(Loop, "evaluate", evaluate)
    original_end = None
    from trainer.training.state import TrainState
    original_end = TrainState.end_epoch

    def end_epoch_then_kill(self, epoch, score, min_delta=0.0):
        original_end(self, epoch, score, min_delta)
        if epoch == 2:  # after epoch 3, with one stale epoch counted
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(TrainState, "end_epoch", end_epoch_then_kill)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(*args), tmp_path / "run")
    monkeypatch.setattr(TrainState, "end_epoch", original_end)
    metrics = train(tiny_cfg(*args), tmp_path / "run")  # resumes at epoch 4
    history = list(csv.DictReader(open(tmp_path / "run" / "history.csv")))
    assert [r["epoch"] for r in history] == ["1", "2", "3", "4"]  # epoch 4: the 2nd stale one
    assert metrics["epochs_trained"] == 4 and "after epoch 4 of 6" in metrics["stopped_early"]
    assert (tmp_path / "run" / "metrics.json").is_file()  # a finished run
    assert tf.train.latest_checkpoint(str(tmp_path / "run" / "checkpoints" / "best")).endswith("-2")
