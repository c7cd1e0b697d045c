"""Checks of lab 03 (LoRA).

Graded interface (the lab's graded cells define these):

* ``count_lora_params(model, targets, r) -> int`` -- trainable LoRA parameters by formula, ``r * (d_in + d_out)``
  per adapted matrix;
* ``setup_lora(model, r, targets) -> model`` -- the model wrapped by peft (``LoraConfig`` + ``get_peft_model``)
  with the lab's settings: ``lora_alpha = 2 r``, ``lora_dropout = 0.05``, ``fan_in_fan_out`` for GPT-2's Conv1D.

Reference namespace: :func:`memopt_lib.lora.count_lora_params` and :func:`memopt_lib.lora.apply_lora`. Every
check is collect/judge (:mod:`.base`).

Where the thresholds come from
------------------------------
* Counts are exact: GPT-2 and Llama-2-7B (meta device, no weights) and a grouped-query Llama (Llama-3-8B
  shape: k/v map 4096 -> 1024), targets and ranks drawn per run (never the rank 16 alone); the course's numbers
  (GPT-2 ``c_attn`` r=16: 589,824; 7B q,k,v,o r=16: 16,777,216) are among the cases.
* ``setup_lora`` is called with a rank and targets drawn per run: the adapted modules, each adapter's rank,
  its ``alpha / r`` scaling and dropout must equal the reference's; nothing else may train; peft must not have
  had to correct ``fan_in_fan_out``. B = 0: logits equal the base model's to ``OUTPUT_ATOL`` (adding an exact
  zero); then the checker writes the same seeded values into every A and B of the student's and the
  reference's model: the logits must agree to ``OUTPUT_RTOL`` (same modules, same scaling, same orientation;
  a wrong ``lora_alpha`` changes them by ``alpha_ref / alpha - 1``, adapters on other modules by ~100 %).
* Memory (``measures_memory``): the checker builds a GPT-2-architecture model (2 x 128, vocab 8192: the
  embedding makes the frozen base count), wraps it with ``setup_lora`` (r=16 on ``c_attn``), builds AdamW over what requires grad and
  runs two steps inside the measured window; the peak above the start may be at most ``CPU_PEAK_RATIO`` x the
  reference's, and AdamW's state at most ``STATE_RATIO`` x. Measured on CPU (tracker; reference 37.6 MiB
  above the start, 131,088 bytes of state): the base left trainable 1.37x peak and 93x state, ``bias="all"``
  1.18x state, adapters on every linear layer 4.0x state; the solution 1.00x. On a GPU with the real shapes (GPT-2 at batch 8 x 512, bf16
  autocast as in the anchor) the peak must also stay under the H200 anchor
  ``gpt2 B8 S512 lora-r16(c_attn) amp-bf16`` x ``GPU_MARGIN``.
"""
from __future__ import annotations

from ..models import from_config  # names the causal-LM loss: no transformers warning

import copy
import hashlib
import warnings

import torch

from .. import lora as L
from ..profiler import fmt_bytes
from .base import Registry, fingerprint, fingerprint_error

CHECKS = Registry(lab="03", reference=lambda: {"count_lora_params": L.count_lora_params,
                                               "setup_lora": lambda model, r, targets: L.apply_lora(
                                                   model, r=r, targets=list(targets))})

