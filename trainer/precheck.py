"""Compose and validate the command line's config before Hydra runs and TensorFlow starts.

Hydra reports composition errors as multi-line text with exit status 1; a config mistake here
must be one line that names the key and what is allowed, with exit status 2, and no run directory.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from trainer.config import ConfigError, one_line, register, validate

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def searchpath_override(argv: list[str]) -> list[str]:
    """recipes/ on the config search path, wherever the command runs (unless set by the user)."""
    if any(a.lstrip("+").startswith("hydra.searchpath") for a in argv):
        return []
    return [f"hydra.searchpath=[file://{RECIPES_DIR}]"]
_SKIP_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--resolve",
               "--shell-completion", "-sc", "--package", "-p", "--version"}


def _split_argv(argv: list[str]) -> tuple[list[str], str, str | None] | None:
    overrides, config_name, config_dir = [], "config", None
    args = iter(argv)
    for arg in args:
        flag, _, value = arg.partition("=")
        if flag in _SKIP_FLAGS:
            return None
        if flag in ("--config-name", "-cn"):
            config_name = value or next(args, "config")
        elif flag in ("--config-dir", "-cd"):
            config_dir = value or next(args, None)
        elif flag in ("--multirun", "-m", "--experimental-rerun"):
            continue
        elif not arg.startswith("-") and not arg.startswith(("hydra.", "hydra/", "+hydra",
                                                             "~hydra")):
            overrides.append(arg)
    return overrides, config_name, config_dir


def _variants(overrides: list[str]) -> list[list[str]]:
    """One override list per sweep value (others at their first value): every value is checked."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    first = [o.input_line if not o.is_sweep_override() else
             f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" for o in parsed]
    variants = [first]
    for i, o in enumerate(parsed):
        if o.is_sweep_override():
            for value in list(o.sweep_string_iterator())[1:]:
                variants.append(first[:i] + [f"{o.get_key_element()}={value}"] + first[i + 1:])
    return variants


def check(argv: list[str]) -> list:
    """Raise ConfigError (one line) if any composition of the command line is invalid; else
    return the composed configs (one per sweep value)."""
    split = _split_argv(argv)
    if split is None:
        return []
    overrides, config_name, config_dir = split
    overrides = overrides + searchpath_override(argv)
    register()
    try:
        variants = _variants(overrides)
    except Exception as e:
        raise ConfigError(one_line(e)) from None
    cfgs = []
    with initialize_config_dir(config_dir=config_dir or CONF_DIR, version_base="1.3"):
        for variant in variants:
            try:
                cfg = compose(config_name=config_name, overrides=variant)
            except Exception as e:
                raise ConfigError(one_line(e)) from None
            try:
                OmegaConf.resolve(cfg)
            except Exception as e:
                raise ConfigError(one_line(e)) from None
            validate(cfg)
            cfgs.append(cfg)
    return cfgs
