"""Mixed precision: compute in 16 bits, keep what must be exact in 32.

What it saves
-------------
``torch.amp.autocast`` runs matmuls (and the ops listed as safe) in bf16 or
fp16, so the *activations* saved for backward are half the size. It does **not**
touch what you keep between steps: under autocast the weights, the gradients and
AdamW's two moment buffers stay fp32 -- 16 bytes per parameter, exactly as
without it -- and autocast even adds a 16-bit copy of each weight while the
forward runs. So the saving is a fraction of the activations, not "50 %": on an
H200, GPT-2 at batch 8 x 512 goes from 7.81 to 7.05 GiB (see
``assets/h200_anchors.json``). Halving everything needs *pure* bf16 training:
weights, gradients and optimizer state in bf16 (8 bytes per parameter with
AdamW), which the anchors put at 5.12 GiB.

What it costs
-------------
Precision. fp16 has 10 mantissa bits but a range that ends at 65504 and
flushes gradients below ~6e-8 to zero, so fp16 needs a ``GradScaler`` (scale the
loss up, unscale the gradients before the step, skip steps that overflowed).
bf16 has fp32's range (8 exponent bits) and only 7 mantissa bits: no scaler is
needed, but pure-bf16 weights lose small updates to rounding (an update smaller
than ~1/256 of a weight vanishes). bf16 is native from compute capability 8.0
(A100, RTX 30xx, H100); on a T4 (7.5) it is emulated -- use fp16 and a scaler.

On a CPU, autocast supports bf16; whether it is faster depends on the CPU's
bf16 instructions (AVX512-BF16/AMX). Without them it is often slower than fp32:
measure, as lab 02 does.

API (torchtune's shapes)::

    cfg = PrecisionConfig("amp")                  # dtype chosen from the device
    model = apply_precision(model, cfg, device)   # casts only for "pure-bf16"
    opt = torch.optim.AdamW(model.parameters())   # after the cast: states follow the weights
    scaler = make_scaler(cfg, device)             # enabled only for fp16
    with autocast_ctx(cfg, device):               # nullcontext() when off
        loss = model(**batch).loss
    scaler.scale(loss).backward(); scaler.step(opt); scaler.update()

Use ``torch.amp`` (``torch.amp.autocast``, ``torch.amp.GradScaler``); the
``torch.cuda.amp`` spellings in older tutorials are deprecated.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable

import torch

MODES = ("fp32", "amp", "pure-bf16")
HALF_DTYPES = (torch.bfloat16, torch.float16)
NATIVE_BF16_CAPABILITY = (8, 0)


def capability_of(device: torch.device | str) -> tuple[int, int] | None:
    """Compute capability of a CUDA device, ``None`` for any other device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


def default_dtype(capability: tuple[int, int] | None) -> torch.dtype:
    """bf16 where it is native (CPU, CUDA >= 8.0), fp16 on older GPUs (T4 is 7.5, V100 7.0)."""
    if capability is not None and tuple(capability) < NATIVE_BF16_CAPABILITY:
        return torch.float16
    return torch.bfloat16


@dataclass(frozen=True)
class PrecisionConfig:
    """How a training step uses floating point.

    ``mode``:
      * ``"fp32"``       -- everything fp32 (the baseline);
      * ``"amp"``        -- autocast to ``dtype``; weights, gradients, optimizer states fp32;
      * ``"pure-bf16"``  -- weights (hence gradients and optimizer states) in bf16, no autocast needed.
    ``dtype``: the 16-bit type for ``"amp"``; ``None`` picks it from the device
    (see :meth:`resolved`).
    """

    mode: str = "amp"
    dtype: torch.dtype | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.dtype is not None and self.dtype not in HALF_DTYPES + (torch.float32,):
            raise ValueError(f"dtype must be torch.bfloat16, torch.float16 or None (auto), got {self.dtype}")
        if self.mode == "fp32" and self.dtype not in (None, torch.float32):
            raise ValueError(f"mode='fp32' computes in fp32; for {self.dtype} use mode='amp', dtype={self.dtype}")
        if self.mode == "amp" and self.dtype == torch.float32:
            raise ValueError("autocast to fp32 does nothing; use mode='fp32', or mode='amp' with dtype=None, "
                             "torch.bfloat16 or torch.float16")
        if self.mode == "pure-bf16" and self.dtype == torch.float16:
            raise ValueError("pure fp16 training is not supported: fp16 weights without fp32 master copies "
                             "underflow and overflow. Use mode='amp', dtype=torch.float16 (with a GradScaler) on "
                             "GPUs without native bf16, or mode='pure-bf16' on compute capability >= 8.0")

    @property
    def enabled(self) -> bool:
        """Whether anything runs in 16 bits."""
        return self.mode != "fp32"

    def resolved(self, device: torch.device | str) -> "PrecisionConfig":
        """This config with ``dtype`` fixed for ``device`` (and checked against what it supports)."""
        device = torch.device(device)
        cap = capability_of(device)
        if self.mode == "fp32":
            return replace(self, dtype=torch.float32)
        dtype = self.dtype or (torch.bfloat16 if self.mode == "pure-bf16" else default_dtype(cap))
        if dtype == torch.bfloat16 and cap is not None and cap < NATIVE_BF16_CAPABILITY:
            name = torch.cuda.get_device_name(device)
            raise ValueError(f"{name} (compute capability {cap[0]}.{cap[1]}) has no native bf16: it would be "
                             "emulated, slower and saving nothing. Use mode='amp' with dtype=None or "
                             "torch.float16 (a GradScaler is created for you by make_scaler)")
        if dtype == torch.float16 and device.type == "cpu" and cap is None:  # (a simulated capability passes)
            raise ValueError("on a CPU use bf16 (fp32's range, no GradScaler needed): "
                             "PrecisionConfig(mode='amp', dtype=None) or dtype=torch.bfloat16")
        return replace(self, dtype=dtype)

    @property
    def needs_scaler(self) -> bool:
        """A GradScaler is needed exactly when gradients flow through fp16."""
        return self.mode == "amp" and self.dtype == torch.float16


