"""Gradient (activation) checkpointing: keep each block's input, recompute the rest in backward.

What it saves: activations. Without it, every transformer block keeps what its
backward needs -- LayerNorm inputs, q/k/v, the attention output, the MLP's
4x-wide hidden state, dropout masks -- roughly ``34 * batch * seq * hidden``
bytes per block in 16-bit (Korthikanti et al. 2022), more on CPU where attention
with dropout falls back to the math kernel and also stores the
``batch * heads * seq * seq`` attention matrices. With a block checkpointed, only
its input (``batch * seq * hidden`` values) is kept; the backward runs the
block's forward again to rebuild the rest, one block at a time.
What it costs: one extra forward of every checkpointed block per step (a forward
is about a third of forward+backward, so up to ~+33 % compute, more where the
recomputed kernels are the slow ones). Weights, gradients and optimizer state do
not change.

Three things go wrong in practice, and this module guards against each:

* **Eval mode.** Hugging Face blocks only checkpoint while ``module.training`` is
  True, and ``from_pretrained`` returns a model in eval mode. Enable it and
  forget ``model.train()``: no error, no saving. :func:`enable_checkpointing`
  calls ``train()``; :func:`checkpointing_active` proves it by measurement.
* **Reentrant checkpointing with frozen inputs.** ``use_reentrant=True`` (the old
  default) only builds a graph through a block if one of its *inputs* requires
  grad. With frozen embeddings (LoRA/PEFT), the hidden states entering the first
  block do not, so the adapters inside get no gradient (and torch warns "None of
  the inputs have requires_grad=True"). Fix: ``use_reentrant=False`` (the default
  here), or ``model.enable_input_require_grads()``.
* **The KV cache.** A training forward of a transformers 5 model may build a
  cache; a recomputed block would write it twice. Blocks wrapped here get none.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

_CACHE_KWARGS = ("cache", "past_key_values", "layer_past")


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The repeated decoder blocks of a model: its longest ``nn.ModuleList`` (GPT-2 ``h``, Llama ``layers``)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks to checkpoint")
    return max(lists, key=len)


def _is_cache(x) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(x, Cache)


def checkpoint_blocks(model: torch.nn.Module, *, every: int = 1, use_reentrant: bool = False) -> torch.nn.Module:
    """Wrap the forward of every ``every``-th block (0, every, 2*every, ...) in ``torch.utils.checkpoint``.

    The placement is yours: ``every=1`` keeps one input per block (least memory),
    ``every=2`` checkpoints half the blocks and keeps the others' activations
    (less recompute). Unlike Hugging Face's switch, this does not depend on
    ``model.training``; it is on whenever gradients are enabled.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1 (checkpoint every k-th block), got {every}")
    blocks = transformer_blocks(model)
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # a KV cache is useless in training; unwrapped blocks would still fill it
    for i, block in enumerate(blocks):
        if i % every == 0 and not hasattr(block, "_memopt_plain_forward"):
            block._memopt_plain_forward = block.forward
            block.forward = functools.partial(_checkpointed_forward, block, use_reentrant)
    return model


def _checkpointed_forward(block: torch.nn.Module, use_reentrant: bool, *args, **kwargs):
    plain = block._memopt_plain_forward
    if not torch.is_grad_enabled():  # nothing will be recomputed: run as is
        return plain(*args, **kwargs)
    # a cache written in the forward would be written again by the recompute
    args = tuple(None if _is_cache(a) else a for a in args)
    for key in _CACHE_KWARGS:
        if kwargs.get(key) is not None:
            kwargs[key] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    # reentrant checkpoint accepts tensors only as positional args; bind the rest like transformers does
    return checkpoint(functools.partial(plain, **kwargs), *args, use_reentrant=use_reentrant)


