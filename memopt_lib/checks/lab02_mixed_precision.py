"""Checks of lab 02 (mixed precision).

Graded interface (the lab's graded cells define these):

* ``choose_amp_dtype(capability) -> (dtype, use_scaler)``
* ``predict_static_bytes(n_params, mode) -> int``
* ``mixed_precision_step(model, batch, optimizer, scaler, dtype) -> float``

Every check is collect/judge (:mod:`.base`): the collect calls the student's functions on inputs drawn from
this run's seed and hands back plain data; the judge compares it with the same collect run on the library's
implementations (:mod:`memopt_lib.mixed_precision`: ``choose_amp_dtype``, ``static_bytes``,
``amp_train_step``).

Where the thresholds come from
------------------------------
* Choices and byte counts are exact: capabilities from 3.0 to 12.x and sizes drawn per run.
* The step is called twice, on two batches, on a GPT-2-architecture model the checker builds from a seeded
  config (dropout off), with an SGD optimizer (updates proportional to the gradients). Per call: the
  gradients handed to ``optimizer.step()`` and the parameter update must match the reference autocast step's
  to ``GRAD_TOL`` (relative, fingerprints). Both run the same bf16 kernels, so right steps measure 0.0 (also with
  ``zero_grad`` at the end, backward inside autocast, or the loss computed outside autocast from the logits). Measured wrong answers
  (``tests/wrong_answers/lab02.py``): the fp32 step 6e-3, ``model.to(bfloat16)`` without autocast 1.5e-2, a
  missing ``zero_grad`` ~1 on the second call, ``optimizer.step()`` instead of ``scaler.step()`` under fp16 =
  the scale (2^8-2^12); a missing ``zero_grad`` under fp16 5e-4 (the first call's gradients
  were unscaled in place, so they come back divided by the scale). The weights must stay fp32 and the attention projection must run in the autocast dtype.
* Peak memory (``measures_memory``): the checker builds the model and the optimizer and calls the step
  ``PEAK_CALLS`` = 3 times inside the measured window; the reference does the same with the library step. The
  student's peak above the window's start may be at most ``CPU_PEAK_RATIO`` = 1.05 x the reference's. The model
  (2 layers x 256, vocab 512, batch 4 x 256, AdamW) makes activations dominate. Measured on CPU (tracker,
  ``tests/wrong_answers/lab02.py``): the fp32 step 1.43x, ``backward(retain_graph=True)`` with the loss kept
  2.44x, a second fp32 copy of the model kept alive 1.125x, a missing ``zero_grad`` 1.125x (last step's
  gradients alive during the forward), the model outputs kept in a global list 1.11x; right variants
  (``zero_grad()`` at the end, loss computed outside autocast) 1.00-1.01x. A loss kept *after* ``backward()``
  holds no saved tensors any more (backward frees them): it costs nothing measurable and is not a memory bug.
* GPU (GPT-2 124M at batch 8 x 512, fused AdamW): the same ratio to the reference step measured the same way,
  and under the H200 anchor ``gpt2 B8 S512 amp-bf16 adamw(fused)`` x ``GPU_MARGIN``.
"""
from __future__ import annotations

from ..models import from_config  # names the causal-LM loss: no transformers warning

import math

import torch

from .. import mixed_precision as mp
from .base import Registry
from .step_evidence import judge_calls, judge_raised, record_calls, trainable

CHECKS = Registry(lab="02", reference=lambda: {"choose_amp_dtype": mp.choose_amp_dtype,
                                               "predict_static_bytes": mp.static_bytes,
                                               "mixed_precision_step": mp.amp_train_step})

