"""Staged fine-tuning, BatchNorm policy, EMA, layer-wise lr decay, step schedule, LAMB / Lion."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import tiny_cfg

from trainer.models.head import build_classifier
from trainer.models.mobilevit import MobileViTBackbone
from trainer.training.optim import (
    ScaledSchedule,
    StagedSchedule,
    ema_pairs,
    make_optimizer,
    make_schedule,
)
from trainer.training.stages import GROUP_ORDER, layer_decay_factors
from trainer.training.train import train

STAGES = ("finetune.stages=[{name:head,epochs:1,lr:0.01,train:head},"
          "{name:frozen_bn,epochs:1,train:all,bn:frozen},{name:all,train:all,bn:train}]")


def restored(cfg, path: str):
    """Model and optimizer as train() builds them, restored from a checkpoint file prefix."""
    model = build_classifier(MobileViTBackbone.from_preset("mobilevit_xxs"), 10)
    optimizer = make_optimizer(cfg.optim, ScaledSchedule(1e-3, 1.0), model)  # a schedule, as
    optimizer.build(model.trainable_variables)  # in train(): no learning-rate variable
    tf.train.Checkpoint(model=model, optimizer=optimizer).restore(path).expect_partial()
    return model, optimizer


def test_stages_switch_trainable_sets_bn_policy_and_ema(tmp_path):
    """head (1 epoch) -> all with BN frozen (1) -> all with BN training (1); EMA on."""
    cfg = tiny_cfg("data=digits", "trainer.epochs=3", "trainer.keep_checkpoints=10",
                   "optim.ema_decay=0.5", "model.head_dropout=0", STAGES)
    metrics = train(cfg, tmp_path)
    models = [restored(cfg, str(tmp_path / "checkpoints" / "last" / f"ckpt-{step}"))[0]
              for step in (0, 2, 4, 6)]  # start and the end of each stage (2 steps per epoch)
    start, s1, s2, s3 = ({w.path: w.numpy() for w in m.weights} for m in models)
    bns = [l for l in models[0]._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]
    stats = {w.path for l in bns for w in (l.moving_mean, l.moving_variance)}
    bn_affine = {w.path for l in bns for w in (l.gamma, l.beta)}
    head = {"head/kernel", "head/bias"}
    others = set(start) - head - stats - bn_affine  # convolutions, attention, LayerNorm
    assert len(bns) > 20 and len(others) > 100

    def changed(a, b, keys):
        return {k for k in keys if not np.array_equal(a[k], b[k])}

    # Stage 1: only the head moves; every backbone weight and BN statistic is bit-identical.
    assert changed(start, s1, head) == head and not changed(start, s1, others | stats | bn_affine)
    # Stage 2 (BN frozen): convolutions and attention change, BN statistics and affine don't.
    assert not changed(s1, s2, stats | bn_affine)
    assert len(changed(s1, s2, others)) > 0.9 * len(others)
    # Stage 3 (BN training): statistics and affine move too.
    assert changed(s2, s3, stats) == stats and changed(s2, s3, bn_affine) == bn_affine

    n_all = len(models[0].trainable_weights)
    assert [s["trainable_weights"] for s in metrics["stages"]] == [2, n_all - len(bn_affine), n_all]
    assert [s["stage"] for s in metrics["stages"]] == ["head", "frozen_bn", "all"]

    # EMA: kept beside the raw weights in the checkpoint, different from them; export uses it.
    model, optimizer = restored(cfg, str(tmp_path / "checkpoints" / "best" /
                                         f"ckpt-{metrics['best_epoch']}"))
    variables, averages = ema_pairs(optimizer)
    ema = {v.path: a.numpy() for v, a in zip(variables, averages)}
    raw = model.get_layer("head").kernel.numpy()
    assert metrics["ema"] is True and np.abs(raw - ema["head/kernel"]).max() > 1e-6
    exported = keras.models.load_model(tmp_path / "export" / "model.keras")
    np.testing.assert_array_equal(exported.get_layer("head").kernel.numpy(), ema["head/kernel"])


def test_layer_decay_scales_each_backbone_stage():
    """SGD without momentum, lr 1, gradient 1: each weight moves by exactly its lr factor."""
    cfg = tiny_cfg("optim=sgd", "optim.momentum=0", "optim.weight_decay=0",
                   "optim.layer_decay=0.5")
    model = build_classifier(MobileViTBackbone.from_preset("mobilevit_xxs"), 3)
    opt = make_optimizer(cfg.optim, 1.0, model, layer_decay_factors(model, 0.5))
    before = {v.path: v.numpy() for v in model.trainable_variables}
    opt.apply_gradients([(tf.ones_like(v), v) for v in model.trainable_variables])
    step = {v.path: float(np.mean(before[v.path] - v.numpy())) for v in model.trainable_variables}
    assert step["stage0_mv2_0_expand_conv/kernel"] == pytest.approx(0.5 ** 6)
    assert step["stage4_mv2_0_expand_conv/kernel"] == pytest.approx(0.5 ** 2)
    # First and last backbone stages: the configured factor to the power of the stages between.
    ratio = step["stage4_mv2_0_expand_conv/kernel"] / step["stage0_mv2_0_expand_conv/kernel"]
    assert ratio == pytest.approx(2.0 ** 4)
    assert step["stem_conv/kernel"] == pytest.approx(0.5 ** len(GROUP_ORDER))
    assert step["head/kernel"] == pytest.approx(1.0)


def test_layer_decay_scales_each_weights_decoupled_weight_decay():
    """Zero gradient, lr 1, weight decay 0.1: a decayed weight shrinks by 0.1 x its lr factor
    (v -= v x lr x factor x wd, one fused kernel per variable), biases and norms not at all."""
    cfg = tiny_cfg("optim=sgd", "optim.momentum=0", "optim.weight_decay=0.1",
                   "optim.layer_decay=0.5")
    model = build_classifier(MobileViTBackbone.from_preset("mobilevit_xxs"), 3)
    opt = make_optimizer(cfg.optim, 1.0, model, layer_decay_factors(model, 0.5))
    before = {v.path: v.numpy() for v in model.trainable_variables}
    tf.function(lambda: opt.apply_gradients([(tf.zeros_like(v), v)
                                             for v in model.trainable_variables]))()
    shrink = {v.path: float(np.median(1.0 - v.numpy()[before[v.path] != 0]
                                      / before[v.path][before[v.path] != 0]))
              for v in model.trainable_variables if np.any(before[v.path] != 0)}
    assert shrink["stage0_mv2_0_expand_conv/kernel"] == pytest.approx(0.1 * 0.5 ** 6, rel=1e-4)
    assert shrink["stage4_mv2_0_expand_conv/kernel"] == pytest.approx(0.1 * 0.5 ** 2, rel=1e-4)
    assert shrink["head/kernel"] == pytest.approx(0.1, rel=1e-4)
    assert shrink["stem_bn/gamma"] == 0.0


def test_step_and_staged_schedules():
    cfg = tiny_cfg("optim.lr=0.1", "schedule=step", "schedule.warmup_epochs=1",
                   "schedule.decay_epochs=[2,4]", "schedule.decay_rate=0.1")
    step = make_schedule(cfg.optim, cfg.schedule, steps_per_epoch=10, epochs=6, global_batch=64)
    assert [float(step(s)) for s in (0, 5, 10, 19, 20, 45)] == pytest.approx(
        [0.0, 0.05, 0.1, 0.1, 0.01, 0.001])
    cosine = tiny_cfg("schedule.warmup_epochs=1")
    stages = [make_schedule(cosine.optim, cosine.schedule, 10, e, 64, lr=lr)
              for e, lr in ((2, 1e-2), (3, 1e-3))]
    staged = StagedSchedule([0, 20], stages)
    # Each stage restarts: warmup from 0 to its own peak, then its own cosine.
    assert [float(staged(s)) for s in (0, 10, 20, 25, 30)] == pytest.approx(
        [0.0, 1e-2, 0.0, 5e-4, 1e-3])


@pytest.mark.parametrize("name", ["lamb", "lion"])
def test_lamb_and_lion_step(name):
    cfg = tiny_cfg(f"optim={name}")
    model = build_classifier(MobileViTBackbone.from_preset("mobilevit_xxs"), 3)
    opt = make_optimizer(cfg.optim, 1e-3, model)
    assert isinstance(opt, {"lamb": keras.optimizers.Lamb, "lion": keras.optimizers.Lion}[name])
    before = model.get_layer("head").kernel.numpy()
    opt.apply_gradients([(tf.ones_like(v), v) for v in model.trainable_variables])
    after = model.get_layer("head").kernel.numpy()
    assert np.isfinite(after).all() and np.abs(after - before).max() > 1e-5
