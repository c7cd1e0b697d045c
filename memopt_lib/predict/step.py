"""One training step of a course configuration, run on meta tensors and replayed as CUDA would run it.

The step is the bench's: the row's :class:`~memopt_lib.recipe.Recipe` is built by
:func:`memopt_lib.recipe.compose` on :class:`~memopt_lib.predict.target.MetaGPU` (a meta-born model
"moved to the GPU", bitsandbytes stand-ins, host memory outside the allocator: see that module) and
:meth:`memopt_lib.recipe.Composed.step` runs it -- ``zero_grad(set_to_none)``, per micro-batch the
recipe's context (autocast, activation offloading) around its loss (the model's own or the chunked one,
token-normalized), ``scaler.scale(loss).backward()``, ``scaler.step``. Meta tensors have no values, so
the batch's target-token counts are given (``rows x (seq - 1)``: the batch is unpadded) instead of
counted.

What the batch does differently from the bench's: its all-ones ``attention_mask`` is allocated like the
bench's but not passed to the model: transformers' ``sdpa_mask`` drops an all-ones mask on a GPU
(``_ignore_causal_mask_sdpa``), which on meta tensors it cannot check. Likewise transformers'
``find_packed_sequence_indices`` (does the batch pack several sequences per row?) reads position ids;
the bench's rows are one sequence each, so the predictor answers ``None`` (not packed) as the GPU
computes it.

Besides memory, the steady step is counted (:func:`predict_step`'s ``flops`` and ``host_transfer_bytes``):
the formulas of ``torch.utils.flop_counter`` (:class:`FlopCount`) count the matmuls and attention of forward, backward and
checkpointing's recomputation as they run on meta (bitsandbytes' 4-bit matmul ``gemm_4bit`` as the
``2 M N K`` of the product it computes), and the host link's bytes are those the
offloading hooks and the host embedding move.
"""
from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .allocator import CachingAllocator
from .gpus import GPU, gpu as get_gpu
from .cuda_semantics import _CACHE, CudaSemantics
from .replay import AllocatorReplay

GiB = float(1 << 30)


@dataclass(frozen=True)
class StepOptions:
    """What the bench's rows do not vary but the anchors do."""

    optimizer: str = "foreach"       # torch AdamW implementation: "foreach" (the CUDA default) or "fused"
    attn: str = "sdpa"               # attn_implementation: "sdpa" or "eager" (the math path)
    amp_dtype: str | None = None     # autocast dtype; None: bf16 where native, else fp16 (memopt's rule)
    steps: int = 3                   # steps replayed; the last one is the steady state
    count_flops: bool = True         # count the steady step's FLOPs (a dispatch mode more: slower)

    def __post_init__(self):
        if self.optimizer not in ("foreach", "fused"):
            raise ValueError(f"optimizer must be 'foreach' or 'fused', got {self.optimizer!r}")
        if self.attn not in ("sdpa", "eager"):
            raise ValueError(f"attn must be 'sdpa' or 'eager', got {self.attn!r}")
        if self.amp_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"amp_dtype must be None, 'bfloat16' or 'float16', got {self.amp_dtype!r}")
        if self.steps < 2:
            raise ValueError("steps must be >= 2: step 1 creates the optimizer state, the last one is steady")


@contextlib.contextmanager
def _autocast_cache_cleared_with_torch():
    """Clear the emulated weight cache whenever torch clears its own (autocast's outermost exit)."""
    orig = torch.clear_autocast_cache

    def clear():
        orig()
        _CACHE.clear()
    torch.clear_autocast_cache = clear
    try:
        yield
    finally:
        torch.clear_autocast_cache = orig
        _CACHE.clear()


def _patch_if_present(target: str, new):
    """``mock.patch`` when ``target`` exists in this torch/transformers version, else nothing to patch."""
    import importlib
    from unittest import mock
    mod, attr = target.rsplit(".", 1)
    try:
        present = hasattr(importlib.import_module(mod), attr)
    except ImportError:
        present = False
    return mock.patch(target, new) if present else contextlib.nullcontext()


