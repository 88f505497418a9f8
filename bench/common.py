"""What every benchmark shares: thread settings, the machine record, interleaved timing, output.

Hand-written timing (not `timeit`): ours and the reference must alternate inside one repeat loop,
so that a slow patch of the machine (another job, thermal limits) hits both sides alike.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODELS = ("mobilevit_xxs", "mobilevit_xs", "mobilevit_s")
MODELS_V2 = ("mobilevitv2_050", "mobilevitv2_075", "mobilevitv2_100", "mobilevitv2_125",
             "mobilevitv2_150", "mobilevitv2_175", "mobilevitv2_200")


def import_timm():
    """timm, with a stand-in for torchvision (bench/timm_import.py says why)."""
    from bench.timm_import import import_timm

    return import_timm()


def trained_like(model, seed: int = 0):
    """`model` (randomly initialised) with the normalisation statistics and biases a trained one
    has: every gamma, moving variance in [0.5, 1.5], every beta, moving mean and bias N(0, 0.1).

    Why: at initialisation every folded BatchNorm bias and every dense bias is exactly 0 and every
    LayerNorm an identity, and grappler deletes such arithmetic from a frozen graph. The export
    then timed is not what a trained model exports: without its BiasAdd, a convolution and its
    SiLU do not fuse into one oneDNN op (found 2026-12-01)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for weight in model.weights:
        name = weight.path.rsplit("/", 1)[-1]
        if name in ("gamma", "moving_variance"):
            weight.assign(rng.uniform(0.5, 1.5, weight.shape).astype("float32"))
        elif name in ("beta", "moving_mean", "bias"):
            weight.assign(rng.normal(0.0, 0.1, weight.shape).astype("float32"))
    return model


def set_threads(threads: int) -> None:
    """The same intra-op thread count for TensorFlow and PyTorch (call before either runs)."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    try:
        import torch
        torch.set_num_threads(threads)
    except ImportError:
        pass


def trainer_threads(model_name: str, size: int, batch: int) -> int:
    """Our side's intra-op threads as the trainer sets them for this step
    (`trainer.intra_op_threads=auto`: one per op for a small step on a CPU); call after
    `set_threads` and before TensorFlow runs. Returns the count (0: all cores)."""
    from trainer.models.presets import step_gmacs
    from trainer.training.distribute import intra_op_threads, set_intra_op_threads

    return set_intra_op_threads(intra_op_threads("auto", step_gmacs(model_name, size, batch)))


def trainer_recompute(model_name: str, size: int, batch: int, xla: bool = False) -> bool:
    """Whether the trainer recomputes the convolutional blocks for this step
    (`trainer.recompute=auto`: on for a large CPU step without XLA)."""
    from trainer.models.presets import step_gmacs
    from trainer.training.distribute import recompute

    return recompute("auto", step_gmacs(model_name, size, batch), "true" if xla else "false")


def add_machine_args(parser) -> None:
    """--threads and --device, shared by every benchmark."""
    parser.add_argument("--threads", type=int, default=0, help="0: all cores")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")


def setup(args) -> tuple[int, dict]:
    """Apply the thread count; returns (threads, the machine record for the results)."""
    threads = args.threads or os.cpu_count()
    set_threads(threads)
    return threads, machine(args.device, threads)


def result_path(task: str, device: str) -> Path:
    """bench/results/<task>[_<device>].json"""
    return RESULTS / (f"{task}.json" if device == "cpu" else f"{task}_{device}.json")


def machine(device: str, threads: int) -> dict:
    import keras
    import tensorflow as tf

    info = {"device": device, "cpu": _cpu_name(), "cores": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__}
    try:
        import torch
        info.update(torch=torch.__version__, timm=import_timm().__version__)
    except ImportError:
        pass
    if device == "gpu":
        info["gpu"] = [d.name for d in tf.config.list_physical_devices("GPU")]
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def interleaved(runs: dict[str, Callable[[], None]], items_per_call: int, repeats: int,
                calls: int = 1) -> dict[str, dict]:
    """Throughput of each callable, measured round-robin `repeats` times: median and spread.

    One timing covers `calls` calls of `fn`, each processing `items_per_call` images. Each callable has been warmed up by the caller (tracing, XLA compilation, allocator).
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append(time.perf_counter() - start)
    out = {}
    for name, seconds in times.items():
        rates = sorted(items_per_call * calls / s for s in seconds)
        out[name] = {"median": statistics.median(rates), "min": rates[0], "max": rates[-1],
                     "seconds": [round(s, 4) for s in seconds]}
    return out


def write(task: str, rows: list[dict], info: dict) -> Path:
    """bench/results/<task>[_<device>].json: the rows, each carrying the machine it ran on."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = result_path(task, info["device"])
    for row in rows:
        row["machine"] = info
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table of `rows`; `columns` are (key, heading) pairs."""
    def fmt(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def speed_row(task: str, model: str, batch: int, size: int, ours_rate: dict, ref_rate: dict,
              **extra) -> dict:
    """A result row; `ours_rate` / `ref_rate` are `interleaved` results (images/s)."""
    return {"task": task, "model": model, "batch": batch, "size": size,
            "ours_img_s": round(ours_rate["median"], 3), "ref_img_s": round(ref_rate["median"], 3),
            "speedup": round(ours_rate["median"] / ref_rate["median"], 3),
            "ours_spread": [round(ours_rate["min"], 3), round(ours_rate["max"], 3)],
            "ref_spread": [round(ref_rate["min"], 3), round(ref_rate["max"], 3)], **extra}
