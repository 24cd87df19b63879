"""Where tensors live and in which precision: the device of a role, bf16 autocast, the process's numerics
(TF32, deterministic algorithms), host-to-device copies."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch

CUBLAS_WORKSPACE = ":4096:8"  # what deterministic cuBLAS needs (PyTorch's reproducibility notes)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' requested but no CUDA device is available (allowed here: auto, cpu)")
    return torch.device(name)


def describe_host() -> str:
    """This machine in one line: CPU model, cores, memory, GPU (if any), Python and torch versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, {gpu_names()}; Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def gpu_names() -> str:
    """The machine's GPUs ("NVIDIA H200", "2x NVIDIA H200", "no GPU"): from the NVIDIA driver's /proc files where
    they exist, so a process that holds no GPU starts no CUDA context; else through torch when it sees any."""
    models = [
        line.split(":", 1)[1].strip()
        for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information"))
        for line in info.read_text().splitlines()
        if line.startswith("Model:")
    ]
    if not models and torch.cuda.is_available():  # no NVIDIA driver files (another vendor, a bare container)
        models = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if not models:
        return "no GPU"
    return models[0] if len(models) == 1 else ", ".join(f"{models.count(m)}x {m}" for m in dict.fromkeys(models))


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device`` for ``precision`` bf16; fp32: a no-op context."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def configure_numerics(precision: str, deterministic: bool) -> None:
    """This process's numerics, set once where a role starts (driver, Train worker, sampler actor).

    TF32 matmuls and convolutions on CUDA for bf16 runs, off for fp32 (true fp32, as on the CPU; PyTorch turns
    TF32 convolutions on by default). ``deterministic``: PyTorch's deterministic algorithms (an op without one
    raises), cuDNN without autotuning, and the cuBLAS workspace they need."""
    tf32 = precision == "bf16"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(deterministic)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; to CUDA from pinned memory without blocking the host (stream-ordered: the next
    kernel on the same stream sees the data)."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
