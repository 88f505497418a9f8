"""The run directory's life cycle: claim a fresh one, resume an old one, guard what is in it.

- `claim` (the `unique_dir` resolver of the default `hydra.run.dir`): two runs started in the
  same second get two directories; `os.mkdir` is the atomic test-and-set.
- `resume_argv`: `resume=RUN_DIR` becomes that run's own overrides plus `hydra.run.dir=RUN_DIR`.
- `check_unchanged`: resuming with another model, data or optimizer config is refused.
- `check_free_space`, `clean_stale`: before training, not after hours of it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from trainer.config import ConfigError

# Set by trainer/__main__.py for a non-chief worker: the chief's run directory, read to resume.
SHARED_RUN_DIR_ENV = "MOBILEVIT_SHARED_RUN_DIR"

_claimed: dict[str, str] = {}  # Hydra may resolve hydra.run.dir more than once per process


def claim(base: str) -> str:
    """Create and return `base`, or `base-2`, `base-3`... if another run took it first."""
    if base in _claimed:
        return _claimed[base]
    Path(base).parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = base if n == 1 else f"{base}-{n}"
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        _claimed[base] = path
        return path
    raise ConfigError(f"hydra.run.dir: 10000 run directories named {base!r}[-N] already exist")


def register_resolver() -> None:
    if not OmegaConf.has_resolver("unique_dir"):
        OmegaConf.register_new_resolver("unique_dir", claim)


# --------------------------------------------------------------------------- resume=RUN_DIR


def resume_argv(argv: list[str]) -> list[str]:
    """Replace `resume=RUN_DIR` by the run's original overrides, then the user's, then its dir."""
    resume = [a for a in argv if a.startswith("resume=")]
    if not resume:
        return argv
    run_dir = Path(resume[-1].split("=", 1)[1]).expanduser()
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if not (run_dir / "config.yaml").is_file() or not overrides_file.is_file():
        raise ConfigError(f"resume={str(run_dir)!r} is not a run directory (expected "
                          f"config.yaml and .hydra/overrides.yaml in it)")
    original = [o for o in OmegaConf.load(overrides_file)
                if not o.startswith(("hydra.run.dir=", "hydra.searchpath="))]
    rest = [a for a in argv if not a.startswith(("resume=", "hydra.run.dir="))]
    return original + rest + [f"hydra.run.dir={run_dir}"]


# --------------------------------------------------------------------------- guards

# What a resumed run may not change: it would no longer be the run its checkpoint belongs to.
GUARDED = ("model", "data", "aug", "optim", "schedule", "finetune", "trainer.batch_size", "seed")


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _section(cfg, key: str) -> dict:
    node = OmegaConf.select(cfg, key)
    value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    return _flatten(value, f"{key}.")


def config_changes(saved, cfg) -> list[str]:
    """`key: old -> new` for every guarded key that differs between two configs."""
    changes = []
    for key in GUARDED:
        old, new = _section(saved, key), _section(cfg, key)
        for k in sorted(set(old) | set(new)):
            if old.get(k, "<unset>") != new.get(k, "<unset>"):
                changes.append(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}")
    return changes


def check_unchanged(run_dir: Path, cfg) -> None:
    """Refuse to resume a run directory's checkpoints under a different config."""
    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file() or cfg.trainer.allow_config_change:
        return
    changes = config_changes(OmegaConf.load(saved_file), cfg)
    if changes:
        raise ConfigError(f"{run_dir} holds a run with a different config ({'; '.join(changes)}); "
                          f"resume with the original config, use a new hydra.run.dir, or set "
                          f"trainer.allow_config_change=true")


def checkpoint_bytes(num_params: int, optimizer_slots: int) -> int:
    """Disk a run needs: 3 checkpoints (2 last + best) and one being written, plus the exports."""
    checkpoint = num_params * 4 * (1 + optimizer_slots)
    return 4 * checkpoint + 4 * num_params * 4 + (64 << 20)


def check_free_space(run_dir: Path, needed: int) -> None:
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise ConfigError(f"hydra.run.dir={str(run_dir)!r}: only {free / 2**20:.0f} MiB free, the "
                          f"run needs about {needed / 2**20:.0f} MiB for its checkpoints and "
                          f"exports")


# Ours: ".<name>.tmp-<pid>..." being written and ".<name>.old-<pid>" being replaced
# (export.atomic_dir, trainer/atomic.py); TensorFlow's: "checkpoints/*/<prefix>_temp/".
_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)")


def clean_stale(run_dir: Path) -> list[Path]:
    """Tidy what a killed process left in the run directory; put back a displaced export."""
    removed = []
    for path in [run_dir, *(p for p in run_dir.rglob("*") if p.is_dir())]:
        if not path.exists():
            continue
        for child in list(path.iterdir()):
            match = _STALE.match(child.name)
            tf_temp = (child.is_dir() and child.name.endswith("_temp")
                       and path.parent.name == "checkpoints")
            if not tf_temp and (not match or _alive(int(match.group("pid")))):
                continue
            original = path / match.group("name") if match else None
            if match and match.group("kind") == "old" and not original.exists():
                os.replace(child, original)  # killed between the two renames of a swap
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()
            removed.append(child)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier attempt in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
