"""Rebuild the TF Hub MobileViT collection from a public PyTorch checkpoint (v1 and v2).

    python -m trainer.convert model=mobilevit_xs checkpoint=model.safetensors output=DIR
    python -m trainer.convert model=mobilevitv2_100 checkpoint=imagenet output=DIR

writes DIR/classifier/ (float32 [N, 256, 256, 3] RGB in [0, 1] -> 1000 ImageNet logits, the
`mobilevit_*_1k_256` contract), DIR/feature_extractor/ (pooled features, the `_fe` models) and
DIR/<model>.weights.h5 (Keras weights that `model.pretrained=` accepts).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from trainer.config.args import fail, parse_args
from trainer.errors import CheckpointError
from trainer.models.presets import MODEL_NAMES

USAGE = ("python -m trainer.convert model=NAME checkpoint=FILE|imagenet|imagenet22k|... output=DIR "
         "[format=timm|hf] [image_size=SIZE]")


@dataclass
class Args:
    model: str = field(default="???", metadata={"choices": MODEL_NAMES})
    # timm or transformers checkpoint (.safetensors, or .bin with torch), or a weight source of
    # the preset to download ('imagenet': timm/<model>.cvnets_in1k; 'imagenet22k[_384]' for
    # mobilevitv2_150 / 175 / 200)
    checkpoint: str = "???"
    output: str = "???"
    format: Optional[str] = field(default=None, metadata={"choices": (None, "timm", "hf")})
    image_size: Optional[int] = None  # default: what the weights were evaluated at (256 or 384)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(Args, argv, USAGE)
    output = Path(args.output)

    from trainer.atomic import replacing
    from trainer.models.head import build_classifier
    from trainer.models.mobilevit import MobileViTBackbone
    from trainer.models.presets import preprocessing, preset
    from trainer.models.weights import (
        download_checkpoint,
        load_torch_state,
        read_checkpoint,
    )
    from trainer.serving.savedmodel import export_float_savedmodel, feature_model

    model = build_classifier(MobileViTBackbone.from_preset(args.model), 1000)
    source = args.checkpoint if args.checkpoint in preset(args.model).weights else "imagenet"
    size = args.image_size or preprocessing(args.model, source)[0]
    try:
        path = (download_checkpoint(args.model, source)
                if args.checkpoint in preset(args.model).weights else Path(args.checkpoint))
        load_torch_state(model, read_checkpoint(path), args.format, source=str(path))
    except CheckpointError as e:
        fail(str(e))
    output.mkdir(parents=True, exist_ok=True)
    weights = output / f"{args.model}.weights.h5"
    with replacing(weights) as tmp:  # never a half-written weights file
        model.save_weights(str(tmp))
    export_float_savedmodel(model, output / "classifier", size, "logits")
    export_float_savedmodel(model, output / "feature_extractor", size, "features")
    print(f"wrote {output}/classifier, {output}/feature_extractor "
          f"({feature_model(model).output.shape[-1]} features) and {weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
