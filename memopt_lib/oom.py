"""Debugging out-of-memory errors: read the message, find the cause, fix the cause.

A CUDA OOM message from PyTorch's caching allocator says everything needed:

    CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 14.75 GiB of which
    1.12 GiB is free. Including non-PyTorch memory, this process has 13.62 GiB memory in use. Of the
    allocated memory 11.89 GiB is allocated by PyTorch, and 1.21 GiB is reserved by PyTorch but
    unallocated. ...

* **allocated by PyTorch** close to the card: the working set is too big. Lower the *peak*: smaller
  micro-batch + accumulation, checkpointing, mixed precision, LoRA, 8-bit optimizer, quantization.
* **reserved but unallocated** large: fragmentation. Cached blocks exist but none is big enough.
  ``torch.cuda.empty_cache()`` does not fix this (it only returns *unused* cached segments to the driver,
  and the allocator would have done that itself before raising OOM); it also slows training down.
  ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (set before the first CUDA allocation) lets
  segments grow in place and removes most fragmentation.
* **non-PyTorch memory** (in use minus reserved): the CUDA context, or other processes on the GPU.
* memory that **grows step after step** is a leak: a tensor with its graph kept alive (``losses.append(loss)``
  instead of ``loss.item()``), or outputs stored in a list.

On a machine without a GPU, :func:`simulated_budget` gives the same experience: a tracker that raises a
real ``torch.OutOfMemoryError``, with a CUDA-style message, when live tensors would exceed a budget.
"""
from __future__ import annotations

import gc
import re
from dataclasses import dataclass
from typing import Callable

import torch

from .profiler import MemoryTracker, fmt_bytes

# PyTorch prints up to 1024 bytes as "N bytes", then KiB, MiB, GiB (c10's format_size)
_UNITS = {"bytes": 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}
_SIZE = r"([\d.]+) (bytes|B|KiB|MiB|GiB|TiB)"


def _bytes(num: str, unit: str) -> int:
    return int(float(num) * _UNITS[unit])


@dataclass
class OOMInfo:
    """The numbers of a CUDA OOM message, in bytes (None when the message lacks them)."""

    tried_bytes: int | None
    total_bytes: int | None
    free_bytes: int | None
    in_use_bytes: int | None
    allocated_bytes: int | None
    reserved_unallocated_bytes: int | None

    @property
    def non_pytorch_bytes(self) -> int | None:
        if None in (self.in_use_bytes, self.allocated_bytes, self.reserved_unallocated_bytes):
            return None
        return self.in_use_bytes - self.allocated_bytes - self.reserved_unallocated_bytes


def parse_oom_message(message: str) -> OOMInfo:
    """Extract the sizes from PyTorch's CUDA OOM message (any field may be missing in older versions)."""
    def find(pattern):
        m = re.search(pattern, message)
        return _bytes(m.group(1), m.group(2)) if m else None
    return OOMInfo(tried_bytes=find(r"Tried to allocate " + _SIZE),
                   total_bytes=find(r"total capacity of " + _SIZE),
                   free_bytes=find(r"of which " + _SIZE + " is free"),
                   in_use_bytes=find(r"this process has " + _SIZE + " memory in use"),
                   allocated_bytes=find(_SIZE + " is allocated by PyTorch"),
                   reserved_unallocated_bytes=find(_SIZE + " is reserved by PyTorch but unallocated"))


def _allocator_size(n: int) -> str:
    """A size the way PyTorch's allocator prints it in an OOM message (c10's ``format_size``).

    Up to 1024 bytes in bytes, up to 1 MiB in KiB, up to 1 GiB in MiB, then GiB (so 1 MiB prints "1024.00 KiB").
    """
    if n <= 1024:
        return f"{n} bytes"
    for unit, size in (("KiB", 1024), ("MiB", 1024**2)):
        if n <= size * 1024:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1024**3:.2f} GiB"


def format_oom_message(tried: int, total: int, free: int, allocated: int, reserved_unallocated: int,
                       other: int = 0, device: str = "GPU 0") -> str:
    """A CUDA out-of-memory message in PyTorch's words (what simulations and checks raise)."""
    s = _allocator_size
    in_use = allocated + reserved_unallocated + other
    return (f"CUDA out of memory. Tried to allocate {s(tried)}. {device} has a total capacity of {s(total)} of "
            f"which {s(free)} is free. Including non-PyTorch memory, this process has {s(in_use)} memory in "
            f"use. Of the allocated memory {s(allocated)} is allocated by PyTorch, and {s(reserved_unallocated)}"
            " is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.")


