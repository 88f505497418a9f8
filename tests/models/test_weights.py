"""model.pretrained: ImageNet download through the Hugging Face cache, local files, errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import reference as R
from helpers import fake_hub_cache, run_python

from trainer.errors import CheckpointError
from trainer.models import mobilevit as M
from trainer.models.weights import load_weights, read_checkpoint


def test_imagenet_from_hub_cache_offline_then_keras_cache(timm_xxs, tmp_path):
    ref, path = timm_xxs
    hub = fake_hub_cache(tmp_path / "hub", path)
    images = R.test_images(3, 96, seed=5)
    np.save(tmp_path / "x.npy", images)
    code = f"""
        import numpy as np
        from trainer.models.head import build_classifier
        from trainer.models.mobilevit import MobileViTBackbone
        from trainer.models.weights import load_weights
        x = np.load({str(tmp_path / 'x.npy')!r})
        for i in range(2):  # first: convert the safetensors; second: the cached Keras weights
            m = build_classifier(MobileViTBackbone.from_preset("mobilevit_xxs"), 1000)
            print(load_weights(m, "imagenet", "mobilevit_xxs"))
            np.save({str(tmp_path)!r} + f"/out{{i}}.npy", m(x, training=False).numpy())
    """
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub),
           "MOBILEVIT_CACHE": str(tmp_path / "keras-cache")}
    result = run_python(code, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "timm/mobilevit_xxs.cvnets_in1k (head kept)" in result.stdout
    cached = list((tmp_path / "keras-cache").glob("mobilevit_xxs.cvnets_in1k-*.weights.h5"))
    assert len(cached) == 1
    expected = R.reference_logits(ref, images, "timm")
    for i in range(2):
        got = np.load(tmp_path / f"out{i}.npy")
        assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4


def test_imagenet_offline_without_cache_names_file_and_key(tmp_path):
    code = """
        from trainer.models.head import build_classifier
        from trainer.models.mobilevit import MobileViTBackbone
        from trainer.models.weights import load_weights
        m = build_classifier(MobileViTBackbone.from_preset("mobilevit_xs"), 5)
        load_weights(m, "imagenet", "mobilevit_xs")
    """
    result = run_python(code, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "CheckpointError" in last
    assert "https://huggingface.co/timm/mobilevit_xs.cvnets_in1k/resolve/main/model.safetensors" in last
    assert "model.pretrained=/path/to/model.safetensors" in last


def test_pytorch_bin_with_torch_and_clear_error_without(timm_xxs, tmp_path, monkeypatch):
    import torch

    ref, _ = timm_xxs
    path = tmp_path / "pytorch_model.bin"
    torch.save(ref.state_dict(), path)
    model = M.build_classifier(M.MobileViTBackbone.from_preset("mobilevit_xxs"), 4)
    assert "head new" in load_weights(model, str(path), "mobilevit_xxs")
    images = R.test_images(2, 64, seed=9)
    features = R.reference_features(ref, images, "timm")
    from trainer.serving.savedmodel import feature_model
    ours = feature_model(model)(images, training=False).numpy()
    assert np.abs(ours - features).max() / np.abs(features).max() < 1e-4

    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(CheckpointError, match="torch is not installed; download the "
                                              "model.safetensors"):
        read_checkpoint(path)


def test_convert_weights_h5_is_accepted_and_checked(timm_xxs, tmp_path):
    ref, path = timm_xxs
    from trainer.convert import main as convert

    assert convert(["model=mobilevit_xxs", f"checkpoint={path}", f"output={tmp_path / 'out'}"]) == 0
    h5 = tmp_path / "out" / "mobilevit_xxs.weights.h5"
    model = M.build_classifier(M.MobileViTBackbone.from_preset("mobilevit_xxs"), 1000)
    assert "head kept" in load_weights(model, str(h5), "mobilevit_xxs")
    images = R.test_images(2, 64, seed=4)
    expected = R.reference_logits(ref, images, "timm")
    assert np.abs(model(images, training=False).numpy() - expected).max() / np.abs(expected).max() < 1e-4
    wrong = M.build_classifier(M.MobileViTBackbone.from_preset("mobilevit_s"), 1000)
    with pytest.raises(CheckpointError, match="does not fit mobilevit_s"):
        load_weights(wrong, str(h5), "mobilevit_s")
    with pytest.raises(SystemExit) as exit_:
        convert(["model=mobilevit_xxs", f"checkpoint={tmp_path / 'nope.safetensors'}",
                 f"output={tmp_path / 'o2'}"])
    assert exit_.value.code == 2
