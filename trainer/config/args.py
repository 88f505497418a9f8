"""One argument style for every command: Hydra's `key=value`, typed by a dataclass.

`python -m trainer` is a Hydra app; the smaller commands (export, evaluate, predict, convert,
reproduce, summarize) take the same `key=value` arguments, parsed here by OmegaConf against a
dataclass of their own (types, defaults, required keys), so a mistake reads the same everywhere:
one line naming the argument and what is allowed, exit status 2. A list argument also takes the
values that follow it (`images=a.jpg b.jpg`, as a shell glob expands them).
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from omegaconf import OmegaConf

from trainer.errors import USAGE_EXIT

T = TypeVar("T")


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USAGE_EXIT)


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (list, typing.List)


def parse_args(schema: type[T], argv: list[str] | None, usage: str) -> T:
    """`key=value ...` into an instance of the dataclass `schema`; exits 2 with one line on a
    mistake, 0 after printing `usage` for -h / --help. `field(metadata={"choices": [...]})`
    restricts a value."""
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(f"usage: {usage}")
        sys.exit(0)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    given: dict[str, list[str]] = {}
    key = None
    for arg in argv:
        if "=" in arg:
            key, value = arg.split("=", 1)
            if key not in fields:
                fail(f"unknown argument {key!r}; allowed: {', '.join(fields)}\nusage: {usage}")
            given.setdefault(key, []).append(value)
        elif key is not None and _is_list(hints[key]):
            given[key].append(arg)
        else:
            fail(f"expected key=value, got {arg!r}\nusage: {usage}")
    values: dict[str, Any] = {}
    for key, items in given.items():
        if _is_list(hints[key]):
            values[key] = items
        elif len(items) > 1:
            fail(f"{key}= given {len(items)} times ({', '.join(items)}); it takes one value")
        else:
            values[key] = items[0]  # converted to the field's type by OmegaConf below
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), values)
    except Exception as e:  # a value of the wrong type
        bad = getattr(e, "full_key", "") or "argument"
        fail(f"{bad}={values.get(bad)!r}: {str(getattr(e, 'msg', e)).splitlines()[0]}\n"
             f"usage: {usage}")
    for name, f in fields.items():
        if OmegaConf.is_missing(cfg, name):
            fail(f"{name}= is missing\nusage: {usage}")
        choices, value = f.metadata.get("choices"), cfg[name]
        if choices is not None and value not in choices:
            fail(f"{name}={value!r} is not allowed; choose one of {', '.join(map(str, choices))}")
    return OmegaConf.to_object(cfg)


def run_dir_arg(value: str) -> Path:
    """A finished or running trainer run directory (it holds the run's config.yaml)."""
    run_dir = Path(value)
    if not (run_dir / "config.yaml").is_file():
        fail(f"run={value!r} is not a run directory (no config.yaml in it)")
    return run_dir
