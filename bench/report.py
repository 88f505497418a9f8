"""The README's Performance section, generated from bench/results/*.json.

    python -m bench.report          # rewrite the section between the markers in README.md
"""

from __future__ import annotations

import json
from pathlib import Path

from bench import common

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- performance:begin -->", "<!-- performance:end -->"


def load(name: str) -> list[dict]:
    path = common.RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else []


def section() -> str:
    parts = []
    train, infer, pipeline = load("train"), load("infer"), load("pipeline")
    memory, macs = load("memory"), load("macs")
    first = next((rows[0]["machine"] for rows in (train, infer, pipeline, memory, macs) if rows),
                 None)
    if first:
        parts.append(f"Measured on {first['cpu']} ({first['cores']} cores, {first['threads']} "
                     f"threads for both frameworks), TensorFlow {first['tensorflow']}, "
                     f"PyTorch {first.get('torch', '?')}, timm {first.get('timm', '?')}. Medians "
                     "of interleaved repeats; spreads are in `bench/results/*.json`.")
    if train:
        parts.append("**Training** (one AdamW step, images/s, batch 32; timm in eager mode):\n\n"
                     + common.table(train, [("model", "model"), ("size", "size"), ("ours", "ours"),
                                            ("ours_img_s", "ours img/s"),
                                            ("ref_img_s", "timm img/s"),
                                            ("speedup", "ours / timm")]))
    if infer:
        parts.append("**Inference** of the exported files (ms per batch; timm eager, "
                     "`inference_mode`):\n\n"
                     + common.table(infer, [("model", "model"), ("batch", "batch"),
                                            ("ours", "ours"), ("ours_ms_per_batch", "ours ms"),
                                            ("ref_ms_per_batch", "timm ms"),
                                            ("speedup", "timm ms / ours ms")]))
    if pipeline:
        parts.append("**Input pipeline** (image folder of 500x375 JPEGs -> augmented 256x256 "
                     "batches) against what the model trains at:\n\n"
                     + common.table(pipeline, [("aug", "aug"), ("model", "model"),
                                               ("ours_img_s", "pipeline img/s"),
                                               ("ref_img_s", "model img/s"),
                                               ("speedup", "ratio")]))
    if memory:
        parts.append("**Peak memory** of a training run (RSS, batch 32):\n\n"
                     + common.table(memory, [("model", "model"), ("size", "size"),
                                             ("ours_peak_rss_mib", "ours MiB"),
                                             ("ref_peak_rss_mib", "timm MiB"),
                                             ("ratio", "ours / timm")]))
    if macs:
        parts.append("**Compute** (multiply-accumulates per image counted from our layers; "
                     "training FLOP/s = 6 x MACs x images/s, against a 2048x2048 float32 "
                     "matmul):\n\n"
                     + common.table(macs, [("model", "model"), ("size", "size"),
                                           ("macs_g", "GMACs"), ("published_g", "published"),
                                           ("matmul_gflop_s", "matmul GFLOP/s"),
                                           ("fraction_of_matmul", "ours: of matmul"),
                                           ("ref_fraction_of_matmul", "timm: of matmul")]))
    parts.append("Re-run: `python -m bench` (all of it, about 40 minutes on 2 cores), or one of "
                 "`python -m bench.train_speed | infer_speed | pipeline_speed | memory | macs`, "
                 "then `python -m bench.report`. On a GPU machine: `python -m bench --device gpu`.")
    return "\n\n".join(parts)


def main() -> None:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{README} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{section()}\n{END}{tail}")
    print(f"updated the Performance section of {README}")


if __name__ == "__main__":
    main()
