"""Checks of lab 05, gradient checkpointing.

Graded interface (the lab's graded cells):

* ``checkpoint_blocks(model, every=1) -> model`` -- wrap every ``every``-th decoder block's
  forward in ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``;
* ``predict_kept_bytes(n_layers, every, block_input_bytes, block_bytes) -> int`` -- what
  the blocks keep for backward under that placement;
* ``prepare_for_checkpointed_training(model) -> model`` -- a model as ``from_pretrained``
  returns it (eval mode, maybe PEFT-wrapped with frozen embeddings) made to train with
  Hugging Face checkpointing actually on.

Checkpointing is proven active by measurement (:func:`memopt_lib.checkpointing.checkpointing_active`:
the tracker's bytes kept by the blocks after a forward, against a copy of the model
without checkpointing), never by reading a flag.

Where the thresholds come from:

* Gradients: checkpointing recomputes the same float32 operations in the same order,
  so gradients agree to ``rtol=1e-5, atol=1e-6`` (measured: bit-identical on CPU).
* Memory, any device: ratios measured in the same run. Every block checkpointed
  keeps one hidden state per block: <= 0.35 of the blocks' activations without
  (measured 0.03 for the tiny GPT-2 on CPU and on an H200). Every other block (the
  tiny GPT-2 has 2): between 0.35 and 0.8 (measured 0.51 on CPU, 0.48 on an H200:
  half the blocks keep everything).
* GPU only: GPT-2 124M, fp32, batch 8 x 512, one fused-AdamW step, peaks under the H200
  anchor "gpt2 B8 S512 fp32 ckpt adamw(fused)" x 1.15 (3.93 GiB x 1.15; 7.81 GiB without).
"""
from __future__ import annotations

import copy
from functools import lru_cache

import torch

from ..checkpointing import checkpointing_active
from ..profiler import measure
from .base import Registry, within_anchor_budget

CHECKS = Registry(lab="05")
RTOL, ATOL = 1e-5, 1e-6
MAX_RATIO_EVERY_BLOCK = 0.35
RATIO_RANGE_EVERY_OTHER = (0.35, 0.8)
GPU_MARGIN = 1.15
ANCHOR_ROW = "gpt2 B8 S512 fp32 ckpt adamw(fused)"


@lru_cache(maxsize=1)
def _pristine():
    from ..models import load_model
    return load_model("gpt2-tiny", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def tiny_model(device):
    """A fresh train-mode copy of gpt2-tiny without dropout (the student's code may modify it)."""
    return copy.deepcopy(_pristine()).to(device).train()


def _batch(ctx, vocab, rows=4, seq=None):
    from ..text import random_batch
    seq = seq or (256 if ctx.is_gpu else 128)
    return random_batch(vocab, rows, seq, device=ctx.device, seed=ctx.seed)


def _grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@CHECKS.check(points=2, needs=["checkpoint_blocks"])
def same_gradients(ns, ctx):
    """checkpoint_blocks leaves loss and gradients unchanged, also with frozen embeddings."""
    for every in (1, 2):
        base, model = tiny_model(ctx.device), tiny_model(ctx.device)
        for m in (base, model):  # frozen embeddings, as under LoRA: reentrant checkpointing loses gradients here
            m.transformer.wte.weight.requires_grad_(False)
            m.transformer.wpe.weight.requires_grad_(False)
        batch = _batch(ctx, base.config.vocab_size)
        out = ns["checkpoint_blocks"](model, every=every)
        model = out if out is not None else model
        ref_loss, ref = _grads(base, batch)
        loss, got = _grads(model, batch)
        missing = sorted(set(ref) - set(got))
        assert not missing, (f"every={every}: no gradient for {missing[:2]} with frozen embeddings. Reentrant "
                             "checkpointing (use_reentrant=True) only backpropagates through a block if an input "
                             "requires grad: use use_reentrant=False.")
        torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL,
                                   msg=f"every={every}: the loss changed under checkpointing")
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=RTOL, atol=ATOL,
                                       msg=lambda m, name=name: f"every={every}: gradient of {name} differs: {m}")
    return {}


