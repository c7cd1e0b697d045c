"""Evidence that a training step trained: what checks of stateful steps collect and how they judge it.

A step is called more than once (a step that forgets ``zero_grad`` is right the first time only). For each
call the collect records, as plain data:

* the value it returned (``loss``) and its type (a tensor keeps its graph alive; a float does not);
* how many times ``optimizer.step()`` ran during the call (an optimizer pre-step hook counts);
* a :func:`~memopt_lib.checks.base.fingerprint` of the gradients the optimizer was asked to apply (taken in
  that hook, so after a GradScaler has unscaled them);
* a fingerprint of how far the trainable parameters moved during the call (after minus before).

Checks that measure memory record only the returned values and the step counts (``fingerprints=False``):
fingerprints and parameter copies would be memory inside the measured window.

The reference namespace's step, run by the same collect on the same inputs, gives the same record; the judge
(:func:`judge_calls`) compares them call by call and names the first difference with the likely mistake.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch

from .base import fingerprint, fingerprint_error


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def returned(value) -> dict:
    """What a step returned, as plain data: its type name and, when it is one number, the number."""
    kind = type(value).__name__
    number = None
    if isinstance(value, bool):
        pass
    elif isinstance(value, (int, float)):
        number = float(value)
    elif torch.is_tensor(value) and value.numel() == 1:
        number = float(value.detach().float().item())
    if number is not None and not math.isfinite(number):
        number = repr(number)
    return {"type": kind, "loss": number}


class StepRecorder:
    """Counts ``optimizer.step()`` calls and fingerprints the gradients each one is handed."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Mapping[str, torch.Tensor], seed: int,
                 fingerprints: bool = True):
        self.params, self.seed, self.fingerprints = dict(params), seed, fingerprints
        self.steps = 0
        self.last_grads: dict | None = None
        self._handle = optimizer.register_step_pre_hook(self._pre)

    def _pre(self, optimizer, args, kwargs):
        self.steps += 1
        if self.fingerprints:
            self.last_grads = fingerprint({n: p.grad for n, p in self.params.items()}, self.seed)

    def remove(self):
        self._handle.remove()


def record_calls(step: Callable[[], object], optimizer: torch.optim.Optimizer,
                 params: Mapping[str, torch.Tensor], seed: int, calls: int = 2,
                 fingerprints: bool = True) -> list[dict]:
    """Run ``step()`` ``calls`` times; one record per call (see the module docstring)."""
    rec = StepRecorder(optimizer, params, seed, fingerprints)
    out = []
    try:
        for _ in range(calls):
            start = {n: p.detach().clone() for n, p in params.items()} if fingerprints else {}
            before, rec.last_grads = rec.steps, None
            try:
                value = step()
            except NotImplementedError:
                raise  # not written yet: nothing to compare (the runner says so)
            except Exception as err:  # noqa: BLE001 - the student's code raised: hand back what and where
                out.append({"raised": raised(err)})
                break
            moved = (fingerprint({n: p.detach() - start[n] for n, p in params.items()}, seed)
                     if fingerprints else None)
            out.append({**returned(value), "optimizer_steps": rec.steps - before, "grads": rec.last_grads,
                        "update": moved})
            del value, start
    finally:
        rec.remove()
    return out


def raised(err: BaseException) -> str:
    """``"Type: message (at line N of fn())"`` of an exception raised by the student's code."""
    import traceback
    if isinstance(err, NotImplementedError):
        return "NotImplementedError: replace `raise NotImplementedError()` with your code"
    tb = traceback.extract_tb(err.__traceback__)
    where = next((f"line {f.lineno} of {f.name}()" for f in reversed(tb) if f.filename.startswith("<")), "")
    return f"{type(err).__name__}: {str(err)[:300]}" + (f" (at {where})" if where else "")


