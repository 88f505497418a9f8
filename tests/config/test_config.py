"""Every config option composes and validates; mistakes exit 2 with one line, before TensorFlow."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import ROOT

from trainer.config.compose import check, compose_config
from trainer.config.validate import validate
from trainer.errors import ConfigError

GROUPS = ["model", "data", "aug", "optim", "schedule", "trainer", "logger", "finetune",
          "launcher", "hparams_search", "experiment"]


def options(group: str) -> list[str]:
    root = ROOT / ("recipes" if group == "experiment" else "conf")
    return sorted(p.stem for p in (root / group).glob("*.yaml"))


def compose_cfg(overrides: list[str]):
    return compose_config(overrides)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option, tmp_path):
    extra = [f"data.path={tmp_path}"] if option == "folder" else []
    cfg = compose_cfg([f"{group}={option}", *extra])
    # A recipe that starts from another recipe's run: any existing directory stands in for it.
    cfg = compose_cfg([f"{group}={option}", *extra,
                       *(f"{key}={tmp_path}" for key in cfg.recipe.requires)])
    validate(cfg)
    if group not in ("experiment", "trainer", "launcher", "hparams_search"):  # no name key
        assert cfg[group].name == option


def test_recipes_are_on_the_search_path():
    cfg = compose_cfg(["experiment=digits_xxs_scratch"])
    assert cfg.name == "digits_xxs_scratch" and cfg.data.image_size == 32


def test_group_options_are_the_documented_ones():
    assert options("model") == ["mobilevit_s", "mobilevit_xs", "mobilevit_xxs", "mobilevitv2_050",
                                "mobilevitv2_075", "mobilevitv2_100", "mobilevitv2_125",
                                "mobilevitv2_150", "mobilevitv2_175", "mobilevitv2_200"]
    assert set(options("data")) >= {"flowers", "flowers102", "pets", "cifar10", "beans",
                                     "food101", "folder", "digits"}


@pytest.mark.parametrize("args,message", [
    (["model.foo=1"], "unknown key 'model.foo'; allowed keys here: checkpoint_format"),
    (["+foo=3"], "unknown key 'foo'"),
    (["+trainer.gpus=2"], "unknown key 'trainer.gpus'"),
    (["model=mobilevit_m"], "model=mobilevit_m is not an option; choose one of mobilevit_s, "
                            "mobilevit_xs, mobilevit_xxs"),
    (["experiment=nope"], "experiment=nope is not an option; choose one of beans_xxs, "
                          "cassava_xs_balanced, cifar10_v2_075, cifar10_xxs, digits_0to4_pretrain"),
    (["trainer.batch_size=abc"], "trainer.batch_size: Value 'abc'"),
    (["optim.lr=-1"], "optim.lr=-1.0 is out of range; it must be > 0.0"),
    (["optim.lr=0"], "optim.lr=0.0 is out of range"),
    (["trainer.batch_size=0"], "trainer.batch_size=0 is out of range; it must be >= 1"),
    (["trainer.epochs=-3"], "trainer.epochs=-3 is out of range"),
    (["trainer.strategy=gpu"], "trainer.strategy='gpu' is not allowed; choose one of auto"),
    (["trainer.intra_op_threads=two"], "trainer.intra_op_threads='two': allowed: auto, or a "
                                       "thread count from 0"),
    (["trainer.intra_op_threads=-1"], "trainer.intra_op_threads='-1': allowed: auto"),
    (["trainer.recompute=sometimes"], "trainer.recompute='sometimes' is not allowed; choose one "
                                      "of auto, true, false"),
    (["trainer.cpu_replicas=2", "trainer.batch_size=33"],
     "trainer.batch_size=33 is not divisible by trainer.cpu_replicas=2"),
    (["data=folder"], "data.path is missing"),
    (["data=folder", "data.path=/no/such/dir"], "data.path='/no/such/dir' is not a directory"),
    (["model.pretrained=/no/such.safetensors"], "model.pretrained='/no/such.safetensors': no such"),
    (["data.image_size=4"], "data.image_size=4 is out of range"),
    (["data.crop_pct=1.5"], "data.crop_pct=1.5 is out of range"),
    (["model.drop_path_rate=1.0"], "model.drop_path_rate=1.0 is out of range"),
    (["aug.scale=[0.9,0.1]"], "aug.scale=[0.9, 0.1] must be [low, high]"),
    (["optim.name=adam"], "optim.name='adam' is not allowed; choose one of adamw, sgd, lamb, lion"),
    (["finetune=head_then_all", "trainer.epochs=2"],
     "finetune.stages run 3 = 3 epochs and more but trainer.epochs=2"),
    (["finetune.bn=half"], "finetune.bn='half' is not allowed; choose one of train, frozen"),
    (["aug.mix_prob=2"], "aug.mix_prob=2.0 is out of range"),
    (["schedule=step", "schedule.decay_epochs=[5,2]"], "schedule.decay_epochs=[5.0, 2.0] must be"),
    (["data.source=s3"], "data.source='s3' is not allowed"),
    (["data.val_fraction=0.0"], "data.val_fraction=0.0 with no data.val_split"),
    (["-m", "optim.lr=1e-3,-2"], "optim.lr=-2.0 is out of range"),
    (["name=a/b"], "name='a/b' must be letters"),
    (["trainer.accumulate_steps=0"], "trainer.accumulate_steps=0 is out of range; it must be >= 1"),
    (["trainer.early_stopping.patience=-1"], "trainer.early_stopping.patience=-1 is out of range"),
    (["trainer.early_stopping.min_delta=2"], "trainer.early_stopping.min_delta=2.0 is out of range"),
    (["data.class_balance=weighted"], "data.class_balance='weighted' is not allowed; choose one of "
                                      "none, weighted_loss, sampler"),
    (["distill.teacher=/no/such/run"], "distill.teacher='/no/such/run': no such file or directory"),
    (["distill.teacher=mobilevit_xs"], "distill.teacher='mobilevit_xs' is a preset: set "
                                       "distill.teacher_weights"),
    (["distill.teacher=mobilevit_q"], "distill.teacher='mobilevit_q' is neither a path nor a preset"),
    (["distill.teacher=mobilevit_xs", "distill.teacher_weights=imagenet", "distill.alpha=1.5"],
     "distill.alpha=1.5 is out of range"),
])
def test_config_mistakes_are_one_line(args, message):
    with pytest.raises(ConfigError) as err:
        check(args)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_config_exits_2_before_tensorflow(tmp_path):
    """The real command: exit 2, one stderr line, no TensorFlow import, no run directory."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = ("import sys, runpy; sys.argv = ['trainer', 'optim.lr=-1', 'hydra.run.dir=%s'];\n"
            "try:\n    runpy.run_module('trainer', run_name='__main__')\n"
            "finally:\n    print('TF_LOADED' if 'tensorflow' in sys.modules else 'TF_NOT_LOADED')"
            % run_dir)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "config error: optim.lr=-1.0 is out of range; it must be > 0.0"
    assert "TF_NOT_LOADED" in result.stdout
    assert not run_dir.exists()


