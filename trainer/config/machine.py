"""What this machine has, known without TensorFlow (which may not see it)."""

from __future__ import annotations

import shutil
from pathlib import Path

GPU_INSTALL = "pip install -e '.[gpu]'  (TensorFlow with its CUDA libraries)"


def nvidia_gpu_present(device: str = "/dev/nvidia0") -> bool:
    """Whether the machine has an NVIDIA GPU, as its driver shows it (device node, nvidia-smi);
    known without TensorFlow, which may not see it (a CPU-only build, missing CUDA libraries)."""
    return Path(device).exists() or shutil.which("nvidia-smi") is not None
