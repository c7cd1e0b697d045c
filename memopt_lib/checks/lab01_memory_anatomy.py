"""Checks of lab 01, memory anatomy (collect in the student's process, judge where no student code ran).

Graded interface: ``count_gpt2_params(config) -> int``, ``training_state_bytes(n_params, n_tensors,
optimizer) -> {"weights", "gradients", "optimizer"}``, ``full_finetune_step(model, batch, optimizer)
-> float``. Every input is drawn from the run's seed (configs, counts, batch shapes, learning rates),
so no answer can be written down in advance, and a failure message quotes this run's inputs only.

Where the thresholds come from:

* parameter counts and state bytes are exact arithmetic: equal to the reference (the
  calculator's :class:`~memopt_lib.calculator.Shape`) to the unit; the reference run also
  confirms its state bytes against the profiler's end-of-step categories (a checker self-test);
* the step *trained*: on a float64 GPT-2 built from a drawn config (dropout off) and SGD with a
  drawn learning rate and momentum, two calls on two batches must return the batches' losses
  (relative 1e-9) and leave parameters whose :func:`~memopt_lib.checks.base.fingerprint` matches
  the reference's after each call (relative 1e-7: float64 summation order). A step that never
  computes the loss, uses another loss, or skips ``zero_grad`` cannot match;
* the step is lean: two AdamW steps on a GPT-2 of 3 layers x 384, vocabulary 4096 (6.9 M parameters,
  28 MB of gradients), batch and length drawn per run. Memory is the collect's peak measured around it
  (by the grader from outside the process; in a notebook by the tracker), above the *reference's*
  starting level. Allowed: ``STEP_RATIO`` x the reference's rise plus the measuring source's slack
  (:data:`~memopt_lib.checks.base.MEMORY_SLACK_BYTES`); keeping zero-filled gradients
  (``set_to_none=False``) or a step's activations alive adds >= 15 % (measured, CPU).
  On a GPU with the real shapes also under the H200 anchor (7.81 GiB) + 10 %.
"""
from __future__ import annotations

import math

import torch

from ..calculator import OPTIMIZER_STATE_BYTES, OPTIMIZER_STATES, Shape
from ..models import from_config
from ..profiler import fmt_bytes, measure, train_step_fn
from ..text import random_batch
from .base import Registry, fingerprint, fingerprint_error, memory_rise_within

OPTIMIZERS = ("adamw", "sgd-momentum", "sgd")
STEP_RATIO = 1.08
GPU_MARGIN = 1.10
LOSS_RTOL, PARAM_RTOL = 1e-9, 1e-7


def reference_state_bytes(n_params: int, n_tensors: int, optimizer: str) -> dict:
    """The calculator's persistent-state arithmetic (fp32 weights and gradients, the optimizer's states)."""
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    opt = n_params * OPTIMIZER_STATES[optimizer] * OPTIMIZER_STATE_BYTES[optimizer]
    opt += 4 * n_tensors if optimizer == "adamw" else 0
    return {"weights": 4 * n_params, "gradients": 4 * n_params, "optimizer": opt}


def reference_step(model, batch, optimizer) -> float:
    return float(train_step_fn(model, batch, optimizer)())


CHECKS = Registry(lab="01", reference=lambda: {
    "count_gpt2_params": lambda config: Shape.from_config(config).n_params,
    "training_state_bytes": reference_state_bytes,
    "full_finetune_step": reference_step,
})