GRAD_TOL = 1e-4        # relative (fingerprints) to the reference autocast step's gradients and updates
LOSS_TOL = 1e-3        # relative, the returned loss vs the reference step's
CPU_PEAK_RATIO = 1.05  # student's peak delta / reference step's, same collect
GPU_PEAK_RATIO = 1.05
GPU_MARGIN = 1.08      # on top of the H200 anchor
GPU_ANCHOR = "gpt2 B8 S512 amp-bf16 adamw(fused)"
SMALL = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=256)
PEAK = dict(n_layer=2, n_embd=256, n_head=4, vocab_size=512, n_positions=512)
PEAK_CALLS = 3
HINT_GRADS = ("Run the forward pass and the loss inside torch.autocast(device_type=..., dtype=dtype), backward "
              "outside it, and step through the scaler (scaler.step unscales the gradients first).")


def _model(cfg: dict, seed: int, device):
    """A GPT-2-architecture model built from ``cfg`` with this run's init, dropout off (same function each call)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    conf = GPT2Config(**cfg, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return from_config(conf).to(device).train()


def _batch(vocab, rows, seq, seed, device):
    from ..text import random_batch
    return random_batch(vocab, rows, seq, device=device, seed=seed)


def _describe_choice(out) -> list:
    if isinstance(out, tuple) and len(out) == 2:
        return [str(out[0]), repr(out[1]) if not isinstance(out[1], bool) else out[1]]
    return [f"not a (dtype, use_scaler) tuple: {type(out).__name__}"]


@CHECKS.check(points=1, needs=["choose_amp_dtype"])
def amp_dtype_choice(ns, ctx):
    """fp16 + scaler below compute capability 8.0, bf16 without scaler from 8.0 and on CPU."""
    caps = [(6, 1), (7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0), None]
    caps += [(ctx.rng.randint(3, 12), ctx.rng.randint(0, 9)) for _ in range(4)]
    ctx.rng.shuffle(caps)
    return {"cases": [[None if c is None else list(c), _describe_choice(ns["choose_amp_dtype"](c))] for c in caps]}


@amp_dtype_choice.judge
def _(got, ref, ctx):
    for (cap, mine), (_, want) in zip(got.data["cases"], ref.data["cases"]):
        where = "a CPU (capability None)" if cap is None else f"compute capability {cap[0]}.{cap[1]}"
        assert len(mine) == 2, f"choose_amp_dtype on {where} returned {mine[0]}: return (dtype, use_scaler)"
        assert mine[0] == want[0], (f"on {where} autocast should use {want[0]}, you chose {mine[0]}: bf16 is native "
                                    "from compute capability 8.0 (and on CPUs); below, use fp16")
        assert mine[1] == want[1], (f"on {where} with {want[0]}: use_scaler should be {want[1]}, got {mine[1]}. "
                                    "A GradScaler is needed for fp16 (small gradients underflow) and only for fp16 "
                                    "(bf16 has fp32's exponent range)")
    return {"cases": len(got.data["cases"])}


@CHECKS.check(points=1, needs=["predict_static_bytes"])
def static_bytes(ns, ctx):
    """Weights + gradients + AdamW states per mode: 16 bytes/param under fp32 and autocast, 8 in pure bf16."""
    sizes = [124_439_808, 6_738_415_616] + [ctx.rng.randrange(10**5, 10**9) for _ in range(2)]
    modes = ["fp32", "amp", "pure-bf16"]
    ctx.rng.shuffle(modes)
    out = []
    for n in sizes:
        for mode in modes:
            v = ns["predict_static_bytes"](n, mode)
            out.append([n, mode, int(v) if isinstance(v, (int, float)) and math.isfinite(v) else repr(v)])
    return {"cases": out}


@static_bytes.judge
def _(got, ref, ctx):
    for (n, mode, mine), (_, _, want) in zip(got.data["cases"], ref.data["cases"]):
        assert mine == want, (
            f"predict_static_bytes({n:,}, {mode!r}) = {mine}, expected {want:,} ({want // n} bytes per parameter): "
            "autocast keeps weights, gradients and AdamW's two moments in fp32 (16 bytes); only pure bf16 halves "
            "all four (8 bytes)")
    return {}


class SpyScaler(torch.amp.GradScaler):
    """A real GradScaler that counts how it is used."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = {"scale": 0, "step": 0, "update": 0}

    def scale(self, outputs):
        self.calls["scale"] += 1
        return super().scale(outputs)

    def step(self, optimizer, *a, **kw):
        self.calls["step"] += 1
        return super().step(optimizer, *a, **kw)

    def update(self, *a, **kw):
        self.calls["update"] += 1
        return super().update(*a, **kw)


