"""A model of PyTorch's CUDA caching allocator: what ``memory_allocated`` and ``memory_reserved`` count.

``torch.cuda.max_memory_allocated()`` is not the sum of tensor sizes, and ``memory_reserved()`` is not
``memory_allocated()`` plus a constant: both come out of the allocator's rules, which this module
replays on a stream of (allocate, free) events. The rules are those of
``c10/cuda/CUDACachingAllocator.cpp`` with its default configuration (no ``PYTORCH_CUDA_ALLOC_CONF``,
no expandable segments, one stream):

* **rounding** -- a request is rounded up to a multiple of 512 bytes (``kMinBlockSize``; a
  1-byte tensor takes 512). ``memory_allocated`` counts rounded block sizes.
* **two pools** -- requests of at most 1 MiB (``kSmallSize``) come from the small pool, larger ones
  from the large pool; a block never moves between pools.
* **segments** -- when no cached block fits, the allocator ``cudaMalloc``s a new segment: 2 MiB
  (``kSmallBuffer``) for a small request, 20 MiB (``kLargeBuffer``) for a request under 10 MiB
  (``kMinLargeAlloc``), else the request rounded up to 2 MiB (``kRoundLarge``). ``memory_reserved`` is
  the sum of the segments; they are kept until ``empty_cache()``.
* **best fit** -- a request takes the smallest cached block of its pool that is large enough
  (ties: lowest address).
* **splitting** -- the block is split, the front part allocated, when what remains is at least
  512 bytes (small pool) or more than 1 MiB (large pool); otherwise the whole block is handed out
  and counted as allocated (so a 19.5 MiB request in a cached 20 MiB block counts 20 MiB).
* **merging** -- a freed block merges with its free neighbours in the same segment.

What is left out: multiple streams and events (one stream here), ``max_split_size_mb``, the
garbage-collection threshold, expandable segments, and out-of-memory retries (a prediction never
frees the cache: it reports the memory a step would need).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

MIN_BLOCK = 512                 # kMinBlockSize
SMALL_SIZE = 1 << 20            # kSmallSize: largest request served by the small pool
SMALL_BUFFER = 2 << 20          # kSmallBuffer: segment size of the small pool
LARGE_BUFFER = 20 << 20         # kLargeBuffer: segment for large requests under kMinLargeAlloc
MIN_LARGE_ALLOC = 10 << 20      # kMinLargeAlloc
ROUND_LARGE = 2 << 20           # kRoundLarge: larger segments are rounded up to 2 MiB


def round_size(nbytes: int) -> int:
    """The block size a request of ``nbytes`` gets (``CUDACachingAllocator::round_size``)."""
    if nbytes < MIN_BLOCK:
        return MIN_BLOCK
    return MIN_BLOCK * -(-nbytes // MIN_BLOCK)


def segment_size(rounded: int) -> int:
    """The ``cudaMalloc`` size when no cached block fits (``get_allocation_size``)."""
    if rounded <= SMALL_SIZE:
        return SMALL_BUFFER
    if rounded < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ROUND_LARGE * -(-rounded // ROUND_LARGE)


@dataclass
class _Block:
    addr: int
    size: int
    small: bool
    segment: int
    allocated: bool = False
    prev: "_Block | None" = None
    next: "_Block | None" = None
    requested: int = 0      # the un-rounded request (allocated blocks)
    fid: int = -1           # the id a free block is filed under


class CachingAllocator:
    """Replays allocations and frees; keeps the allocator's counters.

    >>> a = CachingAllocator()
    >>> h = a.malloc(1000)          # rounded to 1024, from a new 2 MiB small segment
    >>> a.allocated_bytes, a.reserved_bytes
    (1024, 2097152)
    >>> a.free(h); a.allocated_bytes, a.reserved_bytes
    (0, 2097152)
    """

    def __init__(self):
        self._free = {True: [], False: []}   # pool -> sorted [(size, addr, id)]
        self._blocks: dict[int, _Block] = {}  # id -> block (allocated or free)
        self._next_id = 0
        self._next_addr = 1 << 32
        self.allocated_bytes = 0
        self.reserved_bytes = 0
        self.peak_allocated_bytes = 0
        self.peak_reserved_bytes = 0
        self.segments = 0
        self.requested_bytes = 0  # un-rounded sizes of the live allocations

    # -------------------------------------------------------------- bookkeeping
    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _insert_free(self, bid: int, b: _Block) -> None:
        b.fid = bid
        bisect.insort(self._free[b.small], (b.size, b.addr, bid))

    def _remove_free(self, bid: int, b: _Block) -> None:
        lst = self._free[b.small]
        i = bisect.bisect_left(lst, (b.size, b.addr, bid))
        assert lst[i][2] == bid
        del lst[i]

    def reset_peak(self) -> None:
        """``torch.cuda.reset_peak_memory_stats()``: peaks restart from the current values."""
        self.peak_allocated_bytes = self.allocated_bytes
        self.peak_reserved_bytes = self.reserved_bytes

    # -------------------------------------------------------------- allocate / free
    def _best_fit(self, size: int) -> int:
        """Index of the smallest cached block of ``size``'s pool that holds it (the list's length: none)."""
        return bisect.bisect_left(self._free[size <= SMALL_SIZE], (size, -1, -1))

    def new_segment_bytes(self, nbytes: int) -> int:
        """The ``cudaMalloc`` a request of ``nbytes`` would need now (0 when a cached block fits)."""
        size = round_size(nbytes)
        return 0 if self._best_fit(size) < len(self._free[size <= SMALL_SIZE]) else segment_size(size)

    def malloc(self, nbytes: int) -> int | None:
        """Allocate ``nbytes``; returns a handle for :meth:`free` (``None`` for 0 bytes, like CUDA)."""
        if nbytes <= 0:
            return None
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        lst = self._free[small]
        i = self._best_fit(size)
        if i < len(lst):
            _, _, bid = lst.pop(i)
            block = self._blocks.pop(bid)
        else:  # cudaMalloc a new segment
            seg = segment_size(size)
            block = _Block(self._next_addr, seg, small, self.segments)
            self._next_addr += seg + (1 << 21)  # segments are not contiguous: never merge across them
            self.segments += 1
            self.reserved_bytes += seg
            self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved_bytes)
        remaining = block.size - size
        if (remaining >= MIN_BLOCK) if small else (remaining > SMALL_SIZE):
            rest = _Block(block.addr + size, remaining, small, block.segment, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            rid = self._new_id()
            self._blocks[rid] = rest
            self._insert_free(rid, rest)
        block.allocated = True
        hid = self._new_id()
        self._blocks[hid] = block
        self.allocated_bytes += block.size
        self.requested_bytes += nbytes
        block.requested = nbytes
        self.peak_allocated_bytes = max(self.peak_allocated_bytes, self.allocated_bytes)
        return hid

    def block_size(self, handle: int) -> int:
        return self._blocks[handle].size

    def free(self, handle: int | None) -> None:
        if handle is None:
            return
        block = self._blocks.pop(handle)
        assert block.allocated, "double free"
        block.allocated = False
        self.allocated_bytes -= block.size
        self.requested_bytes -= block.requested
        # merge with free neighbours of the same segment (try_merge_blocks)
        for nb in (block.prev, block.next):
            if nb is not None and not nb.allocated:
                nid = nb.fid
                self._remove_free(nid, nb)
                del self._blocks[nid]
                if nb is block.prev:
                    block.addr = nb.addr
                    block.prev = nb.prev
                    if nb.prev is not None:
                        nb.prev.next = block
                else:
                    block.next = nb.next
                    if nb.next is not None:
                        nb.next.prev = block
                block.size += nb.size
        bid = self._new_id()
        self._blocks[bid] = block
        self._insert_free(bid, block)

    def empty_cache(self) -> None:
        """``torch.cuda.empty_cache()``: give back every segment that is entirely free."""
        for small in (True, False):
            keep = []
            for size, addr, bid in self._free[small]:
                b = self._blocks[bid]
                if b.prev is None and b.next is None:
                    del self._blocks[bid]
                    self.reserved_bytes -= b.size
                else:
                    keep.append((size, addr, bid))
            self._free[small] = keep

    def stats(self) -> dict:
        return {"allocated_bytes": self.allocated_bytes, "reserved_bytes": self.reserved_bytes,
                "peak_allocated_bytes": self.peak_allocated_bytes, "peak_reserved_bytes": self.peak_reserved_bytes,
                "segments": self.segments}