def autocast_ctx(cfg: PrecisionConfig, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``mode="amp"``, else ``contextlib.nullcontext()``.

    Pure bf16 needs no autocast: the weights already are bf16, so every matmul is.
    """
    device = torch.device(device)
    cfg = cfg.resolved(device)
    if cfg.mode != "amp":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=cfg.dtype)


def autocast_factory(cfg: PrecisionConfig, device: torch.device | str) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument factory of :func:`autocast_ctx` (what ``profiler.train_step_fn`` takes)."""
    cfg = cfg.resolved(device)
    return lambda: autocast_ctx(cfg, device)


def make_scaler(cfg: PrecisionConfig, device: torch.device | str) -> torch.amp.GradScaler:
    """``torch.amp.GradScaler`` enabled only for fp16 autocast; a disabled no-op object otherwise.

    With bf16 a scaler is useless (bf16 has fp32's exponent range, so small gradients
    do not underflow) -- the seed text's ``GradScaler()`` next to ``bfloat16`` is a mistake.
    """
    device = torch.device(device)
    cfg = cfg.resolved(device)
    return torch.amp.GradScaler(device.type, enabled=cfg.needs_scaler)


def apply_precision(model: torch.nn.Module, cfg: PrecisionConfig,
                    device: torch.device | str | None = None) -> torch.nn.Module:
    """Cast the model for ``cfg`` (in place) and return it.

    Only ``"pure-bf16"`` casts (weights and buffers to bf16). Create the optimizer
    *after* this call: AdamW allocates its states like the parameters, so they
    are bf16 too. ``"fp32"`` and ``"amp"`` keep fp32 weights and check that they are.
    """
    if device is not None:
        cfg = cfg.resolved(device)
    if cfg.mode == "pure-bf16":
        return model.to(torch.bfloat16)
    half = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if half:
        raise ValueError(f"mode={cfg.mode!r} expects fp32 weights but the model has {half}: load it with "
                         "dtype=torch.float32 (autocast keeps fp32 master weights) or use mode='pure-bf16'")
    return model


def precision_step_fn(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer,
                      cfg: PrecisionConfig, device: torch.device | str):
    """``profiler.train_step_fn`` with this config's autocast and scaler: one full training step."""
    from .profiler import train_step_fn
    return train_step_fn(model, batch, optimizer, autocast=autocast_factory(cfg, device),
                         scaler=make_scaler(cfg, device))


def state_dtypes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, list[str]]:
    """Which dtypes the weights, gradients and optimizer states have (to see what autocast leaves in fp32)."""
    def names(ts):
        return sorted({str(t.dtype).replace("torch.", "") for t in ts})
    params = [p for p in model.parameters()]
    out = {"weights": names(params), "gradients": names(p.grad for p in params if p.grad is not None)}
    if optimizer is not None:
        out["optimizer"] = names(v for st in optimizer.state.values() for v in st.values()
                                 if isinstance(v, torch.Tensor) and v.dim() > 0)
    return out


