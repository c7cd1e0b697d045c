"""QLoRA: fine-tune a 7B model in the memory of a consumer GPU, and what each piece of the recipe buys.

The recipe (Dettmers et al., 2023), piece by piece -- what it saves, what it costs:

* **4-bit NF4 weights** (bitsandbytes ``Linear4bit``). Every frozen Linear weight is stored as 4-bit codes
  (0.5 byte/param) plus one absmax scale per block of 64 weights. *Double quantization* stores those scales
  in 8 bits plus one fp32 scale per 256 of them: 0.5 -> ~0.127 bit/param of scales, 0.28 GiB less at 7B.
  Cost: each matmul first dequantizes the layer's weight to the *compute dtype* (bf16; fp16 on GPUs
  without native bf16) -- time, and a transient bf16 copy of one weight.
* **LoRA adapters** (peft) on the frozen base: gradients and optimizer state exist only for
  ``r * (d_in + d_out)`` parameters per adapted matrix (16.8 M at r=16 on q,k,v,o of the 7B, kept in fp32).
* **Gradient checkpointing, non-reentrant**: each decoder layer keeps only its input for backward and
  recomputes the rest -- about one extra forward. Hugging Face checkpoints only in *train* mode, and
  ``from_pretrained`` returns *eval* mode: forget ``model.train()`` and checkpointing is silently off.
  The reentrant variant needs an input that requires grad (``enable_input_require_grads``, which
  transformers' ``gradient_checkpointing_enable`` installs itself), else nothing inside the checkpointed
  layers is connected to the loss and backward fails; the non-reentrant one does not need it.
* **Paged 8-bit AdamW** (bitsandbytes): two 8-bit states, 2 bytes/param instead of 8, in CUDA unified
  memory that the driver pages to host RAM under pressure instead of raising OOM. Paged buffers come from
  ``cudaMallocManaged``, outside PyTorch's allocator: ``max_memory_allocated`` does not count them, so
  the reports here add them (``extra["paged_state_bytes"]``). Without CUDA there is nothing to page.
* **Gradient accumulation**: the batch runs as micro-batches, each loss summed over its target tokens and
  divided by the *whole batch's* target-token count (token-normalized, lab 04); only one micro-batch's
  activations are alive at a time, the gradient is the full batch's, padded rows or not.

And one piece to leave out. peft's ``prepare_model_for_kbit_training`` (peft 0.21) freezes the base, casts
*every* fp16/bf16 parameter that is not 4-bit -- embeddings, lm_head, norms -- to fp32, enables input grads
(itself only for reentrant checkpointing) and turns checkpointing on. The upcast costs 2 bytes x 262 M parameters =
+0.49 GiB at 7B (the H200 anchors measure it), and fp32 norm weights make the residual stream fp32, which
doubles the bytes checkpointing keeps. Llama's RMSNorm already computes in fp32 inside; frozen bf16
embeddings are fine. :func:`prepare_lean` does only what training needs.

Every piece lives in its technique's module (``quantization``, ``checkpointing``, ``lora``, ``accumulation``,
``mixed_precision``); the capstone's two stacks are :mod:`memopt_lib.recipe` configurations
(``recipe.QLORA_DEFAULT``, ``recipe.QLORA_LEAN``) composed by ``recipe.compose``. This module adds the QLoRA
instruments (what a 4-bit model holds, what the upcast costs) and the reports of the capstone's GPU runs.
"""
from __future__ import annotations

import argparse
import gc
import json
from typing import Callable

import torch

from . import checkpointing, quantization, recipe
from .device import amp_dtype

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


# ---------------------------------------------------------------------------------------------- loading
def compute_dtype_for(device: torch.device | str) -> torch.dtype:
    """The dtype QLoRA computes (and keeps its non-4-bit weights) in on ``device``.

    CUDA: bf16 where it is native (compute capability >= 8.0), else fp16. CPU: fp32 -- CPUs without
    AVX512-BF16/AMX (most laptops, CI) run bf16 matmuls slower than fp32 (``mixed_precision.bf16_cost(emulated=True)`` measures it), and a CPU
    run measures *ratios*; the GPU numbers come from a GPU. (``recipe.resolve_precision`` with
    ``precision="auto"`` makes the same choice for a recipe.)
    """
    device = torch.device(device)
    return amp_dtype(device) if device.type == "cuda" else torch.float32


