"""Design a recipe for a memory budget: choose the techniques, predict the peak and the slowdown, keep what fits.

Lab 11 (the closing lab) asks for three functions; these are the reference implementations its checks compare
with. Every technique saves memory and most cost time, so a good design is the *cheapest* recipe that fits the
card, not the one with every technique switched on:

* :func:`predict_peak_gib` -- a linear model in tokens per micro-batch, calibrated on the H200 anchors
  (``memopt_lib/assets/h200_anchors.json``): the peak of a step is the static state (weights, optimizer state, and
  the gradients when micro-batches accumulate them) plus the activations and logits of one micro-batch, and those
  grow with its tokens (fused attention keeps nothing quadratic). Per-token bytes come from the anchors at 8 x 512
  (4096 tokens), one per precision x checkpointing; the 7B QLoRA stack's from its anchors at batch 1 and 4
  (an intercept: the 4-bit base, LoRA state, dequantization scratch).
* :func:`predict_step_time_ratio` -- FLOP arithmetic: a forward is ``2 N`` FLOPs per token for ``N`` matmul
  weights, its backward ``4 N`` (gradient of the input and of the weight) or ``2 N`` for a frozen weight,
  checkpointing adds one forward of the decoder blocks (the lm_head is not recomputed); 16-bit matmuls run
  twice as fast; small micro-batches use the GPU less well (``memopt_lib.predict.cost``'s utilization).
  Relative to ``cost.time_base(model)``: fp32 full fine-tuning for GPT-2, the default QLoRA stack for a Llama.
* :func:`design_recipe` -- every candidate of the model's family (:func:`candidates`), predicted with the two
  functions above; the cheapest whose predicted peak x :data:`RESERVED_FACTOR` + :data:`CUDA_CONTEXT_GIB` fits
  the card wins (ties: the first, i.e. the simpler).

What the checks hold a design to (``memopt_lib/checks/lab11_budget_design.py``): the predictor's
``peak_reserved_bytes`` + the CUDA context must fit the card; the cost model's ratio may not exceed the reference
design's by much; the two predictions must be close to the predictor's peak and the cost model's ratio.
"""
from __future__ import annotations

import itertools
import math

from . import anchors
from .models import model_config, spec
from .recipe import Recipe

GiB = float(1 << 30)
CUDA_CONTEXT_GIB = 0.5   # what the driver takes before PyTorch allocates anything (lab 09's budget)
RESERVED_FACTOR = 1.35   # reserved / allocated: the caching allocator's rounding and cached blocks (anchors: 1.05-1.33)
ANCHOR_TOKENS = 8 * 512  # the GPT-2 anchors' batch x sequence
GPT2_ANCHORS = {("fp32", False): "gpt2 B8 S512 fp32 adamw(fused)", ("amp", False): "gpt2 B8 S512 amp-bf16 adamw(fused)",
                ("pure-bf16", False): "gpt2 B8 S512 pure-bf16 adamw(fused)",
                ("fp32", True): "gpt2 B8 S512 fp32 ckpt adamw(fused)", ("amp", True): "gpt2 B8 S512 amp-bf16 ckpt adamw(fused)",
                ("pure-bf16", True): "gpt2 B8 S512 pure-bf16 ckpt adamw8bit"}
QLORA_B1, QLORA_B4 = "7b qlora-r16(qkvo) ckpt adamw dq=True B1 S512", "7b qlora-r16(qkvo) ckpt adamw dq=True B4 S512"
QLORA_NO_CKPT = "7b qlora-r16(qkvo) no-ckpt adamw dq=True B4 S512"
QLORA_NO_DQ = "7b qlora-r16(qkvo) ckpt adamw dq=False B4 S512"


def _precision(recipe: Recipe) -> str:
    return "amp" if recipe.precision == "auto" else recipe.precision


def _tokens(recipe: Recipe, batch: int, seq: int) -> int:
    micro = min(recipe.micro_batches, batch)
    return math.ceil(batch / micro) * seq  # the largest micro-batch


