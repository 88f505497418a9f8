"""A smoke variant of every recipe (mock data, a few steps), on its real composed config.
(digits_0to4_pretrain and digits_5to9_transfer run through trainer.reproduce in test_recipes.)"""

from __future__ import annotations

import json

import pytest

from trainer.config.recipes import compose_recipe, recipe_names, smoke_overrides
from trainer.training.train import train

CLASSES = {"flowers": 5, "flowers102": 102, "pets": 37, "cifar10": 10, "beans": 3, "digits": 10,
           "cassava": 5}
COVERED_ELSEWHERE = {"digits_0to4_pretrain", "digits_5to9_transfer"}


@pytest.mark.parametrize("name", [n for n in recipe_names() if n not in COVERED_ELSEWHERE])
def test_recipe_smoke(name, tmp_path):
    recipe = compose_recipe(name, check=False)
    required = []  # e.g. a distillation teacher: its own smoke run, exported, goes first
    for key, dependency in recipe.recipe.requires.items():
        needed = compose_recipe(dependency, check=False)
        train(compose_recipe(dependency, smoke_overrides(needed, needed=True)), tmp_path / dependency)
        required.append(f"{key}={tmp_path / dependency}")
    cfg = compose_recipe(name, [*smoke_overrides(recipe), *required])
    assert cfg.model.name == recipe.model.name and cfg.data.name == recipe.data.name
    metrics = train(cfg, tmp_path / "run")
    assert recipe.recipe.metric in metrics
    assert [s["stage"] for s in metrics["stages"]] == (
        [s.name for s in recipe.finetune.stages] or ["all"])
    info = json.loads((tmp_path / "run" / "dataset.json").read_text())
    classes = recipe.data.classes
    assert info["num_classes"] == (len(classes) if classes else CLASSES[recipe.data.name])
