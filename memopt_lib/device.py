"""Which device we run on and what it can do -- the one place that decides.

Native bf16 means compute capability >= 8.0 (Ampere and newer). Do not trust
``torch.cuda.is_bf16_supported()`` for that: on a T4 (7.5) it can answer True
because bf16 is *emulated*, which is slow and saves nothing. On a T4 use fp16
with a GradScaler; from 8.0 use bf16 and no scaler.
"""
from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from importlib import metadata

import torch

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "tokenizers")


def pick_device(prefer: str | None = None) -> torch.device:
    """cuda -> mps -> cpu, unless ``prefer`` names one (e.g. ``"cpu"`` to force the CPU path)."""
    if prefer:
        dev = torch.device(prefer)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("asked for a CUDA device but torch.cuda.is_available() is False")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def has_native_bf16(device: torch.device | str | None = None) -> bool:
    """True on CUDA GPUs of compute capability >= 8.0 and on CPU (autocast supports bf16 there)."""
    device = torch.device(device) if device is not None else pick_device()
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu"


def amp_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """The autocast dtype to use: bf16 where it is native, fp16 on older GPUs (T4, V100)."""
    device = torch.device(device) if device is not None else pick_device()
    if device.type == "cuda" and not has_native_bf16(device):
        return torch.float16
    return torch.bfloat16


@dataclass
class HardwareInfo:
    device: str
    name: str
    total_memory_bytes: int | None
    compute_capability: str | None
    native_bf16: bool
    amp_dtype: str
    python: str
    libraries: dict[str, str | None]

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        from .profiler.report import fmt_bytes
        lines = [f"device        : {self.device} ({self.name})",
                 f"memory        : {fmt_bytes(self.total_memory_bytes)}",
                 f"compute cap.  : {self.compute_capability or '-'}",
                 f"native bf16   : {self.native_bf16}  -> mixed precision uses {self.amp_dtype}",
                 f"python        : {self.python}"]
        lines += [f"{k:<14}: {v or 'not installed'}" for k, v in self.libraries.items()]
        return "\n".join(lines)


def library_versions() -> dict[str, str | None]:
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def hardware_info(device: torch.device | str | None = None) -> HardwareInfo:
    device = torch.device(device) if device is not None else pick_device()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, total = props.name, props.total_memory
        cc = f"{props.major}.{props.minor}"
    else:
        name, total, cc = platform.processor() or platform.machine(), None, None
        try:
            import os
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
    return HardwareInfo(device=str(device), name=name, total_memory_bytes=total, compute_capability=cc,
                        native_bf16=has_native_bf16(device), amp_dtype=str(amp_dtype(device)).replace("torch.", ""),
                        python=platform.python_version(), libraries=library_versions())
