"""Lab 09 checks: the QLoRA capstone.

Graded interface: ``predict_4bit_weight_bytes(config, *, double_quant, other_bytes, blocksize)``,
``build_qlora(model_name, *, rank, device, lr, targets) -> (model, optimizer)`` and
``qlora_train_step(model, optimizer, batch, *, micro_batch) -> float``. Reference namespace:
:func:`reference_4bit_bytes` (below, until :mod:`memopt_lib.qlora` has one), :func:`memopt_lib.qlora.build_lean`
and the token-normalized :func:`memopt_lib.accumulation.accumulation_step`. Every check is collect/judge (:mod:`.base`);
bytes are counted by :mod:`memopt_lib.quantization` (``weight_footprint_bytes``, ``optimizer_state_bytes``,
``paged_state_bytes``).

Where the thresholds come from
------------------------------
* ``predict_weights``: byte arithmetic within 1 % of :func:`reference_4bit_bytes` (byte-exact against a real
  bitsandbytes load, ``tests/test_qlora.py``; the per-tensor code tables the course formula leaves out are
  0.2 % of ``llama-tiny``). Configs drawn per run include grouped-query attention (a Llama-3-8B shape and a
  random small one with ``num_key_value_heads < num_attention_heads``). Measured (test seed): ignoring GQA
  +7.3 % on the Llama-3-8B shape, +2.0 % on the random one; ignoring ``double_quant`` +2.5-5.7 %,
  ``other_bytes`` 11-45 %, tied embeddings +72 %, the absmax scales -0.9 to -8.6 %; the solution <= 0.03 %.
  The judge fails on the first case off by more than 1 % and names the slip that reproduces it.
* ``build_qlora`` is called with a rank, targets (2-5 of the 7 linear layers, never q,k,v,o, q,v or all seven:
  a build that hard-codes one of those can never match) and learning rate drawn per run:
  the adapted modules, each adapter's rank, ``alpha / r`` scaling (``lora_alpha = 2 r``) and dropout, the
  optimizer's parameters and learning rate must equal the reference recipe's; after one step (on seeded
  gradients: the state's size depends on shapes and optimizer only) the optimizer
  state may be at most ``STATE_RATIO`` x the reference 8-bit AdamW's (ranks >= 20 on a 256-wide model, so every
  adapter tensor has >= 4096 values and gets 8-bit state: fp32 AdamW measures 3.4x). The base must be
  4-bit NF4 with double quantization, nothing stored wider than the compute dtype.
* ``checkpointing_active``: the bytes the decoder blocks keep after a forward of the model as returned
  (:func:`memopt_lib.checkpointing.block_activation_bytes`) at most ``CKPT_RATIO`` x the reference's. On
  ``llama-tiny`` at 2 x 128 the reference keeps 1.0 MiB, checkpointing off (never enabled, or the inner layers
  left in eval mode under a ``PeftModel`` that reports ``training``) 15.4 MiB: 15x. Non-reentrant, ``use_cache``
  off, adapters get gradients.
* The step checks run the student's ``qlora_train_step`` on a model the checker builds (a small GQA Llama from
  config with LoRA r=8, checkpointing on, dropout off, SGD), on right-padded batches (row lengths drawn per run)
  whose rows do not split evenly into micro-batches (5-7 rows, micro-batches of 2-4), called twice. ``accumulation_exact``: the gradients handed to
  ``optimizer.step()``, the update and the returned loss must match the reference step's (relative 1e-4;
  the solution measures 0.0 (loss 4e-8); ``loss / number_of_micro_batches`` 0.62 at 7 rows in micro-batches of
  2; a missing ``zero_grad`` fails on the second call; right-padded rows make weighting by rows fail too).
  ``peak_vs_default_stack`` (``measures_memory``): one step on 8 x 640 with ``micro_batch=2`` (a 192-wide model)
  may rise at most ``STEP_PEAK_RATIO`` x the reference's above the window's start plus the meter's slack (6 MiB
  for the grader's cgroup). Measured by the grader (cgroup) at 256 wide: the reference 19.7 MiB, summing the
  micro-batch losses and calling backward once 39.0 MiB (allowed 30.6), ignoring ``micro_batch`` 80.6 MiB; 192
  wide costs ~40 % less CPU (tests/heldout/RESULTS.md has the margins measured there).
* ``scaler_steps``: the same step model and uneven micro-batches, called twice with an enabled GradScaler (what a
  T4's fp16 run needs, lab 02) that counts its calls (``init_scale`` ``SCALER_INIT_SCALE``, so gradients handed
  to the optimizer without unscaling are that many times too large): every micro-batch's loss must go through
  ``scaler.scale``, the optimizer through ``scaler.step`` once per call, then ``scaler.update``; gradients, update
  and loss as the reference step with the same scaler (relative 1e-4). ``qlora_train_step`` keeps working without
  a scaler (``scaler=None``, the other checks).
* GPU checks (``gpu_only``) measure the student's recipe on the real 7B shape at batch 8 x 512 (with a GradScaler
  when the 4-bit layers compute in fp16). Pass: the peak (allocated, measured around the collect) + paged
  optimizer state + 0.5 GiB of CUDA context fit in 12 GiB (the seed's "7B model on 12 GB GPU") *and* peak + paged
  state <= ``PASS_RATIO`` x the default stack's: the default HF + PEFT stack alone fits 12 GiB (H200, B8: 8.11
  GiB allocated, 10.08 GiB reserved, ``.ci/gpu_results/h200-foundation.json``), so fitting alone would grade
  the tutorials' recipe. Predicted on an H200 (``memopt_lib.predict``): the default stack 8.14 GiB (1.00x), with
  paged 8-bit AdamW 8.05 (0.99x, fails), with micro-batches of 2 instead 5.58 (0.69x, passes); the
  lean preparation saves a further ~0.49 GiB. Full marks: peak + paged state <= 0.8x the default stack's,
  extrapolated linearly to batch 8 from the anchors at batch 1 and 4 (8.11 GiB).
"""
from __future__ import annotations

