"""Which channel order do transformers' MobileViT v2 checkpoints expect? Measured, not assumed.

timm's `mobilevitv2_*.cvnets_in1k` and transformers' `apple/mobilevitv2-*-imagenet1k-256` are
conversions of the same ml-cvnets checkpoints, and timm's take RGB. If transformers' stem kernel
equals timm's, its checkpoints take RGB too; if it equals timm's with the input channels reversed,
BGR (what `trainer/models/weights.py` assumes for every transformers checkpoint, v1 and v2, after
transformers' image processor and documentation). Needs the Hugging Face Hub (not reachable from
the build machine):

    python -m bench.hf_channel_order --widths 0.5 1.0 2.0
"""

from __future__ import annotations

import argparse

import numpy as np

HF_FILES = ("model.safetensors", "pytorch_model.bin")


def stem_kernel(repo: str, key: str) -> np.ndarray:
    from huggingface_hub import hf_hub_download

    from trainer.models.weights import read_checkpoint

    for filename in HF_FILES:
        try:
            return read_checkpoint(hf_hub_download(repo, filename))[key]
        except Exception as e:  # the next file name, or the Hub's error at the end
            error = e
    raise SystemExit(f"cannot read {key} of {repo}: {error}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", nargs="+", default=["0.5", "1.0", "2.0"])
    args = parser.parse_args(argv)
    verdicts = {}
    for width in args.widths:
        timm = stem_kernel(f"timm/mobilevitv2_{round(float(width) * 100):03d}.cvnets_in1k",
                           "stem.conv.weight")
        hf = stem_kernel(f"apple/mobilevitv2-{width}-imagenet1k-256",
                         "mobilevitv2.conv_stem.convolution.weight")
        same, flipped = np.abs(hf - timm).max(), np.abs(hf - timm[:, ::-1]).max()
        verdicts[width] = "RGB" if same < flipped else "BGR"
        print(f"width {width}: |hf - timm| = {same:.3g}, |hf - timm with BGR input| = "
              f"{flipped:.3g} -> transformers' checkpoint takes {verdicts[width]}")
    return verdicts


if __name__ == "__main__":
    main()