def load_4bit(model_name: str, *, device: torch.device | str = "cpu", double_quant: bool = True,
              compute_dtype: torch.dtype | None = None):
    """Load ``model_name`` with 4-bit NF4 Linear weights; everything else in ``compute_dtype``, train mode.

    ``compute_dtype`` defaults to :func:`compute_dtype_for` the device (bf16 on an H100, fp16 on a T4, fp32 on CPU).
    """
    compute_dtype = compute_dtype or compute_dtype_for(device)
    return quantization.load_quantized(model_name, bits=4, quant_type="nf4", double_quant=double_quant,
                                       compute_dtype=compute_dtype, dtype=compute_dtype, device=device, train=True)


def prepare_lean(model, *, checkpointing_on: bool = True, use_reentrant: bool = False):
    """What ``prepare_model_for_kbit_training`` does that QLoRA needs, without the fp32 upcast.

    Freezes every base parameter, turns on (non-reentrant) checkpointing
    (:func:`memopt_lib.checkpointing.enable_checkpointing`, which also calls ``model.train()``) and disables
    the KV cache (useless in training, and incompatible with checkpointing).
    """
    for p in model.parameters():
        p.requires_grad_(False)  # no gradient, no optimizer state for the base model
    if checkpointing_on:
        checkpointing.enable_checkpointing(model, use_reentrant=use_reentrant)
    model.config.use_cache = False
    model.train()  # from_pretrained returns eval mode, where HF checkpointing is silently skipped
    return model


def _qlora_recipe(base: recipe.Recipe, *, rank: int, double_quant: bool, **changes) -> recipe.Recipe:
    return base.with_(lora_rank=rank, quantization="nf4-dq" if double_quant else "nf4", **changes)


def build_lean(model_name: str, *, rank: int = 16, device: torch.device | str = "cpu", double_quant: bool = True,
               optimizer: str = "paged_adamw_8bit", lr: float = 2e-4, dropout: float = 0.05, targets=QKVO):
    """The memory-lean QLoRA recipe (``recipe.QLORA_LEAN``): 4-bit load, lean preparation, LoRA, paged 8-bit AdamW.

    Returns ``(model, optimizer)``; for the training step too, use ``recipe.compose(recipe.QLORA_LEAN, ...)``.
    """
    rc = _qlora_recipe(recipe.QLORA_LEAN, rank=rank, double_quant=double_quant, optimizer=optimizer, lr=lr,
                       lora_dropout=dropout, lora_targets=tuple(targets))
    c = recipe.compose(rc, model_name, device)
    return c.model, c.optimizer


def build_default(model_name: str, *, rank: int = 16, device: torch.device | str = "cpu",
                  double_quant: bool = True, lr: float = 2e-4):
    """The default Hugging Face + PEFT stack (``recipe.QLORA_DEFAULT``), as the H200 anchors measured it.

    4-bit NF4 load, ``prepare_model_for_kbit_training(use_gradient_checkpointing=True, use_reentrant=False)``
    (with its fp32 upcast), LoRA r/2r/0.05 on q,k,v,o, ``torch.optim.AdamW``, train mode, the full batch at once.
    """
    c = recipe.compose(_qlora_recipe(recipe.QLORA_DEFAULT, rank=rank, double_quant=double_quant, lr=lr),
                       model_name, device)
    return c.model, c.optimizer


# ---------------------------------------------------------------------------------------------- instruments
def param_bytes_by_dtype(model) -> dict[str, int]:
    """Parameter bytes per storage dtype; 4-bit weights show as ``"nf4"`` / ``"fp4"``."""
    out: dict[str, int] = {}
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        key = getattr(qs, "quant_type", None) or str(p.dtype).replace("torch.", "")
        out[key] = out.get(key, 0) + p.untyped_storage().nbytes()
    return out


def count_4bit_linears(model) -> int:
    """How many ``bitsandbytes.nn.Linear4bit`` modules the model holds."""
    import bitsandbytes as bnb
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def upcast_bytes(model) -> int:
    """What ``prepare_model_for_kbit_training`` would add: 2 bytes per fp16/bf16 parameter that is not 4-bit."""
    return sum(p.numel() * 2 for p in model.parameters()
               if p.dtype in (torch.float16, torch.bfloat16) and p.__class__.__name__ != "Params4bit")


