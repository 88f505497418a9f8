"""How an exported classifier does on a split: top-1, top-5, per-class precision / recall / F1,
expected calibration error, a confusion matrix and the most confident mistakes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.atomic import replacing
from trainer.config.schema import TOP_K


def classification_report(labels: np.ndarray, probs: np.ndarray, num_classes: int,
                          bins: int = 15) -> dict:
    """Every number of the report from labels [N] and probabilities [N, C]."""
    pred = probs.argmax(1)
    k = min(TOP_K, num_classes)
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
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=100)
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
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return len(wrong)
