"""python -m trainer.evaluate run=RUN_DIR [split=val|test]

Top-1, top-5, per-class precision / recall / F1, expected calibration error, a confusion matrix
and the most confident mistakes, computed with the run's exported classifier. Written to
RUN_DIR/eval/<split>/ and printed as a table.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass

import numpy as np

from trainer.config.args import fail, parse_args, run_dir_arg
from trainer.errors import USER_ERRORS

USAGE = "python -m trainer.evaluate run=RUN_DIR [split=val|test]"


@dataclass
class Args:
    run: str = "???"
    split: str = "val"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(Args, argv, USAGE)
    run_dir, split = run_dir_arg(args.run), args.split

    import tensorflow as tf

    from trainer.atomic import replacing, write_json, write_text
    from trainer.data.pipeline import eval_pipeline
    from trainer.data.sources import load_dataset
    from trainer.run.finished import load_config
    from trainer.serving.evaluation import classification_report, plot_confusion, plot_mistakes

    cfg = load_config(run_dir)
    try:
        dataset = load_dataset(cfg.data)
    except USER_ERRORS as e:
        fail(str(e))
    if split not in dataset.splits:
        fail(f"split={split!r}: {dataset.name} has {', '.join(dataset.splits)}")
    classifier = tf.saved_model.load(str(run_dir / "export" / "classifier"))
    serve = classifier.signatures["serve_float"]
    images, labels, probs = [], [], []
    for x, y in eval_pipeline(dataset.splits[split], cfg.data, cfg.trainer.batch_size):
        probs.append(serve(images=x)["probabilities"].numpy())
        images.append(x.numpy())
        labels.append(y.numpy())
    images, labels, probs = np.concatenate(images), np.concatenate(labels), np.concatenate(probs)
    report = classification_report(labels, probs, dataset.num_classes)

    out = run_dir / "eval" / split
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", {k: report[k] for k in ("examples", "top1_accuracy",
                                                             "top5_accuracy", "ece")})
    with replacing(out / "per_class.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "precision", "recall", "f1", "support"])
        for i, name in enumerate(dataset.class_names):
            writer.writerow([name, f"{report['precision'][i]:.4f}", f"{report['recall'][i]:.4f}",
                             f"{report['f1'][i]:.4f}", int(np.sum(report["confusion"][i]))])
    write_text(out / "confusion.json", json.dumps(report["confusion"]))
    plot_confusion(np.array(report["confusion"]), dataset.class_names, out / "confusion_matrix.png")
    plot_mistakes(images, labels, probs, dataset.class_names, out / "mistakes.png")

    print(f"{dataset.name} / {split}: {report['examples']} images")
    print(f"| metric | value |\n|---|---|\n| top-1 | {report['top1_accuracy']:.4f} |\n"
          f"| top-5 | {report['top5_accuracy']:.4f} |\n| ECE | {report['ece']:.4f} |")
    print("\n| class | precision | recall | F1 |\n|---|---|---|---|")
    for i, name in enumerate(dataset.class_names):
        print(f"| {name} | {report['precision'][i]:.3f} | {report['recall'][i]:.3f} | "
              f"{report['f1'][i]:.3f} |")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
