"""One recipe: a validated config that composes the course's techniques into a model, an optimizer and a step.

The recipe builds nothing itself (torchtune's single-device LoRA recipe is the model). It asks each technique's
module for its piece:

==========================  ============================================================  ===============
field                       piece                                                         module
==========================  ============================================================  ===============
``precision``               ``PrecisionConfig``, ``apply_precision``, autocast, scaler    mixed_precision
``quantization``            ``load_quantized`` (4-bit NF4, double quantization)           quantization
``prepare="peft"``          peft's ``prepare_model_for_kbit_training`` (the default stack)  peft
``embedding``, ``lm_head``  ``place_vocab_matrices`` (bf16 / 8-bit / host)                placement
``checkpointing``           ``enable_checkpointing`` (non-reentrant, train mode)          checkpointing
``lora_rank``               ``apply_lora``                                                lora
``optimizer``               ``make_optimizer`` (AdamW, 8-bit, paged 8-bit)                quantization
``optimizer_in_backward``   ``OptimizerInBackward``                                       optimizer_in_backward
``chunked_loss``            ``chunked_loss_fn`` (never the full logits)                   chunked_loss
``micro_batches``           ``split_batch``, ``accumulation_step`` (token-normalized)     accumulation
``offload_activations``     ``offload_activations`` (saved tensors wait in host memory)   offload_activations
==========================  ============================================================  ===============

and the training step reads the same whatever is on: ``zero_grad`` -> per micro-batch ``autocast(loss_fn)`` ->
``scaler.scale(loss).backward()`` -> ``scaler.step(optimizer)``. A feature that is off is a no-op object
(``nullcontext``, ``GradScaler(enabled=False)``, the model's own loss), never a branch. The bench's rows, the
capstone's recipes and ``.ci/gpu_check.py`` are :class:`Recipe` values handed to :func:`compose`.

**Where it is built** is a :class:`Target`: the real device by default. Its few methods (load the base model,
resolve the precision, build an optimizer, make the autocast, the host-embedding and the offloading
objects) are the only places where a build depends on the machine; :mod:`memopt_lib.predict` overrides them
with meta-device stand-ins (a meta-born model "moved to the GPU", bitsandbytes' 4-bit storage and 8-bit
AdamW, host tensors outside the GPU's allocator) and then runs *this* compose and *this* step.

``precision="auto"`` is the capstone's choice: autocast on a CUDA GPU (bf16 from compute capability 8.0, fp16 and
a GradScaler below, e.g. a T4), fp32 on a CPU (most CPUs emulate bf16 matmuls, slower than fp32:
``mixed_precision.bf16_cost`` measures it).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch

from . import accumulation, checkpointing, lora, mixed_precision, placement, quantization
from .chunked_loss import chunked_loss_fn
from .offload_activations import OffloadActivations
from .optimizer_in_backward import OptimizerInBackward

PRECISIONS = ("fp32", "amp", "pure-bf16", "auto")
QUANTIZATIONS = ("", "nf4", "nf4-dq")
PREPARES = ("lean", "peft")


@dataclass(frozen=True)
class Recipe:
    """Which techniques are on. Validated on construction; every error names the fix."""

    name: str = "custom"
    precision: str = "fp32"            # fp32 | amp (autocast) | pure-bf16 | auto (amp on CUDA, fp32 on CPU)
    quantization: str = ""             # "" | "nf4" | "nf4-dq": the base's Linear layers in 4 bits (frozen)
    prepare: str = "lean"              # 4-bit base: "lean" (freeze, keep dtypes) | "peft" (prepare_model_for_kbit_training)
    lora_rank: int = 0                 # 0: full fine-tuning; r > 0: peft LoRA, base frozen
    lora_targets: tuple[str, ...] | None = None  # None: lora.DEFAULT_TARGETS of the model's family
    lora_dropout: float = 0.05
    checkpointing: bool = False        # Hugging Face gradient checkpointing, non-reentrant, train mode
    micro_batches: int = 1             # gradient accumulation: the batch runs as this many micro-batches
    optimizer: str = "adamw"           # adamw | adamw_8bit | paged_adamw_8bit
    optimizer_in_backward: bool = False  # each parameter's update inside backward; its gradient freed at once
    chunked_loss: bool = False         # cross-entropy in chunks of loss_chunk_tokens, never the full logits
    loss_chunk_tokens: int = 1024
    embedding: str = "keep"            # keep | bf16 | 8bit | host (frozen models: LoRA / QLoRA)
    lm_head: str = "keep"              # keep | bf16 | 8bit
    offload_activations: bool = False  # tensors saved for backward wait in host memory (lab 08)
    lr: float = 1e-4
    notes: str = field(default="", compare=False)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS} ('' = none), got {self.quantization!r}")
        if self.prepare not in PREPARES:
            raise ValueError(f"prepare must be one of {PREPARES}, got {self.prepare!r}")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora_rank must be an int >= 0 (0 = full fine-tuning), got {self.lora_rank!r}")
        if self.quantization and self.lora_rank == 0:
            raise ValueError("a 4-bit base cannot be trained: set lora_rank (e.g. 16) to train adapters on it")
        if self.quantization and self.precision == "pure-bf16":
            raise ValueError("pure-bf16 casts weights, 4-bit weights cannot be cast: use precision='amp' or 'auto'")
        if self.prepare == "peft" and not self.quantization:
            raise ValueError("prepare='peft' is prepare_model_for_kbit_training, for a 4-bit base: set "
                             "quantization='nf4-dq' or leave prepare='lean'")
        if not isinstance(self.micro_batches, int) or self.micro_batches < 1:
            raise ValueError(f"micro_batches must be an int >= 1, got {self.micro_batches!r}")
        if self.optimizer not in quantization.OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {quantization.OPTIMIZERS}, got {self.optimizer!r}")
        if self.optimizer_in_backward and self.micro_batches > 1:
            raise ValueError("optimizer_in_backward steps inside every backward, so micro-batches cannot add up: "
                             "use micro_batches=1, or optimizer_in_backward=False to accumulate")
        if not isinstance(self.loss_chunk_tokens, int) or self.loss_chunk_tokens < 1:
            raise ValueError(f"loss_chunk_tokens must be a positive int, got {self.loss_chunk_tokens!r}")
        if self.embedding not in placement.EMBEDDING_PLACEMENTS:
            raise ValueError(f"embedding must be one of {placement.EMBEDDING_PLACEMENTS}, got {self.embedding!r}")
        if self.lm_head not in placement.HEAD_PLACEMENTS:
            raise ValueError(f"lm_head must be one of {placement.HEAD_PLACEMENTS}, got {self.lm_head!r}")
        if (self.embedding, self.lm_head) != ("keep", "keep") and self.lora_rank == 0:
            raise ValueError("embedding/lm_head placement is for frozen matrices: set lora_rank > 0, or keep both")
        if not isinstance(self.offload_activations, bool):
            raise ValueError(f"offload_activations must be True or False, got {self.offload_activations!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def to_dict(self) -> dict:
        """Plain data (JSON): what the bench writes as a row's ``flags``."""
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets) if self.lora_targets is not None else None
        return d

    def with_(self, **changes) -> "Recipe":
        """A copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)


def resolve_precision(recipe: Recipe, device: torch.device | str, capability: tuple[int, int] | None = None,
                      amp_dtype: torch.dtype | None = None) -> mixed_precision.PrecisionConfig:
    """The recipe's precision for ``device``, dtype resolved by :mod:`memopt_lib.mixed_precision`.

    ``"auto"``: autocast where the device has a compute capability (CUDA), fp32 elsewhere. The 16-bit dtype
    is ``mixed_precision.default_dtype(capability)``: bf16 from 8.0, fp16 below (with a GradScaler).
    ``capability`` stands in for the device's (a predictor's named GPU); ``amp_dtype`` forces autocast's dtype.
    """
    device = torch.device(device)
    cap = capability if capability is not None else mixed_precision.capability_of(device)
    mode = recipe.precision
    if mode == "auto":
        mode = "amp" if cap is not None else "fp32"
    if mode == "amp" and (capability is not None or amp_dtype is not None):
        return mixed_precision.PrecisionConfig("amp", amp_dtype or mixed_precision.default_dtype(cap))
    return mixed_precision.PrecisionConfig(mode).resolved(device)


def load_dtype(recipe: Recipe, prec: mixed_precision.PrecisionConfig) -> torch.dtype:
    """The dtype the base loads in: bf16 for pure bf16; a 4-bit base's other weights in the compute dtype."""
    if recipe.quantization:
        return prec.dtype if prec.mode == "amp" else torch.float32
    return torch.bfloat16 if prec.mode == "pure-bf16" else torch.float32