def _two_calls(ns, ctx, dtype, scaler, salt):
    """The student's step called twice (two batches) on a seeded model: what autocast did and what it trained."""
    seed = ctx.seed * 31 + salt
    cfg = {**SMALL, "n_embd": ctx.rng.choice([48, 64, 96])}
    model = _model(cfg, seed, ctx.device)
    rows, seq = ctx.rng.randint(2, 3), ctx.rng.randint(40, 80)
    batches = [_batch(cfg["vocab_size"], rows, seq, seed + i, ctx.device) for i in range(2)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    seen = []
    hook = model.transformer.h[0].attn.c_attn.register_forward_hook(lambda m, i, o: seen.append(str(o.dtype)))
    it = iter(batches)
    try:
        calls = record_calls(lambda: ns["mixed_precision_step"](model, next(it), opt, scaler, dtype), opt,
                             trainable(model), seed)
    finally:
        hook.remove()
    return {"calls": calls, "autocast_dtypes": sorted(set(seen)),
            "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            "shape": [rows, seq], "width": cfg["n_embd"]}


def _judge_autocast(got, ref, what):
    g, r = got.data, ref.data
    judge_raised(g["calls"], what)
    assert g["param_dtypes"] == r["param_dtypes"], (
        f"{what}: after your step the weights are {g['param_dtypes']}, not {r['param_dtypes']}: do not cast the "
        "model (model.to(torch.bfloat16) / .half()). Autocast keeps fp32 master weights and casts inside the "
        "forward; pure 16-bit weights lose small updates to rounding")
    assert g["autocast_dtypes"] == r["autocast_dtypes"], (
        f"{what}: the attention projection ran in {g['autocast_dtypes'] or 'nothing'}, expected "
        f"{r['autocast_dtypes']}: run the forward pass inside torch.autocast(device_type=..., dtype=dtype)")


@CHECKS.check(points=2, needs=["mixed_precision_step"])
def step_gradients_match_fp32(ns, ctx):
    """The autocast step, called twice, hands the reference's gradients to one optimizer step and returns the loss."""
    dtype = mp.default_dtype(mp.capability_of(ctx.device))
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=dtype == torch.float16)
    return {"dtype": str(dtype), **_two_calls(ns, ctx, dtype, scaler, salt=1)}


@step_gradients_match_fp32.judge
def _(got, ref, ctx):
    what = f"{got.data['dtype']} step on a {got.data['width']}-wide model, batch {got.data['shape']}"
    _judge_autocast(got, ref, what)
    return judge_calls(got.data["calls"], ref.data["calls"], what=what, grad_tol=GRAD_TOL, param_tol=GRAD_TOL,
                       loss_tol=LOSS_TOL, hint_grads=HINT_GRADS,
                       hint_loss="Return loss.item() of this call's batch (computed under autocast).")


@CHECKS.check(points=2, needs=["mixed_precision_step"])
def step_uses_scaler_for_fp16(ns, ctx):
    """With fp16 the step scales the loss, steps and updates through the GradScaler; gradients end unscaled."""
    scale = 2.0 ** ctx.rng.randint(8, 12)  # a modest scale: the check is about using the scaler, not its search
    scaler = SpyScaler(ctx.device.type, init_scale=scale)
    data = _two_calls(ns, ctx, torch.float16, scaler, salt=2)
    return {**data, "scaler_calls": dict(scaler.calls), "init_scale": scale}


@step_uses_scaler_for_fp16.judge
def _(got, ref, ctx):
    g, r = got.data["scaler_calls"], ref.data["scaler_calls"]
    what = f"fp16 step (GradScaler, init_scale {got.data['init_scale']:g})"
    judge_raised(got.data["calls"], what)
    assert g["scale"] == r["scale"], (f"{what}: scaler.scale was called {g['scale']}x in 2 steps: call "
                                      "scaler.scale(loss).backward() -- an unscaled fp16 backward lets small "
                                      "gradients underflow to zero")
    assert g["step"] == r["step"], (f"{what}: scaler.step was called {g['step']}x in 2 steps: step with "
                                    "scaler.step(optimizer); it unscales the gradients and skips inf/NaN steps")
    assert g["update"] == r["update"], (f"{what}: scaler.update was called {g['update']}x in 2 steps: call "
                                        "scaler.update() after scaler.step() so the scale adapts")
    _judge_autocast(got, ref, what)
    return judge_calls(got.data["calls"], ref.data["calls"], what=what, grad_tol=GRAD_TOL, param_tol=GRAD_TOL,
                       loss_tol=LOSS_TOL, hint_grads=HINT_GRADS + " Gradients scaled by the GradScaler's scale "
                       "reach the optimizer when optimizer.step() is called instead of scaler.step(optimizer).")


def _real_gpu(ctx) -> bool:
    prof = ctx.profile
    return ctx.is_gpu and prof is not None and (prof.gpt2, prof.gpt2_batch, prof.gpt2_seq) == ("gpt2", 8, 512)


@CHECKS.check(points=2, needs=["mixed_precision_step"], measures_memory=True)
def step_peak_memory(ns, ctx):
    """Peak of two autocast steps (model and optimizer built inside the window) <= 1.05 x the reference step's."""
    dtype = mp.default_dtype(mp.capability_of(ctx.device))
    seed = ctx.seed * 31 + 3
    if _real_gpu(ctx):
        from ..models import load_model
        torch.manual_seed(seed)
        model = load_model("gpt2").to(ctx.device)
        rows, seq, vocab = 8, 512, model.config.vocab_size
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    else:
        model = _model(PEAK, seed, ctx.device)
        rows, seq, vocab = 4, 256, PEAK["vocab_size"]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(ctx.device.type, init_scale=2.0**10, enabled=dtype == torch.float16)
    batches = [_batch(vocab, rows, seq, seed + i, ctx.device) for i in range(PEAK_CALLS)]
    it = iter(batches)
    calls = record_calls(lambda: ns["mixed_precision_step"](model, next(it), opt, scaler, dtype), opt,
                         trainable(model), seed, calls=PEAK_CALLS, fingerprints=False)
    del model, opt, batches, it
    return {"calls": calls, "shape": [rows, seq], "gpu_real": _real_gpu(ctx)}


@step_peak_memory.judge
def _(got, ref, ctx):
    from ..profiler import GiB, fmt_bytes
    judge_calls(got.data["calls"], ref.data["calls"], what="your step (memory check)", grad_tol=math.inf,
                param_tol=math.inf, loss_tol=1e-2, hint_grads="")
    mine, base = got.memory.delta_bytes, ref.memory.delta_bytes
    ratio = mine / max(base, 1)
    limit = GPU_PEAK_RATIO if got.data["gpu_real"] else CPU_PEAK_RATIO
    assert ratio <= limit, (
        f"two of your steps (batch {got.data['shape']}) peak {fmt_bytes(mine)} above the start, the reference "
        f"autocast step {fmt_bytes(base)} (ratio {ratio:.2f} > {limit}). Check for: an fp32 forward (no autocast: "
        "fp32 activations), a second copy of the model, outputs or losses kept in a list, last step's gradients "
        "alive during the forward (zero_grad(set_to_none=True) first).")
    shown = {"ratio_to_reference": ratio}
    if got.data["gpu_real"]:
        from .. import anchors
        budget = anchors.row(GPU_ANCHOR)["peak_steady_GiB"] * GPU_MARGIN * GiB
        assert got.memory.peak_bytes <= budget, (
            f"autocast step peaked at {fmt_bytes(got.memory.peak_bytes)} > {fmt_bytes(budget)} "
            f"(H200 anchor x {GPU_MARGIN}): does something keep fp32 copies?")
        shown["budget_bytes"] = int(budget)
    return shown