# ---------------------------------------------------------------------------------------------- reports
def measure_step(model, optimizer, step: Callable[[dict], float], batch: dict, *, device, label: str = "",
                 warmup: int = 2, timed_calls: int = 0):
    """:func:`memopt_lib.profiler.measure` of one step, with QLoRA facts in ``extra``.

    ``warmup=2`` makes the measured step the third, like the anchors' ``peak_steady``. On CUDA the paged
    optimizer state (outside PyTorch's allocator) is reported as ``extra["paged_state_bytes"]``;
    ``extra["loss"]`` is the measured step's loss.
    """
    from .models import count_parameters
    from .profiler import measure
    losses: list[float] = []
    report = measure(lambda: losses.append(step(batch)), device=device, model=model, optimizer=optimizer,
                     warmup=warmup, timed_calls=timed_calls, label=label)
    report.extra.update(
        batch=int(batch["input_ids"].shape[0]), seq=int(batch["input_ids"].shape[1]),
        weight_bytes=quantization.weight_footprint_bytes(model),
        optimizer_state_bytes=quantization.optimizer_state_bytes(optimizer),
        paged_state_bytes=quantization.paged_state_bytes(optimizer), optimizer=type(optimizer).__name__,
        trainable_params=count_parameters(model, trainable_only=True),
        checkpointing_active=checkpointing.checkpointing_enabled(model), loss=losses[warmup])
    return report


def qlora_step_report(model_name: str = "llama-7b", *, batch: int = 8, seq: int = 512, device: str = "cuda",
                      recipe: str = "lean", rank: int = 16, micro_batch: int | None = None,
                      double_quant: bool = True, timed_calls: int = 0, seed: int = 0):
    """Compose the capstone's ``"lean"`` or ``"default"`` recipe for ``model_name`` and measure one steady step.

    The default stack steps the full batch (the anchors' protocol); the lean one steps ``micro_batch``-row
    pieces (default: the full batch), token-normalized. Both autocast on CUDA and run fp32 on a CPU
    (``precision="auto"``). On CPU the peak is the tracker's.
    """
    from . import recipe as recipes  # the argument ``recipe`` names the capstone's stack
    from .text import random_batch
    which = recipe
    if which not in ("lean", "default"):
        raise ValueError(f"recipe must be 'lean' or 'default', got {which!r}")
    device = torch.device(device)
    if which == "lean":
        rc = _qlora_recipe(recipes.QLORA_LEAN, rank=rank, double_quant=double_quant,
                           micro_batches=recipes.micro_batches_for(batch, micro_batch))
    else:
        rc = _qlora_recipe(recipes.QLORA_DEFAULT, rank=rank, double_quant=double_quant)
    c = recipes.compose(rc, model_name, device)
    data = random_batch(c.model.config.vocab_size, batch, seq, device=device, seed=seed)
    label = f"{model_name} {which} B{batch}x{seq}" + (f" micro{micro_batch}" if micro_batch else "")
    report = measure_step(c.model, c.optimizer, c.step, data, device=device, label=label, timed_calls=timed_calls)
    report.extra.update(recipe=which, micro_batch=micro_batch or batch, double_quant=double_quant,
                        recipe_config=rc.to_dict())
    del c, data
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return report


def default_stack_b8_bytes(anchors: dict | None = None, batch: int = 8) -> float:
    """The default stack's peak at ``batch`` x 512, extrapolated linearly from the H200 anchors at B1 and B4."""
    from .profiler import GiB
    rows = {r["name"]: r for r in (anchors or load_anchors())["rows"]}
    b1 = rows["7b qlora-r16(qkvo) ckpt adamw dq=True B1 S512"]["peak_steady_GiB"] * GiB
    b4 = rows["7b qlora-r16(qkvo) ckpt adamw dq=True B4 S512"]["peak_steady_GiB"] * GiB
    return b4 + (b4 - b1) / 3 * (batch - 4)


def load_anchors() -> dict:
    """The H200 measurements shipped in ``memopt_lib/assets/h200_anchors.json`` (see :mod:`memopt_lib.anchors`)."""
    from . import anchors
    return anchors.load()


def main(argv: list[str] | None = None) -> None:
    """``python -m memopt_lib.qlora --recipe lean --batch 8 --seq 512``: one JSON line per report."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--recipe", default="lean", choices=("lean", "default"))
    ap.add_argument("--batch", type=int, nargs="+", default=[8])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args(argv)
    for b in args.batch:
        r = qlora_step_report(args.model, batch=b, seq=args.seq, device=args.device, recipe=args.recipe,
                              rank=args.rank, micro_batch=args.micro_batch)
        print(json.dumps({"label": r.label, "peak_allocated_bytes": r.peak_allocated_bytes,
                          "peak_reserved_bytes": r.peak_reserved_bytes, **r.extra}), flush=True)


if __name__ == "__main__":
    main()
