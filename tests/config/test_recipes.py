"""Recipes keep their promise in writing (header = config) and run end to end through
`python -m trainer.reproduce`: the offline transfer recipe, smoke-sized, with its pretraining."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

from trainer.config.recipes import compare, compose_recipe, recipe_names

HEADER = ("Recipe:", "Command:", "Hardware:", "Expected:", "Source:")


def header(name: str) -> dict[str, str]:
    lines = (ROOT / "recipes" / "experiment" / f"{name}.yaml").read_text().splitlines()
    fields = {}
    for line in lines:
        for key in HEADER:
            if line.startswith(f"# {key}"):
                fields[key] = line[len(key) + 2:].strip()
    return fields


@pytest.mark.parametrize("name", recipe_names())
def test_recipe_header_states_command_hardware_and_its_expected_metric(name):
    fields = header(name)
    assert set(fields) == set(HEADER), f"{name}: header lacks {set(HEADER) - set(fields)}"
    assert f"python -m trainer experiment={name}" in fields["Command:"]
    cfg = compose_recipe(name, check=False)
    assert cfg.name == name
    metric, expected, tolerance = re.fullmatch(r"(\w+) ([\d.]+) \+/- ([\d.]+)",
                                               fields["Expected:"]).groups()
    assert (metric, float(expected), float(tolerance)) == (
        cfg.recipe.metric, cfg.recipe.expected, cfg.recipe.tolerance)
    assert fields["Source:"].split()[0].rstrip(",") == cfg.recipe.source
    if cfg.recipe.source == "measured":
        assert "python -m trainer.reproduce" in fields["Source:"]


def test_recipes_cover_the_downstream_datasets():
    data = {compose_recipe(n, check=False).data.name for n in recipe_names()}
    assert {"flowers", "flowers102", "pets", "cifar10", "beans", "digits"} <= data
    transfer = compose_recipe("digits_5to9_transfer", check=False)
    assert dict(transfer.recipe.requires) == {"model.pretrained": "digits_0to4_pretrain"}
    assert transfer.recipe.source == "measured"


def test_compare_against_expected_with_tolerance():
    cfg = compose_recipe("digits_xxs_scratch", check=False)
    e, tol = cfg.recipe.expected, cfg.recipe.tolerance
    assert compare(cfg, {"test_accuracy": e + tol * 0.9})["within"] is True
    assert compare(cfg, {"test_accuracy": e - tol * 1.1})["within"] is False
    assert compare(cfg, {})["within"] is None


def reproduce(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.reproduce", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_reproduce_refuses_an_unknown_recipe(tmp_path):
    run = reproduce(["experiment=digits_7to9"], tmp_path)
    assert run.returncode == 2
    assert run.stderr.startswith("error: no recipe 'digits_7to9'; the recipes are: beans_xxs, ")
    assert not (tmp_path / "outputs").exists()


def test_reproduce_refuses_a_bad_override_and_leaves_nothing(tmp_path):
    run = reproduce(["experiment=digits_5to9_transfer", "optim.lr=-1", "out=out"], tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip() == "error: optim.lr=-1.0 is out of range; it must be > 0.0"
    assert list((tmp_path / "out").iterdir()) == []


def test_reproduce_smoke_runs_the_transfer_recipe_after_its_pretraining(tmp_path):
    run = reproduce(["experiment=digits_5to9_transfer", "smoke=true", "out=out"], tmp_path)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    (root,) = (tmp_path / "out").iterdir()
    pre, transfer = root / "digits_0to4_pretrain", root / "digits_5to9_transfer"
    assert (pre / "export" / "model.keras").is_file()  # what the transfer starts from
    assert json.loads((pre / "dataset.json").read_text())["class_names"] == list("01234")
    info = json.loads((transfer / "dataset.json").read_text())
    assert info["class_names"] == list("56789") and info["counts"]["train"] == 25
    assert f"initialised from weights of {pre.resolve()} (head new)" in out
    result = json.loads((transfer / "reproduce.json").read_text())
    assert result["smoke"] is True and result["metric"] == "test_accuracy"
    assert result["measured"] is not None and result["within"] is not None
    assert "recipe digits_5to9_transfer (smoke): ran end to end" in run.stdout