def predict_step(gpu: str | GPU = "h200", model: str = "gpt2", batch: int = 8, seq: int = 512,
                 row="fp32 baseline", **options) -> dict:
    """Predict one training step's CUDA memory: peak allocated and reserved bytes, with a breakdown.

    ``row`` is a :class:`memopt_lib.bench.Row` or the name of one of the bench's rows. ``options`` are
    :class:`StepOptions` fields (``optimizer``, ``attn``, ``amp_dtype``, ``steps``, ``count_flops``). The step is
    replayed ``steps`` times; returned:

    * ``peak_allocated_bytes`` -- the last (steady-state) step's ``max_memory_allocated``;
    * ``peak_step1_bytes`` -- the first step's (it creates the optimizer state after its backward);
    * ``peak_reserved_bytes`` -- ``max_memory_reserved`` of the steady step when the cache is emptied
      before it (the bench's protocol); ``max_reserved_bytes`` -- the whole run's, never emptied;
    * ``breakdown_bytes`` -- what was alive at the peak (weights, gradients, optimizer, activations,
      temporaries; ``workspaces`` = cuBLAS), each block counted at its allocator size;
    * ``state_bytes`` -- weights / optimizer state bytes as tensors (unrounded);
    * ``sdpa_backends`` -- attention kernels chosen, with counts;
    * ``flops`` -- floating-point operations of the steady step (``FlopCounterMode``: matmuls and
      attention of forward, backward and checkpointing's recomputation; 2 per multiply-add; ``None`` with
      ``count_flops=False``);
      ``flops_by_dtype`` splits them by the dtype each kernel produced (bf16 tensor-core matmuls run
      several times faster than fp32 ones: a time model weights them differently);
    * ``host_transfer_bytes`` -- bytes the steady step moves between host and GPU (offloaded activations
      down and back, the host embedding's ids and rows; ``host_transfer_breakdown`` splits them); paged
      optimizer states move only under memory pressure and are not counted.
    """
    from ..bench import Row, rows_for
    from ..models import spec
    g = get_gpu(gpu)
    spec(model)  # clear error for an unknown model
    if batch < 1 or seq < 1:
        raise ValueError(f"batch and seq must be >= 1, got batch={batch}, seq={seq}")
    opts = StepOptions(**options)
    from ..models import model_config
    cfg = model_config(model)
    limit = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if limit and seq > limit:  # a GPU would fail with an index error; meta tensors would not notice
        raise ValueError(f"{model} has {limit} positions; --seq {seq} is longer (choose seq <= {limit})")
    if isinstance(row, str):
        table = {r.name.lower(): r for r in rows_for(model)}
        if row.lower() not in table:
            raise KeyError(f"unknown row {row!r} for {model}; rows: {[r.name for r in rows_for(model)]}")
        row = table[row.lower()]
    if not isinstance(row, Row):
        raise TypeError(f"row must be a bench Row or a row name, got {type(row).__name__}")
    replay = AllocatorReplay(g, CachingAllocator())
    sem = CudaSemantics(g)
    # the objects alive now (modules, imports) are never garbage: freezing them makes gc.collect() scan
    # only what the step creates (seconds -> milliseconds in a big process)
    gc.freeze()
    try:
        return _run(g, model, batch, seq, row, opts, replay, sem)
    finally:
        gc.unfreeze()


