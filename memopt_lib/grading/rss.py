"""A second, independent memory measurement for checks: the process's peak resident set.

The profiler's tracker counts torch storages it sees through the dispatcher, in this
thread. Memory a submission uses *around* it -- numpy temporaries, a background thread,
a tensor made while the tracker's counters were tampered with -- is invisible to it but
not to the kernel. Linux keeps a resettable high-water mark of resident memory
(``VmHWM``; writing ``5`` to ``/proc/self/clear_refs`` resets it to the current RSS),
so a check can ask "how much did resident memory grow during this call", a number no
Python code in the process can rewrite. It is coarse (pages, allocator caching), so
checks use it with large inputs (tens of MiB: glibc serves those with ``mmap`` and
returns them on free) and generous thresholds, next to the tracker's exact number.
"""
from __future__ import annotations

import gc
from typing import Callable, TypeVar

T = TypeVar("T")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def available() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_growth(fn: Callable[[], T]) -> tuple[T, int]:
    """``(fn(), bytes)``: how far resident memory rose above its starting level while ``fn`` ran."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_bytes("VmRSS")
    out = fn()
    return out, max(0, _status_bytes("VmHWM") - before)
