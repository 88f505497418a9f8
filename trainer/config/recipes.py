"""Recipes (recipes/experiment/*.yaml): which there are, their composed configs, the recipes each
requires, their smoke-sized variant, and the comparison of a result with a recipe's promise."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from trainer.config.compose import RECIPES_DIR, compose_config, one_line
from trainer.config.validate import validate
from trainer.errors import ConfigError
from trainer.models.presets import preset

SMOKE = ["trainer.steps_per_epoch=2", "trainer.eval_steps=1", "trainer.batch_size=4",
         "data.image_size=32", "data.shuffle_buffer=16", "logger.tensorboard=false",
         "trainer.checkpoint_every_steps=0", "aug.multiscale_sizes=[]"]
MOCK_EXAMPLES = 64  # per split; enough for a stratified validation split of 37 classes


def recipe_names() -> list[str]:
    return sorted(p.stem for p in (RECIPES_DIR / "experiment").glob("*.yaml"))


def recipe_name(arg: str) -> str:
    name = Path(arg).stem if arg.endswith(".yaml") else arg
    if name not in recipe_names():
        raise ConfigError(f"no recipe {arg!r}; the recipes are: {', '.join(recipe_names())}")
    return name


def compose_recipe(name: str, overrides: list[str] = (), check: bool = True):
    """The recipe's composed config (as `python -m trainer experiment=NAME` sees it)."""
    try:
        cfg = compose_config([f"experiment={name}", *overrides])
        OmegaConf.resolve(cfg)
    except Exception as e:
        raise ConfigError(f"recipe {name}: {one_line(e)}") from None
    if check:
        validate(cfg)
    return cfg


def run_order(name: str, seen: tuple[str, ...] = ()) -> list[str]:
    """The recipe after everything it requires (depth first), each once."""
    if name in seen:
        raise ConfigError(f"recipe {name} requires itself: {' -> '.join(seen + (name,))}")
    order: list[str] = []
    for dep in compose_recipe(name, check=False).recipe.requires.values():
        for n in run_order(recipe_name(dep), seen + (name,)):
            if n not in order:
                order.append(n)
    return order + [name]


def smoke_overrides(cfg, needed: bool = False) -> list[str]:
    """A few steps of the same recipe: one epoch per fine-tuning stage, mock TFDS data.

    `needed`: another recipe starts from this run, which must then export its model.
    """
    stages = cfg.finetune.stages
    out = [*SMOKE, f"trainer.epochs={max(len(stages), 1)}", f"trainer.export={needed}"]
    out += [f"finetune.stages.{i}.epochs=1" for i, s in enumerate(stages) if s.epochs is not None]
    if cfg.data.source == "tfds":
        out.append(f"data.mock_examples={MOCK_EXAMPLES}")
    if cfg.model.pretrained in preset(cfg.model.name).weights:
        out.append("model.pretrained=none")  # not fetched in a smoke run
    return out


def compare(cfg, metrics: dict) -> dict:
    r = cfg.recipe
    measured = metrics.get(r.metric)
    result = {"metric": r.metric, "measured": measured, "expected": r.expected,
              "tolerance": r.tolerance, "source": r.source}
    if measured is None or r.expected is None:
        return {**result, "within": None}
    return {**result, "delta": round(measured - r.expected, 6),
            "within": abs(measured - r.expected) <= r.tolerance + 1e-9}
