"""Every option with every other: a pairwise matrix of short runs that train, export, and check.

`OPTIONS` is the matrix: one line per option a user combines, each value the overrides it
stands for. A new option joins by adding a line. `allpairspy` generates cases so that every
pair of values (of two different options) appears in at least one case that must train, export
and pass its agreement checks. Pairs that truly cannot work on this machine are in `REFUSED`,
kept out of the generated cases and each tried on its own: refused before TensorFlow starts, exit
status 2, one line naming both keys. Each case's result is printed in the session summary
(`tests/conftest.py`).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from allpairspy import AllPairs
from helpers import ROOT

# Each case costs about a minute on 2 cores (tracing the step, exporting; 2 replicas, XLA or
# multi-scale 2-3x that), so values are chosen where code paths differ, and `_trimmed` keeps the
# cases few and their values cheap: the smallest model of each family (v1 and v2), one
# LiteRT variant per value (float32 / dynamic-range LiteRT from a mixed-precision model are in
# tests/training/test_distribute.py, every variant from a float32 model in tests/serving/test_export.py).
OPTIONS: dict[str, list[str]] = {
    "model": ["model=mobilevit_xxs", "model=mobilevitv2_050"],
    "aug": ["aug=none", "aug=basic", "aug=randaugment", "aug=strong"],
    "multiscale": ["aug.multiscale_sizes=[]", "aug.multiscale_sizes=[24,32,40]"],
    "precision": ["trainer.precision=float32", "trainer.precision=mixed_float16",
                  "trainer.precision=mixed_bfloat16"],
    "xla": ["trainer.jit_compile=false", "trainer.jit_compile=true"],
    "replicas": ["trainer.cpu_replicas=0", "trainer.cpu_replicas=2"],
    "stages": ["finetune=full", "finetune=head_then_all finetune.stages.0.epochs=1"],
    "optimizer": ["optim=adamw", "optim=sgd", "optim=lamb", "optim=lion"],
    "ema": ["optim.ema_decay=0.0", "optim.ema_decay=0.9"],
    "layer_decay": ["optim.layer_decay=1.0", "optim.layer_decay=0.75"],
    "drop_path": ["model.drop_path_rate=0.0", "model.drop_path_rate=0.1"],
    "determinism": ["trainer.deterministic=false", "trainer.deterministic=true"],
    # auto: one thread per op for these small CPU steps (trainer/training/distribute.py)
    "threads": ["trainer.intra_op_threads=auto", "trainer.intra_op_threads=2"],
    # auto: off for these small steps; true: the convolutional blocks replayed in the backward
    # pass (trainer/models/recompute.py) with every other option
    "recompute": ["trainer.recompute=auto", "trainer.recompute=true"],
    "litert": ["export.litert=[]", "export.litert=[float16]", "export.litert=[int8]"],
    "data": ["data=digits", "data=folder data.path={folder}", "data=flowers data.mock_examples=24"],
}
# Pairs that cannot work here, with what the refusal must name. XLA's CPU compiler rejects the
# 16-bit gradient of the resize MobileViT applies to odd-sized feature maps, which every size
# below (32 px, multi-scale 24-40) has; at multiples of 64 px the pair trains on CPU as well
# (tests/training/test_distribute.py::test_gpu_settings_run_on_cpu...), and on a GPU it is not refused.
REFUSED: dict[tuple[str, str], tuple[str, ...]] = {
    ("trainer.precision=mixed_float16", "trainer.jit_compile=true"):
        ("trainer.jit_compile=true", "trainer.precision=mixed_float16", "multiples of 64"),
    ("trainer.precision=mixed_bfloat16", "trainer.jit_compile=true"):
        ("trainer.jit_compile=true", "trainer.precision=mixed_bfloat16", "multiples of 64"),
}
# Small and quick: 2 epochs (a stage boundary for head_then_all) of 2 steps at 32x32.
SMALL = ["model.pretrained=none", "data.image_size=32", "trainer.epochs=2",
         "trainer.steps_per_epoch=2", "trainer.batch_size=8", "trainer.eval_steps=1",
         "logger.tensorboard=false", "export.check_images=8", "export.calibration_images=8",
         "data.shuffle_buffer=16"]


LITERT_BAR = {"float32": 1e-4, "float16": 1e-2, "dynamic_int8": 0.05, "int8": 0.05}
# MobileViT v2 in full int8 drifts further in probability: 0.25 on an untrained 5-class matrix
# model (outputs near 0.2), 0.27 on a digits model trained to 0.91 whose int8 top-1 agreement is
# 1.0 (tests/models/test_mobilevit_v2.py holds that one to the export's 0.99 top-1 bar). One cause
# measured: the fused q/k/v projection's one int8 scale for the query channel and the keys and
# values (it now stays float: trainer/serving/litert.py); this bar was set before that.
V2_INT8_BAR = 0.35


def _refused(row: list[str]) -> bool:
    return any(a in row and b in row for a, b in REFUSED)


def _pairs(row: list[str]) -> set[frozenset]:
    return {frozenset(p) for p in itertools.combinations(row, 2)}


def all_pairs() -> set[frozenset]:
    return {frozenset((a, b)) for (_, v1), (_, v2) in itertools.combinations(OPTIONS.items(), 2)
            for a in v1 for b in v2}


def cases() -> list[list[str]]:
    """One value per option in each case; every allowed pair of values in at least one."""
    # Largest value sets first: allpairspy then comes close to the minimum (4 x 4 = 16).
    order = sorted(OPTIONS, key=lambda name: -len(OPTIONS[name]))
    option_of = {value: name for name, values in OPTIONS.items() for value in values}
    rows = []
    for generated in AllPairs([OPTIONS[name] for name in order]):
        row = dict(zip(order, generated))
        for a, b in REFUSED:  # a refused pair: the second value goes back to its first value
            if row[option_of[a]] == a and row[option_of[b]] == b:
                row[option_of[b]] = OPTIONS[option_of[b]][0]
        rows.append([row[name] for name in OPTIONS])
    # Pairs lost that way are packed into as few more cases as fit (a case takes a pair where
    # neither option is set yet), the rest at first values.
    covered = set().union(*map(_pairs, rows))
    extra: list[dict[str, str]] = []
    for pair in sorted(all_pairs() - covered - {frozenset(p) for p in REFUSED}, key=sorted):
        wanted = {option_of[v]: v for v in pair}
        for case in extra:
            merged = {**case, **wanted}
            if all(case.get(k, v) == v for k, v in wanted.items()) and not _refused(
                    list(merged.values())):
                case.update(wanted)
                break
        else:
            extra.append(dict(wanted))
    rows += [[case.get(name, values[0]) for name, values in OPTIONS.items()] for case in extra]
    return _trimmed(rows)


def _trimmed(rows: list[list[str]]) -> list[list[str]]:
    """The same pairs in fewer, cheaper cases: a case whose pairs the others all cover is dropped
    (those with the most non-first values first), then each value goes back to its option's first
    value wherever no pair is lost. allpairspy fills the cells a case does not need with any
    value, and the non-first ones cost (2 replicas, XLA, multi-scale: 2-3x a plain case)."""
    needed = all_pairs() - {frozenset(p) for p in REFUSED}

    def covers(candidate: list[list[str]]) -> bool:
        return needed <= set().union(*map(_pairs, candidate))

    def extras(row: list[str]) -> int:
        return sum(OPTIONS[name].index(value) > 0 for name, value in zip(OPTIONS, row))

    for row in sorted(rows, key=extras, reverse=True):
        rest = [r for r in rows if r is not row]
        if covers(rest):
            rows = rest
    for i, row in enumerate(rows):
        for j, name in enumerate(OPTIONS):
            simpler = [*row[:j], OPTIONS[name][0], *row[j + 1:]]
            if simpler != row and not _refused(simpler) and covers(
                    [*rows[:i], simpler, *rows[i + 1:]]):
                rows[i] = row = simpler
    return rows


CASES = cases()


def case_id(row: list[str]) -> str:
    """Short: the non-first value of each option (the first is the default-like one)."""
    parts = [f"{name}={OPTIONS[name].index(value)}" for name, value in zip(OPTIONS, row)
             if OPTIONS[name].index(value)]
    return ",".join(parts) or "defaults"


def test_every_pair_of_option_values_is_covered_or_refused():
    covered = set().union(*map(_pairs, CASES))
    refused = {frozenset(p) for p in REFUSED}
    wanted = all_pairs()
    assert len(wanted) == sum(len(a) * len(b) for a, b in
                              itertools.combinations(OPTIONS.values(), 2))
    assert refused <= wanted and not wanted - covered - refused
    assert not covered & refused  # no generated case hides a refused pair
    assert all(len(row) == len(OPTIONS) and not _refused(row) for row in CASES)
    print(f"matrix: {len(OPTIONS)} options, {len(CASES)} cases, {len(wanted)} pairs: "
          f"{len(wanted) - len(refused)} run, {len(refused)} refused")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from helpers import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("matrix-folder"), per_class=8)


def record(name: str, row: dict) -> None:
    """For the session summary's matrix table (tests/conftest.py), whichever worker ran it."""
    out = os.environ.get("MATRIX_RESULTS")
    if out:
        (Path(out) / f"{name}.json").write_text(json.dumps(row))


