"""Wrong answers of lab 02 (mixed precision)."""
import copy

import torch

from . import Wrong

KEPT = []  # what leaky steps keep alive between calls (cleared by the test before each run)


def _autocast_step(model, batch, optimizer, scaler, dtype, *, zero=True, keep_out=False, retain=False):
    if zero:
        optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=next(model.parameters()).device.type, dtype=dtype):
        out = model(**batch)
        loss = out.loss
    if keep_out:
        KEPT.append(out)
    scaler.scale(loss).backward(retain_graph=retain)
    if retain:
        KEPT.append(loss)
    scaler.step(optimizer)
    scaler.update()
    return loss.item()


def no_zero_grad(model, batch, optimizer, scaler, dtype):
    return _autocast_step(model, batch, optimizer, scaler, dtype, zero=False)


def keeps_outputs(model, batch, optimizer, scaler, dtype):
    return _autocast_step(model, batch, optimizer, scaler, dtype, keep_out=True)


def retains_graph(model, batch, optimizer, scaler, dtype):
    return _autocast_step(model, batch, optimizer, scaler, dtype, retain=True)


def second_fp32_copy(model, batch, optimizer, scaler, dtype):
    if not any(isinstance(k, torch.nn.Module) for k in KEPT):
        KEPT.append(copy.deepcopy(model))  # "a master copy", kept for good
    return _autocast_step(model, batch, optimizer, scaler, dtype)


def fp32_step(model, batch, optimizer, scaler, dtype):
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss.item()


def cast_model_no_autocast(model, batch, optimizer, scaler, dtype):
    model.to(dtype)
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.item()


def optimizer_step_not_scaler(model, batch, optimizer, scaler, dtype):
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=next(model.parameters()).device.type, dtype=dtype):
        loss = model(**batch).loss
    scaler.scale(loss).backward()
    optimizer.step()  # the gradients are still multiplied by the scale
    scaler.update()
    return loss.item()


def no_scaler(model, batch, optimizer, scaler, dtype):
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=next(model.parameters()).device.type, dtype=dtype):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss.item()


def returns_tensor(model, batch, optimizer, scaler, dtype):
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=next(model.parameters()).device.type, dtype=dtype):
        loss = model(**batch).loss
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss


def backward_inside_no_step(model, batch, optimizer, scaler, dtype):
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=next(model.parameters()).device.type, dtype=dtype):
        loss = model(**batch).loss
        scaler.scale(loss).backward()
    return loss.item()


def bf16_always(capability):
    return torch.bfloat16, False


def scaler_always(capability):
    if capability is not None and tuple(capability) < (8, 0):
        return torch.float16, True
    return torch.bfloat16, True


def threshold_86(capability):
    if capability is not None and tuple(capability) < (8, 6):
        return torch.float16, True
    return torch.bfloat16, False


def major_only_wrong(capability):
    if capability is None or capability[0] > 8:
        return torch.bfloat16, False
    return torch.float16, True


def amp_halves_all(n_params, mode):
    return {"fp32": 16, "amp": 8, "pure-bf16": 8}[mode] * n_params


def amp_half_weights(n_params, mode):
    return {"fp32": 16, "amp": 14, "pure-bf16": 8}[mode] * n_params


def forgets_gradients(n_params, mode):
    return {"fp32": 12, "amp": 12, "pure-bf16": 6}[mode] * n_params


def pure_fp32_states(n_params, mode):
    return {"fp32": 16, "amp": 16, "pure-bf16": 12}[mode] * n_params


G = "step_gradients_match_fp32"
S = "step_uses_scaler_for_fp16"
P = "step_peak_memory"
WRONG = [
    Wrong("no zero_grad", "mixed_precision_step", no_zero_grad, (G, S, P), r"zero_grad|zero the gradients"),
    Wrong("model outputs kept in a global list", "mixed_precision_step", keeps_outputs, (P,), r"kept in a list"),
    Wrong("backward(retain_graph=True), loss kept", "mixed_precision_step", retains_graph, (P,), r"kept in a list"),
    Wrong("a second fp32 copy of the model", "mixed_precision_step", second_fp32_copy, (P,), r"copy of the model"),
    Wrong("fp32 step (no autocast)", "mixed_precision_step", fp32_step, (G, S, P), r"autocast|scaler\.scale"),
    Wrong("model.to(bf16) without autocast", "mixed_precision_step", cast_model_no_autocast, (G,),
          r"do not cast the model"),
    Wrong("optimizer.step() instead of scaler.step()", "mixed_precision_step", optimizer_step_not_scaler, (S,),
          r"scaler\.step"),
    Wrong("no GradScaler at all", "mixed_precision_step", no_scaler, (S,), r"scaler\.scale"),
    Wrong("returns the loss tensor", "mixed_precision_step", returns_tensor, (G, S, P), r"loss\.item\(\)"),
    Wrong("backward inside autocast, no optimizer step", "mixed_precision_step", backward_inside_no_step, (G, S, P),
          r"stepped 0 time|scaler\.step was called 0x"),
    Wrong("bf16 everywhere", "choose_amp_dtype", bf16_always, ("amp_dtype_choice",), r"below, use fp16"),
    Wrong("GradScaler with bf16 too", "choose_amp_dtype", scaler_always, ("amp_dtype_choice",), r"only for fp16"),
    Wrong("bf16 from 8.6", "choose_amp_dtype", threshold_86, ("amp_dtype_choice",), r"8\.0"),
    Wrong("major > 8 only", "choose_amp_dtype", major_only_wrong, ("amp_dtype_choice",), r"8\.0"),
    Wrong("autocast halves everything", "predict_static_bytes", amp_halves_all, ("static_bytes",), r"autocast keeps"),
    Wrong("autocast halves the weights", "predict_static_bytes", amp_half_weights, ("static_bytes",), r"16 bytes"),
    Wrong("no gradients counted", "predict_static_bytes", forgets_gradients, ("static_bytes",), r"gradients"),
    Wrong("pure bf16 keeps fp32 states", "predict_static_bytes", pure_fp32_states, ("static_bytes",), r"pure bf16"),
]
