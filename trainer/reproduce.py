"""`python -m trainer.reproduce experiment=RECIPE [smoke=true] [out=DIR] [overrides...]`: run a
recipe, check its promise.

RECIPE is a file of recipes/experiment/ (its stem, or its path); every other `key=value` is a
Hydra override for every run. The recipes it requires (its
`recipe.requires`, e.g. the pretraining run a transfer recipe starts from) run first, each into
its own directory under `outputs/reproduce/<RECIPE>-<time>/`, then the recipe itself, all with the
same command a user types: `python -m trainer experiment=<name> hydra.run.dir=<dir>`.
The recipe's `recipe.metric` in metrics.json is then compared with `recipe.expected` +/-
`recipe.tolerance`, printed, and written to `<dir>/reproduce.json`.

`smoke=true`: every run for a few steps at 32x32 on mock data (TFDS mock_data; ImageNet weights are
not fetched), offline: the recipe composes and runs end to end; nothing is compared.

Exit status: 0 within tolerance (or a smoke run that finished), 1 outside it, 2 a usage or config
mistake; a failing training run passes on its own status.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import List

from trainer.atomic import write_json
from trainer.config.args import parse_args
from trainer.config.recipes import compare, compose_recipe, recipe_name, run_order, smoke_overrides
from trainer.errors import ConfigError


def train_recipe(name: str, run_dir: Path, overrides: list[str]) -> int:
    cmd = [sys.executable, "-m", "trainer", f"experiment={name}", f"hydra.run.dir={run_dir}",
           *overrides]
    print(f"$ python {' '.join(cmd[1:])}", flush=True)
    return subprocess.run(cmd).returncode


USAGE = ("python -m trainer.reproduce experiment=RECIPE [smoke=true] [out=outputs/reproduce] "
         "[overrides...]")


@dataclass
class Args:
    experiment: str = "???"  # a recipe of recipes/experiment/ (name or path)
    smoke: bool = False  # a few steps on mock data
    out: str = "outputs/reproduce"
    overrides: List[str] = field(default_factory=list)  # Hydra overrides for every run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own = tuple(f"{f.name}=" for f in fields(Args) if f.name != "overrides")
    args = parse_args(Args, [a for a in argv if a.startswith(own) or a in ("-h", "--help")],
                      USAGE)
    args.overrides = [a for a in argv if not a.startswith(own)]
    args.recipe, args.out = args.experiment, Path(args.out)
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
