"""CPU offloading: keep tensors in host memory and bring them to the device only when a step needs them.

What it saves: device memory, of whichever kind is moved out --

* **activations** (:mod:`.offload_activations`): the tensors autograd saves for backward are copied to
  (pinned) host memory during forward and copied back when backward reaches them;
* **optimizer state** (:mod:`.offload_optimizer`): fp32 master weights and AdamW's two moments live on
  the host and the update runs on the CPU (DeepSpeed ZeRO-Offload; a small memopt wrapper without a
  launcher); the device keeps only the weights and gradients the forward/backward need;
* **parameters** (:mod:`.offload_params`): a frozen base's weights stay on the host and are streamed to
  the device module by module (accelerate's ``cpu_offload``).

What it costs: bytes over the host link every step (a PCIe link is orders of magnitude slower than the GPU's
own memory), CPU time (the host runs what the GPU would have run), and pinned host memory. Whether the
copies hide behind compute (a side stream) decides whether the slowdown is a few percent or several-fold.

This module holds what the three share: what "host" means on each device, the bytes-moved accounting,
and one measurement of a training step (device peak, step time, bytes moved).

**Without an accelerator** the device *is* the host: ``tensor.cpu()`` of a CPU tensor is the tensor itself,
so ``torch.autograd.graph.save_on_cpu`` moves nothing there. memopt's offloaders therefore make a real copy
on a CPU as well and make it in :func:`host_memory`, where the memory tracker does not count it -- the same
rule ``torch.cuda.max_memory_allocated`` follows for pinned host memory. What the tracker then reports is
*device residency*: the live bytes that did not move out. The machine's RAM does not go down (the host copy
lives in the same RAM); :class:`OffloadStats` says how many bytes went each way and how much host memory
the copies held.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

GPU_RESULTS = Path(__file__).resolve().parent.parent / ".ci" / "gpu_results" / "h200-offload.json"


@contextlib.contextmanager
def host_memory(device: torch.device | str) -> Iterator[None]:
    """Allocations in this block are host memory, not ``device`` memory.

    On CUDA the host is the CPU and nothing needs to happen: the tracker only counts CUDA storages. On a
    CPU-only machine the device is simulated by the tracker (a ``TorchDispatchMode``); inside this block the
    dispatch modes are switched off, so the copies made here are not counted as device memory -- exactly as
    a CUDA allocator would not see a pinned host buffer.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    from torch.utils._python_dispatch import _disable_current_modes
    with _disable_current_modes():
        yield