def uncheckpoint_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`checkpoint_blocks`."""
    for block in transformer_blocks(model):
        if hasattr(block, "_memopt_plain_forward"):
            block.forward = block._memopt_plain_forward
            del block._memopt_plain_forward
    return model


def enable_checkpointing(model, *, use_reentrant: bool = False, every_n_layers: int = 1, train: bool = True):
    """transformers' checkpointing with the defaults that work, and ``model.train()``.

    Uses ``activation_checkpointing_enable`` (transformers >= 5.2x) or the older
    ``gradient_checkpointing_enable`` with ``{"use_reentrant": use_reentrant}``.
    ``train=True`` matters: blocks do not checkpoint in eval mode. Input
    embeddings are made to require grad (as transformers does for PEFT), which
    reentrant checkpointing needs when the embeddings are frozen.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support Hugging Face gradient checkpointing; "
                         "use checkpoint_blocks(model) instead")
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)
    else:
        if every_n_layers != 1:
            raise ValueError("every_n_layers needs a transformers version with activation_checkpointing_enable")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if train:
        model.train()
    return model


def checkpointing_enabled(model: torch.nn.Module) -> bool:
    """The switches, read (cheap): will the next training forward checkpoint some block?

    True when a Hugging Face layer has ``gradient_checkpointing`` set *and* is in train mode (eval mode
    silently skips it), or a block is wrapped by :func:`checkpoint_blocks`. It reads flags; for proof by
    measurement use :func:`checkpointing_active`.
    """
    hf = any(getattr(m, "gradient_checkpointing", False) and m.training for m in model.modules())
    try:
        wrapped = any(hasattr(b, "_memopt_plain_forward") for b in transformer_blocks(model))
    except ValueError:
        wrapped = False
    return hf or wrapped


