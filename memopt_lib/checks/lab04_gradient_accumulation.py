"""Checks of lab 04, gradient accumulation (collect in the student's process, judge where no student code ran).

Graded interface (the lab's graded cells):

* ``count_target_tokens(labels) -> int`` -- target tokens of a causal-LM loss;
* ``accumulate_gradients(model, micro_batches) -> float`` -- adds the gradient of the
  window's mean token loss to ``param.grad`` one micro-batch at a time; returns that loss.

The reference is the library's :func:`~memopt_lib.accumulation.accumulate` (and
:func:`~memopt_lib.accumulation.count_target_tokens`), run on the same drawn inputs.
Shapes, padding, k and lengths are drawn from the run's seed.

Where the thresholds come from:

* Gradients: a float64 model (dropout off); transformers computes the token losses in
  fp32 (``logits.float()``), identically for any batching, so k micro-batches and one
  full batch differ only by summation order: fingerprints within relative ``1e-6``
  (measured error ~1e-16), ~10^5 x below the error of the seed's ``loss / k`` on the same
  batches (measured: relative error 0.1-0.5). The returned loss: relative 1e-6. The
  reference run also asserts that its batch separates the two (the naive version must be
  off by > 1e-3), so a pass is earned.
* Memory: 4 micro-batches of 2 x 128 on gpt2-tiny (the logits of one micro-batch are
  ~25 MB). The collect's peak above the reference run's starting level may be at most
  ``MAX_RATIO_TO_REFERENCE`` x the library's (one micro-batch at a time) plus the measuring
  source's slack; a loop that keeps every micro-batch's graph until one backward measures
  ~2x (CPU). The window must also have produced the right gradients.
* GPU only: GPT-2 124M, fp32, batch 8 x 512 as 4 micro-batches of 2, one fused-AdamW
  step, must peak under the H200 anchor "gpt2 B8 S512 fp32 accum4x(B/4)" x 1.15
  (3.52 GiB x 1.15; the full batch peaks at 7.81 GiB). Written to the same contract, not
  run on the CPU machine the kit is developed on.
"""
from __future__ import annotations

import copy
from functools import lru_cache

import torch

from ..accumulation import accumulate, count_target_tokens, split_batch
from .base import Registry, fingerprint, fingerprint_error, memory_rise_within, within_anchor_budget

GRAD_RTOL = 1e-6
MAX_RATIO_TO_REFERENCE = 1.25
GPU_MARGIN = 1.15
ANCHOR_ROW = "gpt2 B8 S512 fp32 accum4x(B/4) adamw(fused)"


def reference_accumulate(model, micro_batches) -> float:
    return accumulate(model, micro_batches).loss


CHECKS = Registry(lab="04", reference=lambda: {"count_target_tokens": count_target_tokens,
                                              "accumulate_gradients": reference_accumulate})


