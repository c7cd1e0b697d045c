"""Fragmentation: when the CUDA caching allocator has the memory but not in one piece.

What it is
----------
PyTorch's caching allocator never gives a freed block back to the driver by itself: it keeps it
*reserved* and hands it out again. Blocks of 1-10 MiB are cut from shared 20 MiB segments, so when
a program frees every other such block, the free memory lies in holes between live blocks. A later
request larger than any hole needs a new segment; if the card has no room for one, the allocator
first releases every segment that is *entirely* free (what ``torch.cuda.empty_cache()`` does), and a
segment with one live block is not. The request fails although ``reserved - allocated`` is larger
than it: a fragmentation OOM, recognisable in the message by a large "reserved by PyTorch but
unallocated".

What helps, and what does not
-----------------------------
* ``torch.cuda.empty_cache()`` (the course text's fix): it releases the same fully-free segments the
  allocator already released before raising; the holes stay. It does not help, and costs time.
* ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (set before the first CUDA allocation): one
  segment per pool that grows by mapping 2 MiB pages at its end. Free pages *inside* it can be
  unmapped and their physical memory mapped again at the end, so the holes become usable.

How it is measured
------------------
:func:`fragmenting_workload` is one sequence of allocations and frees written against a tiny
interface (``malloc``, ``free``, ``empty_cache``, ``stats``). On a GPU, :func:`run_on_gpu` runs it in a
fresh subprocess per allocator setting (the setting must be in the environment before CUDA starts),
with ``torch.cuda.set_per_process_memory_fraction`` as the card's size, on real tensors. On a CPU,
:func:`simulate` runs the same sequence on :class:`BoundedAllocator` (the caching allocator model of
:mod:`memopt_lib.predict.allocator` with a capacity and its out-of-memory retry) and on
:class:`ExpandableAllocator` (page-granular expandable segments) -- a simulation of the allocator's
arithmetic, labelled as such wherever it is shown.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

from .oom import format_oom_message
from .predict.allocator import CachingAllocator, round_size

MiB = 1 << 20
PAGE = 2 * MiB                      # expandable segments map physical memory in 2 MiB pages
SETTINGS = ("default", "default+empty_cache", "expandable_segments")


class SimulatedOutOfMemory(MemoryError):
    """The simulated allocator could not serve a request within its capacity."""


def oom_message(tried: int, capacity: int, reserved: int, allocated: int) -> str:
    """The message the allocator would raise (PyTorch's wording, :func:`memopt_lib.oom.format_oom_message`)."""
    return format_oom_message(tried, capacity, max(0, capacity - reserved), allocated, reserved - allocated)


class BoundedAllocator(CachingAllocator):
    """The default caching allocator on a card of ``capacity_bytes``.

    When a request needs a new segment that does not fit, it releases every entirely free segment
    (``release_cached_blocks``, the same as ``empty_cache()``) and tries once more; then it raises
    :class:`SimulatedOutOfMemory` with a CUDA-shaped message.
    """

    def __init__(self, capacity_bytes: int):
        super().__init__()
        self.capacity_bytes = int(capacity_bytes)

    def malloc(self, nbytes: int):
        if nbytes <= 0:
            return None
        seg = self.new_segment_bytes(nbytes)
        if seg and self.reserved_bytes + seg > self.capacity_bytes:
            self.empty_cache()  # the allocator's own retry: free cached segments, then try again
            if self.reserved_bytes + seg > self.capacity_bytes:
                raise SimulatedOutOfMemory(oom_message(round_size(nbytes), self.capacity_bytes,
                                                       self.reserved_bytes, self.allocated_bytes))
        return super().malloc(nbytes)


class ExpandableAllocator:
    """``expandable_segments:True``, one stream, one pool: blocks in one growing address range.

    Requests are rounded like the default allocator's (512 bytes) and placed best-fit in the free
    ranges of the segment, else at its end. Physical memory is mapped in 2 MiB pages: ``reserved`` is
    the number of mapped pages. Before failing, the allocator unmaps every page that lies wholly
    inside a free range; a new request's pages can then be mapped again at the end.
    """

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = int(capacity_bytes)
        self._end = 0
        self._live: dict[int, tuple[int, int]] = {}      # handle -> (start, size)
        self._free: list[tuple[int, int]] = []           # (start, size), sorted by start
        self._mapped: set[int] = set()                   # page indices with physical memory
        self._next = 0
        self.allocated_bytes = 0
        self.peak_allocated_bytes = 0
        self.peak_reserved_bytes = 0

    @property
    def reserved_bytes(self) -> int:
        return len(self._mapped) * PAGE

    def _pages(self, start: int, size: int) -> range:
        return range(start // PAGE, -(-(start + size) // PAGE))

    def _place(self, size: int) -> int:
        fits = [(s, st) for st, s in self._free if s >= size]
        if fits:
            s, st = min(fits)
            self._free.remove((st, s))
            if s > size:
                self._free.append((st + size, s - size))
                self._free.sort()
            return st
        st = self._end
        self._end += size
        return st

    def _unmap_free_pages(self) -> None:
        busy = set()
        for st, size in self._live.values():
            busy.update(self._pages(st, size))
        self._mapped &= busy

    def malloc(self, nbytes: int):
        if nbytes <= 0:
            return None
        size = round_size(nbytes)
        start = self._place(size)
        need = set(self._pages(start, size)) - self._mapped
        if self.reserved_bytes + len(need) * PAGE > self.capacity_bytes:
            self._unmap_free_pages()
            need = set(self._pages(start, size)) - self._mapped
            if self.reserved_bytes + len(need) * PAGE > self.capacity_bytes:
                self._free.append((start, size))
                self._free.sort()
                raise SimulatedOutOfMemory(oom_message(size, self.capacity_bytes, self.reserved_bytes,
                                                       self.allocated_bytes))
        self._mapped |= need
        self._next += 1
        self._live[self._next] = (start, size)
        self.allocated_bytes += size
        self.peak_allocated_bytes = max(self.peak_allocated_bytes, self.allocated_bytes)
        self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved_bytes)
        return self._next

    def free(self, handle) -> None:
        if handle is None:
            return
        st, size = self._live.pop(handle)
        self.allocated_bytes -= size
        merged = [(st, size)]
        rest = []
        for fst, fsize in self._free:  # merge with adjacent free ranges
            if fst + fsize == merged[0][0] or merged[0][0] + merged[0][1] == fst:
                lo = min(fst, merged[0][0])
                merged[0] = (lo, fsize + merged[0][1])
            else:
                rest.append((fst, fsize))
        self._free = sorted(rest + merged)

    def empty_cache(self) -> None:
        self._unmap_free_pages()

    def stats(self) -> dict:
        return {"allocated_bytes": self.allocated_bytes, "reserved_bytes": self.reserved_bytes}


@dataclass
class Outcome:
    """What one allocator setting did with the workload. Bytes; ``simulated`` says where it ran."""

    setting: str
    succeeded: bool
    simulated: bool
    capacity_bytes: int
    request_bytes: int
    allocated_before_request_bytes: int
    reserved_before_request_bytes: int
    reserved_after_bytes: int
    oom_message: str = ""

    @property
    def reserved_unallocated_bytes(self) -> int:
        return self.reserved_before_request_bytes - self.allocated_before_request_bytes


def fragmenting_workload(mem, capacity_bytes: int, setting: str, block_bytes: int = 6 * MiB,
                         fill: float = 0.75, request: float = 0.40) -> dict:
    """Fill ``fill`` of the card with ``block_bytes`` blocks, free every other one, then ask for one
    block of ``request`` x capacity: less than the free total, more than any hole.

    ``mem`` has ``malloc(n) -> handle``, ``free(handle)``, ``empty_cache()``, ``stats()`` and raises
    ``MemoryError`` (``torch.OutOfMemoryError`` is one) when the request cannot be served.
    """
    n = int(fill * capacity_bytes) // block_bytes
    handles = [mem.malloc(block_bytes) for _ in range(n)]
    for h in handles[::2]:
        mem.free(h)
    before = mem.stats()
    if setting == "default+empty_cache":
        mem.empty_cache()  # the course text's prescription
    want = int(request * capacity_bytes)
    try:
        big = mem.malloc(want)
        ok, msg = True, ""
        after = mem.stats()
        mem.free(big)
    except MemoryError as err:
        ok, msg, after = False, str(err).splitlines()[0][:500], mem.stats()
    return {"succeeded": ok, "request_bytes": want, "allocated_before_request_bytes": before["allocated_bytes"],
            "reserved_before_request_bytes": before["reserved_bytes"],
            "reserved_after_bytes": after["reserved_bytes"], "oom_message": msg}


def simulate(setting: str, capacity_bytes: int = 8 * 1024 ** 3, **workload) -> Outcome:
    """Run the workload on the allocator *model* (CPU; a simulation of the allocator's arithmetic)."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    mem = ExpandableAllocator(capacity_bytes) if setting == "expandable_segments" else BoundedAllocator(capacity_bytes)
    res = fragmenting_workload(mem, capacity_bytes, setting, **workload)
    return Outcome(setting, simulated=True, capacity_bytes=capacity_bytes, **res)


class _CudaMemory:
    """The workload interface on real CUDA tensors (one ``uint8`` tensor per block)."""

    def __init__(self):
        import torch
        self.torch = torch
        self._live: dict[int, object] = {}
        self._next = 0

    def malloc(self, nbytes):
        t = self.torch.empty(nbytes, dtype=self.torch.uint8, device="cuda")
        self._next += 1
        self._live[self._next] = t
        return self._next

    def free(self, handle):
        del self._live[handle]

    def empty_cache(self):
        self.torch.cuda.empty_cache()

    def stats(self):
        self.torch.cuda.synchronize()
        return {"allocated_bytes": self.torch.cuda.memory_allocated(),
                "reserved_bytes": self.torch.cuda.memory_reserved()}


def _child(setting: str, capacity_bytes: int) -> dict:
    import torch
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, capacity_bytes / total))
    res = fragmenting_workload(_CudaMemory(), capacity_bytes, setting)
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    return {"setting": setting, "simulated": False, "capacity_bytes": capacity_bytes, "alloc_conf": conf,
            "device": torch.cuda.get_device_name(0), "torch": torch.__version__, **res}


def run_on_gpu(setting: str, capacity_bytes: int = 8 * 1024 ** 3, timeout_s: float = 300) -> dict:
    """Run the workload on the real CUDA allocator, in a fresh process per setting."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    env = {**os.environ}
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    if setting == "expandable_segments":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    out = subprocess.run([sys.executable, "-m", "memopt_lib.fragmentation", "--child", setting,
                          "--capacity-gib", str(capacity_bytes / 1024 ** 3)],
                         env=env, capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"the {setting} run failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memopt_lib.fragmentation",
                                 description="The fragmentation experiment: default allocator, empty_cache(), "
                                             "expandable segments (GPU: real; --simulate: the allocator model).")
    ap.add_argument("--capacity-gib", type=float, default=8.0, help="the card's size for the experiment (8)")
    ap.add_argument("--simulate", action="store_true", help="run on the allocator model (no GPU needed)")
    ap.add_argument("--json", help="write the outcomes here")
    ap.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cap = int(args.capacity_gib * 1024 ** 3)
    if args.child:
        print(json.dumps(_child(args.child, cap)))
        return 0
    rows = [asdict(simulate(s, cap)) if args.simulate else run_on_gpu(s, cap) for s in SETTINGS]
    for r in rows:
        print(f"{r['setting']:<22} {'fits' if r['succeeded'] else 'OOM ':<5} reserved before "
              f"{r['reserved_before_request_bytes'] / MiB:8.0f} MiB, allocated {r['allocated_before_request_bytes'] / MiB:8.0f}"
              f" MiB, request {r['request_bytes'] / MiB:6.0f} MiB" + (" (simulated)" if r["simulated"] else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(["python -m memopt_lib.fragmentation"] + (argv or sys.argv[1:])),
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
