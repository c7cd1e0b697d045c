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
* **Gradient accumulation**: the batch runs as micro-batches with ``loss * (micro / batch)``; only one
  micro-batch's activations are alive at a time, the gradient is the full batch's.

And one piece to leave out. peft's ``prepare_model_for_kbit_training`` (peft 0.21) freezes the base, casts
*every* fp16/bf16 parameter that is not 4-bit -- embeddings, lm_head, norms -- to fp32, enables input grads
(itself only for reentrant checkpointing) and turns checkpointing on. The upcast costs 2 bytes x 262 M parameters =
+0.49 GiB at 7B (the H200 anchors measure it), and fp32 norm weights make the residual stream fp32, which
doubles the bytes checkpointing keeps. Llama's RMSNorm already computes in fp32 inside; frozen bf16
embeddings are fine. :func:`prepare_lean` does only what training needs.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
from typing import Callable, Iterable

import torch

from .device import amp_dtype
from .models import load_model, notice

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "adamw")


# ---------------------------------------------------------------------------------------------- loading
def bnb_4bit_config(*, double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16,
                    quant_type: str = "nf4"):
    """The ``BitsAndBytesConfig`` of QLoRA: NF4 codes, double-quantized scales, matmuls in ``compute_dtype``."""
    from transformers import BitsAndBytesConfig
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' (QLoRA's NormalFloat) or 'fp4', got {quant_type!r}")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)


