"""The machine a number was measured on, for reports (timings are only comparable on the same machine)."""
from __future__ import annotations

import os
import platform
from importlib import metadata


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    """CPU, GPU (when the device is cuda and one is visible), and the versions that decide the numbers."""
    import torch

    info = {
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "device": device,
        "gpu": None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nnunetv2": _version("nnunetv2"),
        "nnunet_foundation": _version("nnunet-foundation"),
        "platform": platform.platform(),
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
    return info


def describe(info: dict) -> str:
    hardware = info["gpu"] or f"{info['cpu']} ({info['cpu_cores']} cores)"
    return (f"{hardware}, device {info['device']}; torch {info['torch']}, nnunetv2 {info['nnunetv2']}, "
            f"nnunet-foundation {info['nnunet_foundation']}, Python {info['python']}")
