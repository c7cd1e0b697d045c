"""One training step of a course configuration, run on meta tensors and replayed as CUDA would run it.

The step is the bench's, i.e. :meth:`memopt_lib.recipe.Composed.step` (zero_grad(set_to_none), a forward per
micro-batch under the row's autocast, ``scaler.scale(loss).backward()``, ``scaler.step``; the loss scale,
token-normalized there, does not change memory, and counting tokens is impossible on meta tensors, so
:func:`_meta_step` divides by the number of micro-batches), on a model built the way
:func:`memopt_lib.recipe.compose` builds the row's :class:`~memopt_lib.recipe.Recipe` -- ``use_cache`` off, Hugging Face
checkpointing (non-reentrant) or ``prepare_model_for_kbit_training``, peft LoRA r=16 alpha=32 dropout
0.05 on the bench's targets, ``model.train()`` -- except that the weights are born on the meta device
from the model's config (no checkpoint is read; a 7B costs nothing) and then "moved to the GPU" in the
order ``model.to("cuda")`` moves them, so the allocator sees the same sequence of allocations.

What is modelled rather than run (each is documented where it is built):

* bitsandbytes 4-bit weights and its 4-bit matmul -> :mod:`memopt_lib.predict.bnb4bit`;
* bitsandbytes' 8-bit (and paged) AdamW -> :class:`memopt_lib.predict.bnb4bit.AdamW8bitStandIn`;
* ``GradScaler``: disabled (on meta it cannot run); a real one adds a few 512-byte scalars;
* the batch's all-ones ``attention_mask`` is allocated like the bench's but not passed to the model:
  transformers' ``sdpa_mask`` drops an all-ones mask on a GPU (``_ignore_causal_mask_sdpa``), which on
  meta tensors it cannot check. Likewise transformers' ``find_packed_sequence_indices`` (does the batch
  pack several sequences per row?) reads position ids; the bench's rows are one sequence each, so the
  predictor answers ``None`` (not packed) as the GPU computes it.
"""
from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, replace

import torch

from .allocator import CachingAllocator
from .gpus import GPU, gpu as get_gpu
from .cuda_semantics import _CACHE, CudaSemantics, cuda_autocast
from .replay import AllocatorReplay

GiB = float(1 << 30)


@dataclass(frozen=True)
class StepOptions:
    """What the bench's rows do not vary but the anchors do."""

    optimizer: str = "foreach"       # torch AdamW implementation: "foreach" (the CUDA default) or "fused"
    attn: str = "sdpa"               # attn_implementation: "sdpa" or "eager" (the math path)
    amp_dtype: str | None = None     # autocast dtype; None: bf16 where native, else fp16 (memopt's rule)
    steps: int = 3                   # steps replayed; the last one is the steady state

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


def _move_to_gpu(model: torch.nn.Module) -> None:
    """``model.to("cuda")``: one new storage per parameter/buffer, in ``Module._apply`` order."""
    done: set[int] = set()

    def fn(t):
        key = t.untyped_storage()._cdata
        if key in done:  # a tied weight is moved once
            return t
        out = torch.empty_like(t)
        done.add(out.untyped_storage()._cdata)
        return out
    model._apply(fn)


def _flags(rc):
    """The recipe fields this predictor models, as flags; a clear error for the ones it does not model yet."""
    from types import SimpleNamespace
    missing = [what for what, on in (("chunked_loss", rc.chunked_loss), ("optimizer_in_backward", rc.optimizer_in_backward),
                                      ("embedding/lm_head placement", (rc.embedding, rc.lm_head) != ("keep", "keep")),
                                      ("lean 4-bit preparation", bool(rc.quantization) and rc.prepare == "lean"))
               if on]
    if missing:
        raise NotImplementedError(f"the predictor does not model {', '.join(missing)} yet (recipe {rc.name!r})")
    return SimpleNamespace(name=rc.name, amp=rc.precision in ("amp", "auto"), pure_bf16=rc.precision == "pure-bf16",
                           ckpt=rc.checkpointing, accum=rc.micro_batches, lora=rc.lora_rank > 0,
                           opt8bit="8bit" in rc.optimizer, quant4=rc.quantization,
                           paged=rc.optimizer == "paged_adamw_8bit")


def _meta_step(model, opt, autocast, scaler, micro_batches):
    """The step's memory behaviour on meta tensors (see the module docstring for the loss scale)."""
    def step():
        opt.zero_grad(set_to_none=True)  # frees last step's gradients before the forward
        for mb in micro_batches:
            with autocast():
                loss = model(**mb).loss / len(micro_batches)
            scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.detach()
    return step


