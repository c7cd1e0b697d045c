"""Held-out wrong answers of lab 02 (mixed precision): cells mp-choose, mp-static, mp-step."""
from cases import Case

_KEEP = '''
global _KEPT
try:
    _KEPT
except NameError:
    _KEPT = []
'''

CASES = [
    # choose_amp_dtype(capability)
    Case("choose-fp16-on-cpu", "mp-choose", '''
if capability is None or tuple(capability) < (8, 0):
    return torch.float16, True
return torch.bfloat16, False
''', "a CPU (None) treated like an old GPU: fp16 + scaler"),
    Case("choose-volta-bf16", "mp-choose", '''
if capability is not None and tuple(capability) < (7, 0):
    return torch.float16, True
return torch.bfloat16, False
''', "bf16 from compute capability 7.0 (Volta) instead of 8.0"),
    Case("choose-scaler-none", "mp-choose", '''
if capability is not None and tuple(capability) < (8, 0):
    return torch.float16, True
return torch.bfloat16, None
''', "use_scaler None instead of False for bf16"),
    Case("choose-dtype-names", "mp-choose", '''
if capability is not None and tuple(capability) < (8, 0):
    return "float16", True
return "bfloat16", False
''', "dtype names as strings, not torch dtypes"),
    # predict_static_bytes(n_params, mode)
    Case("static-amp-extra-copy", "mp-static", '''
extra = 2 if mode == "amp" else 0  # "autocast keeps a bf16 copy of the weights"
per = {"fp32": 4, "amp": 4, "pure-bf16": 2}[mode]
return (4 * per + extra) * n_params
''', "autocast counted with a persistent bf16 weight copy (18 bytes)"),
    Case("static-one-adam-state", "mp-static", '''
per = {"fp32": 4, "amp": 4, "pure-bf16": 2}[mode]
return 3 * per * n_params  # weights, gradients, one AdamW state
''', "AdamW counted with one state"),
    Case("static-pure-fp32-weights", "mp-static", '''
if mode == "pure-bf16":
    return (4 + 2 + 2 * 2) * n_params  # fp32 weights kept, bf16 gradients and states
return 16 * n_params
''', "pure bf16 keeps fp32 weights"),
    # mixed_precision_step(model, batch, optimizer, scaler, dtype)
    Case("step-zero-grad-before-step", "mp-step", '''
device_type = next(model.parameters()).device.type
with torch.autocast(device_type=device_type, dtype=dtype):
    loss = model(**batch).loss
scaler.scale(loss).backward()
optimizer.zero_grad(set_to_none=True)  # "clean up before stepping"
scaler.step(optimizer)
scaler.update()
return loss.item()
''', "zero_grad between backward and step: nothing is applied"),
    Case("step-unscale-then-optimizer-step", "mp-step", '''
device_type = next(model.parameters()).device.type
optimizer.zero_grad(set_to_none=True)
with torch.autocast(device_type=device_type, dtype=dtype):
    loss = model(**batch).loss
scaler.scale(loss).backward()
scaler.unscale_(optimizer)
optimizer.step()   # skips the inf/NaN check and the scale's update
return loss.item()
''', "unscale_ then optimizer.step(), no scaler.step / update"),
    Case("step-fp16-hardcoded", "mp-step", '''
device_type = next(model.parameters()).device.type
optimizer.zero_grad(set_to_none=True)
with torch.autocast(device_type=device_type, dtype=torch.float16):
    loss = model(**batch).loss
scaler.scale(loss).backward()
scaler.step(optimizer)
scaler.update()
return loss.item()
''', "autocast dtype hard-coded to fp16 (the dtype argument ignored)"),
    Case("step-loss-no-shift", "mp-step", '''
device_type = next(model.parameters()).device.type
optimizer.zero_grad(set_to_none=True)
with torch.autocast(device_type=device_type, dtype=dtype):
    logits = model(input_ids=batch["input_ids"]).logits
loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))
scaler.scale(loss).backward()
scaler.step(optimizer)
scaler.update()
return loss.item()
''', "loss from the logits without the causal shift"),
    Case("step-double-step", "mp-step", '''
device_type = next(model.parameters()).device.type
optimizer.zero_grad(set_to_none=True)
with torch.autocast(device_type=device_type, dtype=dtype):
    loss = model(**batch).loss
scaler.scale(loss).backward()
scaler.step(optimizer)
optimizer.step()   # "to be sure the weights move"
scaler.update()
return loss.item()
''', "scaler.step and optimizer.step both called"),
    # memory-only wrong answers of tests/wrong_answers/lab02.py, judged here by the grader's outside meter
    Case("mem-keeps-outputs", "mp-step", _KEEP + '''
device_type = next(model.parameters()).device.type
optimizer.zero_grad(set_to_none=True)
with torch.autocast(device_type=device_type, dtype=dtype):
    out = model(**batch)
_KEPT.append(out)
scaler.scale(out.loss).backward()
scaler.step(optimizer)
scaler.update()
return out.loss.item()
''', "model outputs kept in a global list", origin="memory-only"),
    Case("mem-retains-graph", "mp-step", _KEEP + '''
device_type = next(model.parameters()).device.type
optimizer.zero_grad(set_to_none=True)
with torch.autocast(device_type=device_type, dtype=dtype):
    loss = model(**batch).loss
scaler.scale(loss).backward(retain_graph=True)
_KEPT.append(loss)
scaler.step(optimizer)
scaler.update()
return loss.item()
''', "backward(retain_graph=True), the loss kept", origin="memory-only"),
    Case("mem-second-fp32-copy", "mp-step", _KEEP + '''
import copy
if not any(src is model for src, _ in _KEPT):
    _KEPT.append((model, copy.deepcopy(model)))  # "a master copy" of each model, kept for good
device_type = next(model.parameters()).device.type
optimizer.zero_grad(set_to_none=True)
with torch.autocast(device_type=device_type, dtype=dtype):
    loss = model(**batch).loss
scaler.scale(loss).backward()
scaler.step(optimizer)
scaler.update()
return loss.item()
''', "a second fp32 copy of the model kept alive", origin="memory-only"),
]