GPT2_C_ATTN_R16 = 589_824
LLAMA7B_QKVO_R16 = 16_777_216
OUTPUT_ATOL = 1e-5
OUTPUT_RTOL = 1e-4
CPU_PEAK_RATIO = 1.10
STATE_RATIO = 1.05
GPU_MARGIN = 1.08
GPU_ANCHOR = "gpt2 B8 S512 lora-r16(c_attn) amp-bf16"
LLAMA_SETS = (("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "v_proj"), ("k_proj", "v_proj", "down_proj"),
              ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
GPT2_SETS = (("c_attn",), ("c_attn", "c_proj"), ("c_fc",), ("c_proj",), ("c_attn", "c_fc", "c_proj"))
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)


def _meta(name=None, **llama):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ..models import meta_model
    if name:
        return meta_model(name)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(LlamaConfig(**llama))


def _count(ns, model, targets, r):
    v = ns["count_lora_params"](model, list(targets), r)
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else repr(v)


def _judge_counts(got, ref):
    for (label, mine), (_, want) in zip(got.data["cases"], ref.data["cases"]):
        assert isinstance(mine, int), f"{label}: return an int, got {mine}"
        assert mine == want, (f"{label}: you count {mine:,}, peft creates {want:,} (off by {mine - want:+,}). Sum "
                              "r * (d_in + d_out) over every Linear/Conv1D whose name ends with a target: GPT-2's "
                              "Conv1D stores (d_in, d_out), attn.c_proj and mlp.c_proj both end with c_proj, and "
                              "with grouped-query attention k_proj/v_proj are narrower than q_proj")
    return {label: want for label, want in ref.data["cases"]}


@CHECKS.check(points=1, needs=["count_lora_params"])
def lora_counts_gpt2(ns, ctx):
    """GPT-2 adapter counts by formula equal peft's (c_attn r=16 = 589,824; other targets and ranks)."""
    cases = [(("c_attn",), 16)] + [(ctx.rng.choice(GPT2_SETS), ctx.rng.choice([1, 2, 4, 8, 12, 24, 32, 64]))
                                   for _ in range(3)]
    model = _meta("gpt2")
    return {"cases": [[f"GPT-2 {list(t)} r={r}", _count(ns, model, t, r)] for t, r in cases]}


@lora_counts_gpt2.judge
def _(got, ref, ctx):
    assert ref.data["cases"][0][1] == GPT2_C_ATTN_R16, "checker error: peft's GPT-2 c_attn r=16 count changed"
    return _judge_counts(got, ref)


@CHECKS.check(points=1, needs=["count_lora_params"])
def lora_counts_llama7b(ns, ctx):
    """Llama-2-7B and a grouped-query Llama: adapter counts equal peft's, targets and ranks drawn."""
    big, gqa = _meta("llama-7b"), _meta(**LLAMA3_8B)
    cases = [("Llama-2-7B", big, LLAMA_SETS[0], 16)]
    cases += [("Llama-2-7B", big, ctx.rng.choice(LLAMA_SETS), ctx.rng.choice([2, 4, 8, 32, 64]))]
    cases += [("Llama-3-8B shape (GQA)", gqa, ctx.rng.choice(LLAMA_SETS[:3]), ctx.rng.choice([4, 8, 16, 32]))
              for _ in range(2)]
    return {"cases": [[f"{name} {list(t)} r={r}", _count(ns, m, t, r)] for name, m, t, r in cases]}


@lora_counts_llama7b.judge
def _(got, ref, ctx):
    assert ref.data["cases"][0][1] == LLAMA7B_QKVO_R16, "checker error: peft's 7B q,k,v,o r=16 count changed"
    return _judge_counts(got, ref)


def _tiny(seed: int, device, vocab=None):
    """gpt2-tiny's architecture with the checker's own init (dropout kept, as in the lab)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ..models import model_config
    cfg = model_config("gpt2-tiny").to_dict()
    if vocab:
        cfg["vocab_size"] = vocab
    torch.manual_seed(seed)
    return from_config(GPT2Config(**cfg)).to(device)


def _setup(ns, model, r, targets):
    """The student's setup_lora, and peft's warnings while it ran."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ns["setup_lora"](model, r, list(targets))
    return out, [str(w.message) for w in caught]


def _adapters(pm) -> dict:
    mods = [(n, m) for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})]
    return {"adapted": sorted(n.split("base_model.model.")[-1] for n, _ in mods),
            "ranks": sorted({int(m.r["default"]) for _, m in mods}),
            "scalings": sorted({round(float(m.scaling["default"]), 6) for _, m in mods}),
            "dropouts": sorted({round(float(getattr(m.lora_dropout["default"], "p", 0.0)), 6) for _, m in mods}),
            "fan_in_fan_out": sorted({bool(getattr(m, "fan_in_fan_out", False)) for _, m in mods})}


def _is_peft(pm) -> bool:
    from peft import PeftModel
    return isinstance(pm, PeftModel)


