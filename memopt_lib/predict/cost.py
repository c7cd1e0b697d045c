"""What a recipe costs in step time, predicted from a CPU: FLOPs over the card's throughput, host bytes over PCIe.

Memory techniques are not free. The predictor (:func:`memopt_lib.predict.predict_step`) says what a recipe
*saves*; this module says what it *costs*, as a ratio to a reference recipe at the same model, batch and sequence
length (:data:`TIME_BASE`: the fp32 baseline for GPT-2, the default QLoRA stack for the Llama family, whose fp32
full fine-tune fits no card of the course). The model, and nothing else::

    step_time = FLOPs / (peak_FLOPS(precision) x utilization(tokens per micro-batch))
              + host_transfer_bytes / PCIe bandwidth

* **FLOPs** of one step (every micro-batch's forward and backward), counted by
  :class:`torch.utils.flop_counter.FlopCounterMode` on a step run on the ``meta`` device
  (:func:`step_flops`: no memory, no data; a 7B costs a second). That count sees what changes the work:
  checkpointing's recomputed forward (+1 forward of every block), LoRA's frozen base (no weight gradient:
  its backward is one matmul per layer instead of two), the adapters' own small matmuls. A 4-bit base counts
  as a dense frozen ``Linear`` (bitsandbytes dequantizes and multiplies: the same matmul FLOPs; the
  dequantization itself is memory traffic, not modelled). Micro-batches do not change the FLOPs.
  :func:`step_time_s` uses the predictor's own ``flops`` when it is handed them (``predict_step(...)["flops"]``);
  :func:`time_ratio` does not: it takes both sides of the ratio from :func:`step_flops`, because the predictor's
  count also has flash attention's backward recomputation, which ``step_flops`` cannot see.
* **peak FLOPS** by precision: :data:`HALF_PRECISION_SPEEDUP` -- 16-bit matmuls (autocast, pure bf16, a 4-bit
  base computing in bf16) run 2x the fp32 rate on the course's cards (compute capability 8.6: NVIDIA's GA102
  whitepaper, RTX 3090: 71 dense bf16 tensor TFLOPS with fp32 accumulate vs 35.6 fp32 TFLOPS; PyTorch does not
  use TF32 for fp32 matmuls by default).
* **utilization** ``t / (t + HALF_SATURATION_TOKENS)`` of ``t`` tokens per micro-batch: a GPU is fed by large
  matmuls; splitting a batch into micro-batches makes each smaller and slower per FLOP. The half-saturation
  point (512 tokens) is an *assumption of this model*, not a measurement; lab 11 compares the model with the
  H200's measured ratios (``.ci/gpu_results/h200-bench-gpt2.json``) and shows the gap.
* **host bytes**: what crosses PCIe in a step (``predict_step(...)["host_transfer_bytes"]`` when the predictor
  reports it; else an embedding kept in host memory sends its output rows, ``tokens x hidden x 2`` bytes), at
  :data:`PCIE_BYTES_PER_S` (PCIe 4.0 x16, ~25 GB/s achieved of 32 GB/s).

Not modelled (each makes a real ratio differ from this one): the optimizer step's memory-bound time (AdamW
reads and writes ~16 bytes per trainable parameter: a few percent of a GPT-2 step), 8-bit optimizer and 4-bit
dequantization kernels, kernel-launch overheads, overlap of transfers with compute.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .gpus import GPU
from .step import _patch_if_present

GiB = 1 << 30
HALF_PRECISION_SPEEDUP = 2.0          # 16-bit vs fp32 matmul throughput, compute capability 8.6 (see above)
FP32_TFLOPS = 35.6                    # an RTX 3090's fp32 peak; only absolute times depend on it
HALF_SATURATION_TOKENS = 512          # utilization t / (t + 512) of t tokens per micro-batch (an assumption)
PCIE_BYTES_PER_S = 25e9               # PCIe 4.0 x16, achieved


@dataclass(frozen=True)
class Card:
    """A GPU of the budget exercise: its memory and capability (for the predictor), its speed (for the cost)."""

    gpu: GPU
    fp32_tflops: float = FP32_TFLOPS

    @property
    def memory_bytes(self) -> int:
        return self.gpu.memory_bytes

    @property
    def memory_gib(self) -> float:
        return self.gpu.memory_bytes / GiB


def card(memory_gib: int, capability: tuple[int, int] = (8, 6), sms: int = 82) -> Card:
    """A card of ``memory_gib`` GiB (nominal, as lab 09's 12 GiB budget) and compute capability 8.6.

    8.6 (Ampere: RTX 3060 12 GB, RTX A4000 16 GB, RTX 3090 24 GB) has native bf16 and flash attention; the
    predictor reads the capability for the kernels it picks, the SM count for bitsandbytes' 4-bit heuristic.
    """
    if memory_gib <= 0:
        raise ValueError(f"memory_gib must be > 0, got {memory_gib}")
    return Card(GPU(f"{memory_gib} GB card", tuple(capability), int(memory_gib * GiB), sms,
                    f"a {memory_gib} GB card of compute capability {capability[0]}.{capability[1]}"))


CARDS = {gb: card(gb) for gb in (12, 16, 24)}


def time_base(model_name: str):
    """The recipe ratios are relative to: fp32 full fine-tuning (GPT-2) or the default QLoRA stack (Llama)."""
    from ..models import spec
    from ..recipe import FP32, QLORA_DEFAULT
    return QLORA_DEFAULT if spec(model_name).family == "llama" else FP32


TIME_BASE = {"gpt2": "fp32 baseline", "llama": "QLoRA default"}


def _half_precision(recipe) -> bool:
    return recipe.precision in ("amp", "auto", "pure-bf16") or bool(recipe.quantization)


def _layers_key(cfg) -> str:
    return "n_layer" if hasattr(cfg, "n_layer") else "num_hidden_layers"


@lru_cache(maxsize=64)
def _flops(model_name: str, batch: int, seq: int, lora_rank: int, targets: tuple | None, ckpt: bool) -> int:
    """A step's FLOPs, counted on 1 and 2 decoder layers and extrapolated (every layer does the same work)."""
    from ..models import model_config
    n = getattr(model_config(model_name), _layers_key(model_config(model_name)))
    one, two = (_count_flops(model_name, k, batch, seq, lora_rank, targets, ckpt) for k in (1, 2))
    return one + (n - 1) * (two - one)


def _count_flops(model_name: str, layers: int, batch: int, seq: int, lora_rank: int, targets, ckpt: bool) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from ..checkpointing import enable_checkpointing
    from ..lora import apply_lora
    from ..models import from_config, model_config
    cfg = model_config(model_name)
    setattr(cfg, _layers_key(cfg), layers)
    cfg.use_cache = False
    with torch.device("meta"):
        model = from_config(cfg)
    if lora_rank:
        for p in model.parameters():
            p.requires_grad_(False)  # the frozen base: no weight gradients, so half its backward matmuls
    if ckpt:
        enable_checkpointing(model)
    if lora_rank:
        model = apply_lora(model, r=lora_rank, targets=targets, dropout=0.0)
    model.train()
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    # transformers asks whether the rows pack several sequences (it reads position ids, impossible on meta):
    # one sequence per row, as the predictor answers (step.py)
    with _patch_if_present("transformers.masking_utils.find_packed_sequence_indices", lambda position_ids: None), \
            FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return int(counter.get_total_flops())


def step_flops(model_name: str, batch: int, seq: int, recipe) -> int:
    """FLOPs of one training step of ``recipe`` (forward + backward, checkpointing's recompute included)."""
    targets = tuple(recipe.lora_targets) if recipe.lora_targets is not None else None
    return _flops(model_name, int(batch), int(seq), int(recipe.lora_rank), targets, bool(recipe.checkpointing))


def host_transfer_bytes(model_name: str, batch: int, seq: int, recipe, predicted: dict | None = None) -> int:
    """Bytes a step moves between host and GPU: the predictor's count if it has one, else the host embedding's."""
    if predicted and "host_transfer_bytes" in predicted:
        return int(predicted["host_transfer_bytes"])
    if recipe.embedding == "host":
        from ..models import model_config
        cfg = model_config(model_name)
        return int(batch * seq * cfg.hidden_size * 2)  # the looked-up rows, bf16, host -> GPU
    return 0


def step_time_s(c: Card, model_name: str, batch: int, seq: int, recipe, predicted: dict | None = None) -> dict:
    """The model's step time of ``recipe`` on card ``c``, with its terms (plain data, units in the names)."""
    flops = int(predicted["flops"]) if predicted and "flops" in predicted else step_flops(model_name, batch, seq, recipe)
    micro = min(recipe.micro_batches, batch)
    tokens = -(-batch // micro) * seq  # the largest micro-batch's tokens
    utilization = tokens / (tokens + HALF_SATURATION_TOKENS)
    peak = c.fp32_tflops * 1e12 * (HALF_PRECISION_SPEEDUP if _half_precision(recipe) else 1.0)
    compute_s = flops / (peak * utilization)
    host = host_transfer_bytes(model_name, batch, seq, recipe, predicted)
    transfer_s = host / PCIE_BYTES_PER_S
    return {"flops": flops, "tokens_per_micro_batch": tokens, "utilization": utilization, "compute_s": compute_s,
            "host_transfer_bytes": host, "transfer_s": transfer_s, "step_time_s": compute_s + transfer_s}


def time_ratio(c: Card, model_name: str, batch: int, seq: int, recipe, predicted: dict | None = None) -> float:
    """Predicted step time of ``recipe`` / that of :func:`time_base` at the same model, batch and length."""
    # both sides from one FLOP counter (step_flops): the predictor's ``flops`` also counts flash attention's
    # backward recomputation (its GPU kernel), which step_flops (meta, no CUDA kernel choice) does not
    same = {k: v for k, v in predicted.items() if k != "flops"} if predicted else None
    mine = step_time_s(c, model_name, batch, seq, recipe, same)["step_time_s"]
    base = step_time_s(c, model_name, batch, seq, time_base(model_name))["step_time_s"]
    return mine / base
