"""Compose configs the way `python -m trainer` does, check a command line's config before Hydra
runs and TensorFlow starts, and walk a config tree.

Hydra reports composition errors as multi-line text with exit status 1; a config mistake here
must be one line that names the key and what is allowed, with exit status 2, and no run directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

from hydra import compose, initialize_config_dir
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import DictConfig, OmegaConf

from trainer.config import schema
from trainer.config.schema import Config
from trainer.config.validate import validate
from trainer.errors import ConfigError
from trainer.models.presets import preset

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = str(ROOT / "conf")
RECIPES_DIR = ROOT / "recipes"


class RecipesSearchPath(SearchPathPlugin):
    """recipes/ on Hydra's search path after the primary config directory (conf/, or one given
    with --config-dir): `experiment=NAME` finds every recipe, and `--help` lists them under
    `experiment`. A plugin, because Hydra's help reads only this base search path, never a
    `hydra.searchpath` override. Registered by `register()`, so only in processes that compose
    this project's config."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if f"file://{RECIPES_DIR}" not in [p.path for p in search_path.get_path()]:
            search_path.append("mobilevit-trainer", f"file://{RECIPES_DIR}")


def register() -> None:
    """What composing our config needs, once per process: the schema, the recipes' search path,
    the `preset` resolver."""
    schema.register()
    Plugins.instance().register(RecipesSearchPath)
    if not OmegaConf.has_resolver("preset"):  # data.crop_pct, data.interpolation default to it
        OmegaConf.register_new_resolver("preset", lambda name, key: getattr(preset(name), key))


def compose_config(overrides: Iterable[str] = (), config_name: str = "config",
                   config_dir: str | None = None) -> DictConfig:
    """The config `python -m trainer OVERRIDES` runs with (unresolved; Hydra's errors raised)."""
    register()
    with initialize_config_dir(config_dir=config_dir or CONF_DIR, version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"optim.lr": 0.001, ...}: every leaf of a config (or plain dict) by its dotted key."""
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


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
    try:
        variants = _variants(overrides)
    except Exception as e:
        raise ConfigError(one_line(e)) from None
    cfgs = []
    for variant in variants:
        try:
            cfg = compose_config(variant, config_name, config_dir)
            OmegaConf.resolve(cfg)
        except Exception as e:
            raise ConfigError(one_line(e)) from None
        validate(cfg)
        cfgs.append(cfg)
    return cfgs


def _allowed_keys(full_key: str) -> str:
    parent = full_key.rpartition(".")[0]
    node = OmegaConf.structured(Config)
    node = OmegaConf.select(node, parent) if parent else node
    return ", ".join(sorted(node.keys())) if node is not None and hasattr(node, "keys") else ""


_INVALID_CHOICE = re.compile(r"Invalid value '(.*)', expected one of \[(.*)\]")


def one_line(error: Exception) -> str:
    """Turn Hydra / OmegaConf composition errors into one line naming the key."""
    chain, e = [], error
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        full_key = getattr(e, "full_key", None)
        msg = str(getattr(e, "msg", "") or e).splitlines()[0]
        if full_key and ("not in struct" in msg or type(e).__name__ in ("ConfigAttributeError",
                                                                         "ConfigKeyError")):
            allowed = _allowed_keys(full_key)
            return f"unknown key '{full_key}'" + (f"; allowed keys here: {allowed}" if allowed else "")
        if full_key and type(e).__name__ == "ValidationError":
            choice = _INVALID_CHOICE.match(msg)  # an enum field of the schema
            if choice:
                value, allowed = choice.groups()
                return f"{full_key}={value!r} is not allowed; choose one of {allowed}"
            return f"{full_key}: {msg}"
        if full_key and type(e).__name__ == "MissingMandatoryValue":
            return f"{full_key} is missing: it must be set"
    text = str(error)
    if "Could not find '" in text and "Available options" in text:
        missing = text.split("Could not find '", 1)[1].split("'", 1)[0]
        group, _, option = missing.rpartition("/")
        options = []
        for line in text.split("Available options", 1)[1].splitlines()[1:]:
            if not line.startswith((" ", "\t")) or not line.strip():
                break
            options.append(line.strip())
        return f"{group}={option} is not an option; choose one of {', '.join(options)}"
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return " ".join(lines[:2]) if lines else type(error).__name__