def _judge_adapters(g, r, what):
    assert g["peft"], f"{what}: return the model from peft's get_peft_model, not a {g['type']}"
    assert g["adapted"], f"{what}: no LoRA adapters in the returned model"
    gs, rs = set(g["adapted"]), set(r["adapted"])
    assert gs == rs, (f"{what}: adapters on {sorted(gs - rs)[:3] or sorted(rs - gs)[:3]} "
                      f"{'should not be there' if gs - rs else 'are missing'}: target_modules=list(targets)")
    assert g["ranks"] == r["ranks"], f"{what}: adapters of rank {g['ranks']}: use r=r (the argument)"
    assert g["scalings"] == r["scalings"], (f"{what}: B A is scaled by {g['scalings']} (alpha / r), the lab's by "
                                            f"{r['scalings']}: lora_alpha = 2 * r, not a fixed number")
    assert g["dropouts"] == r["dropouts"], f"{what}: lora_dropout {g['dropouts']}, the lab uses {r['dropouts']}"


@CHECKS.check(points=2, needs=["setup_lora"])
def only_adapters_trainable(ns, ctx):
    """Only lora_A/lora_B require grad; counts exact; Conv1D (GPT-2) gets fan_in_fan_out, nn.Linear (Llama) not."""
    from ..models import meta_model
    out = []
    for name in ("gpt2-tiny", "llama-tiny"):
        r = ctx.rng.choice([4, 8, 12, 24])
        targets = ctx.rng.choice(GPT2_SETS if name == "gpt2-tiny" else LLAMA_SETS)
        model = _tiny(ctx.seed, "cpu") if name == "gpt2-tiny" else meta_model(name)
        base_count = sum(p.numel() for p in model.parameters())
        pm, warned = _setup(ns, model, r, targets)
        rec = {"model": name, "r": r, "targets": list(targets), "peft": _is_peft(pm), "type": type(pm).__name__}
        if rec["peft"]:
            rec.update(_adapters(pm), leaked=L.non_adapter_trainable(pm)[:4], trainable=L.trainable_parameters(pm),
                       added=sum(p.numel() for p in pm.parameters()) - base_count,
                       fixed=[w for w in warned if "fan_in_fan_out is set to" in w][:1])
        out.append(rec)
    return {"cases": out}


@only_adapters_trainable.judge
def _(got, ref, ctx):
    for g, r in zip(got.data["cases"], ref.data["cases"]):
        what = f"setup_lora({g['model']}, r={g['r']}, targets={g['targets']})"
        assert not g.get("fixed"), (f"{what}: peft had to correct your LoraConfig ({g['fixed'][0]}): GPT-2's Conv1D "
                                    "stores weights (d_in, d_out) and needs fan_in_fan_out=True, nn.Linear False")
        _judge_adapters(g, r, what)
        assert not g["leaked"], f"{what}: frozen weights still require grad: {g['leaked']}"
        assert g["trainable"] == r["trainable"], f"{what}: {g['trainable']:,} trainable, expected {r['trainable']:,}"
        assert g["added"] == r["added"], f"{what}: the model grew by {g['added']:,} parameters, LoRA adds {r['added']:,}"
    return {"cases": len(got.data["cases"])}


