"""Rebuild the TF Hub MobileViT collection from a public PyTorch checkpoint.

    python -m trainer.convert --model mobilevit_xs --checkpoint model.safetensors --output DIR

writes DIR/classifier/ (float32 [N, 256, 256, 3] RGB in [0, 1] -> 1000 ImageNet logits, the
`mobilevit_*_1k_256` contract), DIR/feature_extractor/ (pooled features, the `_fe` models) and
DIR/<model>.weights.h5 (Keras weights that `model.pretrained=` accepts).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.models.mobilevit import ARCHS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=sorted(ARCHS))
    parser.add_argument("--checkpoint", required=True,
                        help="timm or transformers checkpoint (.safetensors, or .bin with torch), "
                             "or 'imagenet' to download timm/<model>.cvnets_in1k")
    parser.add_argument("--format", choices=["timm", "hf"], default=None,
                        help="checkpoint naming scheme (default: detected from the keys)")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args(argv)

    from trainer.export import export_float_savedmodel, feature_model
    from trainer.models.mobilevit import MobileViTBackbone, build_classifier
    from trainer.models.weights import (CheckpointError, download_imagenet_checkpoint,
                                        load_torch_state, read_checkpoint)

    model = build_classifier(MobileViTBackbone.from_preset(args.model), 1000)
    try:
        path = (download_imagenet_checkpoint(args.model) if args.checkpoint == "imagenet"
                else Path(args.checkpoint))
        load_torch_state(model, read_checkpoint(path), args.format, source=str(path))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    weights = args.output / f"{args.model}.weights.h5"
    tmp = weights.with_name(f".{weights.name}.tmp.weights.h5")
    model.save_weights(str(tmp))
    tmp.replace(weights)  # atomic: never a half-written weights file
    export_float_savedmodel(model, args.output / "classifier", args.image_size, "logits")
    export_float_savedmodel(model, args.output / "feature_extractor", args.image_size, "features")
    print(f"wrote {args.output}/classifier, {args.output}/feature_extractor "
          f"({feature_model(model).output.shape[-1]} features) and {weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
