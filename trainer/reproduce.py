"""`python -m trainer.reproduce RECIPE [--smoke] [overrides...]`: run a recipe, check its promise.

RECIPE is a file of recipes/experiment/ (its stem, or its path). The recipes it requires (its
`recipe.requires`, e.g. the pretraining run a transfer recipe starts from) run first, each into
its own directory under `outputs/reproduce/<RECIPE>-<time>/`, then the recipe itself, all with the
same command a user types: `python -m trainer experiment=<name> hydra.run.dir=<dir>`.
The recipe's `recipe.metric` in metrics.json is then compared with `recipe.expected` +/-
`recipe.tolerance`, printed, and written to `<dir>/reproduce.json`.

`--smoke`: every run for a few steps at 32x32 on mock data (TFDS mock_data; ImageNet weights are
not fetched), offline: the recipe composes and runs end to end; nothing is compared.

Exit status: 0 within tolerance (or a smoke run that finished), 1 outside it, 2 a usage or config
mistake; a failing training run passes on its own status.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from trainer.atomic import write_json
from trainer.config import ConfigError, one_line, register, validate
from trainer.precheck import CONF_DIR, RECIPES_DIR, searchpath_override

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
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        try:
            cfg = compose("config", overrides=[f"experiment={name}", *overrides,
                                                *searchpath_override([])])
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
    if cfg.model.pretrained == "imagenet":
        out.append("model.pretrained=none")  # not fetched in a smoke run
    return out


def train_recipe(name: str, run_dir: Path, overrides: list[str]) -> int:
    cmd = [sys.executable, "-m", "trainer", f"experiment={name}", f"hydra.run.dir={run_dir}",
           *overrides]
    print(f"$ python {' '.join(cmd[1:])}", flush=True)
    return subprocess.run(cmd).returncode


def compare(cfg, metrics: dict) -> dict:
    r = cfg.recipe
    measured = metrics.get(r.metric)
    result = {"metric": r.metric, "measured": measured, "expected": r.expected,
              "tolerance": r.tolerance, "source": r.source}
    if measured is None or r.expected is None:
        return {**result, "within": None}
    return {**result, "delta": round(measured - r.expected, 6),
            "within": abs(measured - r.expected) <= r.tolerance + 1e-9}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.reproduce",
                                     description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("recipe", help="a recipe of recipes/experiment/ (name or path)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    parser.add_argument("--smoke", action="store_true", help="a few steps on mock data")
    parser.add_argument("--out", type=Path, default=Path("outputs/reproduce"))
    args = parser.parse_args(argv)
    root = None
    try:
        name = recipe_name(args.recipe)
        order = run_order(name)
        root = args.out / f"{name}{'-smoke' if args.smoke else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
        dirs = {n: root / n for n in order}
        for d in dirs.values():  # now, so that a wired path (model.pretrained=DIR) is valid
            d.mkdir(parents=True, exist_ok=True)
        plans = []
        for n in order:
            cfg = compose_recipe(n, args.overrides, check=False)
            wired = [f"{key}={dirs[recipe_name(dep)].resolve()}"
                     for key, dep in cfg.recipe.requires.items()]
            extra = [*(smoke_overrides(cfg, needed=n != name) if args.smoke else []),
                     *args.overrides]
            plans.append((n, [*extra, *wired]))
            compose_recipe(n, plans[-1][1])  # every mistake shows before the first run starts
    except ConfigError as e:
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)  # nothing has run: leave nothing behind
        print(f"error: {e}", file=sys.stderr)
        return 2

    for n, overrides in plans:
        status = train_recipe(n, dirs[n], overrides)
        if status:
            print(f"error: recipe {n} failed (exit status {status}); see {dirs[n]}",
                  file=sys.stderr)
            return status
    metrics = json.loads((dirs[name] / "metrics.json").read_text())
    result = {"recipe": name, "smoke": args.smoke, "run_dir": str(dirs[name]),
              **compare(cfg, metrics)}  # cfg: planned last, the recipe itself
    write_json(dirs[name] / "reproduce.json", result)
    measured = result["measured"]
    shown = "missing" if measured is None else f"{measured:.4f}"
    if args.smoke:
        print(f"recipe {name} (smoke): ran end to end; {result['metric']} {shown} (not compared)")
        return 0
    verdict = {True: "PASS", False: "FAIL", None: "NOT COMPARED"}[result["within"]]
    print(f"recipe {name}: {result['metric']} {shown}, expected {result['expected']} +/- "
          f"{result['tolerance']} ({result['source']}): {verdict}; {dirs[name] / 'reproduce.json'}")
    return 0 if result["within"] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