@lru_cache(maxsize=2)
def _pristine(dtype: torch.dtype):
    from ..models import load_model
    model = load_model("gpt2-tiny", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return model.to(dtype)


def tiny_model(device, dtype=torch.float32):
    """A fresh copy of gpt2-tiny without dropout (the student's code may modify it)."""
    return copy.deepcopy(_pristine(dtype)).to(device)


def _loss(value):
    if torch.is_tensor(value) and value.numel() == 1:
        return float(value.detach())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return {"type": type(value).__name__}
    return float(value)


def _window(fn, model, micro_batches, seed):
    model.zero_grad(set_to_none=True)
    loss = fn(model, [dict(mb) for mb in micro_batches])
    grads = {name: p.grad for name, p in model.named_parameters()}
    return {"loss": _loss(loss), "grads": fingerprint(grads, seed)}


@CHECKS.check(points=1, needs=["count_target_tokens"])
def target_tokens(ns, ctx):
    """count_target_tokens counts what the shifted causal-LM loss averages over."""
    count = ns["count_target_tokens"]
    g = ctx.torch_generator(1)
    cases = []
    for trial in range(6):
        b, s = ctx.rng.randint(1, 6), ctx.rng.randint(2, 40)
        labels = torch.randint(0, 100, (b, s), generator=g)
        mask = torch.rand(b, s, generator=g) < [0.0, 0.2, 0.5, 0.9, 1.0, 0.3][trial]
        labels[mask] = -100
        if trial == 5:  # left padding: the first real token is no target of its own
            for row in range(b):
                labels[row, : ctx.rng.randint(0, s)] = -100
        got = count(labels.clone())
        cases.append({"shape": list(labels.shape), "labelled": int((labels != -100).sum()),
                      "count": int(got) if isinstance(got, int) or (torch.is_tensor(got) and got.numel() == 1)
                      else {"type": type(got).__name__}})
    return {"cases": cases}


@target_tokens.judge
def _(got, ref, ctx):
    assert len(got.data["cases"]) == len(ref.data["cases"]), "the check collected the wrong number of answers"
    for mine, want in zip(got.data["cases"], ref.data["cases"]):
        assert mine["count"] == want["count"], (
            f"labels of shape {tuple(want['shape'])} with {want['labelled']} non -100 labels have {want['count']} "
            f"target tokens, you counted {mine['count']}. The model shifts the labels: position t predicts label "
            "t+1, so the first label of a row is never a target.")


@CHECKS.check(points=3, needs=["accumulate_gradients"])
def gradient_equals_full_batch(ns, ctx):
    """k padded micro-batches give the full batch's gradient and loss (float64)."""
    from ..text import padded_batch
    fn = ns["accumulate_gradients"]
    model = tiny_model(ctx.device, torch.float64)
    vocab = model.config.vocab_size
    out = []
    for trial in range(1):
        k = ctx.rng.choice([2, 4])
        lengths = [ctx.rng.randint(3, 40) for _ in range(ctx.rng.choice([4, 8]))]
        batch = padded_batch(lengths, vocab, device=ctx.device, seed=ctx.seed + trial)
        mbs = split_batch(batch, k)
        model.zero_grad(set_to_none=True)
        accumulate(model, mbs, normalization="per_micro_batch")
        naive = fingerprint({n: p.grad for n, p in model.named_parameters()}, ctx.seed + trial)
        res = _window(fn, model, mbs, ctx.seed + trial)
        out.append({"k": k, "lengths": lengths, "naive": naive, **res})
    return {"trials": out}


@gradient_equals_full_batch.judge
def _(got, ref, ctx):
    assert len(got.data["trials"]) == len(ref.data["trials"]), "the check collected the wrong number of answers"
    for mine, want in zip(got.data["trials"], ref.data["trials"]):
        naive_err = fingerprint_error(want["naive"], want["grads"])
        assert naive_err > 1e-3, f"checker error: its batch does not separate the naive version ({naive_err:.1e})"
        missing = sorted(n for n, v in mine["grads"].items() if v is None and want["grads"].get(n) is not None)
        assert not missing, f"no gradient for {missing[:3]}...: call backward() on every micro-batch's loss"
        err = fingerprint_error(mine["grads"], want["grads"])
        assert err <= GRAD_RTOL, (
            f"rows of lengths {want['lengths']} in {want['k']} micro-batches: your gradients differ from the full "
            f"batch's (relative error {err:.2e}; the seed's loss/k gives {naive_err:.2e}). Divide each micro-batch's "
            "summed token loss by the target tokens of the whole window, e.g. model(**mb, num_items_in_batch=N).loss.")
        loss, full = mine["loss"], want["loss"]
        assert not isinstance(loss, dict), f"return the window's loss as a float, got {loss['type']}"
        assert abs(loss - full) <= 1e-6 * abs(full), (
            f"return the window's mean loss: the full batch's loss is {full:.6f}, you returned {loss:.6f}")
    return {"relative_error": err, "naive_relative_error": naive_err}


@CHECKS.check(points=2, needs=["accumulate_gradients"], measures_memory=True)
def peak_is_one_micro_batch(ns, ctx):
    """4 micro-batches peak like one micro-batch at a time (the library's loop), not like the full batch."""
    from ..text import random_batch
    model = tiny_model(ctx.device)
    seq = 512 if ctx.is_gpu else 128
    batch = random_batch(model.config.vocab_size, 8, seq, device=ctx.device, seed=ctx.seed)
    return _window(ns["accumulate_gradients"], model, split_batch(batch, 4), ctx.seed)


@peak_is_one_micro_batch.judge
def _(got, ref, ctx):
    err = fingerprint_error(got.data["grads"], ref.data["grads"])
    assert err <= 1e-4, (f"the 4 micro-batches did not produce the window's gradients (relative error {err:.1e}): "
                         "call backward() on every micro-batch's loss, scaled by the window's target tokens")
    return memory_rise_within(got.memory, ref.memory, MAX_RATIO_TO_REFERENCE, "4 micro-batches",
                              "Something keeps earlier micro-batches' graphs alive: call backward() inside the loop "
                              "and keep only loss.item() (not the loss tensor).")


@CHECKS.check(points=2, needs=["accumulate_gradients"], gpu_only=True, measures_memory=True)
def gpu_budget_gpt2(ns, ctx):
    """GPU: GPT-2 124M, 8 x 512 as 4 micro-batches + fused AdamW step, under the H200 anchor x 1.15."""
    from ..models import load_model
    from ..text import random_batch
    model = load_model("gpt2").to(ctx.device)
    batch = random_batch(model.config.vocab_size, 8, 512, device=ctx.device, seed=ctx.seed)
    mbs = split_batch(batch, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    fn = ns["accumulate_gradients"]
    losses = []
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        losses.append(_loss(fn(model, mbs)))
        opt.step()
    return {"losses": losses, "params": fingerprint(dict(model.named_parameters()), ctx.seed)}


@gpu_budget_gpt2.judge
def _(got, ref, ctx):
    err = fingerprint_error(got.data["params"], ref.data["params"])
    assert err <= 1e-3, f"after two accumulated AdamW steps the parameters differ from the reference's ({err:.1e})"
    return within_anchor_budget(got.memory.delta_bytes, ANCHOR_ROW, GPU_MARGIN)