import math

import torch

from .. import qlora, quantization, recipe
from ..accumulation import accumulation_step, split_batch
from ..lora import apply_lora
from ..profiler import GiB, fmt_bytes
from .base import Registry, memory_rise_within
from .step_evidence import judge_calls, judge_raised, record_calls, trainable

TINY = "llama-tiny"
CKPT_RATIO = 1.5
STEP_PEAK_RATIO = 1.25
MEMORY_HIDDEN, MEMORY_SEQ = 192, 640  # the memory check's model width and sequence (see peak_vs_default_stack)
STATE_RATIO = 1.1
GRAD_TOL = 1e-4
GPU_BUDGET_BYTES = 12 * GiB
CUDA_CONTEXT_BYTES = GiB // 2
BEAT_DEFAULT_RATIO = 0.8
PASS_RATIO = 0.9  # pass must need a course technique: the default stack is 1.0x, +paged 8-bit AdamW 0.99x (predicted)
SCALER_INIT_SCALE = 1024.0
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the target lists a build might hard-code (the recipe's default, the LoRA paper's, all linear layers): never drawn
FIXED_TARGETS = ({"q_proj", "k_proj", "v_proj", "o_proj"}, {"q_proj", "v_proj"}, set(LLAMA_LINEARS))


def _draw_targets(ctx) -> tuple:
    """2-5 of the 7 Llama linear layers, never a list a build might hard-code (~1 % left for any other list)."""
    while True:
        targets = ctx.rng.sample(LLAMA_LINEARS, ctx.rng.randint(2, 5))
        if set(targets) not in FIXED_TARGETS:
            return tuple(t for t in LLAMA_LINEARS if t in targets)


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


def _build_reference(model_name, *, rank=16, device="cpu", lr=2e-4, targets=qlora.QKVO):
    return qlora.build_lean(model_name, rank=rank, device=device, lr=lr, targets=targets)


def _step_reference(model, optimizer, batch, *, micro_batch=2, scaler=None):
    """The recipe's step: micro-batches of ``micro_batch`` rows, token-normalized (lab 04), one optimizer step
    (through ``scaler`` when one is given, as lab 02 teaches for fp16)."""
    k = recipe.micro_batches_for(batch["input_ids"].shape[0], micro_batch)
    return accumulation_step(model, split_batch(batch, k), optimizer, scaler=scaler).loss


CHECKS = Registry(lab="09", reference=lambda: {"predict_4bit_weight_bytes": reference_4bit_bytes,
                                               "build_qlora": _build_reference,
                                               "qlora_train_step": _step_reference})


# ---------------------------------------------------------------------------------------------- prediction
def _llama(**kw):
    from transformers import LlamaConfig
    return LlamaConfig(**kw)