def _answer(value):
    """What the student's function returned, as plain data (its type when it is not a plain number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return {"type": type(value).__name__}
    return value


def _gpt2_config(ctx, **fixed):
    from transformers import GPT2Config
    heads = ctx.rng.choice([2, 4, 8])
    kw = dict(n_layer=ctx.rng.randint(1, 6), n_embd=heads * ctx.rng.choice([8, 16, 24]), n_head=heads,
              n_positions=ctx.rng.choice([64, 128, 333]), vocab_size=ctx.rng.randint(100, 5000),
              n_inner=ctx.rng.choice([None, 100, 257]), bos_token_id=0, eos_token_id=0)
    kw.update(fixed)
    return GPT2Config(**kw)


def _describe(cfg) -> str:
    return (f"n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, n_inner={cfg.n_inner}, vocab_size={cfg.vocab_size}, "
            f"n_positions={cfg.n_positions}")


# ---------------------------------------------------------------- parameter count
@CHECKS.check(points=2, needs=["count_gpt2_params"])
def param_count(ns, ctx):
    """count_gpt2_params(config) equals the parameters of a GPT-2 built from that config."""
    from transformers import GPT2Config
    configs = [GPT2Config()] + [_gpt2_config(ctx) for _ in range(4)]
    return {"configs": [_describe(c) for c in configs],
            "counts": [_answer(ns["count_gpt2_params"](c)) for c in configs]}


@param_count.judge
def _(got, ref, ctx):
    for desc, mine, want in zip(ref.data["configs"], got.data["counts"], ref.data["counts"]):
        assert isinstance(mine, int), f"return an int, got {mine.get('type') if isinstance(mine, dict) else mine!r}"
        assert mine == want, (
            f"for {desc}: you count {mine:,}, the model has {want:,} (off by {mine - want:+,}). Remember biases, "
            "both LayerNorms per block, the final LayerNorm, the MLP width n_inner (4*n_embd when None), and that "
            "lm_head shares wte's weight.")
    assert len(got.data["counts"]) == len(ref.data["counts"]), "the check collected the wrong number of answers"


# ---------------------------------------------------------------- persistent state
def _measured_state(ctx, optimizer_name):
    """The profiler's weights / gradients / optimizer bytes after one step of a small drawn GPT-2."""
    torch.manual_seed(ctx.seed)
    cfg = _gpt2_config(ctx, n_positions=64, n_layer=ctx.rng.randint(1, 2))
    model = from_config(cfg).to(ctx.device)
    params = list(model.parameters())
    opt = {"adamw": lambda: torch.optim.AdamW(params, lr=1e-3, foreach=False),
           "sgd-momentum": lambda: torch.optim.SGD(params, lr=1e-3, momentum=0.9),
           "sgd": lambda: torch.optim.SGD(params, lr=1e-3)}[optimizer_name]()
    batch = random_batch(cfg.vocab_size, 2, 16, ctx.device, seed=ctx.seed)
    report = measure(train_step_fn(model, batch, opt), device=ctx.device, model=model, optimizer=opt, warmup=0,
                     timeline=False)
    n, n_tensors = sum(p.numel() for p in params), len(params)
    return n, n_tensors, {k: int(report.end_breakdown_bytes.get(k, 0)) for k in ("weights", "gradients", "optimizer")}


@CHECKS.check(points=3, needs=["training_state_bytes"])
def training_state_matches_profiler(ns, ctx):
    """training_state_bytes() predicts the weights, gradients and optimizer bytes the profiler measures, exactly."""
    fn = ns["training_state_bytes"]
    cases = []
    name = ctx.rng.choice(OPTIMIZERS)
    n, n_tensors, measured = _measured_state(ctx, name)
    cases.append((n, n_tensors, name))
    for _ in range(5):
        cases.append((ctx.rng.randint(10**5, 10**10), ctx.rng.randint(2, 500), ctx.rng.choice(OPTIMIZERS)))
    preds = []
    for n_p, n_t, opt in cases:
        p = fn(n_p, n_t, opt)
        preds.append({k: _answer(p.get(k)) for k in ("weights", "gradients", "optimizer")} if isinstance(p, dict)
                     else {"type": type(p).__name__})
    return {"cases": [list(c) for c in cases], "predictions": preds, "measured": measured}


@training_state_matches_profiler.judge
def _(got, ref, ctx):
    assert ref.data["predictions"][0] == ref.data["measured"], (
        f"checker error: the reference's arithmetic {ref.data['predictions'][0]} differs from the profiler's "
        f"measurement {ref.data['measured']}")
    for (n, n_t, opt), mine, want in zip(ref.data["cases"], got.data["predictions"], ref.data["predictions"]):
        assert "type" not in mine, f"return a dict with keys 'weights', 'gradients', 'optimizer', got {mine['type']}"
        for key in ("weights", "gradients", "optimizer"):
            assert mine[key] == want[key], (
                f"{opt} with {n:,} parameters in {n_t} tensors: you predict {key} = {mine[key]!r} bytes, "
                f"expected {want[key]:,} ({fmt_bytes(want[key])}). "
                + ("AdamW keeps exp_avg and exp_avg_sq (fp32) per parameter and a 4-byte step counter per tensor; "
                   "SGD with momentum one fp32 buffer; plain SGD nothing." if key == "optimizer"
                   else "fp32 is 4 bytes per number."))


# ---------------------------------------------------------------- the step trains
def _float64_model(ctx, cfg):
    torch.manual_seed(ctx.seed)
    return from_config(cfg).to(torch.float64).to(ctx.device)


def _two_steps(ns, ctx, model, opt, batches):
    losses, prints = [], []
    for i, batch in enumerate(batches):
        losses.append(_answer(ns["full_finetune_step"](model, {k: v.clone() for k, v in batch.items()}, opt)))
        prints.append(fingerprint(dict(model.named_parameters()), ctx.seed + i))
    return {"losses": losses, "fingerprints": prints}