def device_map(device: torch.device | str) -> dict:
    """``{"": device}``: the whole model on one device (accelerate's spelling)."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"": device.index if device.index is not None else torch.cuda.current_device()}
    return {"": str(device)}


def compute_dtype_for(device: torch.device | str) -> torch.dtype:
    """The dtype QLoRA computes (and keeps its non-4-bit weights) in on ``device``.

    CUDA: bf16 where it is native (compute capability >= 8.0), else fp16. CPU: fp32 -- CPUs without
    AVX512-BF16/AMX (most laptops, CI) run bf16 matmuls about 10x slower than fp32 (measured here), and a CPU
    run measures *ratios*; the GPU numbers come from a GPU.
    """
    device = torch.device(device)
    return amp_dtype(device) if device.type == "cuda" else torch.float32


def load_4bit(model_name: str, *, device: torch.device | str = "cpu", double_quant: bool = True,
              compute_dtype: torch.dtype | None = None):
    """Load ``model_name`` with 4-bit NF4 Linear weights; everything else in ``compute_dtype``, train mode.

    ``compute_dtype`` defaults to :func:`compute_dtype_for` the device (bf16 on an H100, fp16 on a T4, fp32 on CPU).
    """
    device = torch.device(device)
    compute_dtype = compute_dtype or compute_dtype_for(device)
    return load_model(model_name, quantization_config=bnb_4bit_config(double_quant=double_quant,
                                                                       compute_dtype=compute_dtype),
                      dtype=compute_dtype, device_map=device_map(device), train=True)


# ---------------------------------------------------------------------------------------------- the recipe
def enable_checkpointing(model, *, reentrant: bool = False):
    """Turn Hugging Face gradient checkpointing on, with ``use_reentrant`` spelled out."""
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; older: the deprecated name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if reentrant:
        model.enable_input_require_grads()  # reentrant checkpoints drop gradients unless an input requires grad
    return model


def prepare_lean(model, *, checkpointing: bool = True, reentrant: bool = False):
    """What ``prepare_model_for_kbit_training`` does that QLoRA needs, without the fp32 upcast.

    Freezes every base parameter, turns on (non-reentrant) checkpointing, disables the KV cache (useless in
    training, and incompatible with checkpointing) and puts the model in train mode.
    """
    for p in model.parameters():
        p.requires_grad_(False)  # no gradient, no optimizer state for the base model
    if checkpointing:
        enable_checkpointing(model, reentrant=reentrant)
    model.config.use_cache = False
    model.train()  # from_pretrained returns eval mode, where HF checkpointing is silently skipped
    return model


def apply_lora(model, *, rank: int = 16, alpha: int | None = None, dropout: float = 0.05,
               targets: Iterable[str] = QKVO):
    """peft LoRA adapters (fp32) on ``targets`` of a frozen model; returns the ``PeftModel`` in train mode."""
    from peft import LoraConfig, get_peft_model
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    cfg = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, target_modules=list(targets),
                     task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()
    return model


def make_optimizer(model, *, device: torch.device | str, kind: str = "paged_adamw_8bit", lr: float = 2e-4):
    """An optimizer over the *trainable* parameters only.

    ``paged_adamw_8bit`` needs CUDA: elsewhere bitsandbytes' ``AdamW8bit`` is used (same 8-bit states, no
    paging), and if bitsandbytes cannot make it, ``torch.optim.AdamW`` -- each time with a printed notice.
    """
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer kind must be one of {OPTIMIZERS}, got {kind!r}")
    device = torch.device(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: apply LoRA before building the optimizer")
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if kind == "paged_adamw_8bit" and device.type != "cuda":
        notice(f"paged optimizers need CUDA unified memory; on {device.type} using bitsandbytes AdamW8bit "
               "(the same 8-bit states, not paged)")
        kind = "adamw_8bit"
    try:
        import bitsandbytes as bnb
        cls = bnb.optim.PagedAdamW8bit if kind == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(params, lr=lr)
    except (ImportError, RuntimeError, NotImplementedError) as err:
        notice(f"bitsandbytes 8-bit AdamW unavailable on {device.type} ({type(err).__name__}: {err}); "
               "falling back to torch.optim.AdamW (fp32 states: 8 bytes per trainable parameter)")
        return torch.optim.AdamW(params, lr=lr)


def build_lean(model_name: str, *, rank: int = 16, device: torch.device | str = "cpu", double_quant: bool = True,
               optimizer: str = "paged_adamw_8bit", lr: float = 2e-4, dropout: float = 0.05,
               targets: Iterable[str] = QKVO):
    """The memory-lean QLoRA recipe: 4-bit load, :func:`prepare_lean`, LoRA, paged 8-bit AdamW."""
    model = prepare_lean(load_4bit(model_name, device=device, double_quant=double_quant))
    model = apply_lora(model, rank=rank, dropout=dropout, targets=targets)
    return model, make_optimizer(model, device=device, kind=optimizer, lr=lr)


def build_default(model_name: str, *, rank: int = 16, device: torch.device | str = "cpu",
                  double_quant: bool = True, lr: float = 2e-4):
    """The default Hugging Face + PEFT stack, as the H200 anchors measured it (their ``how`` field).

    4-bit NF4 load, ``prepare_model_for_kbit_training(use_gradient_checkpointing=True, use_reentrant=False)``
    (with its fp32 upcast), LoRA r/2r/0.05 on q,k,v,o, ``torch.optim.AdamW``, train mode. Step it with
    :func:`make_train_step` (autocast, full batch).
    """
    from peft import prepare_model_for_kbit_training
    model = load_4bit(model_name, device=device, double_quant=double_quant)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(model, rank=rank, dropout=0.05)
    return model, make_optimizer(model, device=device, kind="adamw", lr=lr)


def make_train_step(model, optimizer, *, micro_batch: int | None = None,
                    autocast_dtype: torch.dtype | None = None) -> Callable[[dict], float]:
    """``step(batch) -> mean loss``: one optimizer step over ``batch``, run as micro-batches of ``micro_batch``.

    Each micro-batch's loss is weighted by its share of the batch, so the summed gradient is the full batch's
    (for token-mean losses over equal-length rows). ``autocast_dtype`` (e.g. bf16) wraps the forward.
    """
    device = next(p for p in model.parameters() if p.requires_grad).device

    def ctx():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast_dtype)

    def step(batch: dict) -> float:
        n = batch["input_ids"].shape[0]
        mb = micro_batch or n
        optimizer.zero_grad(set_to_none=True)  # frees last step's gradients before this forward
        total = torch.zeros((), device=device)
        for i in range(0, n, mb):
            part = {k: v[i:i + mb] for k, v in batch.items()}
            with ctx():
                loss = model(**part).loss * (part["input_ids"].shape[0] / n)
            loss.backward()  # this micro-batch's activations are freed here, before the next forward
            total += loss.detach()
        optimizer.step()
        return float(total)

    return step


# ---------------------------------------------------------------------------------------------- instruments
def _quant_state_tensors(qs) -> list[torch.Tensor]:
    out = [t for t in (getattr(qs, "absmax", None), getattr(qs, "code", None), getattr(qs, "offset", None))
           if isinstance(t, torch.Tensor)]
    if getattr(qs, "state2", None) is not None:
        out += _quant_state_tensors(qs.state2)
    return out


def weight_tensors(model) -> list[torch.Tensor]:
    """Parameters, buffers and the 4-bit scales (``quant_state``) -- each storage once."""
    seen, out = set(), []
    for t in list(model.parameters()) + list(model.buffers()):
        for x in [t] + _quant_state_tensors(getattr(t, "quant_state", None)):
            key = (x.device, x.untyped_storage().data_ptr(), x.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                out.append(x)
    return out


def weight_bytes(model) -> int:
    """Bytes of everything the model holds: weights (4-bit codes included), buffers, quantization scales."""
    return sum(t.untyped_storage().nbytes() for t in weight_tensors(model))


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


def checkpointing_active(model) -> bool:
    """Will the next forward checkpoint? Needs the flag on a layer *and* train mode on that layer."""
    return any(getattr(m, "gradient_checkpointing", False) and m.training for m in model.modules())


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state``."""
    return sum(t.untyped_storage().nbytes() for st in optimizer.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))


