"""Run a training step on the ``meta`` device and replay what a CUDA GPU would allocate.

A meta tensor has a shape, a dtype and a storage size but no data, so a whole training step of a
7B model runs on a laptop in seconds and computes nothing. Two things make the bytes those of a GPU:
:class:`~memopt_lib.predict.cuda_semantics.CudaSemantics` makes CUDA's kernel choices (attention,
dropout, autocast), and :class:`AllocatorReplay` (a ``TorchDispatchMode``, like
:mod:`memopt_lib.profiler.tracker`) sees every storage born and (through a weak reference) the moment
it dies, and replays each one through
:class:`~memopt_lib.predict.allocator.CachingAllocator`: 512-byte rounding, pools, segments,
splitting. Kernel workspaces that never appear as tensors are added where the kernel runs:
one cuBLAS workspace per thread that runs a matmul (forward thread, autograd's device thread),
FlashAttention-2's backward scratch (``softmax_d`` and an fp32 ``dq_accum``), and bitsandbytes'
dequantised weight in its 4-bit matmul (:mod:`memopt_lib.predict.bnb4bit`).
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .allocator import CachingAllocator
from .gpus import GPU

CATEGORIES = ("weights", "gradients", "optimizer", "activations", "temporaries")


# ------------------------------------------------------------------ the allocator replay
@dataclass
class _Live:
    serial: int
    handle: int | None
    ref: object


class AllocatorReplay(TorchDispatchMode):
    """Feed every meta storage's birth and death to a :class:`CachingAllocator`, and name the bytes."""

    def __init__(self, gpu: GPU, allocator: CachingAllocator | None = None):
        super().__init__()
        self.gpu = gpu
        self.alloc = allocator or CachingAllocator()
        self._live: dict[int, _Live] = {}
        self._serial = 0
        self._lock = threading.RLock()
        self.saved: set[int] = set()
        self.grads: set[int] = set()
        self.optim: set[int] = set()
        self.weights: set[int] = set()
        self.workspaces: dict[str, int] = {}   # thread -> serial of its cuBLAS workspace
        self.paused = 0
        self.peak_sizes: dict[int, int] = {}
        self.peak_phase = ""
        self._measuring = False
        self._sizes: dict[int, int] = {}       # serial -> block bytes (live)
        self.host_keys: set[int] = set()       # storages that stand for host memory (never GPU bytes)

    # -------------------------------------------------------------- storages
    def register(self, t: torch.Tensor) -> int | None:
        if not isinstance(t, torch.Tensor) or t.device.type != "meta" or self.paused:
            return None
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None
        key = st._cdata
        if key in self.host_keys:
            return None
        with self._lock:
            e = self._live.get(key)
            if e is not None:
                return e.serial
            nbytes = st.nbytes()
            self._serial += 1
            serial = self._serial
            handle = self.alloc.malloc(nbytes)
            ref = weakref.ref(st, lambda _r, key=key, serial=serial: self._on_free(key, serial))
            self._live[key] = _Live(serial, handle, ref)
            self._sizes[serial] = self.alloc.block_size(handle) if handle is not None else 0
            self._after_change()
            return serial

    def _on_free(self, key, serial):
        with self._lock:
            e = self._live.get(key)
            if e is None or e.serial != serial:
                return
            del self._live[key]
            self.alloc.free(e.handle)
            self._sizes.pop(serial, None)

    def transient(self, nbytes: int) -> int | None:
        """A kernel's scratch buffer: allocated now, freed by :meth:`release` (never a tensor)."""
        with self._lock:
            h = self.alloc.malloc(nbytes)
            self._serial += 1
            self._sizes[self._serial] = self.alloc.block_size(h) if h is not None else 0
            self._after_change()
            return (self._serial, h)

    def release(self, token) -> None:
        serial, h = token
        with self._lock:
            self.alloc.free(h)
            self._sizes.pop(serial, None)

    def _after_change(self):
        if self._measuring and self.alloc.allocated_bytes >= self.alloc.peak_allocated_bytes:
            self.peak_sizes = dict(self._sizes)
            self.peak_phase = "backward" if torch._C._current_graph_task_id() != -1 else self.phase

    phase = "forward"

    def start_measuring(self):
        self.alloc.reset_peak()
        self._measuring = True
        self.peak_sizes = dict(self._sizes)

    def stop_measuring(self):
        self._measuring = False

    def mark_host(self, t: torch.Tensor) -> None:
        """``t`` (made under :meth:`untracked`) lives in host memory: never counted, even when tagged."""
        self.host_keys.add(t.untyped_storage()._cdata)

    @contextlib.contextmanager
    def untracked(self):
        """Allocations made here are not CUDA-allocator memory (e.g. paged / unified memory)."""
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def _workspace(self):
        # cuBLAS handles are per thread: the forward runs on the Python thread, a CUDA backward on the
        # autograd engine's device thread (on meta the engine stays on the caller's thread, so the
        # graph task tells the two apart)
        tid = "backward" if torch._C._current_graph_task_id() != -1 else "main"
        if tid not in self.workspaces:
            serial, _h = self.transient(self.gpu.cublas_workspace_bytes)
            self.workspaces[tid] = serial  # kept for the process's life, like the real one

    _MATMULS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "addmv", "mv", "_scaled_mm", "addr"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in self._MATMULS and not self.paused:
            self._workspace()
        hook = _KERNEL_SCRATCH.get(func._schema.name)
        scratch = hook(self, args, kwargs) if hook is not None and not self.paused else []
        out = func(*args, **kwargs)
        for tok in scratch:
            self.release(tok)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.register(t)
        return out

    # -------------------------------------------------------------- categories
    def tag(self, group: set, tensors) -> None:
        for t in tensors:
            s = self.register(t)
            if s is not None:
                group.add(s)

    def pack_hook(self, x):
        s = self.register(x)
        if s is not None:
            self.saved.add(s)
        return x

    def breakdown(self, sizes: dict[int, int]) -> dict[str, int]:
        out = dict.fromkeys(CATEGORIES, 0)
        order = [("weights", self.weights), ("gradients", self.grads), ("optimizer", self.optim),
                 ("activations", self.saved)]
        for s, n in sizes.items():
            cat = next((c for c, g in order if s in g), "temporaries")
            out[cat] += n
        ws = set(self.workspaces.values())
        out["temporaries"] -= sum(n for s, n in sizes.items() if s in ws and
                                  not any(s in g for _, g in order))
        out["workspaces"] = sum(n for s, n in sizes.items() if s in ws)
        return out


# kernel scratch hooks: func name -> fn(replay, args, kwargs) -> [tokens]; filled by bnb4bit
_KERNEL_SCRATCH: dict[str, object] = {}


def register_scratch(op_name: str, fn) -> None:
    """Declare the scratch buffers a CUDA kernel allocates behind ATen's back (freed when it returns)."""
    _KERNEL_SCRATCH[op_name] = fn


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _flash_backward_scratch(replay, args, kwargs):
    """FlashAttention-2's ``mha_bwd`` (PyTorch's ``flash_api.cpp``): ``softmax_d`` (B, H, S_q rounded to
    128) and the fp32 ``dq_accum`` (B, S_q rounded to 128, H, head_dim rounded to 32), for the call."""
    q = args[1]
    b, h, s, d = q.shape
    sr = _round_up(s, 128)
    dr = _round_up(d, 32) if d <= 192 else 256
    return [replay.transient(b * h * sr * 4), replay.transient(b * sr * h * dr * 4)]


register_scratch("aten::_scaled_dot_product_flash_attention_backward", _flash_backward_scratch)
