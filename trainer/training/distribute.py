"""Strategy selection, CPU threads, logical CPU devices, and who may write (the chief).

`trainer.strategy=auto` picks MultiWorkerMirroredStrategy when TF_CONFIG (or SLURM) describes a
cluster, MirroredStrategy over several GPUs, and the default strategy otherwise.
"""

from __future__ import annotations

import json
import logging
import os

import keras
import tensorflow as tf

from trainer.config.machine import GPU_INSTALL, nvidia_gpu_present
from trainer.errors import ConfigError

log = logging.getLogger(__name__)


def split_cpu(replicas: int) -> None:
    """Expose the CPU as `replicas` logical devices (must run before TensorFlow initialises)."""
    if replicas <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)


# At most this many forward multiply-accumulates per step (billions), one thread per op on a CPU.
# Why: a small step's ops take microseconds, and splitting each over the intra-op pool costs more
# in hand-offs than it gains; the inter-op pool still runs independent ops side by side. Measured
# on 2 cores, batch 32, ms per step with all threads -> one per op (the rows against timm:
# bench/train_speed.py, train_small): XXS 32x32 (0.2 G) 58 -> 37; XS 32 (0.5 G) 82 -> 69;
# S 32 (1.0 G) 153 -> 139; XXS 64 (0.8 G) 111 -> 101; but XS 64 (2.1 G) 183 -> 189, S 64
# (4.0 G) 341 -> 374, XXS 256 (13 G) 1218 -> 1483. Not measured on more cores.
SMALL_STEP_GMACS = 1.5


def intra_op_threads(setting: str | int, step_gmacs: float, jit_compile: str = "auto") -> int:
    """trainer.intra_op_threads as a count: `auto` is 1 for a small step (`step_gmacs`, the
    forward pass of one step) on a machine without GPU or TPU, else 0 (TensorFlow's default:
    all cores); a number is taken as given. XLA keeps the default: its compiled step is one
    op that parallelises inside (XXS 32x32 with XLA on one thread: 213 -> 184 images/s)."""
    if str(setting).lower() != "auto":
        return int(setting)
    return 1 if _plain_cpu_step(jit_compile) and step_gmacs <= SMALL_STEP_GMACS else 0


def _plain_cpu_step(jit_compile: str) -> bool:
    """No GPU or TPU on this machine and no XLA: the step runs as TensorFlow ops on the CPU."""
    accelerator = tf.config.list_physical_devices("GPU") or tf.config.list_physical_devices("TPU")
    return not accelerator and str(jit_compile).lower() != "true"


# At least this many forward multiply-accumulates per step (billions), the convolutional blocks'
# activations recomputed in the backward pass on a CPU (`models/recompute.py`). Why: at large
# steps those activations are most of training memory and their second forward pass costs
# little beside the step; at small steps memory is small and the extra ops cost more. Measured
# on 2 cores, batch 32, the step alone, peak RSS and time per step, off -> on: XXS 256x256
# (13 G) 3469 -> 2314 MiB, 0.81 -> 0.87 s; XS 256 (33 G) 6304 -> 3570 MiB, 1.7-2.1 -> 1.9-2.1 s;
# S 256 (64 G) 7507 -> 4025 MiB, 3.6-4.6 -> 4.2-4.7 s; but XXS 128 (3.3 G) 1655 -> 1350 MiB for
# 5% longer steps and S 64 (4.0 G) 1640 -> 1350 MiB for 18% (163 -> 192 ms; it led timm by 1.2x).
RECOMPUTE_STEP_GMACS = 8.0


def recompute(setting: str, step_gmacs: float, jit_compile: str = "auto") -> bool:
    """trainer.recompute as a bool: `auto` is on for a large step (`step_gmacs`, the forward
    pass of one step, at least RECOMPUTE_STEP_GMACS) on a machine without GPU or TPU, where
    host memory is what the step shares with everything else, and without XLA; a GPU run keeps
    its speed (`trainer.recompute=true` trades it for memory there too)."""
    setting = str(setting).lower()
    if setting != "auto":
        return setting == "true"
    return _plain_cpu_step(jit_compile) and step_gmacs >= RECOMPUTE_STEP_GMACS


