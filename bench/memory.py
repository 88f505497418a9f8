"""Peak resident memory (RSS) of a training run per backbone size, ours vs timm.

Ours: a real `python -m trainer` run (digits upscaled to the size, batch 32, 3 steps and one
evaluation, no export) in a child process. Reference: a child process that builds timm's model
and runs 3 AdamW steps on the same batch shape. Peak RSS from the kernel (`os.wait4`), through
a small launcher process: Linux carries a process's peak RSS across fork and exec, so a child of
this (large) process would report at least this process's own peak.

    python -m bench.memory

Three more children per model say where ours goes: our model and train step alone on a fixed
batch (timm's loop, in TensorFlow: no tf.data, no trainer), the peak of live tensors in that
step (TensorFlow's own allocator count), and TensorFlow imported alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import common

ROOT = Path(__file__).resolve().parent.parent
TIMM_RUN = """
import sys, torch
sys.path.insert(0, "bench/..")
from bench.common import import_timm
timm = import_timm()
torch.set_num_threads({threads})
model = timm.create_model("{model}", num_classes=10).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
x, y = torch.rand({batch}, 3, {size}, {size}), torch.randint(0, 10, ({batch},))
for _ in range(3):
    opt.zero_grad(); torch.nn.functional.cross_entropy(model(x), y).backward(); opt.step()
"""


# Where ours goes: the same 3 steps as timm's loop, our model and step alone (no tf.data, no
# trainer), and TensorFlow imported with nothing else.
STEP_RUN = """
import sys, numpy as np, tensorflow as tf
sys.path.insert(0, ".")
tf.config.threading.set_intra_op_parallelism_threads({threads})
from trainer.models.head import build_classifier
from trainer.models.mobilevit import MobileViTBackbone
from trainer.training.fused import FusedAdamW
from trainer.training.loop import Loop
model = build_classifier(MobileViTBackbone.from_preset("{model}", recompute={recompute}), 10)
opt = FusedAdamW(1e-4)
rng = np.random.default_rng(0)
batch = (rng.random(({batch}, {size}, {size}, 3), dtype=np.float32), np.zeros({batch}, np.int32))
it = iter(tf.data.Dataset.from_tensors(batch).repeat())
loop = Loop(tf.distribute.get_strategy(), model, opt, 10, {batch})
for _ in range(3):
    loop.train_step(it)["loss"].numpy()
"""
IMPORT_ONLY = "import tensorflow as tf; tf.constant(1.0) + 1.0"
# The same step with TensorFlow's BFC allocator on the CPU (TF_CPU_ALLOCATOR_USE_BFC, read when
# TensorFlow starts), which counts every tensor it hands out: the peak of live tensors, apart
# from the runtime, code and malloc's own keeping that the RSS adds.
LIVE_PEAK = STEP_RUN + """
print("live_peak_mib", tf.config.experimental.get_memory_info("CPU:0")["peak"] / 2**20)
"""


# Forks and execs the command from a fresh ~10 MiB interpreter, waits, prints the peak in KiB.
LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def peak_rss_mib(cmd: list[str], env: dict | None = None) -> float:
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **(env or {})})
    kib, code = proc.stdout.split()[-2:]
    if int(code) != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed: {proc.stderr[-2000:]}")
    return int(kib) / 1024


def live_peak_mib(code: str) -> float:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TF_CPU_ALLOCATOR_USE_BFC": "true"})
    if proc.returncode != 0:
        raise RuntimeError(f"the live-tensor run failed: {proc.stderr[-2000:]}")
    return float(proc.stdout.split("live_peak_mib")[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(common.MODELS))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="0: all cores")
    args = parser.parse_args(argv)
    threads = args.threads or os.cpu_count()
    info = common.machine("cpu", threads)
    rows = []
    for model in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            ours = peak_rss_mib([
                sys.executable, "-m", "trainer", f"model={model}", "model.pretrained=none",
                "data=digits", f"data.image_size={args.size}", f"trainer.batch_size={args.batch}",
                "trainer.epochs=1", "trainer.steps_per_epoch=3", "trainer.eval_steps=1",
                "trainer.export=false", "logger.tensorboard=false", f"hydra.run.dir={tmp}/run"],
                env={"PYTHONPATH": str(ROOT)})
        # The step alone as the trainer runs it (trainer.recompute=auto)
        recompute = common.trainer_recompute(model, args.size, args.batch)
        fill = dict(threads=threads, model=model, batch=args.batch, size=args.size,
                    recompute=recompute)
        ref = peak_rss_mib([sys.executable, "-c", TIMM_RUN.format(**fill)])
        step = peak_rss_mib([sys.executable, "-c", STEP_RUN.format(**fill)])
        live = live_peak_mib(LIVE_PEAK.format(**fill))
        tf_alone = peak_rss_mib([sys.executable, "-c", IMPORT_ONLY])
        rows.append({"task": "memory", "model": model, "batch": args.batch, "size": args.size,
                     "ours_peak_rss_mib": round(ours), "ref_peak_rss_mib": round(ref),
                     "ratio": round(ours / ref, 2), "recompute": recompute,
                     "ours_step_only_mib": round(step),
                     "ours_step_live_tensors_mib": round(live),
                     "tensorflow_import_mib": round(tf_alone)})
        print(rows[-1], flush=True)
    path = common.write("memory", rows, info)
    print(common.table(rows, [("model", "model"), ("batch", "batch"), ("size", "size"),
                              ("ours_peak_rss_mib", "ours MiB"),
                              ("ref_peak_rss_mib", "timm MiB"), ("ratio", "ours / timm"),
                              ("recompute", "recomputed blocks"),
                              ("ours_step_only_mib", "our step alone MiB"),
                              ("ours_step_live_tensors_mib", "its live tensors MiB"),
                              ("tensorflow_import_mib", "TF imported MiB")]))
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
