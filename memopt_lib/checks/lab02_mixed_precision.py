"""Checks of lab 02 (mixed precision).

Graded interface (the lab's graded cells define these):

* ``choose_amp_dtype(capability) -> (dtype, use_scaler)``
* ``predict_static_bytes(n_params, mode) -> int``
* ``mixed_precision_step(model, batch, optimizer, scaler, dtype) -> float``

Where the thresholds come from
------------------------------
* Gradients: the checker computes fp32 reference gradients of ``gpt2-tiny`` on a
  batch it draws itself (seed from ``ctx.rng``), then runs the student's step with
  a zero learning rate and compares ``param.grad``. bf16 keeps 8 significant bits,
  fp16 11: a per-tensor relative L2 error of up to ``GRAD_TOL`` (bf16) /
  ``GRAD_TOL_FP16`` is rounding, more is a bug. Measured on this kit's CPU and on
  the worst tensor sits well below (measured on CPU: bf16 ~6e-3, fp16 ~1e-3).
* Peak memory, CPU: a ratio to the fp32 step measured in the same check with the
  profiler's tracker. Autocast leaves weights, gradients and AdamW states in fp32
  and adds bf16 copies of the weights during the forward, so at the CPU profile's
  small batch the autocast peak is close to the fp32 one: the bound is
  ``CPU_PEAK_RATIO`` x fp32 (it catches steps that keep extra copies alive, such as
  a second fp32 model or the last step's graph).
* Peak memory, GPU: an absolute budget from the H200 anchor
  ``gpt2 B8 S512 amp-bf16 adamw(fused)`` (peak_steady_GiB, read from
  ``assets/h200_anchors.json``) times ``GPU_MARGIN`` for other GPUs' kernels.
"""
from __future__ import annotations

import torch

from .. import anchors
from .base import Registry

CHECKS = Registry(lab="02")

GRAD_TOL = 0.05        # bf16: max per-tensor relative L2 error of the gradient vs fp32
GRAD_TOL_FP16 = 0.02   # fp16
LOSS_TOL = 0.02        # relative error of the returned loss vs the fp32 loss
CPU_PEAK_RATIO = 1.10  # autocast peak / fp32 peak on CPU (tracker)
GPU_MARGIN = 1.08      # on top of the H200 anchor
GPU_ANCHOR = "gpt2 B8 S512 amp-bf16 adamw(fused)"


def _tiny(seed: int, device):
    from ..models import load_model
    torch.manual_seed(seed)
    model = load_model("gpt2-tiny").to(device)
    # the checker's own random init (not the cached checkpoint's), and no dropout: same function every call
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else torch.nn.init.normal_(p, std=0.01)
    return model.eval()


def _batch(model, seed: int, device, batch: int = 2, seq: int = 64):
    from ..text import random_batch
    return random_batch(model.config.vocab_size, batch, seq, device=device, seed=seed)