def _configs(ctx) -> list[dict]:
    from ..models import model_config
    tiny, big = model_config(TINY).to_dict(), model_config("llama-7b").to_dict()
    llama3 = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    heads = ctx.rng.choice([8, 16])
    small = dict(hidden_size=heads * ctx.rng.choice([64, 96]), intermediate_size=64 * ctx.rng.randint(20, 60),
                 num_hidden_layers=ctx.rng.randint(2, 12), num_attention_heads=heads,
                 num_key_value_heads=heads // ctx.rng.choice([2, 4, 8]), vocab_size=ctx.rng.randint(4000, 32000),
                 tie_word_embeddings=ctx.rng.random() < 0.5)
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "tie_word_embeddings")
    return [{k: c[k] for k in keys} for c in (tiny, big, llama3, small)]


@CHECKS.check(points=2, needs=["predict_4bit_weight_bytes"])
def predict_weights(ns, ctx):
    """predict_4bit_weight_bytes matches a real 4-bit load's bytes, GQA and non-GQA configs"""
    out = []
    for cfg in _configs(ctx):
        dq, other = ctx.rng.random() < 0.5, ctx.rng.choice([2, 4])
        v = ns["predict_4bit_weight_bytes"](_llama(**cfg), double_quant=dq, other_bytes=other)
        out.append({"config": cfg, "double_quant": dq, "other_bytes": other,
                    "bytes": float(v) if isinstance(v, (int, float)) and math.isfinite(v) else repr(v)})
    return {"cases": out}


def _mistake(case, got) -> str:
    """Which plausible slip reproduces ``got`` on this case (empty if none)."""
    cfg, dq, other = case["config"], case["double_quant"], case["other_bytes"]
    variants = {
        "grouped-query attention ignored: k_proj and v_proj map hidden_size to num_key_value_heads x head_dim, "
        "not to hidden_size": dict(config={**cfg, "num_key_value_heads": cfg["num_attention_heads"]}),
        "double_quant ignored: without it each block of 64 has an fp32 scale; with it an 8-bit scale plus an "
        "fp32 one per 256 blocks": dict(double_quant=not dq),
        "other_bytes ignored: the unquantized embeddings, lm_head and norms cost other_bytes each":
            dict(other_bytes=2 if other == 4 else 4),
        "tie_word_embeddings ignored: an untied lm_head is a second vocab x hidden matrix, a tied one is not":
            dict(config={**cfg, "tie_word_embeddings": not cfg["tie_word_embeddings"]}),
    }
    for why, change in variants.items():
        c = {**case, **change}
        alt = reference_4bit_bytes(_llama(**c["config"]), double_quant=c["double_quant"], other_bytes=c["other_bytes"])
        if abs(got - alt) <= 0.003 * alt:
            return why
    return ""


@predict_weights.judge
def _(got, ref, ctx):
    for mine, want in zip(got.data["cases"], ref.data["cases"]):
        cfg = mine["config"]
        label = (f"hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} heads "
                 f"/ {cfg['num_key_value_heads']} kv heads, vocab {cfg['vocab_size']}, tied={cfg['tie_word_embeddings']}"
                 f", double_quant={mine['double_quant']}, other_bytes={mine['other_bytes']}")
        assert isinstance(mine["bytes"], float), f"{label}: return a number of bytes, got {mine['bytes']}"
        b, w = mine["bytes"], want["bytes"]
        if abs(b - w) > 0.01 * w:
            why = _mistake(mine, b)
            raise AssertionError(
                f"{label}: predicted {b:,.0f} bytes, a 4-bit load holds {w:,.0f} ({b / w - 1:+.1%}). "
                + (f"Likely: {why}." if why else "Count 0.5 byte per quantized weight, the absmax scales (fp32 per "
                   "block of 64; with double quantization 1 byte per block + fp32 per 256 blocks) and the "
                   "unquantized embeddings/lm_head/norms at other_bytes each."))
    return {"cases": len(got.data["cases"])}


# ---------------------------------------------------------------------------------------------- the recipe
def _build(ns, ctx, rank, targets, lr=2e-4):
    torch.manual_seed(ctx.seed)  # the adapters' init: the same for the student's and the reference's build
    out = ns["build_qlora"](TINY, rank=rank, device=ctx.device, lr=lr, targets=tuple(targets))
    if not (isinstance(out, tuple) and len(out) == 2):
        return None, None, f"build_qlora returned {type(out).__name__}, not (model, optimizer)"
    return out[0], out[1], ""


