"""Checks of lab 04, gradient accumulation.

Graded interface (the lab's graded cells):

* ``count_target_tokens(labels) -> int`` -- target tokens of a causal-LM loss;
* ``accumulate_gradients(model, micro_batches) -> float`` -- adds the gradient of the
  window's mean token loss to ``param.grad`` one micro-batch at a time; returns that loss.

Where the thresholds come from:

* Gradients: a float64 model (dropout off); transformers computes the token losses in
  fp32 (``logits.float()``), identically for any batching, so k micro-batches and one
  full batch differ only by summation order: ``rtol=1e-6, atol=1e-9`` (measured error
  ~1e-16), ~10^5 x below the error of the seed's ``loss / k`` on the same batches
  (measured: relative error 0.1-0.5). The returned loss: relative 1e-6 (fp32 sums). The checker also asserts that its own batch
  separates the two (the naive version must be off by > 1e-3), so a pass is earned.
* Memory, any device: ratios measured in the same run with the tracker/allocator.
  k micro-batches may peak at most ``1.25x`` one micro-batch alone (measured 1.13 on
  CPU, 1.03 on an H200: the gradients stay alive across the forwards) and at most
  ``0.6x`` the full batch with k=4 (measured 0.35 on CPU and on an H200; a loop that
  keeps every micro-batch's graph until one backward measures ~1).
* GPU only: GPT-2 124M, fp32, batch 8 x 512 as 4 micro-batches of 2, one fused-AdamW
  step, must peak under the H200 anchor "gpt2 B8 S512 fp32 accum4x(B/4)" x 1.15
  (3.52 GiB x 1.15; the full batch peaks at 7.81 GiB).
"""
from __future__ import annotations

import copy
from functools import lru_cache

import torch

from ..accumulation import accumulate, count_target_tokens, gradient_error, gradients, split_batch
from ..profiler import fmt_bytes, measure
from .base import Registry, within_anchor_budget

CHECKS = Registry(lab="04")
GRAD_RTOL, GRAD_ATOL = 1e-6, 1e-9
MAX_RATIO_TO_ONE_MICRO = 1.25
MAX_RATIO_TO_FULL_K4 = 0.6
GPU_MARGIN = 1.15
ANCHOR_ROW = "gpt2 B8 S512 fp32 accum4x(B/4) adamw(fused)"