def set_intra_op_threads(threads: int) -> int:
    """Apply before TensorFlow initialises; returns the count in effect (a second run in the
    same process keeps the first one's: TensorFlow cannot change it once running)."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:
        log.info("intra-op threads stay at %d (TensorFlow is already running in this process)",
                 tf.config.threading.get_intra_op_parallelism_threads())
    return tf.config.threading.get_intra_op_parallelism_threads()


def report_devices() -> list[str]:
    """Log the devices TensorFlow trains on; warn when an NVIDIA GPU is there but unseen."""
    gpus = tf.config.list_physical_devices("GPU")
    names = []
    for device in tf.config.list_physical_devices():
        detail = (tf.config.experimental.get_device_details(device).get("device_name")
                  if device.device_type == "GPU" else None)
        names.append(device.name.replace("/physical_device:", "") + (f" ({detail})" if detail
                                                                      else ""))
    log.info("devices: %s", ", ".join(names))
    if not gpus and nvidia_gpu_present():
        reason = ("this TensorFlow was built without CUDA support" if not
                  tf.test.is_built_with_cuda() else "TensorFlow found no usable CUDA libraries "
                  "or driver for it")
        log.warning("this machine has an NVIDIA GPU but TensorFlow sees none (%s): training runs "
                    "on the CPU. Install the GPU build with: %s", reason, GPU_INSTALL)
    return names


def _cluster_from_env() -> str | None:
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    if len(tf_config.get("cluster", {}).get("worker", [])) + len(
            tf_config.get("cluster", {}).get("chief", [])) > 1:
        return "tf_config"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    return None


def make_strategy(name: str, cpu_replicas: int = 0) -> tf.distribute.Strategy:
    # Decide from the environment and *physical* devices first: MultiWorkerMirroredStrategy
    # must be created before anything initialises the TensorFlow context.
    cluster = _cluster_from_env()
    gpus = tf.config.list_physical_devices("GPU")
    if name == "auto":
        if cluster:
            name = "multi_worker"
        elif len(gpus) > 1 or cpu_replicas > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "multi_worker":
        resolver = (tf.distribute.cluster_resolver.SlurmClusterResolver()
                    if cluster == "slurm" else None)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    elif name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        strategy = tf.distribute.TPUStrategy(resolver)
    else:
        split_cpu(cpu_replicas)
        gpu_names = [d.name for d in tf.config.list_logical_devices("GPU")]
        cpu_names = [d.name for d in tf.config.list_logical_devices("CPU")]
        if name == "default":
            strategy = tf.distribute.get_strategy()
        elif name == "one_device":
            strategy = tf.distribute.OneDeviceStrategy((gpu_names or cpu_names)[0])
        elif name == "mirrored":
            strategy = tf.distribute.MirroredStrategy(gpu_names or cpu_names)
        else:
            raise ValueError(f"trainer.strategy={name!r} is not known")
    report_devices()
    log.info("strategy: %s with %d replica(s)", strategy_name(strategy),
             strategy.num_replicas_in_sync)
    return strategy


def strategy_name(strategy: tf.distribute.Strategy) -> str:
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "MultiWorkerMirroredStrategy"  # its class is CollectiveAllReduceStrategy
    return type(strategy).__name__


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Only the chief writes the run directory (worker 0 when the cluster has no chief task)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(strategy.extended, "_in_multi_worker_mode", lambda: False)():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (task_type == "worker" and task_id == 0 and
                                    "chief" not in resolver.cluster_spec().as_dict())


def setup(trainer_cfg, seed: int,
          step_gmacs: float) -> tuple[tf.distribute.Strategy, bool, bool]:
    """The run's CPU threads, strategy, precision policy and seeds; returns (strategy, XLA on?,
    blocks recomputed?). `step_gmacs`: the forward pass of one step, which sizes the threads
    (`intra_op_threads`) and decides the recomputation (`recompute`)."""
    threads = set_intra_op_threads(intra_op_threads(trainer_cfg.intra_op_threads, step_gmacs,
                                                    trainer_cfg.jit_compile))
    log.info("intra-op threads: %s (trainer.intra_op_threads=%s, a step of %.2g GMACs)",
             threads or "all cores", trainer_cfg.intra_op_threads, step_gmacs)
    remat = recompute(trainer_cfg.recompute, step_gmacs, trainer_cfg.jit_compile)
    log.info("convolutional blocks recomputed in the backward pass: %s (trainer.recompute=%s)",
             remat, trainer_cfg.recompute)
    strategy = make_strategy(trainer_cfg.strategy, trainer_cfg.cpu_replicas)
    replicas = strategy.num_replicas_in_sync
    if trainer_cfg.batch_size % replicas:
        raise ConfigError(f"trainer.batch_size={trainer_cfg.batch_size} is not divisible by the "
                          f"{replicas} replicas of {strategy_name(strategy)}")
    keras.mixed_precision.set_global_policy(trainer_cfg.precision)
    keras.utils.set_random_seed(seed)  # Python, NumPy and TensorFlow
    if trainer_cfg.deterministic:  # slower kernels, bit-identical results
        tf.config.experimental.enable_op_determinism()
    return strategy, use_xla(trainer_cfg.jit_compile), remat


def describe(strategy: tf.distribute.Strategy, global_batch: int, precision: str,
             jit_compile: bool) -> dict:
    replicas = strategy.num_replicas_in_sync
    return {"strategy": strategy_name(strategy), "replicas": replicas,
            "global_batch": global_batch, "per_replica_batch": global_batch // replicas,
            "precision": precision, "jit_compile": jit_compile,
            # 0: TensorFlow's default (all cores); a thread count changes float rounding
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads()}


def use_xla(setting) -> bool:
    """trainer.jit_compile: auto -> XLA on GPU/TPU only; true / false as given (also on CPU, in
    every precision: slow there, but it is how the GPU settings are tested without a GPU)."""
    accelerator = bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))
    jit = str(setting).lower()
    return accelerator if jit == "auto" else jit == "true"