def diagnose(info: OOMInfo) -> list[str]:
    """Advice, most likely cause first."""
    out = []
    if info.reserved_unallocated_bytes and info.tried_bytes and info.reserved_unallocated_bytes >= info.tried_bytes:
        out.append(f"fragmentation: {fmt_bytes(info.reserved_unallocated_bytes)} is cached but unallocated, more than "
                   f"the {fmt_bytes(info.tried_bytes)} requested, yet no block fits. Set "
                   "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before CUDA starts; empty_cache() will not help.")
    if info.allocated_bytes and info.total_bytes and info.allocated_bytes > 0.7 * info.total_bytes:
        out.append(f"the working set is too large: {fmt_bytes(info.allocated_bytes)} of {fmt_bytes(info.total_bytes)} "
                   "is live tensors. Lower the peak: smaller micro-batch with accumulation, gradient "
                   "checkpointing, mixed precision, LoRA / 8-bit optimizer, 4-bit weights.")
    if info.non_pytorch_bytes and info.total_bytes and info.non_pytorch_bytes > 0.1 * info.total_bytes:
        out.append(f"{fmt_bytes(info.non_pytorch_bytes)} is used outside PyTorch's allocator: another process or "
                   "notebook kernel on this GPU (check nvidia-smi), or a large CUDA context.")
    return out or ["no single cause stands out: measure the step with memopt_lib.profiler and read the breakdown"]


class simulated_budget(MemoryTracker):
    """A tracker that raises ``torch.OutOfMemoryError`` when live tensors would exceed ``limit_bytes``.

    The check happens after each operator creates its outputs (a real allocator refuses before); the error
    message has the same shape as CUDA's, so :func:`parse_oom_message` reads it.
    """

    def __init__(self, limit_bytes: int, device: str | torch.device = "cpu", **kwargs):
        super().__init__(device, timeline=False, **kwargs)
        self.limit_bytes = int(limit_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.current_bytes
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.current_bytes > self.limit_bytes:
            tried = self.current_bytes - before
            raise torch.OutOfMemoryError(
                f"Simulated out of memory. Tried to allocate {fmt_bytes(tried)}. Budget has a total capacity of "
                f"{fmt_bytes(self.limit_bytes)} of which {fmt_bytes(max(0, self.limit_bytes - before))} is free. "
                f"Of the allocated memory {fmt_bytes(before)} is allocated by PyTorch, and 0 B is reserved by "
                f"PyTorch but unallocated. (op: {func})")
        return out


def live_bytes_per_step(step: Callable[[], object], steps: int, device: str | torch.device = "cpu") -> list[int]:
    """Live tensor bytes on ``device`` after each of ``steps`` calls: a leak shows as a rising line."""
    from .profiler.measure import progress
    out = []
    with MemoryTracker(device) as tracker, progress(steps, "steps") as bar:
        for _ in range(steps):
            step()
            gc.collect()
            out.append(tracker.current_bytes)
            bar.update()
    return out


def max_batch_size(peak_for_batch: Callable[[int], int], budget_bytes: int, upper: int = 4096) -> tuple[int, int]:
    """Largest batch whose measured peak fits ``budget_bytes``: doubling, then bisection.

    Returns ``(batch, calls)``. ``peak_for_batch`` must be non-decreasing in the batch size (it is, for a
    training step). 0 means not even batch 1 fits.
    """
    from .profiler.measure import progress
    calls = 0
    bar = progress(None, "batch sizes tried")

    def fits(b):
        nonlocal calls
        calls += 1
        bar.set_postfix_str(f"batch {b}", refresh=False)
        ok = peak_for_batch(b) <= budget_bytes
        bar.update()
        return ok

    if not fits(1):
        bar.close()
        return 0, calls
    lo, hi = 1, 2
    while hi <= upper and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, upper + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    bar.close()
    return lo, calls


# ---------------------------------------------------------------- lab 07's graded functions, as the library does them
def parse_oom(message: str) -> dict[str, int | None]:
    """``{"tried", "free", "allocated", "reserved_unallocated"}`` bytes of a CUDA OOM message (None if absent)."""
    info = parse_oom_message(message)
    return {"tried": info.tried_bytes, "free": info.free_bytes, "allocated": info.allocated_bytes,
            "reserved_unallocated": info.reserved_unallocated_bytes}


WORKING_SET_SHARE = 0.7  # live tensors over this share of the card: the working set is the problem


def classify_cause(info: dict) -> str:
    """The OOM's most likely cause from bytes ``tried, free, allocated, reserved_unallocated, total``.

    ``"fragmentation"`` when the cached-but-unallocated memory alone could hold the request (blocks exist,
    none fits), else ``"working_set"`` when live tensors take over 70 % of the card, else ``"other_process"``
    (memory used outside PyTorch's allocator). The order matters: :func:`diagnose` gives the same one first.
    """
    if info["reserved_unallocated"] >= info["tried"]:
        return "fragmentation"
    if info["allocated"] > WORKING_SET_SHARE * info["total"]:
        return "working_set"
    return "other_process"


def train_and_log(model: torch.nn.Module, batches, optimizer: torch.optim.Optimizer) -> list[float]:
    """One training step per batch; the losses as Python floats -- nothing from a step outlives it."""
    losses = []
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())  # a float: the graph (every saved activation) is freed with `loss`
    return losses
