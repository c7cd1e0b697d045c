"""Lab 09 checks: the QLoRA capstone.

Where the thresholds come from
------------------------------
* ``predict_weights``: the 4-bit byte count is exact arithmetic (codes, scales, the unquantized rest); the
  checker loads ``llama-tiny`` in 4-bit itself and compares with what it holds (1 %), and with the H200
  anchors' ``loaded_GiB`` of the 7B, with and without double quantization (3 %: the anchors read
  ``memory_allocated`` after loading, which holds a few MiB besides the weights).
* CPU checks run the student's recipe on ``llama-tiny`` (the 7B's architecture, 4 layers x 256) and compare
  with a run the checker measures itself in the same check: checkpointing must hold at most 0.6x the
  forward activations of the same model with checkpointing off (0.30x measured on 4 x 256), and the whole
  step at most 0.75x the peak of the default Hugging Face + PEFT stack (micro-batches of 2: 0.58x measured;
  the full batch in fp32 on CPU: 0.99x -- on a CPU everything is fp32, so there the gain is accumulation).
* GPU checks (``gpu_only``) measure the real 7B shape at batch 8 x 512. Pass: peak reserved memory, paged
  optimizer state and 0.5 GiB of CUDA context fit in 12 GiB (the seed's "7B model on 12 GB GPU").
  Full marks: the peak of allocated memory (+ paged state) is at most 0.8x the default stack's, extrapolated
  linearly to batch 8 from the anchors at batch 1 and 4 (8.11 GiB; 8.12 GiB measured on an H200).
"""
from __future__ import annotations

import math

import torch

from .. import qlora
from ..models import model_config
from ..profiler import GiB, MemoryTracker, measure
from ..text import random_batch
from .base import Registry

CHECKS = Registry(lab="09")

CKPT_RATIO = 0.6
DEFAULT_STACK_RATIO = 0.75
GPU_BUDGET_BYTES = 12 * GiB
CUDA_CONTEXT_BYTES = GiB // 2
BEAT_DEFAULT_RATIO = 0.8
TINY = "llama-tiny"


def reference_4bit_bytes(cfg, *, double_quant: bool = True, other_bytes: int = 2, blocksize: int = 64) -> int:
    """What a bitsandbytes NF4 load of a Llama config holds (bitsandbytes 0.50), byte for byte."""
    h, inter, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    head = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head, cfg.num_key_value_heads * head
    mats = [h * q, h * kv, h * kv, q * h, h * inter, h * inter, inter * h]
    total = 0
    for n in mats:
        blocks = math.ceil(n / blocksize)
        total += math.ceil(n / 2) + 16 * 4  # 4-bit codes + the 16-entry NF4 table
        total += blocks + math.ceil(blocks / 256) * 4 + 4 + 256 * 4 if double_quant else blocks * 4
    total *= n_layers
    emb = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return total + (emb + (2 * n_layers + 1) * h) * other_bytes


def _anchor_rows():
    return {r["name"]: r for r in qlora.load_anchors()["rows"]}


def _build(ns, ctx, **kw):
    out = ns["build_qlora"](TINY, rank=16, device=ctx.device, **kw)
    assert isinstance(out, tuple) and len(out) == 2, "build_qlora must return (model, optimizer)"
    return out


def _dtype_of_compute(model) -> torch.dtype:
    import bitsandbytes as bnb
    lin = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert lin, "no bitsandbytes Linear4bit in the model: load it with BitsAndBytesConfig(load_in_4bit=True, ...)"
    return lin[0].compute_dtype or torch.float32


