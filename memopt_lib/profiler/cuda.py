"""What the CUDA caching allocator and the driver say, read with a protocol that repeats.

Four numbers describe GPU memory, from the inside out:

* ``allocated`` -- bytes in live tensors (``torch.cuda.memory_allocated``); its
  maximum since the last reset is ``max_memory_allocated``, the number labs grade.
* ``reserved`` -- bytes the caching allocator holds from the driver, allocated or
  cached for reuse (``memory_reserved``). Reserved minus allocated is the cache
  plus fragmentation; ``empty_cache()`` returns the *unused* cached blocks to the
  driver, it never makes a fragmented live working set smaller.
* ``device used`` -- what the driver reports as used on the whole GPU
  (``torch.cuda.mem_get_info``): reserved + the CUDA context (kernels, cuBLAS
  handles; typically 0.3-0.6 GiB) + every other process on the card.
* ``total`` -- the card.

An out-of-memory error happens when *reserved* would have to grow past what the
driver can give, so a peak of allocated memory close to the card's size can OOM
through fragmentation even though the sum of live tensors fits.
"""
from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class CudaStats:
    """One reading of a CUDA device's memory counters, in bytes."""

    device: str
    allocated_bytes: int
    max_allocated_bytes: int
    reserved_bytes: int
    max_reserved_bytes: int
    device_used_bytes: int
    device_total_bytes: int
    context_bytes: int  # device_used - reserved: the CUDA context plus other processes

    def to_dict(self) -> dict:
        return asdict(self)


def settle(device: torch.device | str) -> None:
    """Bring the allocator to a repeatable state before a measurement.

    gc first (frees tensors caught in reference cycles), then wait for queued
    kernels, then hand cached blocks back so ``reserved`` starts from the live
    set, then reset the peak counters so the next ``max_*`` covers only what follows.
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def read_stats(device: torch.device | str) -> CudaStats:
    """Read all counters of a CUDA device (synchronizes first so pending kernels count)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"read_stats needs a CUDA device, got {device}")
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    return CudaStats(
        device=str(device),
        allocated_bytes=torch.cuda.memory_allocated(device),
        max_allocated_bytes=torch.cuda.max_memory_allocated(device),
        reserved_bytes=reserved,
        max_reserved_bytes=torch.cuda.max_memory_reserved(device),
        device_used_bytes=total - free,
        device_total_bytes=total,
        context_bytes=max(0, total - free - reserved),
    )


class SnapshotRecorder:
    """Record allocator history and write a snapshot that https://pytorch.org/memory_viz opens.

    Uses ``torch.cuda.memory._record_memory_history`` / ``_dump_snapshot``, the
    API behind PyTorch's "Understanding CUDA Memory Usage" guide. A no-op object
    on devices other than CUDA, so the same code runs everywhere.
    """

    def __init__(self, path: str | Path | None, device: torch.device | str, max_entries: int = 200_000):
        self.path = Path(path) if path else None
        self.enabled = self.path is not None and torch.device(device).type == "cuda"
        self.max_entries = max_entries

    def __enter__(self):
        if self.enabled:
            torch.cuda.memory._record_memory_history(max_entries=self.max_entries)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(self.path))
            torch.cuda.memory._record_memory_history(enabled=None)
        return False