#: what an exception from inside a training step most likely means
RAISED_HINTS = (
    ("No inf checks were recorded", "scaler.update() ran without scaler.step(optimizer): step through the scaler, "
                                    "which unscales the gradients and records whether they overflowed"),
    ("Attempting to unscale FP16 gradients", "the weights are fp16: do not cast the model; autocast keeps fp32 "
                                             "weights (and gradients) and casts inside the forward"),
    ("does not require grad", "the loss has no graph: compute it from the model's output and do not detach it "
                              "or run the forward under torch.no_grad()"),
    ("Trying to backward through the graph a second time", "backward ran twice through one graph: one backward "
                                                           "per forward (per micro-batch)"),
    ("NotImplementedError", "the function is not implemented yet"),
)


def judge_raised(records: Sequence[dict], what: str) -> None:
    """Fail with a hint if the student's step raised during any call."""
    for i, r in enumerate(records):
        if "raised" in r:
            hint = next((h for key, h in RAISED_HINTS if key in r["raised"]), "")
            raise AssertionError(f"{what}: call {i + 1} raised {r['raised']}" + (f". Likely: {hint}" if hint else ""))


def _rel(a, b) -> float:
    if not isinstance(a, float) or not isinstance(b, float):
        return math.inf
    return abs(a - b) / max(abs(b), 1e-12)


def judge_calls(got: Sequence[dict], ref: Sequence[dict], *, what: str, grad_tol: float, param_tol: float,
                loss_tol: float, hint_grads: str, hint_loss: str = "", need_float: bool = True) -> dict:
    """Compare the per-call records of a student's step with the reference's; raise ``AssertionError`` naming
    the first difference. Returns the errors measured (to show)."""
    judge_raised(got, what)
    assert len(got) == len(ref), f"checker error: {len(got)} calls recorded, the reference {len(ref)}"
    shown = {}
    for i, (g, r) in enumerate(zip(got, ref)):
        nth = ("first", "second", "third")[i] if i < 3 else f"call {i + 1}"
        if need_float:
            assert g["type"] == "float", (
                f"{what} returned a {g['type']}, not a Python float: return loss.item() -- a loss tensor keeps its "
                "autograd graph (every saved activation) alive for as long as anyone holds it")
        assert g["optimizer_steps"] == r["optimizer_steps"], (
            f"{what}: the optimizer stepped {g['optimizer_steps']} time(s) during the {nth} call; one call is "
            f"one optimizer step ({r['optimizer_steps']}). "
            + ("Call optimizer.step() (through scaler.step(optimizer) with a GradScaler) once, after backward."
               if g["optimizer_steps"] == 0 else "Step once, after all the backward passes of the call."))
        if r["grads"] is not None:
            err = fingerprint_error(g["grads"] or {}, r["grads"])
            shown[f"grad_error_call{i + 1}"] = err
            if err > grad_tol:
                if i > 0 and shown.get("grad_error_call1", math.inf) <= grad_tol:
                    raise AssertionError(
                        f"{what}: the first call's gradients are right, the second call's are not (relative error "
                        f"{err:.2e}): they still hold the first call's. Zero the gradients at the start of each "
                        "step: optimizer.zero_grad(set_to_none=True) (which also frees them before the forward).")
                raise AssertionError(f"{what}: the gradients handed to the optimizer differ from the reference "
                                     f"step's by {err:.2e} (relative; allowed {grad_tol:g}). {hint_grads}")
        lerr = _rel(g["loss"], r["loss"])
        shown[f"loss_error_call{i + 1}"] = lerr
        assert lerr <= loss_tol, (f"{what}: the {nth} call returned {g['loss']}, the batch's loss is "
                                  f"{r['loss']:.6f}. {hint_loss or 'Return the loss of the whole batch.'}")
        if r["update"] is not None:
            perr = fingerprint_error(g["update"] or {}, r["update"])
            shown[f"update_error_call{i + 1}"] = perr
            if perr > param_tol and i > 0 and shown.get("update_error_call1", math.inf) <= param_tol:
                raise AssertionError(
                    f"{what}: the first call's update is right, the second call's is not (relative {perr:.2e}): "
                    "gradients left over from the first call were applied again. Zero the gradients at the start of "
                    "each step: optimizer.zero_grad(set_to_none=True).")
            assert perr <= param_tol, (
                f"{what}: during the {nth} call the parameters moved differently from one optimizer step on this "
                f"batch's loss (relative {perr:.2e}). Step the optimizer you were given, once, after backward.")
    return shown
