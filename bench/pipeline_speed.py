"""Input pipeline: ours against an in-graph reference on the same files, the folder scan, and the
per-core rate a GPU needs.

Generates real-sized JPEGs (500x375 and 375x500, ImageNet's typical sizes, quality 90, smooth
random content so that the files have realistic sizes) and measures, interleaved and with the same
tf.data thread count (1 and 2 threads: the per-core rate and its scaling):
- the trainer's image-folder source + training pipeline (`aug=basic`, `aug=strong`) at 256x256,
  one pipeline running at a time (see `steady_rates`),
  batch 32, against a plain tf.data reference that reads each file, decodes the random crop with
  `tf.image.decode_and_crop_jpeg`, resizes and flips it (Model Garden's / big_vision's recipe);
- the folder scan in ms per file: first (headers checked, cache written) and repeated (cache read,
  one stat per file);
- the per-core rate a 16-core host needs to feed one GPU at timm's published MobileViT training
  rates (RTX 3090, AMP, 256x256: results/benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv).
Targets: `aug=basic` >= 1.0x the reference; repeated scan <= 0.05 ms per file.

    python -m bench.pipeline_speed
    python -m bench.pipeline_speed --images 600 --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import common

# timm's published training rates on one RTX 3090 (AMP, 256x256), images/s.
GPU_TRAIN_RATES = {"mobilevit_xxs": 1316.84, "mobilevit_xs": 792.23, "mobilevit_s": 629.67,
                   "mobilevitv2_050": 1396.45, "mobilevitv2_075": 947.54,
                   "mobilevitv2_100": 727.72}
HOST_CORES = 16


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


def with_threads(ds, threads: int):
    import tensorflow as tf

    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1  # each op on one thread: `threads` is the CPU
    return ds.with_options(options)


def ours(folder: Path, cache: Path, aug: str, size: int, batch: int, threads: int):
    from trainer.config.compose import compose_config
    from trainer.data import pipeline
    from trainer.data.sources import load_dataset

    cfg = compose_config(["data=folder", f"data.path={folder}", f"aug={aug}",
                          f"data.image_size={size}", "data.val_fraction=0.05",
                          f"data.cache_dir={cache}"])
    dataset = load_dataset(cfg.data)
    return with_threads(pipeline.train_pipeline(
        dataset.splits["train"], cfg.data, cfg.aug, batch, cfg.seed,
        num_classes=dataset.num_classes), threads)


def reference(folder: Path, size: int, batch: int, threads: int):
    """A plain in-graph tf.data pipeline: read, decode-and-crop, resize, flip, batch."""
    import tensorflow as tf

    from trainer.data.decode import crop_window

    files = sorted(str(p) for p in folder.rglob("*.jpg"))
    labels = [int(Path(f).parent.name[1:]) for f in files]

    def load(index, example):
        path, label = example
        data = tf.io.read_file(path)
        seed = tf.stack([tf.constant(0, tf.int64), index])
        begin, crop = crop_window(tf.io.extract_jpeg_shape(data), seed, (0.08, 1.0), (3 / 4, 4 / 3))
        image = tf.image.decode_and_crop_jpeg(data, tf.concat([begin, crop], 0), channels=3)
        image = tf.image.resize(tf.cast(image, tf.float32) / 255.0, (size, size), antialias=True)
        return tf.image.stateless_random_flip_left_right(image, seed + 1), label

    ds = tf.data.Dataset.from_tensor_slices((files, labels)).shuffle(2048, seed=0).repeat()
    ds = ds.enumerate().map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return with_threads(ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE), threads)


def steady_rates(pipelines: dict, batches: int, repeats: int, expect) -> dict[str, dict]:
    """Images/s of each pipeline, round-robin `repeats` times. One pipeline runs at a time: each
    turn starts a fresh iterator (so no pipeline fills its buffers while another is timed), lets
    it warm up and autotune for 6 batches, then times `batches` more."""
    seconds: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(repeats):
        for name, ds in pipelines.items():
            iterator = iter(ds)
            for _ in range(6):
                next(iterator)
            start = time.perf_counter()
            for _ in range(batches):
                images, _ = next(iterator)
            seconds[name].append(time.perf_counter() - start)
            assert images.shape == expect
            del iterator
    out = {}
    for name, times in seconds.items():
        rates = sorted(batches * expect[0] / t for t in times)
        out[name] = {"median": float(np.median(rates)), "min": rates[0], "max": rates[-1]}
    return out


def scan_rows(folder: Path, cache: Path, label: str) -> list[dict]:
    """The folder scan, first (a fresh cache) and repeated, in ms per file."""
    from trainer.data.folder import FolderScan

    rows = []
    for when in ("first", "repeated"):
        start = time.perf_counter()
        scan = FolderScan(folder, str(cache))
        classes = scan.classes(folder, "skip", [])
        scan.save()
        seconds = time.perf_counter() - start
        files = sum(len(v) for v in classes.values())
        rows.append({"task": "scan", "scan": f"{when}, {label}", "files": files,
                     "checked": scan.checked, "seconds": round(seconds, 3),
                     "ms_per_file": round(1000 * seconds / files, 4)})
        print(f"scan {when} ({label}): {files} files in {seconds:.2f} s, "
              f"{rows[-1]['ms_per_file']} ms per file", flush=True)
    return rows


def linked_folder(root: Path, sources: list[Path], files: int, classes: int = 100) -> Path:
    """`files` hard links to the generated JPEGs in `classes` class directories: a folder at
    ImageNet-like scale in seconds (the scan's cost is per file, not per byte)."""
    for i in range(files):
        d = root / f"class{i % classes:03d}"
        if i < classes:
            d.mkdir(parents=True)
        os.link(sources[i % len(sources)], d / f"{i:06d}.jpg")
    return root


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--augs", nargs="+", default=["basic", "strong"])
    parser.add_argument("--thread-counts", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scan-files", type=int, default=100_000)
    common.add_machine_args(parser)
    args = parser.parse_args(argv)
    _, info = common.setup(args)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_jpegs(Path(tmp) / "jpegs", args.images)
        rows += scan_rows(folder, Path(tmp) / "cache", "500x375 JPEGs")
        if args.scan_files:
            big = linked_folder(Path(tmp) / "big", sorted(folder.rglob("*.jpg")),
                                args.scan_files)
            rows += scan_rows(big, Path(tmp) / "cache", f"{args.scan_files} files")
        expect = (args.batch, args.size, args.size, 3)
        for threads in args.thread_counts:
            pipelines = {"reference": reference(folder, args.size, args.batch, threads)}
            for aug in args.augs:
                pipelines[aug] = ours(folder, Path(tmp) / "cache", aug, args.size, args.batch,
                                      threads)
            rates = steady_rates(pipelines, args.batches, args.repeats, expect)
            for aug in args.augs:
                rows.append(common.speed_row(
                    "pipeline", "-", args.batch, args.size, rates[aug], rates["reference"],
                    aug=aug, threads=threads, per_core_img_s=round(rates[aug]["median"] / threads, 1),
                    ours="trainer folder pipeline", ref="in-graph decode_and_crop_jpeg reference"))
                print(f"threads={threads} aug={aug}: {rates[aug]['median']:.0f} img/s vs reference "
                      f"{rates['reference']['median']:.0f} ({rows[-1]['speedup']}x)", flush=True)
            del pipelines  # stop the pipelines' threads before their files are deleted
            gc.collect()
    per_core = min(r["per_core_img_s"] for r in rows if r.get("aug") == "basic")
    for model, rate in GPU_TRAIN_RATES.items():
        rows.append({"task": "feed", "model": model, "gpu_img_s": rate,
                     "needed_per_core": round(rate / HOST_CORES, 1), "ours_per_core": per_core,
                     "headroom": round(per_core / (rate / HOST_CORES), 2)})
    path = common.write("pipeline", rows, info)
    print(common.table([r for r in rows if r["task"] == "pipeline"],
                       [("aug", "aug"), ("threads", "threads"), ("ours_img_s", "ours img/s"),
                        ("ref_img_s", "reference img/s"), ("speedup", "ratio")]))
    print(common.table([r for r in rows if r["task"] == "feed"],
                       [("model", "model"), ("gpu_img_s", "GPU img/s (timm, RTX 3090)"),
                        ("needed_per_core", f"needed per core ({HOST_CORES} cores)"),
                        ("ours_per_core", "ours per core"), ("headroom", "ratio")]))
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