def _run(g: GPU, model: str, batch: int, seq: int, row, opts: StepOptions, replay: AllocatorReplay,
         sem: CudaSemantics) -> dict:
    """Compose, replay ``opts.steps`` steps, and read the allocator (see :func:`predict_step`)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    from ..recipe import compose
    from .target import MetaGPU
    peaks = []
    target = MetaGPU(g, replay, attn=opts.attn, optimizer=opts.optimizer,
                     amp_dtype=getattr(torch, opts.amp_dtype) if opts.amp_dtype else None)
    # fused AdamW checks for a GPU-like device; its meta kernel allocates exactly what the CUDA one does
    # (two moment buffers, a device-side step counter per tensor, no temporaries)
    with _patch_if_present("torch.optim.adam._device_dtype_check_for_fused", lambda p, cuda_unsupported=False: None), \
            _patch_if_present("transformers.masking_utils.find_packed_sequence_indices", lambda position_ids: None), \
            _autocast_cache_cleared_with_torch(), sem, replay, torch.autograd.graph.saved_tensors_hooks(
            replay.pack_hook, lambda x: x):
        c = compose(row.recipe, model, target)
        m = c.model
        h1 = register_optimizer_step_pre_hook(
            lambda o, a, k: replay.tag(replay.grads, [p.grad for p in m.parameters() if p.grad is not None]))
        h2 = register_optimizer_step_post_hook(
            lambda o, a, k: replay.tag(replay.optim, [t for st in o.state.values() for t in st.values()
                                                      if isinstance(t, torch.Tensor)]))
        try:
            replay.tag(replay.weights, list(m.parameters()) + list(m.buffers()))
            ids = torch.empty(batch, seq, dtype=torch.long, device="meta")
            data = {"input_ids": ids, "labels": ids.clone()}
            mask = torch.empty_like(ids)  # noqa: F841 -- allocated as the bench's batch is (see module doc)
            k = min(row.recipe.micro_batches, batch)
            tokens = [len(r) * (seq - 1) for r in torch.arange(batch).tensor_split(k)]  # unpadded rows
            reserved_run, flops, flops_by_dtype, moved = 0, None, None, {}
            for i in range(opts.steps):
                last = i == opts.steps - 1
                if last:
                    gc.collect()
                    reserved_run = replay.alloc.peak_reserved_bytes
                    replay.alloc.empty_cache()  # the bench's settle(): empty_cache + reset_peak_memory_stats
                    before = _host_bytes(m, target)
                counter = FlopCount() if last and opts.count_flops else contextlib.nullcontext()
                replay.start_measuring()
                with counter:
                    c.step(data, target_tokens=tokens)
                replay.stop_measuring()
                if last:
                    if opts.count_flops:
                        flops, flops_by_dtype = counter.total, dict(counter.by_dtype)
                    moved = {k: v - before[k] for k, v in _host_bytes(m, target).items()}
                peaks.append((replay.alloc.peak_allocated_bytes, replay.alloc.peak_reserved_bytes,
                              dict(replay.peak_sizes), replay.peak_phase))
            opt = c.optimizer
            weights = sum(_storage_bytes(t) for t in _unique(list(m.parameters()) + list(m.buffers()))
                          if t.untyped_storage()._cdata not in replay.host_keys)
            opt_bytes = sum(_storage_bytes(t) for t in _unique(
                t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)
                and t.device.type == "meta"))
            trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        finally:
            h1.remove()
            h2.remove()
    peak, reserved, sizes, phase = peaks[-1]
    return {"gpu": g.name, "model": model, "batch": batch, "seq": seq, "row": row.name,
            "options": {f: getattr(opts, f) for f in ("optimizer", "attn", "amp_dtype", "steps")},
            "peak_allocated_bytes": peak, "peak_step1_bytes": peaks[0][0],
            "peak_reserved_bytes": reserved, "max_reserved_bytes": max(reserved_run, reserved),
            "peak_phase": phase, "breakdown_bytes": replay.breakdown(sizes),
            "state_bytes": {"weights": weights, "optimizer": opt_bytes}, "trainable_params": trainable,
            "flops": flops, "flops_by_dtype": flops_by_dtype,
            "host_transfer_bytes": sum(moved.values()), "host_transfer_breakdown": moved,
            "sdpa_backends": dict(sem.sdpa_backends), "predicted": True}


class FlopCount(TorchDispatchMode):
    """``FlopCounterMode``'s formulas (``torch.utils.flop_counter.flop_registry``), and nothing else.

    ``FlopCounterMode`` itself is not used in the measured step: its module tracker (hooks on every module's
    inputs and outputs, for the per-module table) keeps tensors alive that non-reentrant checkpointing would
    free -- measured here: GPT-2 B8 x 512 with checkpointing predicted 4.97 GiB instead of 3.93. This mode
    only looks each op up in the same registry (plus bitsandbytes' 4-bit matmul) after running it.
    """

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry, shape_wrapper
        self.registry = dict(flop_registry)
        try:
            from .bnb4bit import flop_formulas
            self.registry.update({k: shape_wrapper(v) for k, v in flop_formulas().items()})
        except (ImportError, AttributeError):  # no bitsandbytes: no 4-bit recipe runs either
            pass
        self.total = 0
        self.by_dtype: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            n = int(formula(*args, **kwargs, out_val=out))
            self.total += n
            first = out if isinstance(out, torch.Tensor) else next(
                (t for t in (out if isinstance(out, (tuple, list)) else ()) if isinstance(t, torch.Tensor)), None)
            key = str(first.dtype).removeprefix("torch.") if first is not None else "unknown"
            self.by_dtype[key] = self.by_dtype.get(key, 0) + n  # the dtype a kernel runs in sets its speed
        return out


def _host_bytes(model, target) -> dict[str, int]:
    """Bytes over the host link so far: activation offloading (each way) and host embeddings' copies."""
    return {"activations_to_host": sum(o.stats.to_host_bytes for o in target.offloaders),
            "activations_to_device": sum(o.stats.to_device_bytes for o in target.offloaders),
            "embedding": sum(getattr(mod, "moved_bytes", 0) for mod in model.modules())}


def _unique(tensors):
    seen = set()
    for t in tensors:
        k = t.untyped_storage()._cdata
        if k not in seen:
            seen.add(k)
            yield t


def _storage_bytes(t) -> int:
    return t.untyped_storage().nbytes()
