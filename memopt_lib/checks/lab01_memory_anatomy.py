"""Checks of lab 01, memory anatomy.

Where the thresholds come from:
* parameter counts and persistent-state bytes are exact arithmetic: compared with
  ``count_parameters`` of a meta-device model and with the profiler's categories,
  to the byte;
* the training step's peak: at most 5 % above a reference step measured in the same
  check on the same model and batch (CPU and GPU alike); on a GPU with the real
  shapes (GPT-2, batch 8 x 512) also under the H200 anchor (7.81 GiB) + 10 %.
"""
from __future__ import annotations


import torch

from .. import anchors
from ..models import count_parameters, load_model
from ..profiler import GiB, fmt_bytes, measure, train_step_fn
from ..text import random_batch
from .base import Registry

CHECKS = Registry(lab="01")
STEP_RATIO = 1.05
GPU_MARGIN = 1.10


def _configs(ctx):
    from ..models import gpt2_config as GPT2Config  # special token ids inside the vocabulary: no warning
    yield GPT2Config()
    yield GPT2Config(n_layer=2, n_embd=128, n_head=4, n_positions=512, vocab_size=8192)
    for _ in range(2):
        heads = ctx.rng.choice([2, 4, 8])
        yield GPT2Config(n_layer=ctx.rng.randint(1, 6), n_embd=heads * ctx.rng.choice([8, 16, 24]), n_head=heads,
                         n_positions=ctx.rng.choice([64, 128, 333]), vocab_size=ctx.rng.randint(100, 5000),
                         n_inner=ctx.rng.choice([None, 100, 257]))


@CHECKS.check(points=2, needs=["count_gpt2_params"])
def param_count(ns, ctx):
    """count_gpt2_params(config) equals the parameters of a GPT-2 built from that config."""
    from transformers import GPT2LMHeadModel
    for cfg in _configs(ctx):
        with torch.device("meta"):
            expected = count_parameters(GPT2LMHeadModel(cfg))
        got = ns["count_gpt2_params"](cfg)
        assert isinstance(got, int), f"return an int, got {type(got).__name__}"
        assert got == expected, (
            f"for n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, n_inner={cfg.n_inner}, vocab={cfg.vocab_size}, "
            f"n_positions={cfg.n_positions}: you count {got:,}, the model has {expected:,} "
            f"(off by {got - expected:+,}). Remember biases, both LayerNorms per block, the final LayerNorm, "
            "the MLP width n_inner (4*n_embd when None), and that lm_head shares wte's weight.")


def _tiny_step(ctx, optimizer_name):
    torch.manual_seed(ctx.seed)
    model = load_model("gpt2-tiny").to(ctx.device)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer_name == "adamw":
        # fused AdamW keeps its step counters on the device (the for-each version keeps them on the CPU when
        # training on a GPU, where they would not count against GPU memory)
        opt = torch.optim.AdamW(params, lr=1e-3, fused=ctx.is_gpu, foreach=False if not ctx.is_gpu else None)
    elif optimizer_name == "sgd-momentum":
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    else:
        opt = torch.optim.SGD(params, lr=1e-3)
    batch = random_batch(model.config.vocab_size, 2, 32, ctx.device, seed=ctx.seed)
    return model, opt, batch


@CHECKS.check(points=3, needs=["training_state_bytes"])
def training_state_matches_profiler(ns, ctx):
    """training_state_bytes() predicts the weights, gradients and optimizer bytes the profiler measures, exactly."""
    out = {}
    for name in ("adamw", "sgd-momentum", "sgd"):
        model, opt, batch = _tiny_step(ctx, name)
        report = measure(train_step_fn(model, batch, opt), device=ctx.device, model=model, optimizer=opt,
                         warmup=1, timeline=False)
        n = count_parameters(model)
        n_tensors = len(list(model.parameters()))
        pred = ns["training_state_bytes"](n, n_tensors, name)
        assert isinstance(pred, dict), "return a dict with keys 'weights', 'gradients', 'optimizer'"
        # after the step, weights, gradients and optimizer state are all alive: the state kept between steps
        end_state = {k: report.end_breakdown_bytes.get(k, 0) for k in ("weights", "gradients", "optimizer")}
        for key in ("weights", "gradients", "optimizer"):
            assert key in pred, f"missing key {key!r}"
            assert int(pred[key]) == end_state[key], (
                f"{name}: you predict {key} = {int(pred[key]):,} bytes, the profiler measured "
                f"{end_state[key]:,} after the step ({fmt_bytes(end_state[key])}). "
                + ("AdamW keeps exp_avg and exp_avg_sq (fp32) and a 4-byte step counter per parameter tensor."
                   if key == "optimizer" else "fp32 is 4 bytes per number."))
        out[f"{name}_optimizer_bytes"] = end_state["optimizer"]
    return out


@CHECKS.check(points=3, needs=["full_finetune_step"])
def training_step_is_correct_and_lean(ns, ctx):
    """full_finetune_step trains, returns a float, and peaks no higher than a reference step."""
    gpu_real = ctx.is_gpu and ctx.profile is not None and getattr(ctx.profile, "is_gpu", False)
    name, b, s = (("gpt2", ctx.profile.gpt2_batch, ctx.profile.gpt2_seq) if gpu_real else ("gpt2-tiny", 4, 64))
    torch.manual_seed(ctx.seed)
    model = load_model(name).to(ctx.device)
    batch = random_batch(model.config.vocab_size, b, s, ctx.device, seed=ctx.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ref = measure(train_step_fn(model, batch, opt), device=ctx.device, model=model, optimizer=opt, timeline=False)
    # fingerprints, not clones: a clone would be live memory inside the measurement
    before = [p.detach().double().sum().item() for p in list(model.parameters())[:4]]
    student = ns["full_finetune_step"]
    results = []
    rep = measure(lambda: results.append(student(model, batch, opt)), device=ctx.device, model=model,
                  optimizer=opt, timeline=False)
    assert all(isinstance(r, float) for r in results), (
        f"return loss.item() (a Python float), not {type(results[-1]).__name__}: a loss tensor keeps its whole "
        "autograd graph -- every saved activation -- alive for as long as you hold it")
    assert all(r == r for r in results), "the loss is NaN"
    changed = any(a != p.detach().double().sum().item() for a, p in zip(before, list(model.parameters())[:4]))
    assert changed, "the parameters did not change: call optimizer.step() after loss.backward()"
    assert rep.peak_allocated_bytes <= STEP_RATIO * ref.peak_allocated_bytes, (
        f"your step peaks at {fmt_bytes(rep.peak_allocated_bytes)}, a reference step at "
        f"{fmt_bytes(ref.peak_allocated_bytes)} (allowed: x{STEP_RATIO}). Zero gradients with "
        "set_to_none=True before the forward, and keep no tensors from the step alive.")
    if gpu_real:
        budget = anchors.row("gpt2 B8 S512 fp32 adamw(fused)")["peak_steady_GiB"] * GPU_MARGIN * GiB
        assert rep.peak_allocated_bytes <= budget, (
            f"peak {fmt_bytes(rep.peak_allocated_bytes)} exceeds the GPU budget {fmt_bytes(budget)} "
            "(H200 anchor + 10 %)")
    return {"peak_allocated_bytes": rep.peak_allocated_bytes,
            "reference_peak_allocated_bytes": ref.peak_allocated_bytes}
