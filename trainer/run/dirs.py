"""The run directory's life cycle: claim a fresh one, resume an old one, guard what is in it.

- `claim` (the `unique_dir` resolver of the default `hydra.run.dir`): two runs started in the
  same second get two directories; `os.mkdir` is the atomic test-and-set.
- `resume_argv`: `resume=RUN_DIR` becomes that run's own overrides plus `hydra.run.dir=RUN_DIR`.
- `open_run`: before training, not after hours of it: the directory is writable, a resumed run
  keeps its config, a finished run is not trained again, what a killed process left is tidied.
- `check_free_space`: enough disk for the checkpoints and exports.
- `non_chief_worker`: only the chief of a cluster writes the run directory.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from trainer.atomic import replacing
from trainer.config.compose import flatten
from trainer.errors import ConfigError
from trainer.run.finished import finished_metrics

log = logging.getLogger(__name__)

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


def _section(cfg, key: str) -> dict:
    return flatten(OmegaConf.select(cfg, key), f"{key}.")


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


def check_writable(run_dir: Path) -> None:
    """Fail before training if the run directory cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0" * 1024)
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"hydra.run.dir={str(run_dir)!r} is not writable: {e.strerror}") from None


def state_dir(run_dir: Path) -> Path:
    """Where an earlier attempt of this run left its state (the chief's directory, for workers)."""
    return Path(os.environ.get(SHARED_RUN_DIR_ENV) or run_dir)


def open_run(run_dir: Path, cfg) -> dict | None:
    """Make the run directory ready to train in; returns the metrics if the run is finished."""
    check_writable(run_dir)
    if (state_dir(run_dir) / "checkpoints" / "last" / "checkpoint").is_file():
        check_unchanged(state_dir(run_dir), cfg)
    finished = finished_metrics(run_dir, cfg.trainer.epochs)
    if finished is not None:
        log.info("%s already holds this finished run: nothing to do", run_dir)
        return finished
    for path in clean_stale(run_dir):
        log.info("removed %s, left by a killed process", path)
    return None


def record_start(work_dir: Path, cfg, run_info: dict) -> None:
    """config.yaml (resolved: evaluate, export and resume rebuild the run from it) and run.json
    (strategy, replicas, batch, precision)."""
    with replacing(work_dir / "config.yaml") as tmp:
        OmegaConf.save(cfg, tmp, resolve=True)
    with replacing(work_dir / "run.json") as tmp:
        tmp.write_text(json.dumps(run_info, indent=2, default=str) + "\n")


def non_chief_worker() -> bool:
    """From TF_CONFIG: is this process a worker other than the chief of a cluster?"""
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    task, cluster = tf_config.get("task", {}), tf_config.get("cluster", {})
    if not task or not cluster:
        return False
    if "chief" in cluster:
        return task.get("type") != "chief"
    return not (task.get("type") == "worker" and int(task.get("index", 0)) == 0)


def write_skipped_report(skipped: list[tuple[str, str]], path: Path) -> None:
    """skipped_files.csv: every file the data stage could not use, and why."""
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "reason"])
        writer.writerows(skipped)
    log.warning("%d file(s) skipped as unusable; see %s", len(skipped), path)


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
# (trainer/atomic.py); TensorFlow's: "checkpoints/*/<prefix>_temp/".
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