def _adapters(model) -> dict:
    """What LoRA was put where: module names (last component), ranks, alpha/r scalings, dropouts, base types."""
    mods = [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})]
    drop = [m.lora_dropout["default"] for _, m in mods]
    return {"targets": sorted({n.split(".")[-1] for n, _ in mods}), "count": len(mods),
            "ranks": sorted({int(m.r["default"]) for _, m in mods}),
            "scalings": sorted({round(float(m.scaling["default"]), 6) for _, m in mods}),
            "dropouts": sorted({round(float(getattr(d, "p", 0.0)), 6) for d in drop}),
            "base_types": sorted({type(m.base_layer).__name__ for _, m in mods})}


def _compute_dtype(model):
    import bitsandbytes as bnb
    lin = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    return (lin[0].compute_dtype or torch.float32) if lin else None


# weights_quantized only reads what the build holds and checkpointing_active builds with the same arguments (a
# rank drawn first from this run's seed, q,k,v,o): in one process with one seed (a notebook's check cell, the
# tests) the second reuses the first's model instead of loading and quantizing it again. In the grader every
# check has its own seed, so each builds its own. Only the most recent build is kept, and only until reused.
_SHARED_BUILD: dict = {}


def _shared_build(ns, ctx, *, keep: bool):
    rank = ctx.rng.choice([4, 8])
    key = (id(ns["build_qlora"]), ctx.seed, rank)
    hit = _SHARED_BUILD.pop("last", None)
    if hit is not None and hit[0] == key:
        return hit[1]
    built = _build(ns, ctx, rank, qlora.QKVO)
    if keep and not built[2]:
        _SHARED_BUILD["last"] = (key, built)
    return built


@CHECKS.check(points=1, needs=["build_qlora"])
def weights_quantized(ns, ctx):
    """every decoder Linear is 4-bit NF4 with double quantization; the rest stays in the compute dtype"""
    model, _, err = _shared_build(ns, ctx, keep=True)
    if err:
        return {"error": err}
    compute = _compute_dtype(model)
    states = [p.quant_state for p in model.parameters() if getattr(p, "quant_state", None) is not None]
    wide = sorted({n.split(".")[-2] for n, p in model.named_parameters()
                   if compute is not None and "lora_" not in n and getattr(p, "quant_state", None) is None
                   and p.dtype.itemsize > compute.itemsize})
    held = quantization.weight_footprint_bytes(model) - sum(p.untyped_storage().nbytes() for n, p in model.named_parameters()
                                           if "lora_" in n)
    return {"linear4bit": qlora.count_4bit_linears(model), "quant_types": sorted({s.quant_type for s in states}),
            "nested": sorted({bool(s.nested) for s in states}), "compute_dtype": str(compute), "wide": wide,
            "base_bytes": held}


@weights_quantized.judge
def _(got, ref, ctx):
    g, r = got.data, ref.data
    assert "error" not in g, g.get("error")
    assert g["linear4bit"] == r["linear4bit"], (
        f"{g['linear4bit']} Linear4bit modules, the recipe has {r['linear4bit']} (q,k,v,o,gate,up,down of every "
        "layer): load with BitsAndBytesConfig(load_in_4bit=True, ...)")
    assert g["quant_types"] == r["quant_types"], (f"4-bit type {g['quant_types']}: use bnb_4bit_quant_type='nf4' "
                                                  "(QLoRA's NormalFloat4)")
    assert g["nested"] == r["nested"], "turn on double quantization (bnb_4bit_use_double_quant=True)"
    assert not g["wide"], (f"{g['wide']} are stored wider than the compute dtype {g['compute_dtype']}: that is "
                           "prepare_model_for_kbit_training's fp32 upcast (+0.49 GiB at 7B), or a load without "
                           "dtype=compute dtype; freeze and enable checkpointing yourself instead")
    assert g["base_bytes"] <= 1.02 * r["base_bytes"], (f"the base model holds {g['base_bytes']:,} bytes, the "
                                                      f"4-bit recipe {r['base_bytes']:,}")
    return {"weight_bytes": g["base_bytes"], "linear4bit": g["linear4bit"]}