class Target:
    """Where :func:`compose` builds: a real device (this class) or a stand-in (a subclass, e.g. the predictor's).

    Each method is one machine-dependent piece of the build; everything else (the order of the techniques,
    freezing, placement, checkpointing, LoRA, the optimizer in backward, the loss, the step) is compose's.
    """

    host = placement.HostEmbedding          # the class that keeps an embedding table in host memory

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def precision(self, recipe: Recipe) -> mixed_precision.PrecisionConfig:
        return resolve_precision(recipe, self.device)

    def load(self, recipe: Recipe, model_name: str, prec) -> torch.nn.Module:
        """The base model on the device, in :func:`load_dtype` (4-bit linear layers for a quantized recipe)."""
        from .models import load_model
        dtype = load_dtype(recipe, prec)
        if recipe.quantization:
            # the non-4-bit weights (embeddings, lm_head, norms) load in the compute dtype and stay there
            return quantization.load_quantized(model_name, bits=4, quant_type="nf4",
                                               double_quant=recipe.quantization == "nf4-dq", compute_dtype=dtype,
                                               dtype=dtype, device=self.device, train=True)
        model = load_model(model_name, train=True, dtype=dtype).to(self.device)
        return mixed_precision.apply_precision(model, prec, self.device)

    def after_prepare(self) -> None:
        """``prepare_model_for_kbit_training`` empties the CUDA cache itself on a GPU: nothing to add here."""

    def make_optimizer(self, params: list, kind: str, lr: float) -> torch.optim.Optimizer:
        return quantization.make_optimizer(params, kind=kind, lr=lr, device=self.device)

    def autocast(self, prec) -> Callable:
        return mixed_precision.autocast_factory(prec, self.device)

    def scaler(self, prec) -> torch.amp.GradScaler:
        return mixed_precision.make_scaler(prec, self.device)

    def offloader(self, model: torch.nn.Module) -> OffloadActivations:
        return OffloadActivations(model=model)


