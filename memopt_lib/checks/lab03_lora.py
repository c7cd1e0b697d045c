"""Checks of lab 03 (LoRA).

Graded interface (the lab's graded cells define these):

* ``count_lora_params(model, targets, r) -> int`` -- trainable LoRA parameters by
  formula, ``r * (d_in + d_out)`` per adapted matrix;
* ``setup_lora(model, r, targets) -> model`` -- the model wrapped by peft
  (``LoraConfig`` + ``get_peft_model``).

Where the thresholds come from
------------------------------
* Counts are exact: the checker wraps the same architecture with peft itself (on
  the ``meta`` device for GPT-2 and the Llama-2-7B shape, so no weights exist)
  and compares; the course's reference numbers (GPT-2 ``c_attn`` r=16: 589,824;
  7B q,k,v,o r=16: 16,777,216) are asserted too.
* B = 0: the adapted model must reproduce the base model's logits to ``OUTPUT_ATOL``
  (float32 rounding of adding an exact zero is none; the tolerance only absorbs
  kernel differences), and must *differ* once the checker sets B to random values
  (so the adapters are really in the forward pass).
* Optimizer state: AdamW keeps two fp32 moments per trainable value plus a 4-byte
  ``step`` per tensor, so the bound is exact: ``8 * trainable + 4 * tensors``.
  On a CPU the checker also measures a full fine-tuning step of the same model in
  the same run and requires the LoRA state to be under ``CPU_STATE_RATIO`` of it.
  On a GPU (GPT-2 at batch 8 x 512, bf16 autocast as in the anchor) the LoRA step's
  peak must stay under the H200 anchor ``gpt2 B8 S512 lora-r16(c_attn) amp-bf16``
  times ``GPU_MARGIN``.
"""
from __future__ import annotations

import copy
import warnings

import torch

from .. import anchors
from .base import Registry

CHECKS = Registry(lab="03")

