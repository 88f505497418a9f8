"""python -m trainer.evaluate run=RUN_DIR [split=val|test] [tta=none|flip|crops|crops_flip]

Top-1, top-5, per-class precision / recall / F1, expected calibration error, a confusion matrix
and the most confident mistakes, computed with the run's exported classifier. Written to
RUN_DIR/eval/<split>/ and printed as a table. With `tta`, the same figures for test-time
augmentation (probabilities averaged over the mirror image and / or five crops) are reported
beside the plain ones (`tta_*` files); the exported model is unchanged.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass

import numpy as np

from trainer.config.args import fail, parse_args, run_dir_arg
from trainer.config.schema import TTA_MODES
from trainer.errors import USER_ERRORS

USAGE = "python -m trainer.evaluate run=RUN_DIR [split=val|test] [tta=none|flip|crops|crops_flip]"


@dataclass
class Args:
    run: str = "???"
    split: str = "val"
    tta: str = "none"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(Args, argv, USAGE)
    run_dir, split = run_dir_arg(args.run), args.split
    if args.tta not in TTA_MODES:
        fail(f"tta={args.tta!r} is not known; choose one of {', '.join(TTA_MODES)}")

    import tensorflow as tf

    from trainer.atomic import write_json
    from trainer.data.pipeline import tta_pipeline
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
    images, labels, probs, tta_probs = [], [], [], []
    # View 0 is the evaluation image itself: the plain figures come from the same pass.
    for views, y in tta_pipeline(dataset.splits[split], cfg.data, cfg.trainer.batch_size,
                                 args.tta):
        n, v = views.shape[0], views.shape[1]
        p = serve(images=tf.reshape(views, [n * v, *views.shape[2:]]))["probabilities"].numpy()
        p = p.reshape(n, v, -1)
        probs.append(p[:, 0])
        tta_probs.append(p.mean(1))
        images.append(views[:, 0].numpy())
        labels.append(y.numpy())
    images, labels = np.concatenate(images), np.concatenate(labels)
    out = run_dir / "eval" / split
    out.mkdir(parents=True, exist_ok=True)
    reports = {"": classification_report(labels, np.concatenate(probs), dataset.num_classes)}
    if args.tta != "none":
        reports["tta_"] = classification_report(labels, np.concatenate(tta_probs),
                                                dataset.num_classes)
    metrics = {k: reports[""][k] for k in ("examples", "top1_accuracy", "top5_accuracy", "ece")}
    if args.tta != "none":
        metrics["tta"] = {"mode": args.tta, **{k: reports["tta_"][k] for k in
                                               ("top1_accuracy", "top5_accuracy", "ece")}}
    write_json(out / "metrics.json", metrics)
    for prefix, report in reports.items():
        write_report(out, prefix, report, dataset.class_names)
    plot_confusion(np.array(reports[""]["confusion"]), dataset.class_names,
                   out / "confusion_matrix.png")
    plot_mistakes(images, labels, np.concatenate(probs), dataset.class_names, out / "mistakes.png")

    print(f"{dataset.name} / {split}: {metrics['examples']} images")
    names = [("plain", "")] + ([(f"tta={args.tta}", "tta_")] if args.tta != "none" else [])
    print("| metric | " + " | ".join(n for n, _ in names) + " |\n|---|" + "---|" * len(names))
    for label, key in (("top-1", "top1_accuracy"), ("top-5", "top5_accuracy"), ("ECE", "ece")):
        print(f"| {label} | " + " | ".join(f"{reports[p][key]:.4f}" for _, p in names) + " |")
    print("\n| class | precision | recall | F1 |\n|---|---|---|---|")
    report = reports[""]
    for i, name in enumerate(dataset.class_names):
        print(f"| {name} | {report['precision'][i]:.3f} | {report['recall'][i]:.3f} | "
              f"{report['f1'][i]:.3f} |")
    print(f"\nwritten to {out}")
    return 0


def write_report(out, prefix: str, report: dict, class_names: list[str]) -> None:
    """<prefix>per_class.csv and <prefix>confusion.json of one report."""
    from trainer.atomic import replacing, write_text

    with replacing(out / f"{prefix}per_class.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "precision", "recall", "f1", "support"])
        for i, name in enumerate(class_names):
            writer.writerow([name, f"{report['precision'][i]:.4f}", f"{report['recall'][i]:.4f}",
                             f"{report['f1'][i]:.4f}", int(np.sum(report["confusion"][i]))])
    write_text(out / f"{prefix}confusion.json", json.dumps(report["confusion"]))


if __name__ == "__main__":
    sys.exit(main())
