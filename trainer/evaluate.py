"""python -m trainer.evaluate run=RUN_DIR [split=val|test]

Top-1, top-5, per-class precision / recall / F1, expected calibration error, a confusion matrix
and the most confident mistakes, computed with the run's exported classifier. Written to
RUN_DIR/eval/<split>/ and printed as a table.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

USAGE = "python -m trainer.evaluate run=RUN_DIR [split=val|test]"


def classification_report(labels: np.ndarray, probs: np.ndarray, num_classes: int,
                          bins: int = 15) -> dict:
    """Every number of the report from labels [N] and probabilities [N, C]."""
    pred = probs.argmax(1)
    k = min(5, num_classes)
    top5 = (np.argsort(-probs, 1)[:, :k] == labels[:, None]).any(1)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, pred), 1)
    tp = np.diag(confusion).astype(float)
    precision = np.divide(tp, confusion.sum(0), out=np.zeros(num_classes), where=confusion.sum(0) > 0)
    recall = np.divide(tp, confusion.sum(1), out=np.zeros(num_classes), where=confusion.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(num_classes),
                   where=(precision + recall) > 0)
    confidence = probs.max(1)
    correct = pred == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):  # expected calibration error, equal-width bins
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return {"examples": int(len(labels)), "top1_accuracy": float(correct.mean()),
            "top5_accuracy": float(top5.mean()), "ece": float(ece),
            "precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
            "confusion": confusion.tolist()}


def plot_confusion(confusion: np.ndarray, class_names: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * n + 2), max(4, 0.45 * n + 2)))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_mistakes(images: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                  class_names: list[str], path: Path, count: int = 16) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != labels)
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]])][:count]
    cols = 4
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), wrong):
        ax.imshow(images[i])
        ax.set_title(f"true {class_names[labels[i]]}\npred {class_names[pred[i]]} "
                     f"({probs[i, pred[i]]:.2f})", fontsize=8)
    if not len(wrong):
        axes[0, 0].set_title("no mistakes")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return len(wrong)


def main(argv: list[str] | None = None) -> int:
    from trainer.runs import fail, load_config, parse_args, run_dir_arg

    args = parse_args(sys.argv[1:] if argv is None else argv,
                      {"run": "required", "split": "optional"}, USAGE)
    run_dir = run_dir_arg(args["run"][0])
    split = args.get("split", ["val"])[0]

    import tensorflow as tf

    from trainer import augment, data
    from trainer.atomic import write_json

    cfg = load_config(run_dir)
    dataset = data.load_dataset(cfg.data)
    if split not in dataset.splits:
        fail(f"split={split!r}: {dataset.name} has {', '.join(dataset.splits)}")
    classifier = tf.saved_model.load(str(run_dir / "export" / "classifier"))
    serve = classifier.signatures["serve_float"]
    images, labels, probs = [], [], []
    for x, y in augment.eval_pipeline(dataset.splits[split], cfg.data, cfg.trainer.batch_size):
        probs.append(serve(images=x)["probabilities"].numpy())
        images.append(x.numpy())
        labels.append(y.numpy())
    images, labels, probs = np.concatenate(images), np.concatenate(labels), np.concatenate(probs)
    report = classification_report(labels, probs, dataset.num_classes)

    out = run_dir / "eval" / split
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", {k: report[k] for k in ("examples", "top1_accuracy",
                                                             "top5_accuracy", "ece")})
    with open(out / "per_class.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "precision", "recall", "f1", "support"])
        for i, name in enumerate(dataset.class_names):
            writer.writerow([name, f"{report['precision'][i]:.4f}", f"{report['recall'][i]:.4f}",
                             f"{report['f1'][i]:.4f}", int(np.sum(report["confusion"][i]))])
    (out / "confusion.json").write_text(json.dumps(report["confusion"]))
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
