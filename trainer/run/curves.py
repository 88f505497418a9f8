"""Training curves (loss, accuracy, learning rate per epoch) as a PNG in the run directory."""

from __future__ import annotations

from pathlib import Path

from trainer.atomic import replacing


def plot_curves(rows: list[dict], path: Path) -> Path:
    """rows: history.csv rows (epoch, loss, accuracy, val_loss, val_accuracy, lr, ...)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) for r in rows]
    panels = [("loss", ["loss", "val_loss"]), ("accuracy", ["accuracy", "val_accuracy"]),
              ("learning rate", ["lr"])]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            if rows and key in rows[0]:
                ax.plot(epochs, [float(r[key]) for r in rows], marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
    fig.tight_layout()
    with replacing(path) as tmp:  # a kill never leaves half a PNG
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return path
