"""A live-tensor-storage tracker: ``max_memory_allocated`` for any device.

On CUDA, PyTorch's caching allocator counts every byte it hands out, so
``torch.cuda.max_memory_allocated()`` is the number everybody quotes. A CPU has
no such counter, so this module builds one at the level where every tensor is
born: a :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees the output
of every ATen operator (forward, backward and optimizer alike), and a weak
reference on each output's *storage* tells us the moment that storage is freed.

    live bytes = sum(storage.nbytes() for every storage that is alive)

That is the same quantity the CUDA allocator reports (minus its 512-byte
rounding and the workspaces that kernels allocate behind ATen's back, which we
measure and report separately on a GPU), so labs and checks mean the same thing
on a laptop as on an H200. It also works on the ``meta`` device, where tensors
have shapes and sizes but no data: a 7B model can be "trained" on meta to count
its memory without a single real byte.

Because the tracker knows every storage, it can also say *what* was alive at
the peak. Storages are assigned to one category each, in this priority:

* ``weights``      -- parameters and buffers of the tracked model;
* ``gradients``    -- ``param.grad`` tensors;
* ``optimizer``    -- tensors in ``optimizer.state`` (AdamW: ``exp_avg``, ``exp_avg_sq``);
* ``activations``  -- tensors autograd saved for backward (seen through
  :func:`torch.autograd.graph.saved_tensors_hooks`);
* ``temporaries``  -- everything else (logits being reduced, gradients of
  activations in flight, the loss, kernel outputs not kept).

The categories of the peak therefore add up to the peak exactly. The phase
(``forward``, ``backward``, ``optimizer``) is detected without any help from the
training loop: backward is whatever runs inside the autograd engine, the
optimizer phase is bracketed by PyTorch's global optimizer step hooks.

CPU and CUDA: what the same step keeps
--------------------------------------
The tracker counts what the kernels *keep*, so a CPU number means a CUDA number only
where the CPU kernels keep the same tensors. Models loaded with
:func:`memopt_lib.models.load_model` are configured for that (no KV cache in training,
no attention dropout so CPU SDPA takes its flash kernel, 1-byte dropout masks): GPT-2
then keeps 28.5 units of ``batch x seq x hidden x 4`` bytes per block on a CPU, the
CUDA arithmetic; scaled to 12 blocks x batch 8 its saved bytes are the H200 run's
activations within 2 % (``tests/test_models.py``), and the CPU profile's 1/16 scale model
of GPT-2 8 x 512 peaks at 1/16 of the H200's 7.81 GiB within 3 % (``tests/test_profiles.py``).
Known differences that remain:

* CUDA's caching allocator rounds blocks up (512 B, segments for ``reserved``) and
  cuBLAS/cuDNN take workspaces outside ATen: a GPU peak is ~1 % above the tracker's
  count of the same step (measured on a GPU, the counter is the allocator's own).
* Attention dropout turned back on (``attn_pdrop > 0``) sends CPU SDPA to the math
  kernel, which stores ``batch x heads x seq x seq`` probabilities and masks that
  CUDA's fused kernels never store (GPT-2 8 x 512: 11.3 GiB on CPU vs 7.8 on an H200).
* Dropout modules added after loading (peft's ``lora_dropout``) keep a mask in the
  input's dtype on a CPU (4 bytes in fp32) and a 1-byte mask on CUDA, until
  :func:`memopt_lib.models.match_cuda_kernels` is called on the model.
* Optimizers: on CUDA ``torch.optim.AdamW`` defaults to the ``foreach`` (or ``fused``)
  implementation, whose ``foreach`` temporaries are weight-sized; on a CPU it loops
  over tensors one at a time. A peak *in the optimizer step* differs between devices.
* Autocast: CPU autocast casts a different list of ops than CUDA's, and CPUs without
  AVX512-BF16/AMX emulate bf16; mixed-precision bytes agree less well than fp32 bytes.
* bitsandbytes' CPU backend dequantizes 4-bit weights with other temporaries than its
  CUDA kernels.
"""
from __future__ import annotations

import gc
import threading
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CATEGORIES = ("weights", "gradients", "optimizer", "activations", "temporaries")
PHASES = ("forward", "backward", "optimizer")


@dataclass
class _Entry:
    serial: int
    nbytes: int
    ref: Any  # weakref.ref to the UntypedStorage; keeps the free-callback alive


@dataclass
class TimelinePoint:
    """One allocation or free: the live bytes right after it and the phase it happened in."""

    event: int
    live_bytes: int
    phase: str


@dataclass
class TrackerResult:
    """Plain data about one tracked region. All sizes are bytes."""

    device: str
    start_bytes: int
    end_bytes: int
    peak_bytes: int
    peak_phase: str
    peak_breakdown_bytes: dict[str, int]
    end_breakdown_bytes: dict[str, int]  # what is still alive after the region: the state kept between steps
    phase_peak_bytes: dict[str, int]
    timeline: list[TimelinePoint] = field(repr=False, default_factory=list)