def predict_peak_gib(recipe: Recipe, model: str, batch: int, seq: int) -> float:
    """Peak allocated GiB of one steady training step of ``recipe`` (the anchors' linear model in tokens)."""
    t, k = _tokens(recipe, batch, seq), min(recipe.micro_batches, batch)
    if spec(model).family == "llama":
        lo, hi = anchors.row(QLORA_B1), anchors.row(QLORA_B4)
        per_token = (hi["peak_steady_GiB"] - lo["peak_steady_GiB"]) / (4 * 512 - 512)
        base = lo["peak_steady_GiB"] - 512 * per_token  # 4-bit weights, fp32 vocab matrices, LoRA state, scratch
        if not recipe.checkpointing:
            per_token = (anchors.row(QLORA_NO_CKPT)["peak_steady_GiB"] - base) / (4 * 512)
        if recipe.quantization == "nf4":  # fp32 absmax per block instead of 8-bit + fp32 per 256 blocks
            base += anchors.row(QLORA_NO_DQ)["peak_steady_GiB"] - hi["peak_steady_GiB"]
        state = hi["opt_state_GiB"]
        if "8bit" in recipe.optimizer:
            base -= state * (0.75 if recipe.optimizer == "adamw_8bit" else 1.0)  # 2 of 8 bytes; paged: off the GPU
        grads = state / 2 if k > 1 else 0.0  # LoRA gradients (fp32) stay alive between micro-batches
        return base + grads + t * per_token
    row = anchors.row(GPT2_ANCHORS[(_precision(recipe), recipe.checkpointing)])
    fp32_weights = anchors.row(GPT2_ANCHORS[("fp32", False)])["weights_GiB"]
    per_token = (row["peak_steady_GiB"] - row["weights_GiB"] - row["opt_state_GiB"]) / ANCHOR_TOKENS
    weights = row["weights_GiB"]
    state = fp32_weights / 2 if "8bit" in recipe.optimizer else 2 * weights  # 2 bytes vs 2 states of the param dtype
    grads = weights if k > 1 else 0.0  # alive between micro-batches; with one, freed before the next forward
    return weights + state + grads + t * per_token


def _matmul_weights(model: str) -> tuple[float, float]:
    """Matmul weights of the decoder blocks and of the lm_head (embeddings are lookups: no FLOPs)."""
    cfg = model_config(model)
    if spec(model).family == "llama":
        h, i = cfg.hidden_size, cfg.intermediate_size
        kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
        block = h * h * 2 + h * kv * 2 + 3 * h * i
        return cfg.num_hidden_layers * block, h * cfg.vocab_size
    h = cfg.n_embd
    return cfg.n_layer * (h * 3 * h + h * h + 2 * h * 4 * h), h * cfg.vocab_size


def _relative_time(recipe: Recipe, model: str, batch: int, seq: int) -> float:
    from .predict.cost import HALF_PRECISION_SPEEDUP, HALF_SATURATION_TOKENS
    blocks, head = _matmul_weights(model)
    frozen = recipe.lora_rank > 0
    per_token = (2 + (2 if frozen else 4)) * (blocks + head) + (2 * blocks if recipe.checkpointing else 0)
    t = _tokens(recipe, batch, seq)
    speed = HALF_PRECISION_SPEEDUP if (recipe.precision != "fp32" or recipe.quantization) else 1.0
    return per_token * batch * seq / (speed * t / (t + HALF_SATURATION_TOKENS))


def predict_step_time_ratio(recipe: Recipe, model: str, batch: int, seq: int) -> float:
    """Step time of ``recipe`` / step time of ``cost.time_base(model)``, by FLOP arithmetic."""
    from .predict.cost import time_base
    return _relative_time(recipe, model, batch, seq) / _relative_time(time_base(model), model, batch, seq)


def candidates(model: str) -> list[Recipe]:
    """The recipes a design chooses from, simplest first: GPT-2 full fine-tuning, or the 7B's QLoRA r=16."""
    if spec(model).family == "llama":
        return [Recipe(f"QLoRA {q} ckpt={c} x{k} {o}", precision="auto", quantization=q, prepare="peft", lora_rank=16,
                       checkpointing=c, micro_batches=k, optimizer=o, lr=2e-4)
                for c, k, q, o in itertools.product((False, True), (1, 2, 4, 8), ("nf4-dq", "nf4"),
                                                    ("adamw", "adamw_8bit"))]
    return [Recipe(f"{p} ckpt={c} x{k} {o}", precision=p, checkpointing=c, micro_batches=k, optimizer=o)
            for c, k, p, o in itertools.product((False, True), (1, 2, 4, 8), ("amp", "pure-bf16", "fp32"),
                                                ("adamw", "adamw_8bit"))]


def design_recipe(card_gb: int, model: str, batch: int, seq: int) -> Recipe:
    """The cheapest candidate predicted to fit a ``card_gb`` GB card (ValueError if none does)."""
    best = None
    for i, rc in enumerate(candidates(model)):
        if rc.micro_batches > batch:
            continue
        need = predict_peak_gib(rc, model, batch, seq) * RESERVED_FACTOR + CUDA_CONTEXT_GIB
        if need <= card_gb:
            key = (round(predict_step_time_ratio(rc, model, batch, seq), 3), i)
            best = min(best, (key, rc)) if best else (key, rc)
    if best is None:
        raise ValueError(f"no candidate recipe fits {model} at {batch} x {seq} on a {card_gb} GB card")
    return best[1]