@CHECKS.check(points=2, needs=["predict_4bit_weight_bytes"])
def predict_weights(ns, ctx):
    """predict_4bit_weight_bytes matches a real 4-bit load (llama-tiny) and the 7B anchors"""
    predict = ns["predict_4bit_weight_bytes"]
    out = {}
    for dq in (True, False):
        model = qlora.load_4bit(TINY, device="cpu", double_quant=dq, compute_dtype=torch.float32)
        held = qlora.weight_bytes(model)
        del model
        got = int(predict(model_config(TINY), double_quant=dq, other_bytes=4))
        assert abs(got - held) <= 0.01 * held, (
            f"llama-tiny, double_quant={dq}, other weights fp32: predicted {got:,} bytes, the loaded model holds "
            f"{held:,}. Count 0.5 byte per quantized weight, the absmax scales (fp32 per block of 64; with double "
            "quantization 1 byte per block + fp32 per 256 blocks) and the unquantized embeddings/lm_head/norms.")
        out[f"tiny_dq{dq}_bytes"] = held
    rows = _anchor_rows()
    for dq in (True, False):
        anchor = rows[f"7b qlora-r16(qkvo) ckpt adamw dq={dq} B4 S512"]["loaded_GiB"] * GiB
        got = int(predict(model_config("llama-7b"), double_quant=dq, other_bytes=2))
        assert abs(got - anchor) <= 0.03 * anchor, (
            f"llama-7b, double_quant={dq}: predicted {got / GiB:.3f} GiB, the H200 measured {anchor / GiB:.3f} GiB")
        out[f"7b_dq{dq}_predicted_bytes"] = got
    return out


@CHECKS.check(points=1, needs=["build_qlora"])
def weights_quantized(ns, ctx):
    """every decoder Linear is 4-bit NF4 with double quantization; the rest stays in the compute dtype"""
    model, _ = _build(ns, ctx)
    cfg = model_config(TINY)
    n4 = qlora.count_4bit_linears(model)
    assert n4 == 7 * cfg.num_hidden_layers, (
        f"{n4} Linear4bit modules, expected {7 * cfg.num_hidden_layers} (q,k,v,o,gate,up,down per layer): "
        "load with BitsAndBytesConfig(load_in_4bit=True, ...)")
    states = [p.quant_state for p in model.parameters() if getattr(p, "quant_state", None) is not None]
    assert all(s.quant_type == "nf4" for s in states), "use bnb_4bit_quant_type='nf4' (QLoRA's NormalFloat4)"
    assert all(s.nested for s in states), "turn on double quantization (bnb_4bit_use_double_quant=True)"
    compute = _dtype_of_compute(model)
    wide = sorted({n.split(".")[-2] for n, p in model.named_parameters()
                   if "lora_" not in n and getattr(p, "quant_state", None) is None
                   and p.dtype.itemsize > compute.itemsize})
    assert not wide, (f"{wide} are stored wider than the compute dtype {compute}: that is "
                      "prepare_model_for_kbit_training's fp32 upcast (+0.49 GiB at 7B); freeze and enable "
                      "checkpointing yourself instead")
    ref = reference_4bit_bytes(cfg, double_quant=True, other_bytes=compute.itemsize)
    held = qlora.weight_bytes(model) - sum(p.untyped_storage().nbytes() for n, p in model.named_parameters()
                                           if "lora_" in n)
    assert held <= 1.02 * ref, f"the base model holds {held:,} bytes, a 4-bit load holds {ref:,}"
    return {"weight_bytes": held, "linear4bit": n4}


@CHECKS.check(points=2, needs=["build_qlora", "qlora_train_step"])
def lora_and_optimizer(ns, ctx):
    """only LoRA adapters train, and the optimizer keeps 8-bit state for them alone"""
    model, opt = _build(ns, ctx)
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing is trainable: add LoRA adapters (peft.get_peft_model)"
    bad = [n for n in trainable.values() if "lora_" not in n]
    assert not bad, f"base parameters are trainable: {bad[:3]}... freeze everything but the adapters"
    adapted = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})]
    names = {type(m.base_layer).__name__ for m in adapted}
    assert len(adapted) >= 4 * model_config(TINY).num_hidden_layers and names == {"Linear4bit"}, (
        f"LoRA on {len(adapted)} modules of types {names}: adapt at least q,k,v,o_proj of the 4-bit model")
    n_train = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    expected = sum(16 * (m.in_features + m.out_features) for m in adapted)
    assert n_train == expected, f"{n_train} trainable parameters; rank 16 on these modules gives {expected}"
    in_opt = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in in_opt} == set(trainable), "the optimizer must hold exactly the trainable parameters"
    batch = random_batch(model.config.vocab_size, 2, 64, device=ctx.device)
    ns["qlora_train_step"](model, opt, batch)
    assert set(map(id, opt.state)) <= set(trainable), "optimizer state exists for frozen parameters"
    state = qlora.optimizer_state_bytes(opt)
    assert state <= 4 * n_train, (
        f"optimizer state is {state / n_train:.2f} bytes per trainable parameter (fp32 AdamW: 8); an 8-bit AdamW "
        "(bitsandbytes PagedAdamW8bit on CUDA, AdamW8bit elsewhere) keeps 2 plus its block scales")
    return {"trainable_params": n_train, "optimizer_state_bytes": state, "optimizer": type(opt).__name__}


