"""What ``qkv env`` reports: this machine, its PyTorch build, and the choices qkv makes on it.

A bug about speed or numerics often depends on the machine more than on the code: which CPU
instructions exist (AVX2, AVX-512, AMX, Arm's bfloat16), which kernels PyTorch was built with
(oneDNN, CUDA, cuDNN), and so which precision ``train.precision=auto`` picks and which kernel
each inference product takes (``qkv._kernels``). ``environment_report()`` gathers all of it as
plain data (strings, numbers, booleans, lists and dicts, so it converts to JSON as is); the
``qkv env`` command prints it.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import qkv
from qkv._kernels import kernel_report

__all__ = ["cpu_features", "cpu_model", "environment_report", "onednn_version"]

# CPU features that decide qkv's choices: bfloat16 training (train.precision=auto) and the
# oneDNN kernels for float32/bfloat16 inference (AVX2 alone has no oneDNN bfloat16 kernel).
X86_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
ARM_FEATURES = ("neon", "bf16", "sve")
# The names Linux's /proc/cpuinfo gives them where it differs ("asimd": NEON on 64-bit Arm).
_CPUINFO_NAMES = {"neon": ("neon", "asimd")}
# The same features as macOS's sysctl names them.
_SYSCTL_FEATURES = {
    "avx2": "hw.optional.avx2_0",
    "avx512f": "hw.optional.avx512f",
    "neon": "hw.optional.neon",
    "bf16": "hw.optional.arm.FEAT_BF16",
}
# Environment variables that change which kernels PyTorch and oneDNN run, or on how many threads.
KERNEL_VARIABLES = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
)


def _is_arm(machine: str) -> bool:
    return machine.lower().startswith(("arm", "aarch64"))


def cpu_features(cpuinfo: str, machine: str) -> dict[str, bool]:
    """Which of the features that matter to qkv a Linux ``/proc/cpuinfo`` lists.

    Args:
        cpuinfo: the text of ``/proc/cpuinfo``.
        machine: ``platform.machine()`` (``"x86_64"``, ``"aarch64"``, ...): which features to
            look for.

    Returns:
        ``{feature: present}`` for ``X86_FEATURES`` or ``ARM_FEATURES``.

    >>> cpu_features("flags\\t: fpu sse avx2 avx512f\\n", "x86_64")
    {'avx2': True, 'avx512f': True, 'avx512_bf16': False, 'amx_tile': False, 'amx_bf16': False}
    >>> cpu_features("Features\\t: fp asimd bf16\\n", "aarch64")
    {'neon': True, 'bf16': True, 'sve': False}
    """
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    wanted = ARM_FEATURES if _is_arm(machine) else X86_FEATURES
    return {f: any(name in flags for name in _CPUINFO_NAMES.get(f, (f,))) for f in wanted}


def cpu_model(cpuinfo: str) -> str | None:
    """The CPU's name from a Linux ``/proc/cpuinfo`` (None when it names none, as on some Arm
    machines)."""
    for key in ("model name", "hardware", "cpu model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", cpuinfo, flags=re.IGNORECASE | re.MULTILINE)
        if match:
            return match.group(1).strip()
    return None


def _sysctl(name: str) -> str | None:
    """A macOS sysctl value, or None where there is none (or no sysctl)."""
    try:
        done = subprocess.run(
            ["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def _cpu_section() -> dict[str, Any]:
    """Model and features from /proc/cpuinfo (Linux) or sysctl (macOS); features None where
    neither exists (Windows)."""
    machine = platform.machine()
    model: str | None = None
    features: dict[str, bool] | None = None
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        cpuinfo = ""
    if cpuinfo:
        model, features = cpu_model(cpuinfo), cpu_features(cpuinfo, machine)
    elif sys.platform == "darwin":
        model = _sysctl("machdep.cpu.brand_string")
        wanted = ARM_FEATURES if _is_arm(machine) else X86_FEATURES
        features = {f: _sysctl(_SYSCTL_FEATURES[f]) == "1" for f in wanted if f in _SYSCTL_FEATURES}
    return {
        "model": model or platform.processor() or machine or None,
        "architecture": machine or None,
        "features": features,
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "logical_cores": os.cpu_count(),
    }


def onednn_version(config: str | None = None) -> str | None:
    """oneDNN's version from PyTorch's build description (``torch.__config__.show()``), e.g.
    ``"3.12.0"``; None when the description names none.

    >>> onednn_version("  - Intel(R) MKL-DNN v3.12.0 (Git Hash 80afa71)")
    '3.12.0'
    """
    text = torch.__config__.show() if config is None else config
    match = re.search(r"(?:oneDNN|MKL-DNN)\D*?v?(\d+(?:\.\d+)+)", text)
    return match.group(1) if match else None


def _torch_section() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    n_gpus = torch.cuda.device_count() if cuda else 0
    cudnn = torch.backends.cudnn.is_available()
    mkldnn = torch.backends.mkldnn.is_available()
    return {
        "version": torch.__version__,
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(n_gpus)],
        "cudnn_version": torch.backends.cudnn.version() if cudnn else None,
        "onednn_available": mkldnn,
        "onednn_version": onednn_version() if mkldnn else None,
        "mps_available": torch.backends.mps.is_available(),
    }


def _dtype_name(dtype: torch.dtype | None) -> str:
    """None is autocast's "no autocast": plain float32."""
    return str(dtype or torch.float32).removeprefix("torch.")


def environment_report() -> dict[str, dict[str, Any]]:
    """Everything ``qkv env`` prints, as JSON-ready data.

    Runs qkv's per-dtype oneDNN check (``qkv._kernels``) if it has not run yet, which takes a
    few milliseconds and logs a warning for a dtype whose kernel fails here.

    Returns:
        sections ``qkv``, ``cpu``, ``torch``, ``training_precision`` (what
        ``train.precision=auto`` picks, per device), ``inference_kernels`` (per device, then
        per dtype) and ``kernel_variables`` (the environment variables that change kernels, as
        set now).
    """
    from qkv.train.loop import autocast_dtype  # training sits after this module's imports

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "qkv": {
            "version": qkv.__version__,
            "python": f"{platform.python_version()} ({platform.python_implementation()})",
            "platform": platform.platform(),
        },
        "cpu": _cpu_section(),
        "torch": _torch_section(),
        "training_precision": {
            d: _dtype_name(autocast_dtype("auto", torch.device(d))) for d in devices
        },
        "inference_kernels": {d: kernel_report(d) for d in devices},
        "kernel_variables": {k: v for k in KERNEL_VARIABLES if (v := os.environ.get(k))},
    }
