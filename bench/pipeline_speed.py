"""Input pipeline throughput (images/s) against the model's training consumption.

Generates real-sized JPEGs (500x375 and 375x500, ImageNet's typical sizes, quality 90, smooth
random content so that the files have realistic sizes), reads them through the trainer's own
image-folder source and `tf.data` training pipeline (decode, augment, batch, prefetch) at 256x256,
and compares with the images/s the model trains at on this machine (bench/results/train.json from
`python -m bench.train_speed`, the faster of our two step variants). The target: the pipeline at
least 3x faster than the model consumes.

    python -m bench.pipeline_speed
    python -m bench.pipeline_speed --augs basic strong --images 512
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import common


def make_jpegs(root: Path, count: int, classes: int = 4) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        h, w = (375, 500) if i % 2 else (500, 375)
        coarse = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        noise = rng.integers(-12, 13, (h, w, 3))
        pixels = np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8)
        (root / f"c{i % classes}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / f"c{i % classes}" / f"{i}.jpg", quality=90)
    return root


def pipeline_rate(folder: Path, aug: str, size: int, batch: int, batches: int) -> float:
    from trainer.config.compose import compose_config
    from trainer.data import pipeline as augment
    from trainer.data import sources as data

    cfg = compose_config(["data=folder", f"data.path={folder}", f"aug={aug}",
                          f"data.image_size={size}", "data.val_fraction=0.05"])
    dataset = data.load_dataset(cfg.data)
    ds = augment.train_pipeline(dataset.splits["train"], cfg.data, cfg.aug, batch, cfg.seed,
                                num_classes=dataset.num_classes)
    iterator = iter(ds)
    for _ in range(3):  # fill the prefetch buffers and autotune
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        images, _ = next(iterator)
    assert images.shape == (batch, size, size, 3)
    return batch * batches / (time.perf_counter() - start)


def consumption(model: str, size: int, device: str) -> float | None:
    path = common.result_path("train", device)
    if not path.is_file():
        return None
    rates = [r["ours_img_s"] for r in json.loads(path.read_text())
             if r["model"] == model and r["size"] == size]
    return max(rates) if rates else None


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--augs", nargs="+", default=["basic", "strong"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    common.add_machine_args(parser)
    args = parser.parse_args(argv)
    threads, info = common.setup(args)
    from trainer.config.compose import CONF_DIR

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_jpegs(Path(tmp) / "jpegs", args.images)
        for aug in args.augs:
            if not (Path(CONF_DIR) / "aug" / f"{aug}.yaml").is_file():
                print(f"aug={aug}: no such policy in conf/aug, skipped")
                continue
            rates = sorted(pipeline_rate(folder, aug, args.size, args.batch, args.batches)
                           for _ in range(args.repeats))
            ours = {"median": float(np.median(rates)), "min": rates[0], "max": rates[-1]}
            for model in common.MODELS:
                need = consumption(model, args.size, args.device)
                if need is None:
                    print(f"{model}: no training rate at {args.size} in bench/results; "
                          "run `python -m bench.train_speed` first")
                    continue
                rows.append(common.speed_row(
                    "pipeline", model, args.batch, args.size, ours,
                    {"median": need, "min": need, "max": need}, aug=aug,
                    ours="tf.data image folder (JPEG 500x375)", ref="model training img/s"))
                print(aug, model, round(ours["median"], 1), "img/s vs model", need, flush=True)
    path = common.write("pipeline", rows, info)
    print(common.table(rows, [("aug", "aug"), ("model", "model"), ("ours_img_s", "pipeline img/s"),
                              ("ref_img_s", "model img/s"), ("speedup", "ratio")]))
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