def _build(row, model_name: str, g: GPU, opts: StepOptions, replay: AllocatorReplay):
    from transformers import AutoModelForCausalLM

    from ..checkpointing import enable_checkpointing
    from ..lora import DEFAULT_TARGETS as LORA_TARGETS
    from ..lora import apply_lora
    from ..models import model_config, name_the_loss, spec
    row = _flags(row.recipe)
    family = spec(model_name).family
    cfg = model_config(model_name)
    cfg.use_cache = False  # a KV cache is for generation; in training it only costs memory
    if opts.attn == "eager":
        cfg._attn_implementation = "eager"
    adt = getattr(torch, opts.amp_dtype) if opts.amp_dtype else (torch.bfloat16 if g.native_bf16 else torch.float16)
    dtype = torch.bfloat16 if (row.pure_bf16 or row.quant4) else torch.float32
    with replay.untracked(), torch.device("meta"):
        model = name_the_loss(AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=opts.attn))
    model.config.use_cache = False
    if row.quant4:
        from .bnb4bit import quantize_to_4bit
        quantize_to_4bit(model, double_quant=row.quant4 == "nf4-dq", compute_dtype=adt, replay=replay)
    else:
        _move_to_gpu(model)
    if row.quant4:
        from peft import prepare_model_for_kbit_training
        # upcasts embeddings, lm_head and norms to fp32 (+0.49 GiB at 7B, see the H200 anchors)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=row.ckpt,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        replay.alloc.empty_cache()  # prepare_model_for_kbit_training calls torch.cuda.empty_cache() on a GPU
    elif row.ckpt:
        enable_checkpointing(model, use_reentrant=False)
    if row.lora or row.quant4:
        model = apply_lora(model, r=16, alpha=32, targets=list(LORA_TARGETS[family]), dropout=0.05)
    model.train()  # HF checkpointing is silently off in eval mode
    params = [p for p in model.parameters() if p.requires_grad]
    if row.opt8bit:
        from .bnb4bit import AdamW8bitStandIn
        opt = AdamW8bitStandIn(params, lr=1e-4, paged=row.paged, replay=replay)
    else:
        kw = {"fused": True} if opts.optimizer == "fused" else {"foreach": True}
        opt = torch.optim.AdamW(params, lr=1e-4, **kw)
    autocast = (lambda: cuda_autocast(adt)) if (row.amp or row.quant4) else contextlib.nullcontext
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, opt, autocast, scaler, cfg


def predict_step(gpu: str | GPU = "h200", model: str = "gpt2", batch: int = 8, seq: int = 512,
                 row="fp32 baseline", **options) -> dict:
    """Predict one training step's CUDA memory: peak allocated and reserved bytes, with a breakdown.

    ``row`` is a :class:`memopt_lib.bench.Row` or the name of one of the bench's rows. ``options`` are
    :class:`StepOptions` fields (``optimizer``, ``attn``, ``amp_dtype``, ``steps``). The step is
    replayed ``steps`` times; returned:

    * ``peak_allocated_bytes`` -- the last (steady-state) step's ``max_memory_allocated``;
    * ``peak_step1_bytes`` -- the first step's (it creates the optimizer state after its backward);
    * ``peak_reserved_bytes`` -- ``max_memory_reserved`` of the steady step when the cache is emptied
      before it (the bench's protocol); ``max_reserved_bytes`` -- the whole run's, never emptied;
    * ``breakdown_bytes`` -- what was alive at the peak (weights, gradients, optimizer, activations,
      temporaries; ``workspaces`` = cuBLAS), each block counted at its allocator size;
    * ``state_bytes`` -- weights / optimizer state bytes as tensors (unrounded);
    * ``sdpa_backends`` -- attention kernels chosen, with counts.
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
    """Build, replay ``opts.steps`` steps, and read the allocator (see :func:`predict_step`)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    peaks = []
    # fused AdamW checks for a GPU-like device; its meta kernel allocates exactly what the CUDA one does
    # (two moment buffers, a device-side step counter per tensor, no temporaries)
    with _patch_if_present("torch.optim.adam._device_dtype_check_for_fused", lambda p, cuda_unsupported=False: None), \
            _patch_if_present("transformers.masking_utils.find_packed_sequence_indices", lambda position_ids: None), \
            _autocast_cache_cleared_with_torch(), sem, replay, torch.autograd.graph.saved_tensors_hooks(
            replay.pack_hook, lambda x: x):
        m, opt, autocast, scaler, cfg = _build(row, model, g, opts, replay)
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
            micro = [{key: v[i::k] for key, v in data.items()} for i in range(k)]
            step = _meta_step(m, opt, autocast, scaler, micro)
            reserved_run = 0
            for i in range(opts.steps):
                if i == opts.steps - 1:
                    gc.collect()
                    reserved_run = replay.alloc.peak_reserved_bytes
                    replay.alloc.empty_cache()  # the bench's settle(): empty_cache + reset_peak_memory_stats
                replay.start_measuring()
                step()
                replay.stop_measuring()
                peaks.append((replay.alloc.peak_allocated_bytes, replay.alloc.peak_reserved_bytes,
                              dict(replay.peak_sizes), replay.peak_phase))
            weights = sum(_storage_bytes(t) for t in _unique(list(m.parameters()) + list(m.buffers())))
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
            "sdpa_backends": dict(sem.sdpa_backends), "predicted": True}


def _unique(tensors):
    seen = set()
    for t in tensors:
        k = t.untyped_storage()._cdata
        if k not in seen:
            seen.add(k)
            yield t


def _storage_bytes(t) -> int:
    return t.untyped_storage().nbytes()