@CHECKS.check(points=2, needs=["build_qlora"])
def lora_and_optimizer(ns, ctx):
    """LoRA of the asked rank on the asked targets trains alone; 8-bit AdamW at the asked lr holds only them"""
    rank = ctx.rng.choice([20, 24, 32])
    targets = _draw_targets(ctx)
    lr = ctx.rng.choice([7e-5, 1.5e-4, 3e-4, 5e-4])
    model, opt, err = _build(ns, ctx, rank, targets, lr)
    if err:
        return {"error": err}
    params = trainable(model)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    data = {"rank": rank, "asked_targets": list(targets), "lr": lr, **_adapters(model),
            "trainable": sum(p.numel() for p in params.values()),
            "non_adapter_trainable": sorted(n for n in params if "lora_" not in n)[:3],
            "optimizer": type(opt).__name__, "lrs": sorted({float(g["lr"]) for g in opt.param_groups}),
            "missing_in_optimizer": sum(id(p) not in in_opt for p in params.values()),
            "frozen_in_optimizer": len(in_opt - {id(p) for p in params.values()})}
    # one optimizer step creates the state; its size depends on the parameters' shapes and the optimizer only, so
    # seeded gradients stand in for a forward and backward through the 4-bit model
    g = torch.Generator().manual_seed(ctx.seed)
    for p in params.values():
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device=p.device, dtype=p.dtype)
    opt.step()
    data["state_bytes"] = quantization.optimizer_state_bytes(opt)
    return data


@lora_and_optimizer.judge
def _(got, ref, ctx):
    g, r = got.data, ref.data
    assert "error" not in g, g.get("error")
    asked = f"rank={g['rank']}, targets={g['asked_targets']}, lr={g['lr']:g}"
    assert g["count"], f"build_qlora({asked}): no LoRA adapters found: wrap the model with peft.get_peft_model"
    assert not g["non_adapter_trainable"], (f"build_qlora({asked}): base parameters are trainable "
                                            f"({g['non_adapter_trainable']}...): freeze everything but the adapters")
    assert g["targets"] == r["targets"], (f"build_qlora({asked}): adapters on {g['targets']}, asked for "
                                          f"{r['targets']}: pass target_modules=list(targets) (not a fixed list, "
                                          "not 'all-linear')")
    assert g["ranks"] == r["ranks"], f"build_qlora({asked}): adapters of rank {g['ranks']}: use r=rank"
    assert g["scalings"] == r["scalings"], (f"build_qlora({asked}): the adapters scale B A by {g['scalings']}, the "
                                            f"recipe by {r['scalings']}: lora_alpha = 2 * rank")
    assert g["dropouts"] == r["dropouts"], f"build_qlora({asked}): LoRA dropout {g['dropouts']}, the recipe's is {r['dropouts']}"
    assert g["base_types"] == r["base_types"], (f"the adapted layers are {g['base_types']}, not {r['base_types']}: "
                                                "put LoRA on the 4-bit model")
    assert not g["missing_in_optimizer"] and not g["frozen_in_optimizer"], (
        f"the optimizer misses {g['missing_in_optimizer']} trainable tensors and holds {g['frozen_in_optimizer']} "
        "frozen ones: build it from [p for p in model.parameters() if p.requires_grad]")
    assert g["lrs"] == r["lrs"], f"build_qlora({asked}): the optimizer's learning rate is {g['lrs']}: use lr={g['lr']:g}"
    assert g["state_bytes"] <= STATE_RATIO * r["state_bytes"], (
        f"after one step {g['optimizer']} holds {g['state_bytes']:,} bytes of state for {g['trainable']:,} "
        f"trainable values, the recipe's 8-bit AdamW {r['state_bytes']:,}: use bitsandbytes PagedAdamW8bit on CUDA, "
        "AdamW8bit elsewhere")
    return {"trainable_params": g["trainable"], "optimizer_state_bytes": g["state_bytes"], "optimizer": g["optimizer"]}


@CHECKS.check(points=2, needs=["build_qlora"])
def checkpointing_active(ns, ctx):
    """non-reentrant checkpointing is on and really active (measured), the KV cache off, the adapters get gradients"""
    from ..checkpointing import block_activation_bytes
    from ..text import random_batch
    model, _, err = _shared_build(ns, ctx, keep=False)
    if err:
        return {"error": err}
    for m in model.modules():  # dropout off: the two forwards must do the same work
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    func = getattr(flagged[0], "_gradient_checkpointing_func", None) if flagged else None
    kw = getattr(func, "keywords", {}) or {}
    vocab = model.config.vocab_size
    held = block_activation_bytes(model, random_batch(vocab, 2, 128, device=ctx.device, seed=ctx.seed))
    out = model(**random_batch(vocab, 2, 32, device=ctx.device, seed=ctx.seed + 1))
    out.loss.backward()
    b_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    return {"held_bytes": held, "flagged": len(flagged), "flagged_training": sum(m.training for m in flagged),
            "reentrant": None if "use_reentrant" not in kw else bool(kw["use_reentrant"]),
            "use_cache": bool(getattr(model.config, "use_cache", False)),
            "b_grads": bool(b_grads) and all(g is not None and float(g.abs().sum()) > 0 for g in b_grads)}