def _storage_key(t: torch.Tensor):
    # a DTensor (FSDP2's sharded parameters, their gradients and AdamW state) owns no storage of its
    # own: what this rank holds is its local shard, so that is what counts
    local = getattr(t, "_local_tensor", None)
    if isinstance(local, torch.Tensor):
        t = local
    st = t.untyped_storage()
    return st._cdata, st


def _tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    flat, _ = tree_flatten(obj)
    for x in flat:
        if isinstance(x, torch.Tensor):
            yield x


class MemoryTracker(TorchDispatchMode):
    """Count live tensor-storage bytes on one device while the ``with`` block runs.

    Parameters
    ----------
    device:
        Which device's storages to count (``"cpu"``, ``"cuda"``, ``"cuda:0"``,
        ``"meta"``). Tensors on other devices are ignored, like
        ``torch.cuda.max_memory_allocated`` ignores host memory.
    model, optimizer:
        Optional. Used to name the categories (weights, gradients, optimizer
        state). Without them every byte is an activation or a temporary.
    include_existing:
        Count tensors that already exist when tracking starts (found through the
        model, the optimizer and Python's garbage collector), like
        ``torch.cuda.memory_allocated()`` counts everything already allocated.
    timeline:
        Keep one :class:`TimelinePoint` per allocation/free for plotting.

    Example
    -------
    >>> with MemoryTracker("cpu", model=model, optimizer=opt) as tracker:
    ...     train_step()
    >>> tracker.result().peak_bytes
    """

    def __init__(self, device: str | torch.device = "cpu", *, model: torch.nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None, include_existing: bool = True,
                 timeline: bool = True):
        super().__init__()
        self.device = torch.device(device)
        self.model = model
        self.optimizer = optimizer
        self.include_existing = include_existing
        self.keep_timeline = timeline
        self._lock = threading.RLock()
        self._live: dict[int, _Entry] = {}
        self._serial = 0
        self._events = 0
        self.current_bytes = 0
        self.peak_bytes = 0
        self.start_bytes = 0
        self._peak_sizes: dict[int, int] = {}  # serial -> bytes of each storage alive at the peak
        self._peak_phase = "forward"
        self._phase_peak = {p: 0 for p in PHASES}
        self._saved_serials: set[int] = set()
        self._grad_serials: set[int] = set()
        self._opt_serials: set[int] = set()
        self._timeline: list[TimelinePoint] = []
        self._in_optimizer = 0
        self._forced_phase: str | None = None
        self._hooks: list[Any] = []
        self._saved_hooks = None
        self._active = False
        self._weight_serials: set[int] = set()
        self._end_sizes: dict[int, int] = {}

    # ------------------------------------------------------------------ registry
    def _matches(self, st: torch.UntypedStorage) -> bool:
        d = st.device
        if d.type != self.device.type:
            return False
        return self.device.index is None or d.index is None or d.index == self.device.index

    def _register(self, t: torch.Tensor) -> int | None:
        """Make sure ``t``'s storage is counted; return its serial (None if not on our device)."""
        key, st = _storage_key(t)
        if not self._matches(st):
            return None
        with self._lock:
            entry = self._live.get(key)
            nbytes = st.nbytes()
            if entry is not None:
                if entry.nbytes != nbytes:  # resize_ (e.g. an ``out=`` tensor grown by an op)
                    self._change(nbytes - entry.nbytes)
                    entry.nbytes = nbytes
                return entry.serial
            self._serial += 1
            serial = self._serial
            ref = weakref.ref(st, lambda _r, key=key, serial=serial: self._on_free(key, serial))
            self._live[key] = _Entry(serial, nbytes, ref)
            self._change(nbytes)
            return serial

    def _on_free(self, key: int, serial: int) -> None:
        with self._lock:
            entry = self._live.get(key)
            if entry is None or entry.serial != serial or not self._active:
                return
            del self._live[key]
            self._change(-entry.nbytes)

    def _change(self, delta: int) -> None:
        self.current_bytes += delta
        self._events += 1
        phase = self.phase
        if self.keep_timeline:
            self._timeline.append(TimelinePoint(self._events, self.current_bytes, phase))
        if self.current_bytes > self._phase_peak[phase]:
            self._phase_peak[phase] = self.current_bytes
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
            self._peak_phase = phase
            self._peak_sizes = {e.serial: e.nbytes for e in self._live.values()}

    def _serials_of(self, tensors: Iterable[torch.Tensor]) -> set[int]:
        out = set()
        for t in tensors:
            s = self._register(t)
            if s is not None:
                out.add(s)
        return out

    # ------------------------------------------------------------------ roots
    def _weights(self) -> list[torch.Tensor]:
        if self.model is None:
            return []
        return list(self.model.parameters()) + list(self.model.buffers())

    def _grads(self) -> list[torch.Tensor]:
        if self.model is None:
            return []
        return [p.grad for p in self.model.parameters() if p.grad is not None]

    def _opt_state(self) -> list[torch.Tensor]:
        if self.optimizer is None:
            return []
        return [t for st in self.optimizer.state.values() for t in _tensors_in(st)]

    # ------------------------------------------------------------------ phases
    @property
    def phase(self) -> str:
        if self._forced_phase is not None:
            return self._forced_phase
        if self._in_optimizer:
            return "optimizer"
        if torch._C._current_graph_task_id() != -1:
            return "backward"
        return "forward"

    @contextmanager
    def force_phase(self, phase: str):
        """Attribute everything in this block to ``phase`` (one of :data:`PHASES`)."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        old, self._forced_phase = self._forced_phase, phase
        try:
            yield
        finally:
            self._forced_phase = old

    def _opt_pre(self, optimizer, args, kwargs):
        self._in_optimizer += 1
        if optimizer is self.optimizer or self.optimizer is None:
            self._grad_serials |= self._serials_of(self._grads())

    def _opt_post(self, optimizer, args, kwargs):
        if optimizer is self.optimizer:
            self._opt_serials |= self._serials_of(self._opt_state())
        self._in_optimizer = max(0, self._in_optimizer - 1)

    # ------------------------------------------------------------------ mode
    def __enter__(self):
        self._active = True
        if self.include_existing:
            # collect garbage first: a tensor that is unreachable but not yet collected would count as
            # live now and "free" itself mid-region when gc runs, hiding real allocations under the start
            gc.collect()
            for t in self._weights() + self._grads() + self._opt_state():
                self._register(t)
            with warnings.catch_warnings():  # some objects warn when inspected
                warnings.simplefilter("ignore")
                existing = [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)]  # type(): proxies raise
            for obj in existing:  # like memory_allocated(): whatever is alive already counts
                try:
                    self._register(obj)
                except (RuntimeError, NotImplementedError):  # sparse / nested / functional wrappers
                    pass
        self.start_bytes = self.current_bytes
        self.peak_bytes = self.current_bytes
        # the baseline's registration is not part of the region: the timeline starts at the start bytes
        self._events = 0
        self._timeline = [TimelinePoint(0, self.current_bytes, self.phase)] if self.keep_timeline else []
        self._peak_sizes = {e.serial: e.nbytes for e in self._live.values()}
        self._phase_peak = {p: 0 for p in PHASES}
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
        self._hooks = [register_optimizer_step_pre_hook(self._opt_pre),
                       register_optimizer_step_post_hook(self._opt_post)]
        # saved_tensors_hooks sees every tensor autograd keeps for backward. Returning a
        # detached alias (same storage) matters: returning ``x`` itself would create a
        # reference cycle (output -> grad_fn -> saved output) and delay frees until gc.
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)
        self._saved_hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._saved_hooks.__exit__(*exc)
            for h in self._hooks:
                h.remove()
            self._hooks = []
            # categories are read while the roots are still alive
            self._weight_serials = self._serials_of(self._weights())
            self._grad_serials |= self._serials_of(self._grads())
            self._opt_serials |= self._serials_of(self._opt_state())
            self._end_sizes = {e.serial: e.nbytes for e in self._live.values()}
            self._active = False

    def _pack(self, x: torch.Tensor):
        s = self._register(x)
        if s is not None:
            self._saved_serials.add(s)
        return x.detach()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in _tensors_in(out):
            try:
                self._register(t)
            except (RuntimeError, NotImplementedError):
                pass  # tensors without storage (e.g. some subclasses): nothing to count
        return out

    # ------------------------------------------------------------------ results
    def breakdown(self, sizes: dict[int, int]) -> dict[str, int]:
        """Split ``{serial: bytes}`` of some storages into :data:`CATEGORIES` (each byte once)."""
        out = dict.fromkeys(CATEGORIES, 0)
        order = [("weights", self._weight_serials), ("gradients", self._grad_serials),
                 ("optimizer", self._opt_serials), ("activations", self._saved_serials)]
        for s in sizes:
            cat = next((name for name, group in order if s in group), "temporaries")
            out[cat] += sizes[s]
        return out

    def result(self) -> TrackerResult:
        if self._active:
            raise RuntimeError("result() is available after the `with MemoryTracker(...)` block ends")
        return TrackerResult(
            device=str(self.device), start_bytes=self.start_bytes, end_bytes=self.current_bytes,
            peak_bytes=self.peak_bytes, peak_phase=self._peak_phase,
            peak_breakdown_bytes=self.breakdown(self._peak_sizes),
            end_breakdown_bytes=self.breakdown(self._end_sizes),
            phase_peak_bytes=dict(self._phase_peak), timeline=list(self._timeline))
