"""Hardware profiles: the one place that decides which shapes a lab uses.

* ``gpu`` -- the real shapes of the course: GPT-2 124M at batch 8 x 512 and the
  Llama-2-7B QLoRA run at batch 8 x 512. Absolute memory budgets apply.
* ``cpu`` -- the real GPT-2 124M (so weights, gradients and optimizer state are
  the real byte counts) at a small batch, and the 4-layer Llama stand-in for the
  7B, so that each lab runs in a few minutes on 2 cores. Memory checks are ratios
  measured in the same run, because CPU kernels keep different temporaries than
  CUDA's (see ``shared/anchors``: the same GPT-2 step tracks 11.3 GiB on CPU vs
  7.8 GiB on an H200).

``MEMOPT_PROFILE=cpu`` forces the CPU profile on a GPU machine (handy to compare).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .device import amp_dtype, has_native_bf16, pick_device


@dataclass(frozen=True)
class Profile:
    name: str
    device: torch.device
    gpt2: str
    gpt2_batch: int
    gpt2_seq: int
    llama: str
    llama_batch: int
    llama_seq: int
    amp_dtype: torch.dtype
    reason: str

    @property
    def is_gpu(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        return (f"profile '{self.name}' on {self.device}: GPT-2 model '{self.gpt2}' at batch {self.gpt2_batch} x "
                f"{self.gpt2_seq}; 7B stand-in '{self.llama}' at batch {self.llama_batch} x {self.llama_seq}; "
                f"mixed precision in {str(self.amp_dtype).replace('torch.', '')}.\n  why: {self.reason}")


def gpu_profile(device: torch.device) -> Profile:
    props = torch.cuda.get_device_properties(device)
    why = (f"{props.name} with {props.total_memory / 1024**3:.1f} GiB: the course's real shapes. "
           + ("Native bf16 (compute capability >= 8.0)." if has_native_bf16(device)
              else "No native bf16 (compute capability < 8.0): fp16 with a GradScaler."))
    return Profile("gpu", device, "gpt2", 8, 512, "llama-7b", 8, 512, amp_dtype(device), why)


def cpu_profile(device: torch.device | None = None, why: str = "") -> Profile:
    device = device or torch.device("cpu")
    return Profile("cpu", device, "gpt2", 2, 128, "llama-tiny", 2, 128, torch.bfloat16,
                   why or "no CUDA GPU: real GPT-2 124M at a small batch; a 4-layer Llama stands in for the 7B. "
                          "Memory checks are ratios measured on this machine.")


def pick_profile(device: torch.device | str | None = None) -> Profile:
    """Choose the profile for this machine (or for ``device``); ``MEMOPT_PROFILE`` overrides."""
    forced = os.environ.get("MEMOPT_PROFILE", "").lower()
    if forced not in ("", "cpu", "gpu"):
        raise ValueError(f"MEMOPT_PROFILE must be 'cpu' or 'gpu', got {forced!r}")
    if forced == "cpu":
        return cpu_profile(why="MEMOPT_PROFILE=cpu was set")
    device = torch.device(device) if device is not None else pick_device()
    if device.type == "cuda":
        return gpu_profile(device)
    if forced == "gpu":
        raise RuntimeError("MEMOPT_PROFILE=gpu but no CUDA GPU is visible")
    if device.type == "mps":
        return cpu_profile(device, "Apple GPU (MPS): small shapes; the profiler's tracker measures there too")
    return cpu_profile()
