"""python -m trainer.predict run=RUN_DIR images=PATH [PATH ...] [top_k=5] [output=FILE.json]

Top-k labels with probabilities for image files or folders, using only the exported SavedModel
(`export/classifier`, signature `serve_bytes`): no training code, no config.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from trainer.atomic import write_text
from trainer.config.args import fail, parse_args
from trainer.config.schema import TOP_K
from trainer.data.files import SERVED_SUFFIXES

USAGE = ("python -m trainer.predict run=RUN_DIR images=PATH [PATH ...] [top_k=5] "
         "[output=predictions.json]")


@dataclass
class Args:
    run: str = "???"
    images: List[str] = field(default_factory=lambda: ["???"])
    top_k: int = TOP_K
    output: Optional[str] = None


def image_files(paths: list[str]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in SERVED_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            fail(f"images={str(p)!r}: no such file or directory")
    return files


def predict(classifier_dir: Path, files: list[Path], top_k: int = TOP_K) -> list[dict]:
    import tensorflow as tf

    serve = tf.saved_model.load(str(classifier_dir)).signatures["serve_bytes"]
    results = []
    for f in files:
        try:
            out = serve(images=tf.constant([f.read_bytes()]))
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
            results.append({"file": str(f), "error": e.message.splitlines()[0]})
            continue
        probs = out["probabilities"][0].numpy()
        names = [n.decode() for n in out["top_k_names"][0].numpy()][:top_k]
        indices = out["top_k_indices"][0].numpy()[:top_k]
        results.append({"file": str(f), "top_k": [
            {"label": n, "index": int(i), "probability": float(probs[i])}
            for n, i in zip(names, indices)]})
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(Args, argv, USAGE)
    classifier = Path(args.run) / "export" / "classifier"
    if not (classifier / "saved_model.pb").is_file():
        fail(f"run={args.run!r} has no exported classifier ({classifier})")
    if args.images == ["???"]:
        fail(f"images= is missing\nusage: {USAGE}")
    files = image_files(args.images)
    if not files:
        fail("images= matched no image file")
    results = predict(classifier, files, args.top_k)
    for r in results:
        if "error" in r:
            print(f"{r['file']}: cannot decode ({r['error']})")
        else:
            best = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top_k"])
            print(f"{r['file']}: {best}")
    if args.output:
        write_text(Path(args.output), json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
