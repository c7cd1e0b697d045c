"""Memory snapshots: every allocation of a region, with the stack that made it, in memory_viz's format.

https://pytorch.org/memory_viz draws a *snapshot*: a dict whose ``device_traces`` list every
``alloc`` / ``free_requested`` / ``free_completed`` event (address, size, stack frames) and whose
``segments`` describe what is allocated at the end. This module makes one on any device, by
wrapping PyTorch's own recorders:

* **CUDA**: the caching allocator records its history (``torch.cuda.memory._record_memory_history``)
  and ``torch.cuda.memory._snapshot()`` returns it, with Python and C++ frames per block;
* **CPU**: ``torch.profiler`` with ``profile_memory=True, with_stack=True`` records every tensor's
  allocation and free, and ``torch.cuda._memory_viz._profile_to_snapshot`` (what
  ``torch.cuda._memory_viz.profile_plot`` uses) turns it into the same format. Frames are the Python
  call stack's function names (``file.py(line): name``), innermost first, and each block carries the
  profiler's category (parameter, activation, gradient, ...). The profiler's memory timeline keeps
  only allocations it can tie to a tensor, so a CPU trace can miss some op outputs (e.g. the
  output of ``a + 1`` that outlives the region can be missing); :class:`~memopt_lib.profiler.MemoryTracker` is the
  exact count, the snapshot says *where* the memory was allocated.

:func:`write_snapshot` saves the pickle (drop it on memory_viz) and an HTML page that draws it
offline; :func:`largest_at_peak` answers the question a snapshot is opened for: what was alive at
the peak, and which allocation was the largest.
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

def record_snapshot(fn: Callable[[], object], device: torch.device | str = "cpu",
                    max_entries: int = 200_000) -> dict:
    """Run ``fn`` once and return the memory snapshot of what it allocated and freed on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.memory._record_memory_history(max_entries=max_entries)
        try:
            fn()
            torch.cuda.synchronize(device)
            snap = torch.cuda.memory._snapshot()
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
        return snap
    from torch.cuda._memory_viz import _profile_to_snapshot
    from torch.profiler import ProfilerActivity, profile
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            fn()
        return _profile_to_snapshot(prof)


def write_snapshot(snapshot: dict, path: str | Path) -> dict[str, str]:
    """Write ``path`` (.pickle, for pytorch.org/memory_viz) and ``path`` with .html (draws it offline)."""
    from torch.cuda._memory_viz import trace_plot
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(snapshot, f)
    html = path.with_suffix(".html")
    html.write_text(trace_plot(snapshot))
    return {"pickle": str(path), "html": str(html)}


def _device_trace(snapshot: dict, device: int | None) -> list[dict]:
    traces = snapshot.get("device_traces")
    if not isinstance(traces, list) or not traces:
        raise ValueError("not a memory snapshot: it has no 'device_traces' (record it with "
                         "torch.cuda.memory._record_memory_history, or record_snapshot on a CPU)")
    if device is None:  # the device that did the most
        device = max(range(len(traces)), key=lambda i: len(traces[i]))
    return traces[device]


LIBRARY_MARKERS = ("torch/", "transformers/", "<built-in", "nn.Module:", "site-packages/", "python3.")


def frame_name(frame: dict) -> str:
    """``file.py:line:name`` for a CUDA frame, the profiler's ``file.py(line): name`` as it is."""
    if frame.get("filename") not in (None, "none"):
        return f"{frame['filename']}:{frame.get('line', 0)}:{frame.get('name', '')}"
    return str(frame.get("name", ""))


def user_frame(frames: list[dict]) -> str:
    """The innermost frame that is not PyTorch's or transformers' own code (else the innermost one)."""
    names = [frame_name(f) for f in frames or []]
    return next((n for n in names if not any(m in n for m in LIBRARY_MARKERS)), names[0] if names else "")


def largest_at_peak(snapshot: dict, device: int | None = None) -> dict[str, Any]:
    """Replay a snapshot's trace: the peak of live bytes, and the largest allocation alive at it.

    Returns ``{"peak_bytes", "size", "frame", "alive"}``: the bytes allocated during the trace at its
    peak, the largest block alive then (its size and :func:`user_frame` of its stack) and how many blocks
    were alive. A block is alive from its ``alloc`` until its ``free_completed`` (a
    ``free_requested`` on CUDA waits for the stream to finish with it); the first peak wins a tie.
    """
    live: dict[int, dict] = {}
    current = peak = 0
    at_peak: dict[int, dict] = {}
    for event in _device_trace(snapshot, device):
        action = event.get("action")
        if action == "alloc":
            live[event["addr"]] = event
            current += event["size"]
            if current > peak:
                peak, at_peak = current, dict(live)
        elif action == "free_completed" and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]
    if not at_peak:
        return {"peak_bytes": 0, "size": 0, "frame": "", "alive": 0}
    big = max(at_peak.values(), key=lambda e: e["size"])  # max() keeps the first of equal sizes
    return {"peak_bytes": peak, "size": big["size"], "frame": user_frame(big.get("frames")), "alive": len(at_peak)}


def synthetic_snapshot(rng, n_events: int = 60, device_count: int = 1) -> dict:
    """A random, well-formed trace (for checks): allocs and frees with sizes, addresses and frames.

    Addresses are reused after a free (as allocators do), frees arrive as ``free_requested`` then
    ``free_completed`` (sometimes far apart), and each device gets its own trace, each one longer than the
    one before (so the busiest device is never the first of several).
    """
    names = ["forward", "backward", "attention", "mlp", "lm_head", "cross_entropy", "step", "embedding"]
    traces = []
    for dev in range(device_count):
        trace, live, pending, free_addrs = [], [], [], []
        next_addr = 0x7F0000000000
        for _ in range(n_events + dev * rng.randint(5, 40)):  # each event appends one entry: later devices busier
            r = rng.random()
            if live and r < 0.35:
                e = live.pop(rng.randrange(len(live)))
                trace.append({**e, "action": "free_requested"})
                pending.append(e)
            elif pending and r < 0.55:
                e = pending.pop(rng.randrange(len(pending)))
                trace.append({**e, "action": "free_completed"})
                free_addrs.append(e["addr"])
            else:
                if free_addrs and rng.random() < 0.5:
                    addr = free_addrs.pop(rng.randrange(len(free_addrs)))
                else:
                    addr, next_addr = next_addr, next_addr + (1 << 30)
                size = 512 * rng.choice([1, 2, 8, 64, 512, 2048, 4096, 8192, 8192])
                frames = [{"filename": "train.py", "line": rng.randint(1, 400), "name": rng.choice(names)}
                          for _ in range(rng.randint(1, 3))]
                e = {"action": "alloc", "addr": addr, "size": size, "stream": 0, "frames": frames}
                trace.append(e)
                live.append(e)
        traces.append(trace)
    return {"device_traces": traces, "segments": []}
