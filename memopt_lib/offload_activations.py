"""Activation offloading: what autograd saves for backward waits in host memory instead of on the device.

Every tensor autograd keeps for backward passes through the *saved-tensor hooks*
(``torch.autograd.graph.saved_tensors_hooks(pack, unpack)``): ``pack`` runs in forward when the tensor is
saved and returns anything; ``unpack`` runs in backward and must return the tensor. Offloading is a pair of
hooks: pack copies the tensor to host memory (and lets the device copy die), unpack copies it back.

* :func:`save_on_cpu` is PyTorch's own pair (``torch.autograd.graph.save_on_cpu``): synchronous copies,
  optionally into pinned memory. Simple, and every copy stalls the compute stream. On a CPU-only machine it
  moves nothing: ``t.cpu()`` of a CPU tensor is ``t``.
* :class:`OffloadActivations` is the torchtune idea (``torchtune.training.OffloadActivations``): on CUDA the
  device->host copies run on a **side stream**, so forward compute continues while the previous tensors are
  copied; a small *stash* keeps the last ``max_fwd_stash`` device tensors alive until their copy finished
  (the memory price of the overlap), and backward uses a still-stashed tensor directly instead of fetching
  it. Restores in backward run on the side stream too, ordered before the compute that needs them. Small
  tensors (< ``min_offload_bytes``) and weights stay where they are: moving them costs more than it saves,
  and a weight is alive anyway. On a CPU the same code runs with no streams, synchronously, and the copies
  are made in :func:`~memopt_lib.offload.host_memory`, so the tracker measures what stays *device-resident*.

**With gradient checkpointing** (lab 05) the two compose: a non-reentrant checkpointed block saves only its
*inputs* through the outer hooks (``torch.utils.checkpoint`` keeps its recompute's tensors through its own
inner hooks), so wrapping a checkpointed model's forward in :class:`OffloadActivations` offloads exactly the
block inputs -- one hidden state per block -- and the device keeps almost no activation at all.

What it costs: two copies of every offloaded byte per step over the host link, and in backward each restore
must arrive before its layer's gradient kernels start. Gradients do not change: the same values come back.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch.autograd.graph import saved_tensors_hooks

from .offload import OffloadStats, host_memory, pinned_available, to_host


def save_on_cpu(enabled: bool = True, pin_memory: bool | None = None):
    """``torch.autograd.graph.save_on_cpu`` (pinned when CUDA is available), or a null context when off."""
    if not enabled:
        return contextlib.nullcontext()
    pin = pinned_available() if pin_memory is None else pin_memory
    return torch.autograd.graph.save_on_cpu(pin_memory=pin)


MIN_OFFLOAD_BYTES = 1024  # torchtune's default: below this a copy costs more than it saves


def pack_to_host(t: torch.Tensor, min_bytes: int = MIN_OFFLOAD_BYTES):
    """The simplest offloading pack hook: a host copy of ``t``, or ``t`` itself if it is small or a weight.

    Pair it with :func:`unpack_to_device` in ``torch.autograd.graph.saved_tensors_hooks``. Synchronous (no
    side stream); :class:`OffloadActivations` is the overlapped version.
    """
    if t.numel() * t.element_size() < min_bytes or isinstance(t, torch.nn.Parameter):
        return (None, t)  # kept on the device
    return (t.device, to_host(t))


def unpack_to_device(packed) -> torch.Tensor:
    """The unpack hook for :func:`pack_to_host`: a fresh device copy of the host tensor (or the kept tensor)."""
    device, t = packed
    return t if device is None else t.to(device, copy=True)


class _Packed:
    """What pack hands autograd: the host copy (or the tensor kept as is) until backward unpacks it."""

    __slots__ = ("host", "kept", "device", "key", "__weakref__")

    def __init__(self, host=None, kept=None, device=None, key=0):
        self.host, self.kept, self.device, self.key = host, kept, device, key


class OffloadActivations(saved_tensors_hooks):
    """Context manager: tensors saved for backward in its forward wait in host memory.

    >>> with OffloadActivations(model=model) as off:
    ...     loss = model(**batch).loss
    >>> loss.backward()          # restores run here (the hooks travel with the graph)
    >>> off.stats.moved_bytes    # bytes over the host link this step

    Parameters
    ----------
    model:
        Optional: tensors that share storage with its parameters or buffers are never offloaded (a weight is
        alive on the device anyway; copying it would only cost bandwidth). Without it, ``nn.Parameter``
        objects are recognised by type.
    min_offload_bytes:
        Tensors smaller than this stay on the device (torchtune: 1024).
    use_streams:
        Overlap the copies with compute on a side CUDA stream (default: on when the tensors are on CUDA).
        Ignored on a CPU, where there is one "stream": the copies run synchronously.
    max_fwd_stash:
        How many recent device tensors are kept alive until their copy has finished (streams only). More
        means more overlap and more device memory; at least 1.
    pin_memory:
        Host copies in page-locked memory (default: when CUDA is available; required for overlap).
    """

    def __init__(self, *, model: torch.nn.Module | None = None, min_offload_bytes: int = 1024,
                 use_streams: bool | None = None, max_fwd_stash: int = 5, pin_memory: bool | None = None):
        if min_offload_bytes < 0:
            raise ValueError(f"min_offload_bytes must be >= 0, got {min_offload_bytes}")
        if max_fwd_stash < 1:
            raise ValueError(f"max_fwd_stash must be >= 1 (the stash keeps a tensor alive until its copy "
                             f"is done), got {max_fwd_stash}")
        self.min_offload_bytes = int(min_offload_bytes)
        self.max_fwd_stash = int(max_fwd_stash)
        self.pin_memory = pinned_available() if pin_memory is None else bool(pin_memory)
        self.want_streams = use_streams
        self.stats = OffloadStats()
        self._weights = weakref.WeakValueDictionary()  # storage pointer -> tensor, for the weight test
        if model is not None:
            for t in list(model.parameters()) + list(model.buffers()):
                self._weights[t.untyped_storage().data_ptr()] = t
        self._key = 0
        self._side = None                  # the copy stream (CUDA only)
        self._fwd_stash: dict[int, tuple[torch.Tensor, object]] = {}   # key -> (device tensor, copy event)
        super().__init__(self._pack, self._unpack)

    # ------------------------------------------------------------------ decisions
    def _is_weight(self, t: torch.Tensor) -> bool:
        if isinstance(t, torch.nn.Parameter):
            return True
        if t.device.type == "meta":
            return True
        return t.untyped_storage().data_ptr() in self._weights

    def _streams_for(self, device: torch.device) -> bool:
        if device.type != "cuda":
            return False  # one "stream" on a CPU: the same code path, synchronously
        return True if self.want_streams is None else bool(self.want_streams)

    # ------------------------------------------------------------------ forward: pack
    def _pack(self, t: torch.Tensor) -> _Packed:
        nbytes = t.numel() * t.element_size()
        if nbytes < self.min_offload_bytes or self._is_weight(t) or t.layout != torch.strided:
            self.stats.tensors_kept += 1
            return _Packed(kept=t)
        self._key += 1
        key, device = self._key, t.device
        streams = self._streams_for(device)
        if streams:
            host, event = self._copy_out(t)
            self._fwd_stash[key] = (t, event)  # keep the device tensor alive until its copy is done
        else:
            host = self._host_copy(t, non_blocking=False)
        self.stats.to_host_bytes += nbytes
        self.stats.tensors_offloaded += 1
        self.stats.add_host(nbytes)
        packed = _Packed(host=host, device=device, key=key)
        weakref.finalize(packed, self._host_freed, nbytes)  # the graph dropped it: host memory is free
        return packed

    def _copy_out(self, t: torch.Tensor):
        """Start the device->host copy of ``t`` on the side stream; returns ``(host copy, its event)``."""
        if self._side is None:
            self._side = torch.cuda.Stream(t.device)
        main = torch.cuda.current_stream(t.device)
        self._retire_stash(keep=self.max_fwd_stash - 1)
        self._side.wait_stream(main)  # the copy must see the finished tensor
        with torch.cuda.stream(self._side):
            host = self._host_copy(t, non_blocking=True)
            event = self._side.record_event()
        return host, event

    def _wait(self, device: torch.device, event) -> None:
        """The compute stream waits for a copy (a stashed block may be reused only after its copy)."""
        torch.cuda.current_stream(device).wait_event(event)

    def _host_copy(self, t: torch.Tensor, non_blocking: bool) -> torch.Tensor:
        with host_memory(t.device):  # on a CPU: not device memory, as pinned memory is not on CUDA
            host = torch.empty_like(t, device="cpu", pin_memory=self.pin_memory)  # same strides if dense
            host.copy_(t, non_blocking=non_blocking)
        return host

    def _host_freed(self, nbytes: int) -> None:
        self.stats.host_live_bytes -= nbytes

    def _retire_stash(self, keep: int) -> None:
        """Let go of stashed device tensors whose copies are done, keeping the newest ``keep``."""
        while len(self._fwd_stash) > keep:
            key = next(iter(self._fwd_stash))
            t, event = self._fwd_stash.pop(key)
            self._wait(t.device, event)  # t (a main-stream block) may be reused only after its copy

    # ------------------------------------------------------------------ backward: unpack
    def _unpack(self, packed: _Packed) -> torch.Tensor:
        if packed.kept is not None:
            return packed.kept
        if packed.key in self._fwd_stash:  # the last tensors of forward are needed first: no round trip
            t, event = self._fwd_stash.pop(packed.key)
            # once backward drops t its block is reused on the main stream: the copy must be done by then
            self._wait(t.device, event)
            return t
        nbytes = packed.host.numel() * packed.host.element_size()
        self.stats.to_device_bytes += nbytes
        if self._streams_for(packed.device):
            return self._copy_in(packed)
        return packed.host.to(packed.device, copy=True)  # a new device storage, counted by the tracker

    def _copy_in(self, packed: _Packed) -> torch.Tensor:
        """Restore on the side stream, ordered before the gradient kernels that read it."""
        main = torch.cuda.current_stream(packed.device)
        self._retire_stash(keep=0)  # backward reached older tensors: release the stash
        with torch.cuda.stream(self._side):
            out = packed.host.to(packed.device, non_blocking=True)
        main.wait_stream(self._side)  # the gradient kernels run after the restore
        out.record_stream(main)       # the allocator must not reuse it while main still reads it
        return out


def offload_activations(enabled: bool = True, **kwargs):
    """The context manager a training step uses: :class:`OffloadActivations` or a null context when off."""
    return OffloadActivations(**kwargs) if enabled else contextlib.nullcontext()


def saved_tensor_bytes(fn) -> dict:
    """Bytes and count of the tensors autograd saves while ``fn()`` runs (what offloading could move).

    Counts each saved tensor by its own size (views of one storage count once per save, as the hooks see
    them). Returns ``{"saved_bytes", "saved_tensors", "result"}``.
    """
    sizes: list[int] = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return {"saved_bytes": sum(sizes), "saved_tensors": len(sizes), "result": result}