def trainer(args: list[str], run_dir: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "trainer", *args, f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    return result, round(time.monotonic() - start, 1)


@pytest.mark.parametrize("row", CASES, ids=[f"c{i:02d}:{case_id(r)}" for i, r in enumerate(CASES)])
def test_case_trains_and_exports(row, folder, tmp_path):
    overrides = [o.format(folder=folder) for value in row for o in value.split()]
    run_dir = tmp_path / "run"
    result, seconds = trainer([*SMALL, *overrides], run_dir)
    name = f"c{CASES.index(row):02d}"
    record(name, {"case": name, "values": row, "rc": result.returncode,
                            "seconds": seconds})
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["export_max_rel_diff"] < 1e-4  # the float32 export against its model
    litert = [v for o in overrides if o.startswith("export.litert=")
              for v in o.split("=", 1)[1].strip("[]").split(",") if v]
    if litert:
        checks = json.loads((run_dir / "export" / "litert" / "checks.json").read_text())
        assert set(checks) == set(litert)
        # Against the float32 model, in probabilities: after 4 steps the outputs are near uniform,
        # so top-1 agreement says nothing here (it does for trained models: tests/serving/test_export.py).
        for variant in litert:
            bar = (V2_INT8_BAR if variant == "int8" and "model=mobilevitv2_050" in row
                   else LITERT_BAR[variant])
            assert checks[variant]["max_abs_prob_diff"] <= bar, checks[variant]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["replicas"] == (2 if "trainer.cpu_replicas=2" in row else 1)
    assert run["precision"] == dict(zip(OPTIONS, row))["precision"].split("=")[1]
    threads = dict(zip(OPTIONS, row))["threads"]  # auto: 1 for these small steps, but not XLA's
    assert run["intra_op_threads"] == (2 if threads.endswith("=2") else
                                       0 if "trainer.jit_compile=true" in row else 1)
    assert run["recompute"] is ("trainer.recompute=true" in row)


@pytest.mark.parametrize("pair", list(REFUSED), ids=["+".join(p) for p in REFUSED])
def test_refused_pair_stops_before_tensorflow_naming_both_keys(pair, tmp_path):
    run_dir = tmp_path / "run"
    result, seconds = trainer([*SMALL, *pair], run_dir)
    record("refused-" + "+".join(pair).replace("=", "-"),
           {"case": "refused", "values": list(pair), "rc": result.returncode, "seconds": seconds})
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("config error: ") and all(k in line for k in REFUSED[pair])
    assert not run_dir.exists()