def _reference(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach().item(), grads


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


def _run_student_step(ns, model, batch, dtype, scaler, device):
    """Student's step with lr=0 (weights unchanged, gradients left in .grad); records autocast and steps."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    steps = {"n": 0}
    opt.register_step_post_hook(lambda *_: steps.__setitem__("n", steps["n"] + 1))
    seen = []
    hook = model.transformer.h[0].attn.c_attn.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        loss = ns["mixed_precision_step"](model, batch, opt, scaler, dtype)
    finally:
        hook.remove()
    return loss, seen, steps["n"]


def _check_grads(model, ref_grads, tol, what):
    from ..mixed_precision import grad_error
    err = grad_error(model, ref_grads)
    assert err["max_rel_err"] <= tol, (
        f"{what}: a gradient differs from the fp32 reference by {err['max_rel_err']:.3g} (relative L2) > {tol}: "
        "run forward and loss under torch.autocast, backward outside it, and let scaler.step unscale")
    return err


@CHECKS.check(points=1, needs=["choose_amp_dtype"])
def amp_dtype_choice(ns, ctx):
    """fp16 + scaler below compute capability 8.0, bf16 without scaler from 8.0 and on CPU."""
    choose = ns["choose_amp_dtype"]
    cases = {(6, 1): torch.float16, (7, 0): torch.float16, (7, 5): torch.float16, (8, 0): torch.bfloat16,
             (8, 6): torch.bfloat16, (8, 9): torch.bfloat16, (9, 0): torch.bfloat16, (10, 0): torch.bfloat16,
             (12, 0): torch.bfloat16, None: torch.bfloat16}
    order = list(cases)
    ctx.rng.shuffle(order)
    for cap in order:
        out = choose(cap)
        assert isinstance(out, tuple) and len(out) == 2, f"choose_amp_dtype({cap}) must return (dtype, use_scaler)"
        dtype, use_scaler = out
        where = "a CPU" if cap is None else f"compute capability {cap[0]}.{cap[1]}"
        assert dtype == cases[cap], f"on {where} use {cases[cap]}, got {dtype}"
        assert bool(use_scaler) == (dtype == torch.float16), (
            f"on {where}: a GradScaler is needed for fp16 and only for fp16 (use_scaler={use_scaler} with {dtype})")
    return {"cases": len(cases)}


@CHECKS.check(points=1, needs=["predict_static_bytes"])
def static_bytes(ns, ctx):
    """Weights + gradients + AdamW states per mode: 16 bytes/param under fp32 and autocast, 8 in pure bf16."""
    per_param = {"fp32": 16, "amp": 16, "pure-bf16": 8}
    for n in (124_439_808, 6_738_415_616, ctx.rng.randrange(10**5, 10**9)):
        for mode, b in per_param.items():
            got = ns["predict_static_bytes"](n, mode)
            assert int(got) == b * n, (f"predict_static_bytes({n:,}, {mode!r}) = {got:,}, expected {b * n:,}: "
                                       "which of weights, gradients and AdamW's two states does the mode change?")
    return {}


@CHECKS.check(points=2, needs=["mixed_precision_step"])
def step_gradients_match_fp32(ns, ctx):
    """The autocast step's gradients match fp32 (gpt2-tiny, checker's seed and batch); loss is a float."""
    from ..mixed_precision import capability_of, default_dtype
    device = ctx.device
    dtype = default_dtype(capability_of(device))
    seed = ctx.rng.randrange(10**6)
    model = _tiny(seed, device)
    batch = _batch(model, seed, device)
    ref_loss, ref_grads = _reference(model, batch)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10, enabled=dtype == torch.float16)
    loss, seen, n_steps = _run_student_step(ns, model, batch, dtype, scaler, device)
    assert isinstance(loss, float), f"return loss.item() (a Python float), not {type(loss).__name__}"
    assert seen and all(d == dtype for d in seen), (
        f"the attention projection ran in {sorted({str(d) for d in seen}) or 'nothing'}, expected {dtype}: "
        "run the forward pass inside torch.autocast(device_type=..., dtype=dtype)")
    assert n_steps == 1, f"the optimizer stepped {n_steps} times; one call = one optimizer step (via scaler.step)"
    assert abs(loss - ref_loss) <= LOSS_TOL * abs(ref_loss), f"loss {loss:.4f} vs fp32 {ref_loss:.4f}"
    err = _check_grads(model, ref_grads, GRAD_TOL if dtype == torch.bfloat16 else GRAD_TOL_FP16, str(dtype))
    return {"dtype": str(dtype), **err}


@CHECKS.check(points=2, needs=["mixed_precision_step"])
def step_uses_scaler_for_fp16(ns, ctx):
    """With fp16 the step scales the loss, steps and updates through the GradScaler; gradients end unscaled."""
    device = ctx.device
    seed = ctx.rng.randrange(10**6)
    model = _tiny(seed, device)
    batch = _batch(model, seed, device)
    _, ref_grads = _reference(model, batch)
    # a modest initial scale: the check is about *using* the scaler, not about its overflow search
    scaler = SpyScaler(device.type, init_scale=2.0**10)
    loss, seen, n_steps = _run_student_step(ns, model, batch, torch.float16, scaler, device)
    assert scaler.calls["scale"] == 1, ("fp16: call scaler.scale(loss).backward() -- an unscaled fp16 backward lets "
                                        f"small gradients underflow to zero (scale called {scaler.calls['scale']}x)")
    assert scaler.calls["step"] == 1, "fp16: step with scaler.step(optimizer); it unscales and skips inf/NaN steps"
    assert scaler.calls["update"] == 1, "fp16: call scaler.update() after scaler.step() to adapt the scale"
    assert n_steps == 1, f"the optimizer stepped {n_steps} times (expected once, through scaler.step)"
    assert all(d == torch.float16 for d in seen) and seen, "fp16: the forward must run under autocast(dtype=fp16)"
    err = _check_grads(model, ref_grads, GRAD_TOL_FP16, "fp16 (after scaler.step the gradients are unscaled)")
    return {"scale": float(scaler.get_scale()), **err}


def _peak(step, model, opt, device) -> int:
    from ..profiler import measure
    return measure(step, device=device, model=model, optimizer=opt, warmup=1, timeline=False).peak_allocated_bytes


@CHECKS.check(points=2, needs=["mixed_precision_step"])
def step_peak_memory(ns, ctx):
    """Peak of the autocast step: CPU <= 1.10 x fp32 step (same check); GPU <= H200 anchor x 1.08."""
    from ..models import load_model
    from ..profiler import GiB, train_step_fn
    from ..text import random_batch
    device, prof = ctx.device, ctx.profile
    from ..mixed_precision import capability_of, default_dtype
    dtype = default_dtype(capability_of(device))
    name, b, s = (prof.gpt2, prof.gpt2_batch, prof.gpt2_seq) if ctx.is_gpu else ("gpt2-tiny", 4, 128)
    seed = ctx.rng.randrange(10**6)
    fused = {"fused": True} if device.type == "cuda" else {}

    def fresh():  # one model alive at a time, so both measurements count the same things
        torch.manual_seed(seed)
        return load_model(name).to(device)

    student = fresh()
    batch = random_batch(student.config.vocab_size, b, s, device=device, seed=seed)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, **fused)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10, enabled=dtype == torch.float16)
    amp_peak = _peak(lambda: ns["mixed_precision_step"](student, batch, opt, scaler, dtype), student, opt, device)
    del student, opt
    out = {"amp_peak_bytes": amp_peak}
    if ctx.is_gpu and (name, b, s) == ("gpt2", 8, 512):
        anchor = anchors.row(GPU_ANCHOR)["peak_steady_GiB"]
        budget = anchor * GPU_MARGIN * GiB
        assert amp_peak <= budget, (f"autocast step peaked at {amp_peak / GiB:.2f} GiB > {budget / GiB:.2f} GiB "
                                    f"(H200 anchor {anchor} GiB x {GPU_MARGIN}): does something keep fp32 copies?")
        return {**out, "budget_bytes": int(budget)}
    base = fresh()
    opt = torch.optim.AdamW(base.parameters(), lr=1e-5, **fused)
    fp32_peak = _peak(train_step_fn(base, batch, opt), base, opt, device)
    ratio = amp_peak / fp32_peak
    assert ratio <= CPU_PEAK_RATIO, (f"autocast step peak {amp_peak / 2**20:.1f} MiB is {ratio:.2f} x the fp32 "
                                     f"step's ({fp32_peak / 2**20:.1f} MiB), above {CPU_PEAK_RATIO}: free the "
                                     "gradients (zero_grad(set_to_none=True)) and keep no extra copies or graphs")
    return {**out, "fp32_peak_bytes": fp32_peak, "ratio": ratio}
