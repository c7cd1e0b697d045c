"""Quantization: store the frozen weights (and the optimizer state) in 8 or 4 bits.

What it saves
-------------
A bf16 weight costs 16 bits. bitsandbytes stores the weights of the *linear
layers* in fewer bits and keeps everything else (embeddings, ``lm_head``,
norms, biases) in the load dtype:

* **8-bit (LLM.int8)**: one int8 per weight plus one fp32 scale per output row,
  ``8 + 32/d_in`` bits per weight; matmuls split outlier features into fp16.
* **4-bit (NF4 or FP4)**: two 4-bit codes per byte plus one fp32 ``absmax`` per
  block of 64 weights: ``4 + 32/64 = 4.5`` bits per weight. **Double
  quantization** stores those absmax values in 8 bits, with one fp32 scale per
  256 of them: ``4 + 8/64 + 32/(64*256) = 4.127`` bits (:func:`bits_per_weight`).
  NF4's 16 levels are the quantiles of a normal distribution, which is what
  trained weights look like; FP4 is a tiny float format with uneven levels.
* **8-bit optimizers** (``bnb.optim.AdamW8bit``): both AdamW states in 8 bits
  with one fp32 absmax per block of 256 values: ~2.03 instead of 8 bytes per
  trainable parameter (-75 %). Tensors under 4096 values keep fp32 state.

What it costs
-------------
Quantization error (logits move; perplexity rises a little, more for FP4 than
NF4), dequantization work in every forward (4-bit weights are unpacked to the
*compute dtype* tile by tile), and the weights are frozen: you train adapters
on top (QLoRA, lab 09), not the 4-bit weights themselves.

All of this runs on CPU with bitsandbytes >= 0.48 (4-bit, 8-bit and the 8-bit
optimizers have CPU kernels); paging (``PagedAdamW8bit``) only means something
on CUDA, where its state lives in unified memory that ``torch.cuda``'s
allocator does not count -- and only for tensors of at least
:data:`PAGED_MIN_NUMEL` values: bitsandbytes gives smaller ones ordinary device
buffers (:func:`paged_split`). A rank-16 LoRA matrix of the 7B has 65,536 values,
so a LoRA run's paged optimizer pages nothing.
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from typing import Callable, Iterable

import torch

from .device import pick_device
from .offload_paged import PAGED_MIN_NUMEL, paged_split, paged_tensors  # noqa: F401 (paging lives there)
from .models import count_parameters, load_model, model_config

QUANT_TYPES = ("nf4", "fp4")
BLOCK_4BIT = 64          # weights per absmax in bitsandbytes' 4-bit format
DQ_BLOCK = 256           # absmax values per fp32 scale under double quantization
OPT8_BLOCK = 256         # values per absmax in the 8-bit optimizer states
OPT8_MIN_SIZE = 4096     # smaller tensors keep 32-bit optimizer state


# ---------------------------------------------------------------------- arithmetic
def bits_per_weight(block_size: int = BLOCK_4BIT, absmax_bits: int = 32, double_quant: bool = False,
                    dq_block: int = DQ_BLOCK, dq_bits: int = 8, weight_bits: int = 4) -> float:
    """Average storage bits of one blockwise-quantized weight.

    ``weight_bits`` per code plus the block's scale spread over its ``block_size``
    weights. With double quantization the scale costs ``dq_bits``, plus one
    ``absmax_bits`` second-level scale per ``dq_block`` scales.
    NF4: 4.5 bits; NF4 + double quantization: 4.127 bits.
    """
    if block_size <= 0 or dq_block <= 0:
        raise ValueError("block sizes must be positive")
    if not double_quant:
        return weight_bits + absmax_bits / block_size
    return weight_bits + dq_bits / block_size + absmax_bits / (block_size * dq_block)


def quantized_linear_shapes(config) -> list[tuple[str, int, int]]:
    """``(name, d_out, d_in)`` of every layer bitsandbytes quantizes: the linear layers inside the blocks.

    ``transformers`` converts every ``nn.Linear`` (and GPT-2's ``Conv1D``, whose
    weight is stored transposed) except the output head, which it keeps in the
    load dtype together with the embeddings and the norms. Read from a meta-device
    model: no weights are allocated.
    """
    return list(_meta_counts(config.to_json_string())[0])


@lru_cache(maxsize=16)
def _meta_counts(config_json: str) -> tuple[tuple[tuple[str, int, int], ...], int]:
    """(quantized linear shapes, total parameters) of a config, from one meta-device model (cached)."""
    from transformers import AutoConfig
    config = AutoConfig.for_model(**json.loads(config_json))
    return tuple(_linear_shapes(config)), _n_params(config)


def _n_params(config) -> int:
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return count_parameters(AutoModelForCausalLM.from_config(config))


def _linear_shapes(config) -> list[tuple[str, int, int]]:
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    out = []
    for name, mod in model.named_modules():
        if mod is head:
            continue
        if isinstance(mod, torch.nn.Linear):
            out.append((name, mod.out_features, mod.in_features))
        elif isinstance(mod, Conv1D):
            d_in, d_out = mod.weight.shape
            out.append((name, d_out, d_in))
    return out


def predict_weight_bytes(config, bits: int = 4, double_quant: bool = True, other_bytes: int = 2,
                         block_size: int = BLOCK_4BIT) -> dict[str, float]:
    """Predicted bytes of a model loaded in ``bits`` (4 or 8): ``{"quantized", "other", "total"}``.

    ``config`` is a transformers config or a course model name. ``other_bytes``:
    bytes per weight of what stays unquantized (2 for bf16, 4 for fp32).
    """
    if isinstance(config, str):
        config = model_config(config)
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    shapes, n_total = _meta_counts(config.to_json_string())
    n_quant = sum(o * i for _, o, i in shapes)
    if bits == 4:
        q = n_quant * bits_per_weight(block_size, double_quant=double_quant) / 8
    else:  # int8 codes + one fp32 scale (SCB) per output row
        q = sum(o * i + 4 * o for _, o, i in shapes)
    other = (n_total - n_quant) * other_bytes
    return {"quantized": q, "other": other, "total": q + other}


def adamw8bit_state_bytes(numels: Iterable[int], block_size: int = OPT8_BLOCK,
                          min_8bit_size: int = OPT8_MIN_SIZE) -> int:
    """Bytes of ``bnb.optim.AdamW8bit`` state for parameters of these sizes (arithmetic).

    Per tensor of n >= ``min_8bit_size`` values: two uint8 states (2n bytes) and
    two fp32 absmax per ``block_size`` values; smaller tensors keep two fp32
    states (8n bytes). Plus the two 256-entry fp32 quantization maps, shared.
    """
    total, any8 = 0, False
    for n in numels:
        if n >= min_8bit_size:
            total += 2 * n + 2 * 4 * math.ceil(n / block_size)
            any8 = True
        else:
            total += 2 * 4 * n
    return total + (2 * 256 * 4 if any8 else 0)


def cpu_4bit_kernel_is_bf16() -> bool:
    """Whether bitsandbytes runs 4-bit *inference* on this CPU with its packed bf16 kernel.

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode on an input that needs no
    gradient repacks the weight once and multiplies in bf16, whatever ``compute_dtype`` says
    (bitsandbytes >= 0.49). Training (or an input that requires grad) keeps the dequantize-then-
    matmul path in the compute dtype.
    """
    try:
        from bitsandbytes.functional import has_avx512bf16
        return bool(has_avx512bf16())
    except ImportError:
        return False


def double_quant_absmax_error(weight: torch.Tensor, quant_type: str = "nf4") -> dict[str, float]:
    """Relative error of the absmax scales that double quantization stores in 8 bits (measured with bnb).

    Quantizes ``weight`` to 4 bits twice, with and without ``compress_statistics``,
    dequantizes the 8-bit absmax values and compares them with the fp32 ones.
    """
    import bitsandbytes.functional as F
    w = weight.detach().float().cpu().reshape(-1)
    w = w[: w.numel() - w.numel() % BLOCK_4BIT]  # whole blocks only (the CPU kernel quantizes a flat tensor)
    _, plain_state = F.quantize_4bit(w, blocksize=BLOCK_4BIT, quant_type=quant_type, compress_statistics=False)
    _, dq_state = F.quantize_4bit(w, blocksize=BLOCK_4BIT, quant_type=quant_type, compress_statistics=True)
    restored = F.dequantize_blockwise(dq_state.absmax, dq_state.state2) + dq_state.offset
    rel = (restored - plain_state.absmax).abs() / plain_state.absmax.abs().clamp_min(1e-12)
    return {"max_rel": float(rel.max()), "mean_rel": float(rel.mean()), "n_absmax": int(rel.numel())}


def adamw_state_bytes(numels: Iterable[int]) -> int:
    """Bytes of ``torch.optim.AdamW`` state: two fp32 states per value and a 4-byte step per tensor."""
    numels = list(numels)
    return sum(8 * n + 4 for n in numels)


# ---------------------------------------------------------------------- loading
def bnb_config(bits: int = 4, quant_type: str = "nf4", double_quant: bool = True, compute_dtype=None):
    """A ``transformers.BitsAndBytesConfig`` for 4-bit (``quant_type`` nf4/fp4) or 8-bit loading.

    ``compute_dtype``: the dtype 4-bit weights are dequantized to for each matmul
    (default: bf16 on CPU and on GPUs with native bf16, else fp16).
    """
    from transformers import BitsAndBytesConfig
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if compute_dtype is None:
        from .device import amp_dtype
        compute_dtype = amp_dtype()
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)


def load_quantized(name: str, bits: int = 4, quant_type: str = "nf4", double_quant: bool = True,
                   compute_dtype=None, dtype=torch.bfloat16, device=None, train: bool = False, **kw):
    """Load course model ``name`` with its linear layers in ``bits``; the rest in ``dtype``.

    ``device`` defaults to :func:`~memopt_lib.device.pick_device` (bitsandbytes
    quantizes while loading, on that device).
    """
    device = torch.device(device) if device is not None else pick_device()
    cfg = bnb_config(bits, quant_type, double_quant, compute_dtype)
    return load_model(name, quantization_config=cfg, dtype=dtype, device_map=device_map(device), train=train, **kw)


def device_map(device: torch.device | str) -> dict:
    """``{"": device}``: the whole model on one device, in accelerate's spelling (a CUDA index, or a name)."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"": device.index if device.index is not None else torch.cuda.current_device()}
    return {"": str(device)}