GPT2_C_ATTN_R16 = 589_824
LLAMA7B = {("q_proj", "k_proj", "v_proj", "o_proj"): 16_777_216, ("q_proj", "v_proj"): 8_388_608,
           ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"): 39_976_960}
OUTPUT_ATOL = 1e-5
CPU_STATE_RATIO = 0.05  # LoRA AdamW state / full fine-tuning AdamW state, gpt2-tiny r=16 on c_attn
GPU_MARGIN = 1.08
GPU_ANCHOR = "gpt2 B8 S512 lora-r16(c_attn) amp-bf16"


def peft_count(meta_name: str, targets, r: int) -> int:
    """Trainable parameters that peft itself creates (model on the meta device: no weights)."""
    from ..lora import apply_lora, trainable_parameters
    from ..models import meta_model
    return trainable_parameters(apply_lora(meta_model(meta_name), r=r, targets=list(targets), dropout=0.0))


def _count(ns, meta_name, targets, r):
    from ..models import meta_model
    got = ns["count_lora_params"](meta_model(meta_name), list(targets), r)
    assert isinstance(got, int) and not isinstance(got, bool), f"return an int, not {type(got).__name__}"
    return got


@CHECKS.check(points=1, needs=["count_lora_params"])
def lora_counts_gpt2(ns, ctx):
    """GPT-2 adapter counts by formula equal peft's (c_attn r=16 = 589,824; other targets and ranks)."""
    cases = [(("c_attn",), 16), (("c_attn", "c_proj"), ctx.rng.randint(1, 64)), (("c_fc",), ctx.rng.choice([4, 8, 32]))]
    out = {}
    for targets, r in cases:
        ref = peft_count("gpt2", targets, r)
        got = _count(ns, "gpt2", targets, r)
        assert got == ref, (f"GPT-2 {list(targets)} r={r}: you count {got:,}, peft creates {ref:,}. Sum r*(d_in+d_out) "
                            "over every module whose name ends with a target (attn.c_proj and mlp.c_proj differ)")
        out[f"{'+'.join(targets)} r={r}"] = got
    assert out["c_attn r=16"] == GPT2_C_ATTN_R16
    return out


@CHECKS.check(points=1, needs=["count_lora_params"])
def lora_counts_llama7b(ns, ctx):
    """Llama-2-7B adapter counts (meta device) equal peft's: q,k,v,o / q,v / all linear, r=16 and a random r."""
    out = {}
    for targets, expected in LLAMA7B.items():
        got = _count(ns, "llama-7b", targets, 16)
        ref = peft_count("llama-7b", targets, 16)
        assert ref == expected, f"peft counts {ref:,} for {targets}; the course expects {expected:,}"
        assert got == ref, f"7B {list(targets)} r=16: you count {got:,}, peft creates {ref:,}"
        out["+".join(t[0] for t in targets)] = got
    r = ctx.rng.choice([2, 8, 32, 64])
    got, ref = _count(ns, "llama-7b", ("q_proj", "v_proj"), r), peft_count("llama-7b", ("q_proj", "v_proj"), r)
    assert got == ref, f"7B q,v r={r}: you count {got:,}, peft creates {ref:,}"
    return out


def _tiny(seed: int, device):
    from ..models import load_model
    torch.manual_seed(seed)
    model = load_model("gpt2-tiny").to(device)
    for p in model.parameters():  # the checker's own weights, not the cached checkpoint's
        torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else torch.nn.init.normal_(p, std=0.01)
    return model


def _setup(ns, model, r, targets, warned=None):
    """Run the student's setup_lora; peft's warnings go to ``warned`` (a list) when given."""
    from peft import PeftModel
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ns["setup_lora"](model, r, list(targets))
    if warned is not None:
        warned.extend(str(w.message) for w in caught)
    assert isinstance(out, PeftModel), f"return the model from peft's get_peft_model, not {type(out).__name__}"
    return out


@CHECKS.check(points=2, needs=["setup_lora"])
def only_adapters_trainable(ns, ctx):
    """Only lora_A/lora_B require grad; counts exact; Conv1D (GPT-2) gets fan_in_fan_out, nn.Linear (Llama) not."""
    from ..lora import non_adapter_trainable, trainable_parameters
    from ..models import meta_model
    r = ctx.rng.choice([4, 8, 16])
    for name, targets in (("gpt2-tiny", ("c_attn",)), ("llama-tiny", ("q_proj", "v_proj"))):
        model = meta_model(name) if name != "gpt2-tiny" else _tiny(ctx.rng.randrange(10**6), "cpu")
        base_count = sum(p.numel() for p in model.parameters())
        warned = []
        pm = _setup(ns, model, r, targets, warned)
        leaked = non_adapter_trainable(pm)
        assert not leaked, f"{name}: frozen weights still require grad: {leaked[:4]}"
        expected = peft_count(name, targets, r)
        got = trainable_parameters(pm)
        assert got == expected, f"{name} {list(targets)} r={r}: {got:,} trainable parameters, expected {expected:,}"
        assert sum(p.numel() for p in pm.parameters()) == base_count + expected, "the base model changed size"
        # peft silently corrects a wrong fan_in_fan_out (and says so in a warning): the config must be right
        fixed = [w for w in warned if "fan_in_fan_out is set to" in w]
        assert not fixed, (f"{name}: peft had to correct your LoraConfig ({fixed[0]}): GPT-2's Conv1D stores weights "
                           "(d_in, d_out) and needs fan_in_fan_out=True, nn.Linear needs False")
    return {"r": r}


@CHECKS.check(points=2, needs=["setup_lora"])
def b_zero_gives_base_output(ns, ctx):
    """With B = 0 (peft's init) the adapted model gives the base model's logits; with B != 0 it does not."""
    from ..lora import lora_b_matrices
    from ..text import random_batch
    seed = ctx.rng.randrange(10**6)
    base = _tiny(seed, ctx.device).eval()
    batch = random_batch(base.config.vocab_size, 2, 32, device=ctx.device, seed=seed)
    with torch.no_grad():
        want = base(input_ids=batch["input_ids"]).logits
    pm = _setup(ns, copy.deepcopy(base), 8, ["c_attn"]).eval()
    bs = lora_b_matrices(pm)
    assert bs, "no lora_B matrices found: are the adapters on c_attn?"
    assert all(float(b.detach().abs().max()) == 0.0 for b in bs.values()), "lora_B must start at zero (peft's default)"
    with torch.no_grad():
        got = pm(input_ids=batch["input_ids"]).logits
        diff = float((got - want).abs().max())
        assert diff <= OUTPUT_ATOL, f"with B = 0 the logits differ from the base model's by {diff:.3g}"
        for b in bs.values():
            b.normal_(std=2.0)
        moved = float((pm(input_ids=batch["input_ids"]).logits - want).abs().max())
    assert moved > 1e-3, "changing lora_B does not change the output: the adapters are not in the forward pass"
    return {"max_abs_diff_b0": diff, "max_abs_diff_b_random": moved}


@CHECKS.check(points=2, needs=["setup_lora"])
def optimizer_state_bytes(ns, ctx):
    """AdamW state of the LoRA model <= 8 B x trainable + 4 B x tensors; CPU: < 5 % of full fine-tuning's."""
    from ..lora import adapter_optimizer, optimizer_state_bytes as state_bytes, trainable_parameters
    from ..mixed_precision import PrecisionConfig, autocast_factory
    from ..models import load_model
    from ..profiler import GiB, measure, train_step_fn
    from ..text import random_batch
    device, prof = ctx.device, ctx.profile
    real = ctx.is_gpu and (prof.gpt2, prof.gpt2_batch, prof.gpt2_seq) == ("gpt2", 8, 512)
    seed = ctx.rng.randrange(10**6)
    if real:  # one model on the GPU: the peak is the LoRA step's alone, comparable with the anchor
        torch.manual_seed(seed)
        base = load_model("gpt2").to(device)
        batch = random_batch(base.config.vocab_size, 8, 512, device=device, seed=seed)
    else:
        base = _tiny(seed, device).train()
        batch = random_batch(base.config.vocab_size, 4, 64, device=device, seed=seed)
    pm = _setup(ns, base if real else copy.deepcopy(base), 16, ["c_attn"])
    n_train = trainable_parameters(pm)
    n_tensors = sum(1 for p in pm.parameters() if p.requires_grad)
    opt = adapter_optimizer(pm, lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    autocast = autocast_factory(PrecisionConfig("amp"), device) if real else None
    rep = measure(train_step_fn(pm, batch, opt, autocast=autocast), device=device, model=pm, optimizer=opt,
                  timeline=False)
    lora_state = state_bytes(opt)
    bound = 8 * n_train + 4 * n_tensors
    assert lora_state <= bound, (f"AdamW holds {lora_state:,} bytes for {n_train:,} trainable values (bound {bound:,}): "
                                 "does the optimizer see frozen parameters?")
    out = {"lora_state_bytes": lora_state, "lora_peak_bytes": rep.peak_allocated_bytes}
    if real:
        anchor = anchors.row(GPU_ANCHOR)["peak_steady_GiB"]
        budget = anchor * GPU_MARGIN * GiB
        assert rep.peak_allocated_bytes <= budget, (f"LoRA step peak {rep.peak_allocated_bytes / GiB:.2f} GiB > "
                                                   f"{budget / GiB:.2f} GiB (H200 anchor {anchor} x {GPU_MARGIN})")
        return {**out, "budget_bytes": int(budget)}
    full = copy.deepcopy(base)
    full_opt = torch.optim.AdamW(full.parameters(), lr=1e-4)
    train_step_fn(full, batch, full_opt)()
    full_state = state_bytes(full_opt)
    ratio = lora_state / full_state
    assert ratio < CPU_STATE_RATIO, f"LoRA optimizer state is {ratio:.1%} of full fine-tuning's (bound {CPU_STATE_RATIO:.0%})"
    return {**out, "full_state_bytes": full_state, "ratio": ratio}