def _write_adapters(pm, seed):
    """Seeded values (by name) into every lora_A / lora_B: the same numbers in any model with the same adapters."""
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                key = n.split("base_model.model.")[-1]
                g = torch.Generator().manual_seed(seed * 131 + int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@CHECKS.check(points=2, needs=["setup_lora"])
def b_zero_gives_base_output(ns, ctx):
    """With B = 0 the adapted model gives the base logits; with A, B set by the checker, the reference's logits."""
    from ..text import random_batch
    r, targets = ctx.rng.choice([4, 8, 12]), ctx.rng.choice(GPT2_SETS)
    base = _tiny(ctx.seed, ctx.device).eval()
    batch = random_batch(base.config.vocab_size, 2, 32, device=ctx.device, seed=ctx.seed)
    with torch.no_grad():
        want = base(input_ids=batch["input_ids"]).logits
    pm, _ = _setup(ns, copy.deepcopy(base), r, targets)
    rec = {"r": r, "targets": list(targets), "peft": _is_peft(pm), "type": type(pm).__name__}
    if not rec["peft"]:
        return rec
    pm.eval()
    rec.update(_adapters(pm))
    bs = L.lora_b_matrices(pm)
    rec["b_zero"] = bool(bs) and all(float(b.detach().abs().max()) == 0.0 for b in bs.values())
    with torch.no_grad():
        rec["diff_b0"] = float((pm(input_ids=batch["input_ids"]).logits - want).abs().max())
        _write_adapters(pm, ctx.seed)
        logits = pm(input_ids=batch["input_ids"]).logits
    rec["moved"] = float((logits - want).abs().max())
    rec["logits"] = fingerprint({"logits": logits}, ctx.seed)
    return rec


@b_zero_gives_base_output.judge
def _(got, ref, ctx):
    g, r = got.data, ref.data
    what = f"setup_lora(gpt2-tiny, r={g['r']}, targets={g['targets']})"
    _judge_adapters(g, r, what)
    assert g["b_zero"], f"{what}: lora_B must start at zero (peft's default init): do not initialize it yourself"
    assert g["diff_b0"] <= OUTPUT_ATOL, f"{what}: with B = 0 the logits differ from the base model's by {g['diff_b0']:.3g}"
    assert g["moved"] > 1e-3, f"{what}: changing lora_A/lora_B does not change the output: adapters not in the forward"
    err = fingerprint_error(g["logits"], r["logits"])
    assert err <= OUTPUT_RTOL, (f"{what}: with the checker's A and B your model's logits differ from the reference "
                                f"LoRA's by {err:.2e} (relative): check fan_in_fan_out (True for GPT-2's Conv1D) "
                                "and lora_alpha = 2 * r")
    return {"max_abs_diff_b0": g["diff_b0"], "logits_error_with_ab": err}


def _real_gpu(ctx) -> bool:
    prof = ctx.profile
    return ctx.is_gpu and prof is not None and (prof.gpt2, prof.gpt2_batch, prof.gpt2_seq) == ("gpt2", 8, 512)


@CHECKS.check(points=2, needs=["setup_lora"], measures_memory=True)
def optimizer_state_bytes(ns, ctx):
    """Two LoRA steps (model, setup_lora, AdamW over what requires grad) peak and keep state like the reference's."""
    from ..mixed_precision import PrecisionConfig, autocast_factory
    from ..profiler import train_step_fn
    from ..text import random_batch
    real = _real_gpu(ctx)
    if real:
        from ..models import load_model
        torch.manual_seed(ctx.seed)
        base = load_model("gpt2").to(ctx.device)
        rows, seq = 8, 512
    else:
        base, rows, seq = _tiny(ctx.seed, ctx.device).train(), 4, 64
    pm, _ = _setup(ns, base, 16, ["c_attn"])
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if ctx.device.type == "cuda" else {}))
    batch = random_batch(base.config.vocab_size, rows, seq, device=ctx.device, seed=ctx.seed)
    step = train_step_fn(pm, batch, opt, autocast=autocast_factory(PrecisionConfig("amp"), ctx.device) if real else None)
    step()
    step()
    out = {"state_bytes": L.optimizer_state_bytes(opt), "trainable": sum(p.numel() for p in params), "real": real}
    del pm, base, opt, params, batch, step
    return out


@optimizer_state_bytes.judge
def _(got, ref, ctx):
    from .. import anchors
    from ..profiler import GiB
    g, r = got.data, ref.data
    assert g["state_bytes"] <= STATE_RATIO * r["state_bytes"], (
        f"AdamW over what your model trains holds {g['state_bytes']:,} bytes of state for {g['trainable']:,} values; "
        f"with the adapters alone it is {r['state_bytes']:,}: freeze the base model (peft does, unless something "
        "unfreezes it or adds modules_to_save)")
    ratio = got.memory.delta_bytes / max(ref.memory.delta_bytes, 1)
    assert ratio <= CPU_PEAK_RATIO, (
        f"two LoRA steps peak {fmt_bytes(got.memory.delta_bytes)} above the start, the reference's "
        f"{fmt_bytes(ref.memory.delta_bytes)} (ratio {ratio:.2f} > {CPU_PEAK_RATIO}): does the base model train?")
    shown = {"state_bytes": g["state_bytes"], "ratio_to_reference": ratio}
    if g["real"]:
        budget = anchors.row(GPU_ANCHOR)["peak_steady_GiB"] * GPU_MARGIN * GiB
        assert got.memory.peak_bytes <= budget, (f"LoRA step peak {got.memory.peak_bytes / GiB:.2f} GiB > "
                                                 f"{budget / GiB:.2f} GiB (H200 anchor x {GPU_MARGIN})")
        shown["budget_bytes"] = int(budget)
    return shown