def quant_tensors(p: torch.Tensor) -> list[torch.Tensor]:
    """The tensors bitsandbytes keeps *beside* a quantized weight (scales, code tables)."""
    out = []
    qs = getattr(p, "quant_state", None)
    while qs is not None:  # 4-bit: absmax, code, offset; then the nested state of double quantization
        out += [t for t in (qs.absmax, qs.code, qs.offset) if isinstance(t, torch.Tensor)]
        qs = qs.state2 if qs.nested else None
    scb = getattr(p, "SCB", None)  # 8-bit: one fp32 scale per output row
    if isinstance(scb, torch.Tensor):
        out.append(scb)
    return out


def _weight_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [x for t in list(model.parameters()) + list(model.buffers()) for x in [t] + quant_tensors(t)]


def weight_footprint_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct storage the model's weights occupy, quantization state included.

    Unlike ``model.get_memory_footprint()`` this counts the absmax/scale tensors
    of 4-bit and 8-bit layers too, and each shared (tied) storage once.
    """
    seen, total = set(), 0
    for x in _weight_tensors(model):
        st = x.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def measure_loaded_bytes(load: Callable[[], torch.nn.Module], device=None) -> tuple[torch.nn.Module, int]:
    """Call ``load()`` and return ``(model, bytes it left allocated on device)``.

    CUDA: ``torch.cuda.memory_allocated`` after minus before (what the H200
    anchors call ``loaded_GiB``). Elsewhere the profiler's live-storage tracker
    around the load, which counts the same thing.
    """
    import gc
    from .profiler import MemoryTracker
    device = torch.device(device) if device is not None else pick_device()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        model = load()
        torch.cuda.synchronize(device)
        return model, torch.cuda.memory_allocated(device) - before
    # include_existing=False: count only storages born during the load that are still alive after it
    with MemoryTracker(device, include_existing=False, timeline=False) as tracker:
        model = load()
        gc.collect()
        # safetensors can hand over storages created outside ATen's dispatcher, where the tracker does not
        # see them born: register every weight (and quantization state) of the model explicitly
        for t in _weight_tensors(model):
            tracker._register(t)
    return model, tracker.result().end_bytes


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct tensor storages in ``optimizer.state`` (measured, not predicted).

    The one count of the package (``lora`` re-exports it): every state tensor -- AdamW's ``exp_avg`` and
    ``exp_avg_sq``, its scalar ``step``, an 8-bit optimizer's codes and block scales -- each storage once.
    On the ``meta`` device (no storage) it counts ``numel * element_size``.
    """
    seen, total = set(), 0
    for state in optimizer.state.values():
        for v in state.values():
            if not isinstance(v, torch.Tensor):
                continue
            if v.device.type == "meta":
                key, nbytes = ("meta", id(v)), v.numel() * v.element_size()
            else:
                key, nbytes = (v.device, v.untyped_storage().data_ptr()), v.untyped_storage().nbytes()
            if key not in seen:
                seen.add(key)
                total += nbytes
    return total


OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")


def make_optimizer(params, *, kind: str = "adamw_8bit", lr: float = 1e-4, device: torch.device | str = "cpu"):
    """An AdamW over ``params`` (a list of tensors, or a model: its trainable parameters), states as ``kind`` says.

    * ``"adamw"``: ``torch.optim.AdamW``, two fp32 states (8 bytes per trainable parameter);
    * ``"adamw_8bit"``: bitsandbytes ``AdamW8bit``, two 8-bit states with block scales (~2 bytes);
    * ``"paged_adamw_8bit"``: ``PagedAdamW8bit``, the same states in CUDA unified memory that the driver pages
      to host RAM under pressure. It needs CUDA: elsewhere ``AdamW8bit`` is used, with a printed notice.
    If bitsandbytes cannot build an 8-bit optimizer here, ``torch.optim.AdamW`` is used, with a notice.
    """
    from .models import notice
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer kind must be one of {OPTIMIZERS}, got {kind!r}")
    device = torch.device(device)
    if isinstance(params, torch.nn.Module):
        params = [p for p in params.parameters() if p.requires_grad]
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters: apply LoRA (or unfreeze something) before building the optimizer")
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


def paged_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state in bitsandbytes paged (unified) memory, which ``max_memory_allocated`` misses."""
    return paged_tensors(optimizer)["paged_bytes"]


def state_after_one_step(model: torch.nn.Module, batch: dict, optimizer_cls, **kwargs) -> int:
    """Optimizer-state bytes once ``optimizer_cls`` has taken one step on ``batch`` (states are created lazily)."""
    opt = optimizer_cls(model.parameters(), **kwargs)
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return optimizer_state_bytes(opt)


def quantized_modules(model: torch.nn.Module) -> dict[str, list[str]]:
    """Names of the layers by storage: ``{"4bit": [...], "8bit": [...], "unquantized": [...]}``."""
    import bitsandbytes as bnb
    out = {"4bit": [], "8bit": [], "unquantized": []}
    for name, mod in model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            out["4bit"].append(name)
        elif isinstance(mod, bnb.nn.Linear8bitLt):
            out["8bit"].append(name)
        elif any(True for _ in mod.parameters(recurse=False)):
            out["unquantized"].append(name)
    return out


# ---------------------------------------------------------------------- quality
@torch.no_grad()
def eval_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(fp32 logits, perplexity)`` of a batch of token windows (labels = inputs, shifted)."""
    model.eval()
    dev = next(model.parameters()).device
    x = input_ids.to(dev)
    out = model(input_ids=x, labels=x)
    return out.logits.float().cpu(), math.exp(out.loss.item())


def heldout_windows(tokenizer, n: int = 4, seq: int = 128) -> torch.Tensor:
    """The first ``n`` windows of ``seq`` tokens of the held-out text, shape ``(n, seq)``."""
    from .text import token_stream
    ids = token_stream(tokenizer, "heldout")
    if len(ids) < n * seq:
        raise ValueError(f"held-out text has {len(ids)} tokens, fewer than n*seq = {n * seq}")
    return ids[: n * seq].view(n, seq)


def logits_error(reference: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
    """How far ``test`` logits are from ``reference``: relative L2 error, max abs error, top-1 agreement."""
    ref, t = reference.float(), test.float()
    return {"rel_l2": ((t - ref).norm() / ref.norm()).item(),
            "max_abs": (t - ref).abs().max().item(),
            "top1_agree": (t.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def perplexity_from_logits(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    """``exp`` of the mean cross-entropy of predicting token t+1 from the logits at position t (in fp32)."""
    v = logits.shape[-1]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v).float(), input_ids[:, 1:].reshape(-1))
    return float(torch.exp(nll))