@lru_cache(maxsize=2)
def _pristine(dtype: torch.dtype):
    from ..models import load_model
    model = load_model("gpt2-tiny", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return model.to(dtype)


def tiny_model(device, dtype=torch.float32):
    """A fresh copy of gpt2-tiny without dropout (the student's code may modify it)."""
    return copy.deepcopy(_pristine(dtype)).to(device)


def _student_window(fn, model, micro_batches):
    model.zero_grad(set_to_none=True)
    loss = fn(model, [dict(mb) for mb in micro_batches])
    return loss, gradients(model)


@CHECKS.check(points=1, needs=["count_target_tokens"])
def target_tokens(ns, ctx):
    """count_target_tokens counts what the shifted causal-LM loss averages over."""
    count = ns["count_target_tokens"]
    g = torch.Generator().manual_seed(ctx.seed)
    for trial in range(6):
        b, s = ctx.rng.randint(1, 6), ctx.rng.randint(2, 40)
        labels = torch.randint(0, 100, (b, s), generator=g)
        mask = torch.rand(b, s, generator=g) < [0.0, 0.2, 0.5, 0.9, 1.0, 0.3][trial]
        labels[mask] = -100
        if trial == 5:  # left padding: the first real token is no target of its own
            for row in range(b):
                labels[row, : ctx.rng.randint(0, s)] = -100
        got, want = count(labels.clone()), count_target_tokens(labels)
        assert int(got) == want, (f"labels of shape {tuple(labels.shape)} with {int((labels != -100).sum())} "
                                  f"non -100 labels have {want} target tokens, you counted {got}. The model "
                                  "shifts the labels: position t predicts label t+1, so the first label of a row "
                                  "is never a target.")
    return {"cases": 6}


@CHECKS.check(points=3, needs=["accumulate_gradients"])
def gradient_equals_full_batch(ns, ctx):
    """k padded micro-batches give the full batch's gradient and loss (float64)."""
    fn = ns["accumulate_gradients"]
    model = tiny_model(ctx.device, torch.float64)
    vocab = model.config.vocab_size
    from ..text import padded_batch
    for trial in range(2):
        k = ctx.rng.choice([2, 4])
        lengths = [ctx.rng.randint(3, 48) for _ in range(8)]
        batch = padded_batch(lengths, vocab, device=ctx.device, seed=ctx.seed + trial)
        mbs = split_batch(batch, k)
        model.zero_grad(set_to_none=True)
        full = model(**batch).loss
        full.backward()
        full_loss = full.item()
        ref = gradients(model)
        model.zero_grad(set_to_none=True)
        accumulate(model, mbs, normalization="per_micro_batch")
        naive_err = gradient_error(gradients(model), ref)
        assert naive_err > 1e-3, f"checker error: its batch does not separate the naive version ({naive_err:.1e})"
        loss, got = _student_window(fn, model, mbs)
        missing = sorted(set(ref) - set(got))
        assert not missing, f"no gradient for {missing[:3]}...: call backward() on every micro-batch's loss"
        err = gradient_error(got, ref)
        for name in ref:
            try:
                torch.testing.assert_close(got[name], ref[name], rtol=GRAD_RTOL, atol=GRAD_ATOL)
            except AssertionError:
                raise AssertionError(
                    f"rows of lengths {lengths} in {k} micro-batches: the gradient of {name} differs from the "
                    f"full batch's (relative error over all parameters {err:.2e}; the seed's loss/k gives "
                    f"{naive_err:.2e}). Divide each micro-batch's summed token loss by the target tokens of the "
                    "whole window, e.g. model(**mb, num_items_in_batch=N).loss.") from None
        assert isinstance(loss, (int, float)) or (torch.is_tensor(loss) and loss.numel() == 1), (
            f"return the window's loss as a float, got {type(loss).__name__}")
        loss = float(loss.detach() if torch.is_tensor(loss) else loss)
        assert abs(loss - full_loss) <= 1e-6 * abs(full_loss), (
            f"return the window's mean loss: the full batch's loss is {full_loss:.6f}, you returned {loss:.6f}")
    return {"relative_error": err, "naive_relative_error": naive_err}


def _peaks(fn, ctx):
    from ..text import random_batch
    model = tiny_model(ctx.device)
    seq = 512 if ctx.is_gpu else 128
    batch = random_batch(model.config.vocab_size, 8, seq, device=ctx.device, seed=ctx.seed)
    mbs = split_batch(batch, 4)

    def run(f, micro_batches):
        def step():
            model.zero_grad(set_to_none=True)
            f(model, micro_batches)
        peak = measure(step, device=ctx.device, model=model, timeline=False).peak_allocated_bytes
        assert all(p.grad is not None for p in model.parameters()), "no gradients were computed: call backward()"
        return peak

    lib = lambda m, x: accumulate(m, x)  # noqa: E731
    return run(fn, mbs), run(lib, mbs[:1]), run(lib, [batch])


@CHECKS.check(points=2, needs=["accumulate_gradients"])
def peak_is_one_micro_batch(ns, ctx):
    """4 micro-batches peak like one micro-batch, not like the full batch (ratios, measured here)."""
    yours, one, full = _peaks(ns["accumulate_gradients"], ctx)
    assert yours <= MAX_RATIO_TO_ONE_MICRO * one, (
        f"4 micro-batches peak at {fmt_bytes(yours)}, one micro-batch alone at {fmt_bytes(one)} "
        f"(ratio {yours / one:.2f} > {MAX_RATIO_TO_ONE_MICRO}). Something keeps earlier micro-batches' graphs "
        "alive: call backward() inside the loop and keep only loss.item() (not the loss tensor).")
    assert yours <= MAX_RATIO_TO_FULL_K4 * full, (
        f"4 micro-batches peak at {fmt_bytes(yours)}, the full batch at {fmt_bytes(full)} "
        f"(ratio {yours / full:.2f} > {MAX_RATIO_TO_FULL_K4}): run one micro-batch at a time.")
    return {"peak_bytes": yours, "one_micro_batch_peak_bytes": one, "full_batch_peak_bytes": full}


@CHECKS.check(points=2, needs=["accumulate_gradients"], gpu_only=True)
def gpu_budget_gpt2(ns, ctx):
    """GPU: GPT-2 124M, 8 x 512 as 4 micro-batches + fused AdamW step, under the H200 anchor x 1.15."""
    from ..models import load_model
    from ..text import random_batch
    model = load_model("gpt2").to(ctx.device)
    batch = random_batch(model.config.vocab_size, 8, 512, device=ctx.device, seed=ctx.seed)
    mbs = split_batch(batch, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    fn = ns["accumulate_gradients"]

    def step():
        opt.zero_grad(set_to_none=True)
        fn(model, mbs)
        opt.step()

    rep = measure(step, device=ctx.device, model=model, optimizer=opt, warmup=2, timeline=False)
    return within_anchor_budget(rep.peak_allocated_bytes, ANCHOR_ROW, GPU_MARGIN)
