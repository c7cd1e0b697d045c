"""Memory of a grading child, measured by the grader from outside the child.

Nothing the child's code does can rewrite these numbers: they are read by the grader's own
process from the kernel (a memory cgroup the grader creates per child, ``/proc/<pid>/status``
of the child's processes) or from the GPU driver (NVML / ``nvidia-smi``). The grader opens a
*window* when it sends "run check X with seed S" and closes it when the check's evidence
arrives; :meth:`Meter.open` / :meth:`Meter.close` bracket that window.

Sources, in the order the grader trusts them for a verdict:

* ``cgroup`` (Linux, root): a memory cgroup per child, which the child cannot leave (its
  ``cgroup.procs`` is root's) and whose every process (threads, ``fork``) is charged. At
  window start the grader resets the high-water mark (v1 ``memory.max_usage_in_bytes``,
  v2 ``memory.peak``); at the end it reads it. The trap: *page cache* is charged to
  whichever cgroup first read a file, so a child that is first to import a module would look
  bigger. The grader subtracts the growth of the cgroup's file cache during the window
  (``memory.stat``: v1 ``total_cache - total_shmem``, v2 ``file - shmem``); ``tmpfs``/shared
  memory the child writes stays counted (memory a submission could hide work in).
* ``rss``: a sampler thread reading ``RssAnon + RssShmem`` of every process of the child
  (from the cgroup's process list, or the child's process tree) every ``interval_s``.
  Anonymous and shared memory only, so page cache cannot distort it, but a spike shorter than
  the interval can be missed: used when there is no cgroup, and shown next to it otherwise.
* ``cuda-driver``: on a CUDA machine, the driver's per-process used memory of the child's
  processes (NVML via ``pynvml``, else ``nvidia-smi --query-compute-apps``), sampled by the
  same thread. Written to the same contract but *not tested on the CPU machine this kit is
  developed on*; the CPU sources are.

Each window's :class:`~memopt_lib.checks.base.MemoryReading` carries the peak and the level at
window start (``baseline_bytes``); the grader then replaces the baseline by the *reference
run's* level at the start of the same check (see :mod:`.grade`), which the student's code
cannot inflate.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

from ..checks.base import MemoryReading

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")


def _read_int(path: Path) -> int:
    return int(path.read_text().split()[0])


def _stat(path: Path) -> dict[str, int]:
    out = {}
    for line in path.read_text().splitlines():
        k, _, v = line.partition(" ")
        if v.strip().isdigit():
            out[k] = int(v)
    return out


def _status_kb(pid: int, fields=("RssAnon", "RssShmem")) -> int:
    total = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                for name in fields:
                    if line.startswith(name.encode() + b":"):
                        total += int(line.split()[1])
    except (OSError, ValueError):
        return 0
    return total * 1024


def _tree(root: int) -> list[int]:
    """``root`` and its descendants (by /proc/<pid>/task/*/children)."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


class Cgroup:
    """One memory cgroup (v1 or v2) that only the grader (root) can reset, read or leave."""

    def __init__(self, path: Path, version: int):
        self.path, self.version = path, version

    @classmethod
    def create(cls, prefix: str = "memopt-grade") -> "Cgroup | None":
        """A fresh cgroup, or None where this machine gives us none (not root, no memory controller)."""
        if os.geteuid() != 0:
            return None
        name = f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if (V1_ROOT / "memory.max_usage_in_bytes").exists() or (V1_ROOT / "cgroup.procs").exists():
            try:
                p = V1_ROOT / name
                p.mkdir()
                return cls(p, 1)
            except OSError:
                return None
        if (V2_ROOT / "cgroup.controllers").exists() and "memory" in (V2_ROOT / "cgroup.controllers").read_text():
            try:  # below our own cgroup; the parent must delegate the memory controller to its children
                own = V2_ROOT / Path(open("/proc/self/cgroup").read().split("::", 1)[1].strip()).relative_to("/")
                parent = own.parent if (own / "cgroup.procs").read_text().strip() else own
                p = parent / name
                p.mkdir()
                if not (p / "memory.peak").exists():
                    p.rmdir()
                    return None
                return cls(p, 2)
            except (OSError, ValueError, IndexError):
                return None
        return None

    @property
    def procs_file(self) -> str:
        return str(self.path / "cgroup.procs")

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def usage(self) -> int:
        return _read_int(self.path / ("memory.usage_in_bytes" if self.version == 1 else "memory.current"))

    def reset_peak(self) -> None:
        if self.version == 1:
            (self.path / "memory.max_usage_in_bytes").write_text("0")
        else:  # writing to memory.peak resets it for this file descriptor (Linux >= 6.12): keep it open
            self._peak_fd = open(self.path / "memory.peak", "r+")
            self._peak_fd.write("1")
            self._peak_fd.flush()

    def peak(self) -> int:
        if self.version == 1:
            return _read_int(self.path / "memory.max_usage_in_bytes")
        fd = getattr(self, "_peak_fd", None)
        if fd is None:
            return _read_int(self.path / "memory.peak")
        fd.seek(0)
        value = int(fd.read().split()[0])
        fd.close()
        self._peak_fd = None
        return value

    def file_cache(self) -> int:
        """Page cache of files (not tmpfs / shared memory) charged to this cgroup."""
        st = _stat(self.path / "memory.stat")
        if self.version == 1:
            return st.get("total_cache", st.get("cache", 0)) - st.get("total_shmem", st.get("shmem", 0))
        return st.get("file", 0) - st.get("shmem", 0)

    def destroy(self) -> None:
        for _ in range(100):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:  # processes still leaving
                time.sleep(0.05)


class _NvidiaSampler:
    """Used GPU memory per process, from the driver. Untested here (no GPU on the development machine)."""

    def __init__(self):
        self.kind = None
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nv, self._handles = pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i)
                                               for i in range(pynvml.nvmlDeviceGetCount())]
            self.kind = "nvml"
        except Exception:  # noqa: BLE001 - no pynvml, no driver
            if shutil.which("nvidia-smi"):
                self.kind = "nvidia-smi"

    def used(self, pids: set[int]) -> int:
        if self.kind == "nvml":
            total = 0
            for h in self._handles:
                for p in self._nv.nvmlDeviceGetComputeRunningProcesses(h):
                    if p.pid in pids and p.usedGpuMemory:
                        total += int(p.usedGpuMemory)
            return total
        if self.kind == "nvidia-smi":
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            total = 0
            for line in out.splitlines():
                pid, _, mib = line.partition(",")
                if pid.strip().isdigit() and int(pid) in pids and mib.strip().isdigit():
                    total += int(mib) * 2**20
            return total
        return 0


class Meter:
    """Windows of one child's memory, measured from outside it (see the module docstring)."""

    def __init__(self, cgroup: Cgroup | None, interval_s: float = 0.002, gpu: bool = False):
        self.cgroup = cgroup
        self.interval_s = interval_s
        self.root_pid: int | None = None
        self._gpu = _NvidiaSampler() if gpu else None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._win: dict | None = None

    @classmethod
    def create(cls, gpu: bool = False) -> "Meter":
        return cls(Cgroup.create(), gpu=gpu)

    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` started inside this meter's cgroup (the shell joins it, then ``exec``\\ s the command)."""
        if self.cgroup is None:
            return cmd
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', self.cgroup.procs_file] + cmd

    def attach(self, pid: int) -> None:
        self.root_pid = pid
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _pids(self) -> list[int]:
        if self.cgroup is not None:
            return self.cgroup.pids()
        return _tree(self.root_pid) if self.root_pid else []

    def _sample(self) -> None:
        while not self._stop.is_set():
            win = self._win
            if win is not None:
                pids = self._pids()
                rss = sum(_status_kb(p) for p in pids)
                gpu = self._gpu.used(set(pids)) if self._gpu is not None and self._gpu.kind else None
                with self._lock:
                    if win is self._win:
                        win["rss_peak"] = max(win["rss_peak"], rss)
                        win["samples"] += 1
                        if gpu is not None:
                            win["gpu_peak"] = max(win["gpu_peak"], gpu)
                            win.setdefault("gpu_start", gpu)
            time.sleep(self.interval_s if self._win is not None else 0.01)

    def open(self) -> None:
        """Start a window: reset the high-water marks, note where memory stands now."""
        pids = self._pids()
        rss = sum(_status_kb(p) for p in pids)
        win = {"rss_start": rss, "rss_peak": rss, "samples": 0, "gpu_peak": 0}
        if self.cgroup is not None:
            self.cgroup.reset_peak()
            win["cg_start"] = self.cgroup.usage()
            win["cache_start"] = self.cgroup.file_cache()
        with self._lock:
            self._win = win

    def close(self) -> MemoryReading | None:
        """End the window; the reading that decides (cgroup, else GPU driver, else rss) with the others as breakdown."""
        with self._lock:
            win, self._win = self._win, None
        if win is None:
            return None
        pids = self._pids()
        rss_now = sum(_status_kb(p) for p in pids)
        win["rss_peak"] = max(win["rss_peak"], rss_now)
        detail = {"rss_start_bytes": win["rss_start"], "rss_peak_bytes": win["rss_peak"],
                  "rss_samples": win["samples"]}
        if self._gpu is not None and self._gpu.kind and "gpu_start" in win:
            detail.update(gpu_start_bytes=win["gpu_start"], gpu_peak_bytes=win["gpu_peak"])
        if self.cgroup is not None:
            peak = self.cgroup.peak()
            cache_growth = max(0, self.cgroup.file_cache() - win["cache_start"])
            detail.update(cgroup_start_bytes=win["cg_start"], cgroup_raw_peak_bytes=peak,
                          file_cache_growth_bytes=cache_growth)
            reading = MemoryReading(max(win["cg_start"], peak - cache_growth), win["cg_start"], "cgroup", detail)
        else:
            reading = MemoryReading(win["rss_peak"], win["rss_start"], "rss", detail)
        if "gpu_peak_bytes" in detail:  # on a GPU the device memory is what a memory check is about
            reading = MemoryReading(detail["gpu_peak_bytes"], detail["gpu_start_bytes"], "cuda-driver", detail)
        return reading

    def finish(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self.cgroup is not None:
            self.cgroup.destroy()