@CHECKS.check(points=3, needs=["checkpoint_blocks"])
def saves_activations(ns, ctx):
    """checkpoint_blocks is active by measurement, and every=2 checkpoints only half the blocks."""
    ratios = {}
    for every in (1, 2):
        base, model = tiny_model(ctx.device), tiny_model(ctx.device)
        batch = _batch(ctx, base.config.vocab_size)
        out = ns["checkpoint_blocks"](model, every=every)
        model = out if out is not None else model
        proof = checkpointing_active(model, batch, baseline=base)
        ratios[every] = proof.ratio
        if every == 1:
            assert proof.ratio <= MAX_RATIO_EVERY_BLOCK, (
                f"every=1: {proof}. Expected <= {MAX_RATIO_EVERY_BLOCK}: wrap every block's forward in "
                "torch.utils.checkpoint.checkpoint(..., use_reentrant=False)")
        else:
            lo, hi = RATIO_RANGE_EVERY_OTHER
            assert lo <= proof.ratio <= hi, (
                f"every=2 on a 2-block model: {proof}. Expected between {lo} and {hi}: only blocks 0, 2, 4, ... "
                "are checkpointed, the others keep their activations")
    return {"ratio_every_1": ratios[1], "ratio_every_2": ratios[2]}


def _reference_prediction(n_layers, every, block_input_bytes, block_bytes):
    n_ckpt = len(range(0, n_layers, every))
    return n_ckpt * block_input_bytes + (n_layers - n_ckpt) * block_bytes


@CHECKS.check(points=1, needs=["predict_kept_bytes"])
def prediction(ns, ctx):
    """predict_kept_bytes: checkpointed blocks keep their output only, the others everything."""
    fn = ns["predict_kept_bytes"]
    for _ in range(8):
        n, every = ctx.rng.randint(1, 48), ctx.rng.randint(1, 8)
        inp, blk = ctx.rng.randint(1, 10**6), ctx.rng.randint(10**6, 10**8)
        want = _reference_prediction(n, every, inp, blk)
        got = fn(n, every, inp, blk)
        assert int(got) == want, (f"n_layers={n}, every={every}, block_input_bytes={inp}, block_bytes={blk}: "
                                  f"expected {want}, got {got}. Blocks 0, every, 2*every, ... are checkpointed.")
    return {}


@CHECKS.check(points=3, needs=["prepare_for_checkpointed_training"])
def active_after_from_pretrained(ns, ctx):
    """A PEFT model straight from from_pretrained (eval mode): checkpointing measured active, LoRA gets gradients."""
    import peft

    from ..models import load_model
    model = load_model("gpt2-tiny", train=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).to(ctx.device)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True)
    model = peft.get_peft_model(model, cfg)
    model.eval()  # as from_pretrained returns it
    for n, p in model.named_parameters():  # LoRA B starts at 0: make it non-zero so A gets a gradient too
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    base = copy.deepcopy(model).train()
    batch = _batch(ctx, model.config.vocab_size)
    out = ns["prepare_for_checkpointed_training"](model)
    model = out if out is not None else model
    proof = checkpointing_active(model, batch, baseline=base)
    assert proof.active, (f"{proof}. from_pretrained returns eval mode, where Hugging Face blocks do not "
                          "checkpoint: call model.train() after enabling checkpointing.")
    _, ref = _grads(base, batch)
    _, got = _grads(model, batch)
    lora = [n for n in ref if "lora_" in n]
    assert lora, "checker error: no LoRA gradients in the baseline"
    missing = [n for n in lora if n not in got]
    assert not missing, (f"LoRA parameters without gradient: {missing[:2]}. With frozen embeddings, reentrant "
                         "checkpointing builds no graph: use gradient_checkpointing_kwargs={'use_reentrant': False}")
    for name in lora:
        torch.testing.assert_close(got[name], ref[name], rtol=RTOL, atol=ATOL)
    return {"ratio": proof.ratio}


@CHECKS.check(points=2, needs=["checkpoint_blocks"], gpu_only=True)
def gpu_budget_gpt2(ns, ctx):
    """GPU: GPT-2 124M, 8 x 512, checkpoint_blocks + fused AdamW step under the H200 anchor x 1.15."""
    from ..models import load_model
    from ..text import random_batch
    model = load_model("gpt2").to(ctx.device)
    out = ns["checkpoint_blocks"](model, every=1)
    model = out if out is not None else model
    batch = random_batch(model.config.vocab_size, 8, 512, device=ctx.device, seed=ctx.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step():
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()

    rep = measure(step, device=ctx.device, model=model, optimizer=opt, warmup=2, timeline=False)
    return within_anchor_budget(rep.peak_allocated_bytes, ANCHOR_ROW, GPU_MARGIN)


