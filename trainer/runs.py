"""Finished runs, for the entry points that work on them (export, evaluate, predict)."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf


def parse_args(argv: list[str], allowed: dict[str, str], usage: str) -> dict[str, list[str]]:
    """`key=value ...` arguments (Hydra style); values after a key without '=' extend it."""
    args: dict[str, list[str]] = {}
    key = None
    for arg in argv:
        if "=" in arg:
            key, value = arg.split("=", 1)
            if key not in allowed:
                fail(f"unknown argument {key!r}; allowed: {', '.join(allowed)}\nusage: {usage}")
            args.setdefault(key, []).append(value)
        elif key is not None:
            args[key].append(arg)
        else:
            fail(f"expected key=value, got {arg!r}\nusage: {usage}")
    for key, kind in allowed.items():
        if kind == "required" and key not in args:
            fail(f"{key}= is missing\nusage: {usage}")
    return args


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run_dir_arg(value: str) -> Path:
    run_dir = Path(value)
    if not (run_dir / "config.yaml").is_file():
        fail(f"run={value!r} is not a run directory (no config.yaml in it)")
    return run_dir


def load_config(run_dir: Path):
    return OmegaConf.load(run_dir / "config.yaml")


def load_model(run_dir: Path, cfg, num_classes: int):
    """The run's best weights: rebuilt from its config and restored from checkpoints/best."""
    import tensorflow as tf

    from trainer.train import build_model

    model = build_model(cfg.model, num_classes)
    manager_dir = run_dir / "checkpoints" / "best"
    latest = tf.train.latest_checkpoint(str(manager_dir))
    if latest is None:
        fail(f"{manager_dir} holds no checkpoint")
    tf.train.Checkpoint(model=model).restore(latest).expect_partial()
    return model
