"""LoRA: freeze the model, train a low-rank update beside chosen weight matrices.

For an adapted matrix ``W`` (``d_in -> d_out``) LoRA adds ``B @ A`` with ``A``
of shape ``r x d_in`` and ``B`` of shape ``d_out x r``, scaled by ``alpha / r``:

    y = W x + (alpha / r) * B (A x)          trainable: r * (d_in + d_out)

``B`` starts at zero, so the adapted model starts as the base model exactly.

What it saves
-------------
Everything that scales with the *trainable* parameters: gradients (4 bytes each
in fp32) and AdamW's two moments (8 bytes each). GPT-2 with r=16 on ``c_attn``
trains 589,824 of 124M parameters, so optimizer state falls by more than 99 %.

What it does not save
---------------------
The frozen weights stay (in fp32 unless you quantize them: lab 06/09), and the
*activations* stay: backward still runs through every layer to reach the
adapters of the first one, so everything the forward saved is still saved. When
activations dominate the peak -- GPT-2 at batch 8 x 512 -- the peak falls by a
quarter, not by 99 %. When static memory dominates (a 7B model at batch 1),
LoRA is what makes training fit at all.

This module wraps peft (``LoraConfig``, ``get_peft_model``) with the defaults
the course models need -- GPT-2's projections are ``transformers``' ``Conv1D``,
whose weight is stored ``(d_in, d_out)``, the transpose of ``nn.Linear``, so
peft needs ``fan_in_fan_out=True`` -- and with errors that name the modules
you can target. It works on the ``meta`` device, so a 7B model's adapters can
be counted without a byte of weights.
"""
from __future__ import annotations

import torch

from .quantization import optimizer_state_bytes  # noqa: F401  (one count of optimizer state, re-exported)

DEFAULT_TARGETS = {"gpt2": ("c_attn",), "llama": ("q_proj", "k_proj", "v_proj", "o_proj")}
ALL_LINEAR = "all-linear"  # peft's spelling: every Linear/Conv1D except the output layer


def _conv1d_type():
    from transformers.pytorch_utils import Conv1D
    return Conv1D


def matrix_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """``(d_in, d_out)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D``; ``None`` for anything else.

    ``nn.Linear.weight`` is ``(d_out, d_in)``; ``Conv1D.weight`` is ``(d_in, d_out)``.
    """
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, _conv1d_type()):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    return None


def linear_layers(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``{qualified name: (d_in, d_out)}`` of every matrix LoRA could adapt."""
    return {name: shp for name, mod in model.named_modules() if (shp := matrix_shape(mod)) is not None}


def model_family(model: torch.nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    return "gpt2" if model_type == "gpt2" else "llama" if model_type == "llama" else model_type or "unknown"


def _matches(name: str, targets) -> bool:
    return name.split(".")[-1] in targets


def lora_config(model: torch.nn.Module, *, r: int = 16, alpha: int | None = None,
                targets: tuple[str, ...] | list[str] | str | None = None, dropout: float = 0.05,
                bias: str = "none"):
    """A ``peft.LoraConfig`` that fits ``model``.

    ``targets``: module names (last component, as peft matches them), ``"all-linear"``,
    or ``None`` for the course default of the model's family (GPT-2: ``c_attn``;
    Llama: ``q_proj, k_proj, v_proj, o_proj``). ``alpha`` defaults to ``2 * r``
    (the seed's ``r=16, lora_alpha=32``). ``fan_in_fan_out`` is set from the
    module type (True for GPT-2's Conv1D).
    """
    from peft import LoraConfig
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"rank r must be a positive int, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    family = model_family(model)
    if targets is None:
        if family not in DEFAULT_TARGETS:
            raise ValueError(f"no default LoRA targets for a {family!r} model; pass targets=[...] from "
                             f"{sorted({n.split('.')[-1] for n in linear_layers(model)})}")
        targets = DEFAULT_TARGETS[family]
    layers = linear_layers(model)
    if targets == ALL_LINEAR:
        matched = [n for n in layers if not n.endswith(("lm_head", "score"))]
        peft_targets = ALL_LINEAR
    else:
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        matched = [n for n in layers if _matches(n, targets)]
        peft_targets = list(targets)
        if not matched:
            names = sorted({n.split(".")[-1] for n in layers})
            raise ValueError(f"LoRA targets {list(targets)} match no Linear/Conv1D module of this {family} model; "
                             f"choose from {names}")
    conv = _conv1d_type()
    kinds = {type(model.get_submodule(n)) for n in matched}
    if conv in kinds and torch.nn.Linear in kinds:
        raise ValueError("targets mix GPT-2 Conv1D and nn.Linear modules, which need different fan_in_fan_out; "
                         "adapt them in two separate LoRA configs or choose one kind")
    return LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, target_modules=peft_targets,
                      lora_dropout=dropout, bias=bias, fan_in_fan_out=conv in kinds, task_type="CAUSAL_LM")


def apply_lora(model: torch.nn.Module, *, r: int = 16, alpha: int | None = None,
               targets: tuple[str, ...] | list[str] | str | None = None, dropout: float = 0.05):
    """Wrap ``model`` with LoRA adapters (``peft.get_peft_model``) and return the ``PeftModel``.

    The base weights are frozen (``requires_grad=False``); only ``lora_A``/``lora_B``
    train. Build the optimizer *after* this call, from the trainable parameters
    only, so it allocates states for the adapters alone.
    """
    from peft import get_peft_model
    cfg = lora_config(model, r=r, alpha=alpha, targets=targets, dropout=dropout)
    peft_model = get_peft_model(model, cfg)
    # peft's lora_dropout is a new nn.Dropout: give it the 1-byte mask CUDA keeps (no-op on a GPU)
    from .models import match_cuda_kernels
    match_cuda_kernels(peft_model)
    leaked = non_adapter_trainable(peft_model)
    if leaked:
        raise RuntimeError(f"parameters outside the adapters still require grad: {leaked[:5]}")
    return peft_model


def is_adapter_parameter(name: str) -> bool:
    return "lora_" in name


def trainable_parameters(model: torch.nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (each shared tensor once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def non_adapter_trainable(model: torch.nn.Module) -> list[str]:
    """Names of parameters that require grad but are not LoRA adapters (should be empty)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and not is_adapter_parameter(n)]


def adapter_optimizer(model: torch.nn.Module, lr: float = 2e-4, **kw) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only: frozen weights get no state at all."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: apply LoRA (or unfreeze something) before building the optimizer")
    return torch.optim.AdamW(params, lr=lr, **kw)


def lora_b_matrices(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every ``lora_B`` weight, by name (they start at zero)."""
    return {n: p for n, p in model.named_parameters() if "lora_B" in n}


def count_lora_params(model: torch.nn.Module, targets, r: int) -> int:
    """Trainable LoRA parameters by formula: ``r * (d_in + d_out)`` for every Linear/Conv1D named in ``targets``.

    Equals what :func:`apply_lora` creates (peft matches a target against the last component of the name, so
    ``c_proj`` adapts both GPT-2's ``attn.c_proj`` and ``mlp.c_proj``); works on the ``meta`` device.
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    return sum(r * (d_in + d_out) for name, (d_in, d_out) in linear_layers(model).items() if _matches(name, targets))