def test_recipe_style_yaml_mistake_is_reported(tmp_path):
    """A mistake inside a YAML file (not on the command line) names the key too."""
    conf = tmp_path / "conf"
    import shutil
    shutil.copytree(ROOT / "conf", conf)
    (conf / "experiment").mkdir()
    (conf / "experiment" / "broken.yaml").write_text(
        "# @package _global_\noptim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'optim.learning_rate'"):
        check(["--config-dir", str(conf), "experiment=broken"])


def test_help_introduces_the_product_and_lists_every_option_and_recipe():
    """`python -m trainer --help`: the product and where to start, then every group's options,
    the recipes (from recipes/, a second config root) under `experiment`."""
    from trainer.config.recipes import recipe_names
    from trainer.models.presets import MODEL_NAMES

    result = subprocess.run([sys.executable, "-m", "trainer", "--help"], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("mobilevit-trainer: fine-tune MobileViT")
    assert "powered by Hydra" not in text
    assert "python -m trainer experiment=quickstart" in text
    groups = dict(line.split(": ", 1) for line in
                  text.split("== Config groups (group=option) ==\n", 1)[1].split("\n\n", 1)[0]
                  .splitlines())
    assert groups["experiment"].split(", ") == recipe_names()
    assert "quickstart" in recipe_names()
    assert groups["model"].split(", ") == sorted(MODEL_NAMES)
    for group in GROUPS[:-1]:
        assert groups[group].split(", ") == options(group), group
