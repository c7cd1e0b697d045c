"""Hardware profiles: the one place that decides which shapes a lab uses.

* ``gpu`` -- the real shapes of the course: GPT-2 124M at batch 8 x 512 and the
  Llama-2-7B QLoRA run at batch 8 x 512. Absolute memory budgets apply.
* ``cpu`` -- a *scale model* of the GPU shape: ``gpt2-narrow`` (GPT-2 with a
  quarter of its width and vocabulary, all 12 layers) at batch 8 x 128, a quarter
  of the GPU's tokens, and the 4-layer Llama stand-in for the 7B, so that each lab
  runs in a few minutes on 2 cores.

Why a scale model and not the real GPT-2 at a small batch. What a technique saves
depends on *where the peak is*: on the GPU shape, activations and logits are ~80 %
of GPT-2's peak, weights + AdamW state ~18 %. The real GPT-2 at batch 2 x 128 (the
old CPU profile) puts the peak at the end of backward in weights + gradients +
AdamW state, so every ratio points the other way (checkpointing 1.00x instead of
0.50x, LoRA 0.41x instead of 0.79x). Scaling width ``h``, vocabulary ``V`` and
tokens ``N`` by the same factor ``a`` scales every term of the step by ``a**2``:
activations ``~ L N h`` and logits ``~ N V`` (per token), weights ``~ V h + 12 L h**2``.
So at ``a = 1/4`` each category is ~1/16 of GPT-2's at 8 x 512 and its *share* of
the peak is the same (``tests/test_profiles.py`` holds the CPU ratios to the
H200's). The 16x is :attr:`Profile.gpt2_scale_bytes`.
Measured bytes are comparable with CUDA's because :func:`memopt_lib.models.load_model`
configures the kernels to keep what CUDA's keep (no KV cache in training, fused
attention, 1-byte dropout masks); see :mod:`memopt_lib.models`.

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
    gpt2_stands_for: tuple[str, int, int] = ("gpt2", 8, 512)  # (model, batch, seq) the GPT-2 shape models
    gpt2_scale_bytes: float = 1.0  # bytes at ``gpt2_stands_for`` ~ this x the bytes measured at this shape

    @property
    def is_gpu(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        scale = ""
        if self.gpt2_stands_for != (self.gpt2, self.gpt2_batch, self.gpt2_seq):
            m, b, s = self.gpt2_stands_for
            scale = (f" (a scale model of {m} at {b} x {s}: every part of the step ~1/{self.gpt2_scale_bytes:.0f} "
                     "of its bytes, the same share of the peak)")
        return (f"profile '{self.name}' on {self.device}: GPT-2 model '{self.gpt2}' at batch {self.gpt2_batch} x "
                f"{self.gpt2_seq}{scale}; 7B stand-in '{self.llama}' at batch {self.llama_batch} x {self.llama_seq}; "
                f"mixed precision in {str(self.amp_dtype).replace('torch.', '')}.\n  why: {self.reason}")

    def shape(self, model: str) -> tuple[str, int, int]:
        """``(model name, batch, seq)`` this profile uses for a course model family (``"gpt2"`` or ``"llama"``).

        ``python -m memopt_lib.bench`` takes its default shapes from here.
        """
        family = model.split("-")[0]
        if family == "gpt2":
            return self.gpt2, self.gpt2_batch, self.gpt2_seq
        if family == "llama":
            return self.llama, self.llama_batch, self.llama_seq
        raise ValueError(f"model must be a gpt2 or llama course model, got {model!r}")


def gpu_profile(device: torch.device) -> Profile:
    props = torch.cuda.get_device_properties(device)
    why = (f"{props.name} with {props.total_memory / 1024**3:.1f} GiB: the course's real shapes. "
           + ("Native bf16 (compute capability >= 8.0)." if has_native_bf16(device)
              else "No native bf16 (compute capability < 8.0): fp16 with a GradScaler."))
    return Profile("gpu", device, "gpt2", 8, 512, "llama-7b", 8, 512, amp_dtype(device), why,
                   gpt2_stands_for=("gpt2", 8, 512), gpt2_scale_bytes=1.0)


CPU_SCALE = 4  # width, vocabulary and tokens of the CPU GPT-2 are 1/CPU_SCALE of the GPU shape's


def cpu_profile(device: torch.device | None = None, why: str = "") -> Profile:
    device = device or torch.device("cpu")
    return Profile("cpu", device, "gpt2-narrow", 8, 512 // CPU_SCALE, "llama-tiny", 2, 128, torch.bfloat16,
                   why or "no CUDA GPU: GPT-2 at 1/4 width and vocabulary, 8 x 128 tokens, a scale model of GPT-2 "
                          "at 8 x 512 (same shares of the peak, 1/16 of the bytes); a 4-layer Llama stands in for "
                          "the 7B. Memory checks are ratios measured on this machine.",
                   gpt2_stands_for=("gpt2", 8, 512), gpt2_scale_bytes=float(CPU_SCALE ** 2))


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
