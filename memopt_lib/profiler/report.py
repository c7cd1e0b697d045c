"""The result of one measurement: plain data with units in the names."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .cuda import CudaStats
from .tracker import CATEGORIES, TimelinePoint

GiB = 1024**3
MiB = 1024**2


def fmt_bytes(n: float | None) -> str:
    """``1536*MiB -> '1.50 GiB'``. Binary units, as ``nvidia-smi`` and PyTorch use."""
    if n is None:
        return "n/a"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{int(n)} B"


@dataclass
class MemoryReport:
    """Memory of one measured region (usually one training step).

    ``peak_allocated_bytes`` is the graded number: ``torch.cuda.max_memory_allocated``
    on CUDA, the tracker's peak of live storage bytes elsewhere.
    ``breakdown_bytes`` splits that peak into categories that add up to it exactly;
    on CUDA the part the tracker cannot see (cuBLAS workspaces, allocator rounding)
    is its own category, ``unattributed``.
    """

    label: str
    device: str
    peak_allocated_bytes: int
    tracker_peak_bytes: int
    start_allocated_bytes: int
    end_allocated_bytes: int
    peak_phase: str
    breakdown_bytes: dict[str, int]
    phase_peak_bytes: dict[str, int]
    step_time_s: float | None = None
    peak_reserved_bytes: int | None = None
    device_used_bytes: int | None = None
    cuda_context_bytes: int | None = None
    cuda: dict | None = None
    snapshot_path: str | None = None
    end_breakdown_bytes: dict[str, int] = field(default_factory=dict)  # state alive after the step
    timeline: list[TimelinePoint] = field(default_factory=list, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def peak_gib(self) -> float:
        return self.peak_allocated_bytes / GiB

    def to_dict(self, timeline: bool = False) -> dict:
        d = asdict(self)
        if not timeline:
            d.pop("timeline")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def table(self) -> str:
        """A short human-readable summary (what a notebook prints)."""
        lines = [f"{self.label or 'measurement'} on {self.device}",
                 f"  peak allocated : {fmt_bytes(self.peak_allocated_bytes)} (in {self.peak_phase})"]
        if self.peak_reserved_bytes is not None:
            lines.append(f"  peak reserved  : {fmt_bytes(self.peak_reserved_bytes)}")
            lines.append(f"  device used    : {fmt_bytes(self.device_used_bytes)} "
                         f"(CUDA context and other processes: {fmt_bytes(self.cuda_context_bytes)})")
        if self.step_time_s is not None:
            lines.append(f"  step time      : {self.step_time_s * 1e3:.1f} ms")
        lines.append("  at the peak:")
        total = max(1, self.peak_allocated_bytes)
        for cat, n in self.breakdown_bytes.items():
            lines.append(f"    {cat:<13}{fmt_bytes(n):>12}  {100 * n / total:5.1f} %")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def combine_breakdown(tracker_breakdown: dict[str, int], peak_allocated_bytes: int,
                      tracker_peak_bytes: int) -> dict[str, int]:
    """Categories from the tracker, plus what the allocator saw beyond it, summing to the peak."""
    out = {c: int(tracker_breakdown.get(c, 0)) for c in CATEGORIES}
    gap = peak_allocated_bytes - tracker_peak_bytes
    if gap:
        out["unattributed"] = gap
    return out


def cuda_fields(stats: CudaStats | None) -> dict:
    if stats is None:
        return {}
    return dict(peak_reserved_bytes=stats.max_reserved_bytes, device_used_bytes=stats.device_used_bytes,
                cuda_context_bytes=stats.context_bytes, cuda=stats.to_dict())