def to_host(t: torch.Tensor, *, pin: bool | None = None, non_blocking: bool = False,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host copy of ``t`` (always a new storage, also when ``t`` is already on the CPU).

    ``pin`` (default: when CUDA is available): page-locked memory, which the GPU's DMA engine reads
    directly -- needed for ``non_blocking`` copies to overlap with compute.
    """
    pin = torch.cuda.is_available() if pin is None else pin
    with host_memory(t.device):
        out = torch.empty(t.shape, dtype=dtype or t.dtype, device="cpu", pin_memory=pin)
        out.copy_(t.detach(), non_blocking=non_blocking)
    return out


def pinned_available() -> bool:
    """Page-locked host memory needs a CUDA (or other accelerator) runtime."""
    return torch.cuda.is_available()


@dataclass
class OffloadStats:
    """Bytes an offloader moved, plain data. ``*_bytes`` count tensor bytes, both directions separately."""

    to_host_bytes: int = 0          # device -> host (activations packed, gradients sent to the host step)
    to_device_bytes: int = 0        # host -> device (activations restored, updated weights copied back)
    tensors_offloaded: int = 0
    tensors_kept: int = 0           # too small, weights, or not on the device: left where they were
    host_live_bytes: int = 0        # host copies alive now
    host_peak_bytes: int = 0        # most host bytes alive at once

    @property
    def moved_bytes(self) -> int:
        return self.to_host_bytes + self.to_device_bytes

    def add_host(self, nbytes: int) -> None:
        self.host_live_bytes += nbytes
        self.host_peak_bytes = max(self.host_peak_bytes, self.host_live_bytes)

    def to_dict(self) -> dict:
        return {**asdict(self), "moved_bytes": self.moved_bytes}

    def reset_counters(self) -> None:
        """Zero the per-step counters (host memory still alive stays counted)."""
        self.to_host_bytes = self.to_device_bytes = self.tensors_offloaded = self.tensors_kept = 0
        self.host_peak_bytes = self.host_live_bytes


@dataclass
class TradeRow:
    """One row of the trade table: a technique (or combination) on one step. Plain data."""

    technique: str
    device: str
    peak_allocated_bytes: int       # device peak of one steady step (the tracker on a CPU: device residency)
    forward_peak_bytes: int         # ... while forward ran (what activation offloading lowers)
    backward_peak_bytes: int
    optimizer_peak_bytes: int       # ... during the update (what optimizer offloading lowers)
    step_time_s: float              # median wall time of steady steps
    moved_bytes: int                # host <-> device bytes per step, counted by the offloader
    host_peak_bytes: int            # host memory the offloader's copies held at most
    loss: float

    def to_dict(self) -> dict:
        return asdict(self)


def device_peaks(fn: Callable[[], object], device: torch.device | str,
                 roots: Callable[[], Iterable[torch.Tensor]] = lambda: ()) -> dict:
    """Peak device bytes while ``fn()`` runs, overall and per phase (forward, backward, optimizer), and the
    bytes still alive when it returns (``end_bytes``: e.g. what a forward leaves for backward).

    The tracker starts empty (``include_existing=False``) and counts ``roots()`` -- the tensors that live on
    the device between steps (weights, gradients, device-side optimizer state) -- plus everything the step
    allocates on the device outside :func:`host_memory`. Host copies made earlier (master weights, Adam
    moments) are therefore not counted, on a CPU as on a GPU. On CUDA ``peak_bytes`` is the allocator's
    ``max_memory_allocated`` (the tracker still splits it into phases).
    """
    from .profiler import MemoryTracker
    from .profiler.cuda import read_stats, settle
    device = torch.device(device)
    settle(device)
    with MemoryTracker(device, include_existing=False, timeline=False) as tracker:
        for t in roots():
            if t is not None:
                tracker._register(t)  # alive before the step: counted from the start
        fn()
    tr = tracker.result()
    peak = tr.peak_bytes
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = read_stats(device).max_allocated_bytes
    return {"peak_bytes": int(peak), "end_bytes": int(tr.end_bytes),
            "phase_peak_bytes": {k: int(v) for k, v in tr.phase_peak_bytes.items()}}


def model_roots(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """The device tensors alive between steps: weights, buffers, gradients, and ``optimizer``'s state."""
    def roots():
        yield from model.parameters()
        yield from model.buffers()
        yield from (p.grad for p in model.parameters() if p.grad is not None)
        if optimizer is not None:
            for st in optimizer.state.values():
                yield from (v for v in st.values() if torch.is_tensor(v) and v.device.type != "meta")
    return roots


def measure_trade(technique: str, step: Callable[[], object], *, device: torch.device | str,
                  roots: Callable[[], Iterable[torch.Tensor]] = lambda: (),
                  stats: Callable[[], OffloadStats | None] = lambda: None, warmup: int = 1,
                  timed_calls: int = 1) -> TradeRow:
    """Measure one steady ``step()``: device peak, bytes moved (the offloader's stats), step time.

    ``roots``: see :func:`device_peaks` (:func:`model_roots` builds it; give the optimizer only when
    its state lives on the device). ``stats`` returns the offloader's :class:`OffloadStats` (or ``None``);
    its counters are reset before the measured call, so ``moved_bytes`` is one step's traffic.
    """
    device = torch.device(device)
    for _ in range(warmup):  # the first step creates optimizer state, on the host or on the device
        step()
    st = stats()
    if st is not None:
        st.reset_counters()
    box = {}

    def once():
        box["loss"] = step()

    peaks = device_peaks(once, device, roots)
    st = stats()
    moved, host_peak = (st.moved_bytes, st.host_peak_bytes) if st is not None else (0, 0)
    times = []
    for _ in range(timed_calls):  # without the tracker: its hook on every operator would distort time
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    loss = box.get("loss")
    phase = peaks["phase_peak_bytes"]
    return TradeRow(technique, str(device), peaks["peak_bytes"], phase["forward"], phase["backward"],
                    phase["optimizer"], float(sorted(times)[len(times) // 2]), int(moved), int(host_peak),
                    float(loss) if loss is not None else float("nan"))


def gpu_results(path: str | Path | None = None) -> dict | None:
    """The offloading measurements a GPU session recorded (``.ci/gpu_offload.py``), or ``None`` if none exist."""
    path = Path(path) if path is not None else GPU_RESULTS
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "rows" not in data:
        raise ValueError(f"{path} is not an offloading results file (no 'rows'); rerun .ci/gpu_offload.py")
    return data


def verdict(baseline: TradeRow, row: TradeRow) -> dict:
    """What ``row`` saved and cost against ``baseline``: peak saving and slowdown as fractions."""
    if baseline.peak_allocated_bytes <= 0 or baseline.step_time_s <= 0:
        raise ValueError("the baseline row has no peak or no step time; measure it first")
    return {"technique": row.technique,
            "peak_saving": 1 - row.peak_allocated_bytes / baseline.peak_allocated_bytes,
            "slowdown": row.step_time_s / baseline.step_time_s - 1,
            "moved_bytes": row.moved_bytes}