@checkpointing_active.judge
def _(got, ref, ctx):
    g, r = got.data, ref.data
    assert "error" not in g, g.get("error")
    ratio = g["held_bytes"] / max(r["held_bytes"], 1)
    if ratio > CKPT_RATIO:
        if not g["flagged"]:
            why = "gradient checkpointing is not enabled: model.gradient_checkpointing_enable(...)"
        elif not g["flagged_training"]:
            why = ("the decoder layers are in eval mode, where Hugging Face skips checkpointing: call model.train() "
                   "on the final (PEFT) model -- a PeftModel can report training while its inner layers are in eval")
        else:
            why = "the checkpointed layers do not save memory"
        raise AssertionError(f"after a forward the decoder blocks keep {fmt_bytes(g['held_bytes'])}, the recipe's "
                             f"{fmt_bytes(r['held_bytes'])} (ratio {ratio:.1f} > {CKPT_RATIO}): {why}")
    assert g["reentrant"] is False, (
        "pass gradient_checkpointing_kwargs={'use_reentrant': False}: the reentrant variant drops the adapters' "
        "gradients unless an input requires grad (peft's prepare_model_for_kbit_training defaults to it)")
    assert not g["use_cache"], "set model.config.use_cache = False: a KV cache is useless in training"
    assert g["b_grads"], "the LoRA B matrices got no gradient: are the adapters connected to the loss?"
    return {"held_ckpt_bytes": g["held_bytes"], "reference_held_bytes": r["held_bytes"], "ratio": ratio}