@CHECKS.check(points=1, needs=["full_finetune_step"])
def training_step_trains(ns, ctx):
    """full_finetune_step returns the batch's loss and moves the parameters exactly as one SGD step on it."""
    cfg = _gpt2_config(ctx, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, n_positions=64,
                       n_layer=ctx.rng.randint(1, 3))
    model = _float64_model(ctx, cfg)
    lr, momentum = ctx.rng.choice([0.05, 0.1, 0.3]), ctx.rng.choice([0.0, 0.9])
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    b, s = ctx.rng.randint(1, 4), ctx.rng.randint(8, 48)
    batches = [random_batch(cfg.vocab_size, b, s, ctx.device, seed=ctx.seed + 10 + i) for i in range(2)]
    out = _two_steps(ns, ctx, model, opt, batches)
    out["setup"] = f"a {cfg.n_layer}-layer GPT-2 (float64), batch {b} x {s}, SGD lr={lr} momentum={momentum}"
    return out


def _judge_trained(got, ref, loss_rtol, param_rtol):
    setup = ref.data["setup"]
    for i, (mine, want) in enumerate(zip(got.data["losses"], ref.data["losses"])):
        assert not isinstance(mine, dict), (
            f"return loss.item() (a Python float), not a {mine['type']}: a loss tensor keeps its whole autograd "
            "graph -- every saved activation -- alive for as long as you hold it")
        assert isinstance(mine, float) and math.isfinite(mine), f"call {i + 1}: the loss is {mine!r}"
        assert abs(mine - want) <= loss_rtol * abs(want), (
            f"{setup}: call {i + 1} returned {mine:.6g}, the batch's loss is {want:.6g}. Return the loss of the "
            "batch you were given (model(**batch).loss), computed before optimizer.step().")
    for i, (mine, want) in enumerate(zip(got.data["fingerprints"], ref.data["fingerprints"])):
        err = fingerprint_error(mine, want)
        assert err <= param_rtol, (
            f"{setup}: after call {i + 1} the parameters differ from one optimizer step on that batch's loss "
            f"(relative {err:.1e}). Zero the gradients first, then loss.backward() and optimizer.step() once"
            + (": the second call is off, so gradients from the first call were still there" if i else "."))
    assert len(got.data["losses"]) == len(ref.data["losses"]) == len(got.data["fingerprints"])


@training_step_trains.judge
def _(got, ref, ctx):
    _judge_trained(got, ref, LOSS_RTOL, PARAM_RTOL)


# ---------------------------------------------------------------- the step is lean
@CHECKS.check(points=2, needs=["full_finetune_step"], measures_memory=True)
def training_step_is_correct_and_lean(ns, ctx):
    """Two full_finetune_step calls train and peak no higher than the reference step (memory measured around them)."""
    from transformers import GPT2Config
    gpu_real = ctx.is_gpu and getattr(ctx.profile, "is_gpu", False)
    torch.manual_seed(ctx.seed)
    if gpu_real:
        from ..models import load_model
        model, b, s = load_model("gpt2").to(ctx.device), ctx.profile.gpt2_batch, ctx.profile.gpt2_seq
    else:
        cfg = GPT2Config(n_layer=3, n_embd=384, n_head=6, n_positions=128, vocab_size=4096, bos_token_id=0,
                         eos_token_id=0)
        model, b, s = from_config(cfg).to(ctx.device).train(), ctx.rng.randint(3, 4), ctx.rng.choice([48, 64])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = [random_batch(model.config.vocab_size, b, s, ctx.device, seed=ctx.seed + 20 + i) for i in range(2)]
    out = _two_steps(ns, ctx, model, opt, batches)
    out["setup"] = f"a {model.config.n_layer}-layer GPT-2, batch {b} x {s}, AdamW"
    out["gpu_real"] = gpu_real
    return out


@training_step_is_correct_and_lean.judge
def _(got, ref, ctx):
    _judge_trained(got, ref, 1e-5, 1e-4)
    shown = memory_rise_within(got.memory, ref.memory, STEP_RATIO, (
        f"{ref.data['setup']}: two of your steps"), "Zero gradients with set_to_none=True before the forward "
        "(zero-filled gradients stay allocated through it), and keep no tensor of the step alive after it.")
    if ref.data.get("gpu_real"):
        from .base import within_anchor_budget
        shown.update(within_anchor_budget(got.memory.delta_bytes, "gpt2 B8 S512 fp32 adamw(fused)", GPU_MARGIN))
    return shown