@contextmanager
def checkpointing_disabled(model: torch.nn.Module):
    """Temporarily switch off Hugging Face's and :func:`checkpoint_blocks`'s checkpointing (to measure without)."""
    flags = [(m, m.gradient_checkpointing) for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    wrapped = [b for b in transformer_blocks(model) if hasattr(b, "_memopt_plain_forward")]
    saved = [(b, b.forward) for b in wrapped]
    try:
        for m, _ in flags:
            m.gradient_checkpointing = False
        for b in wrapped:
            b.forward = b._memopt_plain_forward
        yield model
    finally:
        for m, v in flags:
            m.gradient_checkpointing = v
        for b, fwd in saved:
            b.forward = fwd


def block_activation_bytes(model: torch.nn.Module, batch: dict, device: torch.device | str | None = None) -> int:
    """Bytes the decoder blocks leave alive for backward after one forward, measured by the tracker.

    Live bytes when the last block returns minus live bytes when the first block
    starts: what the stack of blocks holds for its backward (plus the hidden
    state it returns). The model's mode is left as it is -- that is the point.
    """
    from .profiler import MemoryTracker
    device = torch.device(device) if device is not None else next(model.parameters()).device
    blocks = transformer_blocks(model)
    marks: dict[str, int] = {}

    def mark(name):
        def hook(*_):  # a hook must return None: a pre-hook's return value would replace the block's inputs
            marks.setdefault(name, tracker.current_bytes) if name == "start" else marks.__setitem__(name,
                                                                                              tracker.current_bytes)
        return hook

    # include_existing=False skips the tracker's scan of every Python object (slow in a notebook, and it
    # would count garbage freed mid-forward); the weights are registered so views of them are not "new"
    with MemoryTracker(device, model=model, include_existing=False, timeline=False) as tracker:
        for t in list(model.parameters()) + list(model.buffers()):
            tracker._register(t)
        h1 = blocks[0].register_forward_pre_hook(mark("start"))
        h2 = blocks[-1].register_forward_hook(mark("end"))
        try:
            with torch.enable_grad():
                out = model(**batch)
        finally:
            h1.remove()
            h2.remove()
        del out
    if "start" not in marks or "end" not in marks:
        raise RuntimeError("the forward never ran the model's blocks; is this a decoder-only model?")
    return marks["end"] - marks["start"]


def block_kept_bytes(model: torch.nn.Module, batch: dict, device: torch.device | str | None = None) -> list[int]:
    """Bytes each decoder block leaves alive after one forward (live bytes after it minus before it).

    A checkpointed block keeps about its output (one hidden state); a plain one everything its backward needs
    (and a KV cache if one is built). Shows *which* blocks are checkpointed, not only how many.
    """
    from .profiler import MemoryTracker
    device = torch.device(device) if device is not None else next(model.parameters()).device
    blocks = transformer_blocks(model)
    before: dict[int, int] = {}
    kept: dict[int, int] = {}
    handles = []
    with MemoryTracker(device, model=model, include_existing=False, timeline=False) as tracker:
        for t in list(model.parameters()) + list(model.buffers()):
            tracker._register(t)
        def pre(i):
            def hook(*_):  # must return None: a pre-hook's return value would replace the block's inputs
                before.setdefault(i, tracker.current_bytes)
            return hook

        def post(i):
            def hook(*_):  # must return None: a hook's return value would replace the block's output
                kept.setdefault(i, tracker.current_bytes - before[i])
            return hook

        for i, b in enumerate(blocks):
            handles.append(b.register_forward_pre_hook(pre(i)))
            handles.append(b.register_forward_hook(post(i)))
        try:
            with torch.enable_grad():
                out = model(**batch)
        finally:
            for h in handles:
                h.remove()
        del out
    if len(kept) != len(blocks):
        raise RuntimeError("the forward did not run every block once")
    return [kept[i] for i in range(len(blocks))]


def predict_kept_bytes(n_layers: int, every: int, block_input_bytes: int, block_bytes: int) -> int:
    """Bytes the blocks keep when blocks 0, every, 2*every, ... are checkpointed: their inputs, the others all."""
    n_ckpt = len(range(0, n_layers, every))
    return n_ckpt * block_input_bytes + (n_layers - n_ckpt) * block_bytes


@dataclass
class CheckpointingProof:
    """The measurement behind :func:`checkpointing_active`. Truthy when checkpointing is active."""

    active: bool
    with_bytes: int       # block activations of the model as it is
    without_bytes: int    # the same forward without checkpointing (or the baseline model)
    ratio: float
    max_ratio: float

    def __bool__(self) -> bool:
        return self.active

    def __str__(self) -> str:
        from .profiler import fmt_bytes
        return (f"checkpointing {'ACTIVE' if self.active else 'NOT active'}: blocks keep "
                f"{fmt_bytes(self.with_bytes)} vs {fmt_bytes(self.without_bytes)} without "
                f"(ratio {self.ratio:.2f}, active means <= {self.max_ratio:.2f})")


def checkpointing_active(model: torch.nn.Module, batch: dict, *, baseline: torch.nn.Module | None = None,
                         max_ratio: float = 0.6) -> CheckpointingProof:
    """Prove checkpointing is on by measuring, not by reading a flag.

    Measures :func:`block_activation_bytes` of ``model`` and of the same forward
    without checkpointing: ``baseline`` if given (a copy of the model made before
    checkpointing was applied, in the same mode), else ``model`` itself inside
    :func:`checkpointing_disabled`. Active means the blocks keep at most
    ``max_ratio`` of what they keep without. ``max_ratio=0.6``: checkpointing every
    block keeps one hidden state per block, a small fraction of a block's
    activations; checkpointing every other block keeps about half.
    """
    with_bytes = block_activation_bytes(model, batch)
    if baseline is not None:
        without = block_activation_bytes(baseline, batch)
    else:
        with checkpointing_disabled(model):
            without = block_activation_bytes(model, batch)
    ratio = with_bytes / without if without > 0 else float("inf")
    return CheckpointingProof(ratio <= max_ratio, with_bytes, without, ratio, max_ratio)