def grad_error(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative L2 error of each parameter's gradient against ``reference`` (name -> fp32 gradient).

    Returns ``{"max_rel_err", "mean_rel_err", "min_cosine"}``. Parameters whose
    reference gradient is zero are skipped; a missing gradient counts as error 1.
    """
    errs, coss = [], []
    for name, p in model.named_parameters():
        ref = reference.get(name)
        if ref is None or float(ref.norm()) == 0.0:
            continue
        if p.grad is None:
            errs.append(1.0)
            coss.append(0.0)
            continue
        g, r = p.grad.detach().float().flatten(), ref.detach().float().flatten().to(p.grad.device)
        errs.append(float((g - r).norm() / r.norm()))
        coss.append(float(torch.nn.functional.cosine_similarity(g, r, dim=0)))
    if not errs:
        raise ValueError("no reference gradients to compare with")
    return {"max_rel_err": max(errs), "mean_rel_err": sum(errs) / len(errs), "min_cosine": min(coss)}


# ---------------------------------------------------------------- the lab's graded functions, as the library does them
def choose_amp_dtype(capability: tuple[int, int] | None) -> tuple[torch.dtype, bool]:
    """``(dtype, use_scaler)`` for autocast on a GPU of ``capability`` (``None``: a CPU).

    fp16 with a GradScaler below compute capability 8.0 (no native bf16); bf16 without one from 8.0 and on a CPU.
    """
    dtype = default_dtype(None if capability is None else tuple(capability))
    return dtype, dtype == torch.float16


STATIC_BYTES_PER_PARAM = {"fp32": 16, "amp": 16, "pure-bf16": 8}  # weights + gradients + AdamW's 2 states


def static_bytes(n_params: int, mode: str) -> int:
    """Bytes of weights, gradients and AdamW's two moments for ``mode``: autocast changes none of them."""
    if mode not in STATIC_BYTES_PER_PARAM:
        raise ValueError(f"mode must be one of {tuple(STATIC_BYTES_PER_PARAM)}, got {mode!r}")
    return STATIC_BYTES_PER_PARAM[mode] * int(n_params)


def amp_train_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, dtype: torch.dtype) -> float:
    """One autocast training step (forward and loss under autocast, backward outside); returns the loss."""
    device_type = next(model.parameters()).device.type
    optimizer.zero_grad(set_to_none=True)  # frees last step's gradients before the forward
    with torch.autocast(device_type=device_type, dtype=dtype):
        loss = model(**batch).loss
    scaler.scale(loss).backward()  # a disabled scaler returns the loss as is
    scaler.step(optimizer)         # unscales first; skips the step on inf/NaN gradients
    scaler.update()
    return loss.item()


# ------------------------------------------------------------------ what emulated bf16 costs
_BF16_PROBE = r"""
import json, sys, time
import torch
torch.manual_seed(0)
torch.set_num_threads(1)  # one thread: on a shared machine, idle-spinning worker threads dominate small matmuls
rows, d_in, d_out, reps = map(int, sys.argv[1:5])
out = {"cpu_capability": torch.backends.cpu.get_cpu_capability()}
for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    layer = torch.nn.Linear(d_in, d_out).to(dtype)
    x = torch.randn(rows, d_in, dtype=dtype, requires_grad=True)
    layer(x).sum().backward()  # warm-up: kernels chosen, buffers allocated
    times = []
    for _ in range(reps):  # the fastest of reps: a busy machine only ever adds time
        t = time.perf_counter()
        y = layer(x)
        y.sum().backward()
        times.append(time.perf_counter() - t)
    out[name] = {"step_time_s": min(times), "bytes_per_value": y.element_size(),
                 "activation_bytes": y.numel() * y.element_size(),
                 "weight_bytes": layer.weight.numel() * layer.weight.element_size()}
print(json.dumps(out))
"""
# oneDNN and ATen limited to AVX2: no AVX512-BF16 / AMX instructions, so bf16 arithmetic is emulated
EMULATED_BF16_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def bf16_cost(emulated: bool = False, *, rows: int = 256, d_in: int = 256, d_out: int = 512, reps: int = 3) -> dict:
    """Bytes and time of one ``Linear`` forward + backward in fp32 and in bf16 on this CPU, in a fresh process.

    ``emulated=True`` runs it with the CPU's bf16 instructions switched off (:data:`EMULATED_BF16_ENV`), the
    situation of a CPU without AVX512-BF16/AMX -- and of a GPU below compute capability 8.0, which has no bf16
    tensor cores: the tensors are still 2 bytes (the memory saving is the same), but every bf16 operation is
    converted to fp32 and back, so it is slower than fp32. A fresh process because both settings are read once,
    when torch loads. The time is the fastest of ``reps`` calls. Returns ``{"cpu_capability", "fp32": {...}, "bf16": {...}}`` with ``step_time_s``,
    ``bytes_per_value``, ``activation_bytes`` and ``weight_bytes`` per dtype.
    """
    import json
    import os
    import subprocess
    import sys
    for name, v in (("rows", rows), ("d_in", d_in), ("d_out", d_out), ("reps", reps)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    env = {**os.environ, **(EMULATED_BF16_ENV if emulated else {})}
    if not emulated:
        for k in EMULATED_BF16_ENV:
            env.pop(k, None)
    done = subprocess.run([sys.executable, "-c", _BF16_PROBE, str(rows), str(d_in), str(d_out), str(reps)],
                          env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"the bf16 probe failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
