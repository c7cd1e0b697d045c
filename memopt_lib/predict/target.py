"""The predictor's :class:`~memopt_lib.recipe.Target`: :func:`memopt_lib.recipe.compose` on a meta "GPU".

The predictor does not build models. It hands :func:`~memopt_lib.recipe.compose` this target and runs the
:class:`~memopt_lib.recipe.Composed` step that the bench runs; only the machine-dependent pieces differ:

* **load** -- the weights are born on the meta device from the model's config (no checkpoint is read; a 7B
  costs nothing) and then "moved to the GPU" in the order ``model.to("cuda")`` moves them, so the allocator
  sees the same sequence of allocations; a 4-bit recipe gets bitsandbytes' own ``Linear4bit`` /
  ``Params4bit`` with the storage ``from_pretrained(load_in_4bit=True)`` leaves
  (:func:`memopt_lib.predict.bnb4bit.quantize_to_4bit`). Like :func:`memopt_lib.models.load_model` it names
  the loss; it does not swap dropout modules (:class:`~memopt_lib.predict.cuda_semantics.CudaSemantics`
  already gives every dropout CUDA's 1-byte mask) nor zero GPT-2's attention dropout (fused attention keeps
  the same bytes either way; the eager-attention anchor was measured with it on).
* **precision** -- the named GPU's capability decides ``"auto"`` and autocast's dtype (bf16 from sm80, fp16
  before), unless a dtype is forced; autocast is :func:`~memopt_lib.predict.cuda_semantics.cuda_autocast`.
* **optimizer** -- torch AdamW with the implementation CUDA picks (``foreach``, or ``fused`` when asked; on
  meta torch would fall back to its for-loop); bitsandbytes' 8-bit / paged AdamW as
  :class:`~memopt_lib.predict.bnb4bit.AdamW8bitStandIn`.
* **GradScaler** -- disabled (on meta it cannot run); a real one adds a few 512-byte scalars.
* **host memory** -- what a GPU keeps in host RAM is a meta tensor outside the replayed allocator: the
  host embedding's table (:class:`HostEmbeddingStandIn`) and offloaded activations
  (:class:`OffloadActivationsStandIn`, the CUDA path: side-stream copies, a stash of the last
  ``max_fwd_stash`` device tensors, restores as new device tensors). Both count the bytes that cross the
  host link.
* ``prepare_model_for_kbit_training`` empties the CUDA cache on a GPU: here the replayed allocator's.
"""
from __future__ import annotations

import contextlib

import torch

from ..offload_activations import OffloadActivations
from ..placement import HostEmbedding
from ..recipe import Recipe, Target, load_dtype, resolve_precision
from .cuda_semantics import cuda_autocast


def move_to_gpu(model: torch.nn.Module) -> None:
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


class MetaGPU(Target):
    """compose()'s target for a named GPU whose memory ``replay`` (an AllocatorReplay) replays."""

    def __init__(self, gpu, replay, *, attn: str = "sdpa", optimizer: str = "foreach",
                 amp_dtype: torch.dtype | None = None):
        super().__init__("meta")
        self.gpu, self.replay, self.attn, self.impl, self.amp_dtype = gpu, replay, attn, optimizer, amp_dtype
        self.offloaders: list[OffloadActivationsStandIn] = []
        target = self

        class Host(HostEmbeddingStandIn):
            replay = target.replay
        self.host = Host

    def precision(self, recipe: Recipe):
        return resolve_precision(recipe, self.device, capability=self.gpu.capability, amp_dtype=self.amp_dtype)

    def load(self, recipe: Recipe, model_name: str, prec) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        from ..mixed_precision import apply_precision
        from ..models import model_config, name_the_loss
        cfg = model_config(model_name)
        cfg.use_cache = False
        if self.attn == "eager":
            cfg._attn_implementation = "eager"
        dtype = load_dtype(recipe, prec)
        with self.replay.untracked(), torch.device("meta"):
            model = name_the_loss(AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=self.attn))
        model.config.use_cache = False
        if recipe.quantization:
            from .bnb4bit import quantize_to_4bit
            return quantize_to_4bit(model, double_quant=recipe.quantization == "nf4-dq", compute_dtype=dtype,
                                    replay=self.replay)
        move_to_gpu(model)
        return apply_precision(model, prec)

    def after_prepare(self) -> None:
        self.replay.alloc.empty_cache()  # prepare_model_for_kbit_training: torch.cuda.empty_cache()

    def make_optimizer(self, params: list, kind: str, lr: float) -> torch.optim.Optimizer:
        if kind == "adamw":
            kw = {"fused": True} if self.impl == "fused" else {"foreach": True}
            return torch.optim.AdamW(params, lr=lr, **kw)
        from .bnb4bit import AdamW8bitStandIn
        return AdamW8bitStandIn(params, lr=lr, paged=kind == "paged_adamw_8bit", replay=self.replay)

    def autocast(self, prec):
        if prec.mode != "amp":
            return contextlib.nullcontext
        return lambda: cuda_autocast(prec.dtype)

    def scaler(self, prec) -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cpu", enabled=False)

    def offloader(self, model: torch.nn.Module) -> OffloadActivations:
        off = OffloadActivationsStandIn(self.replay, model=model)
        self.offloaders.append(off)
        return off


class HostEmbeddingStandIn(HostEmbedding):
    """:class:`~memopt_lib.placement.HostEmbedding` with its table and lookup outside the GPU's allocator."""

    replay = None  # set by MetaGPU on a subclass

    def to_host(self, embedding: torch.nn.Embedding) -> torch.nn.Embedding:
        with self.replay.untracked():  # new host storages; the GPU copies die with the old tensors
            embedding._apply(lambda t: torch.empty_like(t))
        for t in embedding.parameters():
            self.replay.mark_host(t)
        return embedding

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        with self.replay.untracked():
            rows = self.inner(ids)      # on the host: ids copied down, the rows looked up there
        return torch.empty_like(rows)   # the host->device copy: a new device tensor


class OffloadActivationsStandIn(OffloadActivations):
    """:class:`~memopt_lib.offload_activations.OffloadActivations` on CUDA's path, with meta host copies."""

    def __init__(self, replay, *, model: torch.nn.Module, **kwargs):
        self.replay = replay
        super().__init__(model=None, pin_memory=True, **kwargs)
        self._weight_keys = {t.untyped_storage()._cdata for t in list(model.parameters()) + list(model.buffers())}

    def _is_weight(self, t: torch.Tensor) -> bool:
        return isinstance(t, torch.nn.Parameter) or t.untyped_storage()._cdata in self._weight_keys

    def _streams_for(self, device: torch.device) -> bool:
        return self.want_streams is not False  # a GPU overlaps the copies on a side stream

    def _pack(self, t):
        self.replay.pack_hook(t)  # still an activation in the breakdown while it is on the device
        return super()._pack(t)

    def _copy_out(self, t: torch.Tensor):
        self._retire_stash(keep=self.max_fwd_stash - 1)
        return self._host_copy(t, non_blocking=True), None

    def _wait(self, device, event) -> None:
        pass

    def _host_copy(self, t: torch.Tensor, non_blocking: bool) -> torch.Tensor:
        with self.replay.untracked():
            return torch.empty_like(t)

    def _copy_in(self, packed) -> torch.Tensor:
        self._retire_stash(keep=0)
        return torch.empty_like(packed.host)  # the restore: a new device tensor
