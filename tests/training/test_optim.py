"""Schedules in steps, learning-rate scaling with the global batch, weight-decay exclusions."""

from __future__ import annotations

import pytest
from helpers import tiny_cfg

from trainer.models.head import build_classifier
from trainer.models.mobilevit import MobileViTBackbone
from trainer.training.optim import make_optimizer, make_schedule, scaled_lr


@pytest.mark.parametrize("scaling,expected", [("none", 1e-3), ("linear", 4e-3), ("sqrt", 2e-3)])
def test_lr_scaling_with_global_batch(scaling, expected):
    cfg = tiny_cfg(f"optim.lr_scaling={scaling}", "optim.base_batch_size=64")
    assert scaled_lr(cfg.optim, 256) == pytest.approx(expected)


def test_cosine_schedule_warms_up_then_decays():
    cfg = tiny_cfg("optim.lr=0.01", "schedule.warmup_epochs=1", "schedule.min_lr_ratio=0.1")
    schedule = make_schedule(cfg.optim, cfg.schedule, steps_per_epoch=10, epochs=5,
                             global_batch=64)
    values = [float(schedule(step)) for step in (0, 5, 10, 30, 50)]
    assert values[0] == 0.0 and values[1] == pytest.approx(0.005)
    assert values[2] == pytest.approx(0.01)
    assert values[2] > values[3] > values[4] == pytest.approx(0.001)


def test_no_weight_decay_on_norms_and_biases():
    model = build_classifier(MobileViTBackbone.from_preset("mobilevit_xxs"), 3)
    cfg = tiny_cfg()
    opt = make_optimizer(cfg.optim, 1e-3, model)
    opt.build(model.trainable_variables)
    decayed = {v.path for v in model.trainable_variables if opt._use_weight_decay(v)}
    assert "head/kernel" in decayed and "head/bias" not in decayed
    assert not any(p.endswith(("gamma", "beta", "bias")) for p in decayed)