# ---------------------------------------------------------------------------------------------- the step
def _step_model(ctx, salt: int, hidden: int = 128):
    """A small GQA Llama with LoRA r=8 on q,k,v,o, non-reentrant checkpointing, dropout off, SGD."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(ctx.seed * 17 + salt)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0)
    model = apply_lora(qlora.prepare_lean(LlamaForCausalLM(cfg).to(ctx.device)), r=8, targets=qlora.QKVO,
                       dropout=0.0).train()
    return model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)


@CHECKS.check(points=2, needs=["qlora_train_step"])
def accumulation_exact(ns, ctx):
    """uneven micro-batches give the full batch's gradient and loss, one optimizer step per call, twice"""
    from ..text import random_batch
    from ..text import padded_batch
    model, opt = _step_model(ctx, 1)
    rows, mb = ctx.rng.choice([(5, 2), (6, 4), (7, 3), (7, 2), (5, 3)])
    seq = ctx.rng.randint(24, 48)
    # right-padded rows of different lengths: micro-batches hold different numbers of target tokens, so a step
    # that weights them by rows (or by 1 / count) moves the parameters differently from the token-normalized one
    lengths = [[ctx.rng.randint(seq // 4, seq) for _ in range(rows - 1)] + [seq] for _ in range(2)]
    batches = iter([padded_batch(lens, 512, device=ctx.device, seed=ctx.seed + i) for i, lens in enumerate(lengths)])
    calls = record_calls(lambda: ns["qlora_train_step"](model, opt, next(batches), micro_batch=mb), opt,
                         trainable(model), ctx.seed)
    return {"calls": calls, "rows": rows, "micro_batch": mb, "seq": seq, "lengths": lengths[0]}


@accumulation_exact.judge
def _(got, ref, ctx):
    d = got.data
    what = (f"qlora_train_step on {d['rows']} right-padded rows (lengths {d.get('lengths')}) with "
            f"micro_batch={d['micro_batch']}")
    return judge_calls(d["calls"], ref.data["calls"], what=what, grad_tol=GRAD_TOL, param_tol=GRAD_TOL,
                       loss_tol=1e-4, need_float=False,
                       hint_grads=("Token-normalize (lab 04): each micro-batch's loss is the sum of its token "
                                   "losses / the whole batch's target tokens (labels[:, 1:] != -100; pass "
                                   "num_items_in_batch=N), not its mean loss x its rows / all rows or / the number "
                                   "of micro-batches; call backward on each; zero_grad once per call, before the "
                                   "first micro-batch."),
                       hint_loss="Return the batch's mean token loss: the sum of the normalized micro-batch losses.")


@CHECKS.check(points=2, needs=["qlora_train_step"], measures_memory=True)
def peak_vs_default_stack(ns, ctx):
    """a step on 8 x 640 with micro_batch=2 peaks like one micro-batch (measured against the recipe's step)"""
    from ..text import random_batch
    # wide and long enough that the activations of one micro-batch rise ~30 MiB: the grader measures from
    # outside the process (cgroup, a few MiB of slack), where a rise of a few MiB would be noise
    model, opt = _step_model(ctx, 2, hidden=MEMORY_HIDDEN)
    batch = random_batch(512, 8, MEMORY_SEQ, device=ctx.device, seed=ctx.seed)
    # one call: what a second call could add (a missing zero_grad) is accumulation_exact's to catch
    calls = record_calls(lambda: ns["qlora_train_step"](model, opt, batch, micro_batch=2), opt, trainable(model),
                         ctx.seed, calls=1, fingerprints=False)
    del model, opt, batch
    return {"calls": calls}


@peak_vs_default_stack.judge
def _(got, ref, ctx):
    judge_calls(got.data["calls"], ref.data["calls"], what="qlora_train_step (memory check)", grad_tol=math.inf,
                param_tol=math.inf, loss_tol=1e-3, need_float=False, hint_grads="")
    shown = memory_rise_within(
        got.memory, ref.memory, STEP_PEAK_RATIO, f"a step on 8 x {MEMORY_SEQ} with micro_batch=2",
        "only one micro-batch's activations may be alive at a time -- call backward on each micro-batch's loss "
        "inside the loop (summing the losses and calling backward once keeps every graph), and keep "
        "loss.item(), not the loss tensor")
    return {**shown, "ratio_to_reference": got.memory.delta_bytes / max(ref.memory.delta_bytes, 1)}


class _RecordingScaler(torch.amp.GradScaler):
    """An enabled GradScaler that counts ``scale``, ``step`` and ``update`` calls (plain data for the judge)."""

    def __init__(self, device):
        super().__init__(torch.device(device).type, init_scale=SCALER_INIT_SCALE)
        self.calls = {"scale": 0, "step": 0, "update": 0}

    def scale(self, outputs):
        self.calls["scale"] += 1
        return super().scale(outputs)

    def step(self, optimizer, *args, **kwargs):
        self.calls["step"] += 1
        return super().step(optimizer, *args, **kwargs)

    def update(self, new_scale=None):
        self.calls["update"] += 1
        return super().update(new_scale)


@CHECKS.check(points=1, needs=["qlora_train_step"])
def scaler_steps(ns, ctx):
    """with an fp16 run's GradScaler: each micro-batch's loss scaled, one scaler.step + update per call, twice"""
    from ..text import random_batch
    model, opt = _step_model(ctx, 3)
    rows, mb = ctx.rng.choice([(5, 2), (6, 4), (7, 3), (7, 2)])
    seq = ctx.rng.randint(24, 48)
    batches = iter([random_batch(512, rows, seq, device=ctx.device, seed=ctx.seed + 10 + i) for i in range(2)])
    scaler = _RecordingScaler(ctx.device)
    calls = record_calls(lambda: ns["qlora_train_step"](model, opt, next(batches), micro_batch=mb, scaler=scaler),
                         opt, trainable(model), ctx.seed)
    return {"calls": calls, "scaler_calls": dict(scaler.calls), "rows": rows, "micro_batch": mb, "seq": seq}


@scaler_steps.judge
def _(got, ref, ctx):
    d, r = got.data, ref.data
    what = f"qlora_train_step(..., micro_batch={d['micro_batch']}, scaler=GradScaler) on {d['rows']} rows x {d['seq']}"
    first = d["calls"][0] if d["calls"] else {}
    assert "scaler" not in first.get("raised", ""), (
        f"{what} raised {first['raised']}: add the keyword argument scaler=None to qlora_train_step (a T4 trains "
        "in fp16 and needs a GradScaler, lab 02); with scaler=None the step must work as before")
    for i, rec in enumerate(d["calls"]):
        assert "since the last update" not in rec.get("raised", ""), (
            f"{what}: call {i + 1} raised {rec['raised']}: call scaler.update() after scaler.step(optimizer) in "
            "every step")
    judge_raised(d["calls"], what)
    g, w = d["scaler_calls"], r["scaler_calls"]
    assert g["scale"] == w["scale"], (
        f"{what}: scaler.scale ran {g['scale']} times in 2 calls, the reference {w['scale']} (once per micro-batch): "
        "call scaler.scale(loss).backward() on each micro-batch's loss -- without it fp16 gradients underflow")
    assert g["step"] == w["step"], (
        f"{what}: scaler.step ran {g['step']} times in 2 calls (expected {w['step']}): step the optimizer through "
        "scaler.step(optimizer), which unscales the gradients and skips the step when they overflowed")
    assert g["update"] == w["update"], (
        f"{what}: scaler.update ran {g['update']} times in 2 calls (expected {w['update']}): call scaler.update() "
        "after scaler.step(optimizer), once per optimizer step, so the scale adapts")
    return judge_calls(d["calls"], r["calls"], what=what, grad_tol=GRAD_TOL, param_tol=GRAD_TOL, loss_tol=1e-4,
                       need_float=False,
                       hint_grads=(f"The optimizer was handed gradients still multiplied by the loss scale "
                                   f"({SCALER_INIT_SCALE:g} here) or otherwise different: call scaler.step(optimizer), "
                                   "not optimizer.step(), after the scaled backward passes."),
                       hint_loss="Return the batch's (unscaled) mean loss: loss.item(), not the scaled loss.")


# ---------------------------------------------------------------------------------------------- GPU: the 7B
def _collect_7b(ns, ctx):
    from ..text import random_batch
    model, opt = ns["build_qlora"]("llama-7b", rank=16, device=ctx.device)
    batch = random_batch(model.config.vocab_size, 8, 512, device=ctx.device, seed=ctx.seed)
    # fp16 compute (a T4) needs a GradScaler (lab 02); bf16 and fp32 get none, as the default scaler=None
    kw = {"scaler": torch.amp.GradScaler("cuda")} if _compute_dtype(model) == torch.float16 else {}
    calls = record_calls(lambda: ns["qlora_train_step"](model, opt, batch, **kw), opt, trainable(model), ctx.seed,
                         calls=2, fingerprints=False)
    data = {"calls": calls, "paged_state_bytes": quantization.paged_state_bytes(opt)}
    del model, opt, batch
    torch.cuda.empty_cache()
    return data


@CHECKS.check(points=2, needs=["build_qlora", "qlora_train_step"], gpu_only=True, measures_memory=True)
def fits_12gb_7b(ns, ctx):
    """GPU: the 7B at batch 8 x 512 fits in a 12 GB GPU"""
    return _collect_7b(ns, ctx)


@fits_12gb_7b.judge
def _(got, ref, ctx):
    judge_raised(got.data["calls"], "the 7B step")
    paged = max(got.data["paged_state_bytes"], ref.data["paged_state_bytes"])
    used = got.memory.peak_bytes + paged + CUDA_CONTEXT_BYTES
    assert used <= GPU_BUDGET_BYTES, (
        f"peak {got.memory.peak_bytes / GiB:.2f} GiB + paged optimizer state {paged / GiB:.2f} GiB + ~0.5 GiB CUDA "
        f"context = {used / GiB:.2f} GiB > 12 GiB")
    bar = PASS_RATIO * qlora.default_stack_b8_bytes()
    assert got.memory.peak_bytes + paged <= bar, (
        f"peak {(got.memory.peak_bytes + paged) / GiB:.2f} GiB fits 12 GiB, but so does the default HF + PEFT stack "
        f"({qlora.default_stack_b8_bytes() / GiB:.2f} GiB): passing needs <= {bar / GiB:.2f} GiB ({PASS_RATIO} x it). "
        "Use the course's techniques: micro-batches (gradient accumulation), no fp32 upcast, 8-bit optimizer state")
    return {"peak_allocated_bytes": got.memory.peak_bytes, "paged_state_bytes": paged}


@CHECKS.check(points=2, needs=["build_qlora", "qlora_train_step"], gpu_only=True, measures_memory=True)
def beats_default_7b(ns, ctx):
    """GPU: the 7B at batch 8 x 512 peaks clearly below the default HF + PEFT stack"""
    return _collect_7b(ns, ctx)


@beats_default_7b.judge
def _(got, ref, ctx):
    judge_raised(got.data["calls"], "the 7B step")
    bar = BEAT_DEFAULT_RATIO * qlora.default_stack_b8_bytes()
    peak = got.memory.peak_bytes + max(got.data["paged_state_bytes"], ref.data["paged_state_bytes"])
    assert peak <= bar, (f"peak {peak / GiB:.2f} GiB; full marks need <= {bar / GiB:.2f} GiB "
                         f"({BEAT_DEFAULT_RATIO} x the default stack's {qlora.default_stack_b8_bytes() / GiB:.2f} GiB)")
    return {"peak_allocated_bytes": peak, "bar_bytes": bar}