def _forward_held_bytes(model, batch, device) -> int:
    with MemoryTracker(device) as tr:
        loss = model(**batch).loss
    r = tr.result()
    del loss
    return r.end_bytes - r.start_bytes


@CHECKS.check(points=2, needs=["build_qlora"])
def checkpointing_active(ns, ctx):
    """non-reentrant checkpointing is on and really active (train mode), measured against it off"""
    model, _ = _build(ns, ctx)
    for m in model.modules():  # dropout off: the two forwards must do the same work
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    assert model.training, "the model is in eval mode: Hugging Face skips checkpointing there -- call model.train()"
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert layers, "gradient checkpointing is not enabled (gradient_checkpointing_enable(...))"
    kw = getattr(getattr(layers[0], "_gradient_checkpointing_func", None), "keywords", {})
    assert kw.get("use_reentrant") is False, (
        "pass gradient_checkpointing_kwargs={'use_reentrant': False}: the reentrant variant drops the adapters' "
        "gradients unless an input requires grad")
    batch = random_batch(model.config.vocab_size, 4, 256, device=ctx.device)
    loss = model(**batch).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), "the LoRA B matrices got no gradient"
    model.zero_grad(set_to_none=True)
    del loss
    on = _forward_held_bytes(model, batch, ctx.device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_disable()
    off = _forward_held_bytes(model, batch, ctx.device)
    assert on <= CKPT_RATIO * off, (
        f"after the forward {on:,} bytes are held for backward, {off:,} without checkpointing "
        f"(ratio {on / off:.2f} > {CKPT_RATIO}): checkpointing is not doing its job")
    return {"held_ckpt_bytes": on, "held_no_ckpt_bytes": off, "ratio": on / off}


class _GradCapture(torch.optim.Optimizer):
    """An optimizer that records the gradients it is asked to apply, and applies nothing."""

    def __init__(self, params):
        super().__init__(params, {})
        self.steps, self.grads = 0, []

    @torch.no_grad()
    def step(self, closure=None):
        self.steps += 1
        self.grads = [p.grad.detach().float().clone() for g in self.param_groups for p in g["params"]
                      if p.grad is not None]


@CHECKS.check(points=2, needs=["build_qlora", "qlora_train_step"])
def accumulation_exact(ns, ctx):
    """micro-batches give the full batch's gradient and loss, and one optimizer step"""
    model, _ = _build(ns, ctx)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = random_batch(model.config.vocab_size, 4, 64, device=ctx.device, seed=ctx.seed + 9)
    step = ns["qlora_train_step"]
    results = []
    for mb in (4, 1):
        cap = _GradCapture([p for p in model.parameters() if p.requires_grad])
        loss = float(step(model, cap, batch, micro_batch=mb))
        assert cap.steps == 1, f"micro_batch={mb}: {cap.steps} optimizer steps for one batch; accumulate, then step once"
        assert cap.grads, "no gradients reached the optimizer"
        results.append((loss, cap.grads))
    (l_full, g_full), (l_micro, g_micro) = results
    tol = 1e-3 if _dtype_of_compute(model) == torch.float32 else 3e-2
    assert abs(l_full - l_micro) <= tol * abs(l_full) + 1e-6, (
        f"loss of the batch {l_full:.5f}, of its micro-batches {l_micro:.5f}: return the batch's mean loss")
    err = max(float((a - b).norm() / (b.norm() + 1e-12)) for a, b in zip(g_micro, g_full))
    assert err <= tol, (f"micro-batch gradients differ from the full batch's by {err:.3g} (relative): scale each "
                        "micro-batch's loss by its share of the batch before backward")
    return {"relative_grad_error": err}


def _step_peak(model, opt, step, batch, device, label):
    rep = measure(lambda: step(model, opt, batch), device=device, model=model, optimizer=opt, warmup=2,
                  label=label)
    return rep


@CHECKS.check(points=2, needs=["build_qlora", "qlora_train_step"])
def peak_vs_default_stack(ns, ctx):
    """a training step of your recipe peaks well below the default HF + PEFT stack (llama-tiny)"""
    batch = random_batch(model_config(TINY).vocab_size, 4, 256, device=ctx.device)
    model, opt = qlora.build_default(TINY, rank=16, device=ctx.device)
    default_step = qlora.make_train_step(model, opt, autocast_dtype=torch.bfloat16 if ctx.is_gpu else None)
    ref = _step_peak(model, opt, lambda m, o, b: default_step(b), batch, ctx.device, "default")
    del model, opt, default_step
    model, opt = _build(ns, ctx)
    mine = _step_peak(model, opt, ns["qlora_train_step"], batch, ctx.device, "student")
    ratio = mine.peak_allocated_bytes / ref.peak_allocated_bytes
    assert ratio <= DEFAULT_STACK_RATIO, (
        f"your step peaks at {mine.peak_allocated_bytes / 2**20:.1f} MiB, the default stack at "
        f"{ref.peak_allocated_bytes / 2**20:.1f} MiB (ratio {ratio:.2f} > {DEFAULT_STACK_RATIO}): run the batch as "
        "micro-batches (gradient accumulation) and keep the weights out of fp32")
    return {"peak_bytes": mine.peak_allocated_bytes, "default_peak_bytes": ref.peak_allocated_bytes, "ratio": ratio}


def _measure_7b(ns, ctx):
    cached = getattr(ctx, "_lab09_7b", None)
    if cached is not None:
        return cached
    model, opt = ns["build_qlora"]("llama-7b", rank=16, device=ctx.device)
    batch = random_batch(model.config.vocab_size, 8, 512, device=ctx.device)
    rep = _step_peak(model, opt, ns["qlora_train_step"], batch, ctx.device, "7b B8x512")
    rep.extra["paged_state_bytes"] = qlora.paged_state_bytes(opt)
    del model, opt, batch
    torch.cuda.empty_cache()
    ctx._lab09_7b = rep
    return rep


@CHECKS.check(points=2, needs=["build_qlora", "qlora_train_step"], gpu_only=True)
def fits_12gb_7b(ns, ctx):
    """GPU: the 7B at batch 8 x 512 fits in a 12 GB GPU"""
    rep = _measure_7b(ns, ctx)
    used = rep.peak_reserved_bytes + rep.extra["paged_state_bytes"] + CUDA_CONTEXT_BYTES
    assert used <= GPU_BUDGET_BYTES, (
        f"peak reserved {rep.peak_reserved_bytes / GiB:.2f} GiB + paged optimizer state "
        f"{rep.extra['paged_state_bytes'] / GiB:.2f} GiB + ~0.5 GiB CUDA context = {used / GiB:.2f} GiB > 12 GiB")
    return {"peak_allocated_bytes": rep.peak_allocated_bytes, "peak_reserved_bytes": rep.peak_reserved_bytes}


@CHECKS.check(points=2, needs=["build_qlora", "qlora_train_step"], gpu_only=True)
def beats_default_7b(ns, ctx):
    """GPU: the 7B at batch 8 x 512 peaks clearly below the default HF + PEFT stack"""
    rep = _measure_7b(ns, ctx)
    bar = BEAT_DEFAULT_RATIO * qlora.default_stack_b8_bytes()
    peak = rep.peak_allocated_bytes + rep.extra["paged_state_bytes"]
    assert peak <= bar, (f"peak {peak / GiB:.2f} GiB; full marks need <= {bar / GiB:.2f} GiB "
                         f"({BEAT_DEFAULT_RATIO} x the default stack's {qlora.default_stack_b8_bytes() / GiB:.2f} GiB)")
    return {"peak_allocated_bytes": peak, "bar_bytes": bar}
