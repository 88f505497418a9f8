"""python -m trainer.export run=RUN_DIR: export an existing run again (its best checkpoint).

Writes RUN_DIR/export/ as training does (SavedModels, model.keras, LiteRT files, model card),
atomically, with the same reload check.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from trainer.config.args import fail, parse_args, run_dir_arg
from trainer.errors import USER_ERRORS

USAGE = "python -m trainer.export run=RUN_DIR"


@dataclass
class Args:
    run: str = "???"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(Args, argv, USAGE)
    run_dir = run_dir_arg(args.run)

    from trainer.data.pipeline import eval_pipeline
    from trainer.data.sources import load_dataset
    from trainer.models.mobilevit import build_model
    from trainer.models.weights import restore_best_checkpoint
    from trainer.run.finished import METRICS_FILE, load_config
    from trainer.serving.model_card import ModelCard
    from trainer.serving.savedmodel import export_run

    cfg = load_config(run_dir)
    try:
        dataset = load_dataset(cfg.data)
        model = build_model(cfg.model, dataset.num_classes)
        restore_best_checkpoint(model, run_dir)
    except USER_ERRORS as e:
        fail(str(e))
    batch = cfg.trainer.batch_size
    val_ds = eval_pipeline(dataset.splits["val"], cfg.data, batch)
    calib_ds = eval_pipeline(dataset.splits["train"], cfg.data, batch)
    metrics_path = run_dir / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    result = export_run(model, dataset.class_names, cfg.export, ModelCard.from_config(cfg),
                        run_dir, val_ds, calib_ds, metrics)
    print(f"exported {run_dir / 'export'} (reload check {result['reload_max_rel_diff']:.2g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