@dataclass
class Composed:
    """What :func:`compose` built: call ``step(batch) -> loss`` (the batch's token-mean loss, a float)."""

    recipe: Recipe
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    precision: mixed_precision.PrecisionConfig
    scaler: torch.amp.GradScaler
    autocast: Callable
    loss_fn: Callable | None
    device: torch.device
    offload: OffloadActivations | None = None
    last: accumulation.AccumulationResult | None = None

    def step(self, batch: dict, *, target_tokens: list[int] | None = None) -> float:
        """One optimizer step over ``batch``: ``micro_batches`` pieces, token-normalized, one update.

        ``target_tokens``: each micro-batch's target-token count when it is known without reading the labels
        (an unpadded batch: ``rows x (seq - 1)``; a predictor's meta tensors have no values); default: counted.
        """
        rows = batch["input_ids"].shape[0]
        micro = accumulation.split_batch(batch, min(self.recipe.micro_batches, rows))
        self.last = accumulation.accumulation_step(self.model, micro, self.optimizer, autocast=self.context,
                                                   scaler=self.scaler, loss_fn=self.loss_fn,
                                                   target_tokens=target_tokens)
        return self.last.loss

    def context(self) -> contextlib.AbstractContextManager:
        """What each micro-batch's forward runs under: the recipe's autocast, then its activation offloading."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.autocast())
        if self.offload is not None:
            stack.enter_context(self.offload)
        return stack


def compose(recipe: Recipe, model_name: str, device: torch.device | str | Target = "cpu") -> Composed:
    """Build ``recipe`` for course model ``model_name`` on ``device`` (or a :class:`Target`): a fresh model,
    its optimizer, its step."""
    if not isinstance(recipe, Recipe):
        raise TypeError(f"compose() takes a Recipe, got {type(recipe).__name__}")
    target = device if isinstance(device, Target) else Target(device)
    device = target.device
    prec = target.precision(recipe)
    if recipe.optimizer_in_backward and prec.needs_scaler:
        raise ValueError("fp16 autocast needs a GradScaler, which must see every gradient before any update; "
                         "optimizer_in_backward updates during backward. On this GPU (no native bf16) set "
                         "optimizer_in_backward=False")
    model = target.load(recipe, model_name, prec)
    if recipe.prepare == "peft":
        from peft import prepare_model_for_kbit_training
        # freezes the base, upcasts every non-4-bit parameter to fp32 (+0.49 GiB at 7B), turns checkpointing on
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        target.after_prepare()
    elif recipe.lora_rank:
        for p in model.parameters():
            p.requires_grad_(False)  # no gradient, no optimizer state for the base
    model.config.use_cache = False  # a KV cache is for generation; in training it costs memory
    # placement before checkpointing: enable_checkpointing hooks the embedding module that is there now
    placement.place_vocab_matrices(model, embedding=recipe.embedding, lm_head=recipe.lm_head, device=device,
                                   host_embedding=target.host)
    if recipe.checkpointing and recipe.prepare != "peft":
        checkpointing.enable_checkpointing(model)
    if recipe.lora_rank:
        model = lora.apply_lora(model, r=recipe.lora_rank, targets=recipe.lora_targets, dropout=recipe.lora_dropout)
    model.train()  # HF checkpointing is silently off in eval mode
    params = [p for p in model.parameters() if p.requires_grad]
    kind = recipe.optimizer
    if kind == "paged_adamw_8bit" and device.type not in ("cuda", "meta") and recipe.optimizer_in_backward:
        kind = "adamw_8bit"  # one notice (make_optimizer's) instead of one per parameter

    def make(ps):
        return target.make_optimizer(ps, kind, recipe.lr)

    optimizer = OptimizerInBackward(params, make) if recipe.optimizer_in_backward else make(params)
    loss_fn = chunked_loss_fn(recipe.loss_chunk_tokens) if recipe.chunked_loss else None
    offload = target.offloader(model) if recipe.offload_activations else None
    return Composed(recipe, model, optimizer, prec, target.scaler(prec), target.autocast(prec), loss_fn, device,
                    offload)


def micro_batches_for(batch_rows: int, micro_batch_rows: int | None) -> int:
    """How many micro-batches give pieces of at most ``micro_batch_rows`` rows (``None``: one)."""
    if micro_batch_rows is None:
        return 1
    if micro_batch_rows < 1:
        raise ValueError(f"micro_batch must be >= 1 row, got {micro_batch_rows}")
    return max(1, math.ceil(batch_rows / micro_batch_rows))


# ------------------------------------------------------------------------------------------- named recipes
FP32 = Recipe("fp32 baseline")
QLORA_DEFAULT = Recipe(
    "QLoRA default", precision="auto", quantization="nf4-dq", prepare="peft", lora_rank=16, checkpointing=True,
    optimizer="adamw", lr=2e-4,
    notes="HF + PEFT as the H200 anchors measured it: prepare_model_for_kbit_training, AdamW, full batch")
QLORA_LEAN = Recipe(
    "QLoRA lean", precision="auto", quantization="nf4-dq", prepare="lean", lora_rank=16, checkpointing=True,
    optimizer="paged_adamw_8bit", lr=2e-4,
    notes="the capstone: no fp32 upcast, non-reentrant checkpointing, paged 8-bit AdamW; micro-batches per run")
MEMOPT_LLAMA = Recipe(
    "memopt recipe", precision="auto", quantization="nf4-dq", prepare="lean", lora_rank=16, checkpointing=True,
    optimizer="adamw_8bit", optimizer_in_backward=True, chunked_loss=True, embedding="host", lm_head="8bit",
    lr=2e-4, notes="QLoRA lean + chunked cross-entropy + optimizer in backward + host embedding + 8-bit lm_head")
MEMOPT_GPT2 = Recipe(
    "memopt recipe", precision="amp", checkpointing=True, optimizer="adamw_8bit", optimizer_in_backward=True,
    chunked_loss=True, notes="full fine-tuning: bf16 autocast (fp32 master weights), checkpointing, chunked "
                             "cross-entropy, 8-bit AdamW stepped in backward")


def memopt_recipe(model_name: str) -> Recipe:
    """memopt's recipe for a course model: full fine-tuning for GPT-2, QLoRA for the Llama family."""
    from .models import spec
    return MEMOPT_LLAMA if spec(model_name).family == "llama" else MEMOPT_GPT2