def paged_state_bytes(optimizer) -> int:
    """Bytes of optimizer state in bitsandbytes paged (unified) memory, which ``max_memory_allocated`` misses."""
    return sum(t.untyped_storage().nbytes() for st in optimizer.state.values() for t in st.values()
               if isinstance(t, torch.Tensor) and getattr(t, "is_paged", False))


def upcast_bytes(model) -> int:
    """What ``prepare_model_for_kbit_training`` would add: 2 bytes per fp16/bf16 parameter that is not 4-bit."""
    return sum(p.numel() * 2 for p in model.parameters()
               if p.dtype in (torch.float16, torch.bfloat16) and p.__class__.__name__ != "Params4bit")


# ---------------------------------------------------------------------------------------------- reports
def measure_step(model, optimizer, step: Callable[[dict], float], batch: dict, *, device, label: str = "",
                 warmup: int = 2, timed_calls: int = 0):
    """:func:`memopt_lib.profiler.measure` of one step, with QLoRA facts in ``extra``.

    ``warmup=2`` makes the measured step the third, like the anchors' ``peak_steady``. On CUDA the paged
    optimizer state (outside PyTorch's allocator) is reported as ``extra["paged_state_bytes"]``.
    """
    from .models import count_parameters
    from .profiler import measure
    losses: list[float] = []
    report = measure(lambda: losses.append(step(batch)), device=device, model=model, optimizer=optimizer,
                     warmup=warmup, timed_calls=timed_calls, label=label)
    report.extra.update(
        batch=int(batch["input_ids"].shape[0]), seq=int(batch["input_ids"].shape[1]),
        weight_bytes=weight_bytes(model), optimizer_state_bytes=optimizer_state_bytes(optimizer),
        paged_state_bytes=paged_state_bytes(optimizer), optimizer=type(optimizer).__name__,
        trainable_params=count_parameters(model, trainable_only=True),
        checkpointing_active=checkpointing_active(model), loss=losses[-1])
    return report


def qlora_step_report(model_name: str = "llama-7b", *, batch: int = 8, seq: int = 512, device: str = "cuda",
                      recipe: str = "lean", rank: int = 16, micro_batch: int | None = None,
                      double_quant: bool = True, timed_calls: int = 0, seed: int = 0):
    """Build ``recipe`` ("lean" or "default") for ``model_name`` and measure one steady training step.

    The default stack steps the full batch under autocast (the anchors' protocol); the lean one steps
    ``micro_batch``-sized pieces (default: the full batch) under autocast too. On CPU the peak is the tracker's.
    """
    from .text import random_batch
    if recipe not in ("lean", "default"):
        raise ValueError(f"recipe must be 'lean' or 'default', got {recipe!r}")
    device = torch.device(device)
    build = build_lean if recipe == "lean" else build_default
    model, opt = build(model_name, rank=rank, device=device, double_quant=double_quant)
    step = make_train_step(model, opt, micro_batch=micro_batch if recipe == "lean" else None,
                           autocast_dtype=amp_dtype(device) if device.type == "cuda" else None)
    data = random_batch(model.config.vocab_size, batch, seq, device=device, seed=seed)
    label = f"{model_name} {recipe} B{batch}x{seq}" + (f" micro{micro_batch}" if micro_batch else "")
    report = measure_step(model, opt, step, data, device=device, label=label, timed_calls=timed_calls)
    report.extra.update(recipe=recipe, micro_batch=micro_batch or batch, double_quant=double_quant)
    del model, opt, step, data
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
