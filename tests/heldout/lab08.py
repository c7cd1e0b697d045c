"""Held-out wrong answers of lab 08 (CPU offloading): co-hooks (2 regions), co-predict, co-hostadam (3), co-paged."""
from cases import Case

CASES = [
    # pack_to_host(t) / unpack_to_device(packed)
    Case("hooks-keeps-device-copy", "co-hooks", '''
if t.numel() * t.element_size() < MIN_OFFLOAD_BYTES or isinstance(t, torch.nn.Parameter):
    return (None, t, None)
return (t.device, to_host(t), t)  # "keep the original in case the copy is slow"
''', "packs the device tensor along with its host copy", others=((1, '''
device, t, _ = packed
return t if device is None else t.to(device, copy=True)
'''),)),
    Case("hooks-offloads-weights", "co-hooks", '''
if t.numel() * t.element_size() < MIN_OFFLOAD_BYTES:
    return (None, t)
return (t.device, to_host(t))  # weights too
''', "offloads the parameters autograd saves as well (copies of the weights every step)"),
    Case("hooks-unpack-stays-on-host", "co-hooks", '''
device, t = packed
return t  # "autograd moves it where it needs it"
''', "unpack returns the host copy", region=1),
    Case("hooks-small-only", "co-hooks", '''
if t.numel() * t.element_size() >= MIN_OFFLOAD_BYTES or isinstance(t, torch.nn.Parameter):
    return (None, t)
return (t.device, to_host(t))
''', "size test inverted: offloads only the small tensors"),
    # predict_offload_bytes(n_params, offload, offload_gradients=False)
    Case("predict-device-weights-only", "co-predict", '''
if not offload:
    return {"device_bytes": 16 * n_params, "host_bytes": 0, "moved_bytes": 0}
return {"device_bytes": 4 * n_params, "host_bytes": 16 * n_params, "moved_bytes": 8 * n_params}
''', "the device keeps only the weights even when gradients stay there"),
    Case("predict-moved-one-way", "co-predict", '''
if not offload:
    return {"device_bytes": 16 * n_params, "host_bytes": 0, "moved_bytes": 0}
return {"device_bytes": (4 if offload_gradients else 8) * n_params, "host_bytes": 16 * n_params,
        "moved_bytes": 4 * n_params}
''', "bytes moved counted one way (gradients down, not the weights back)"),
    Case("predict-host-no-master", "co-predict", '''
if not offload:
    return {"device_bytes": 16 * n_params, "host_bytes": 0, "moved_bytes": 0}
return {"device_bytes": (4 if offload_gradients else 8) * n_params, "host_bytes": 8 * n_params,
        "moved_bytes": 8 * n_params}
''', "the host holds only AdamW's two states (no master weights, no gradients)"),
    # HostAdamW: __init__ (0), step (1), zero_grad (2)
    Case("hostadam-no-copy-back", "co-hostadam", '''
with torch.no_grad():
    for p, h in zip(self.params, self.host):
        h.grad = None if p.grad is None else to_host(p.grad, dtype=torch.float32)
    with host_memory(self.device):
        self.inner.step()
''', "the updated host weights never copied back to the device", region=1),
    Case("hostadam-state-on-device", "co-hostadam", '''
self.params = [p for p in params if p.requires_grad]
self.device = self.params[0].device
self.inner = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
''', "AdamW over the device parameters (state on the device)", others=((1, '''
self.inner.step()
'''), (2, '''
self.inner.zero_grad(set_to_none=True)
'''))),
    Case("hostadam-zero-host-only", "co-hostadam", '''
for h in self.host:
    h.grad = None
''', "zero_grad clears the host gradients only", region=2),
    Case("hostadam-lr-default", "co-hostadam", '''
self.params = [p for p in params if p.requires_grad]
self.device = self.params[0].device
self.host = [to_host(p, dtype=torch.float32).requires_grad_() for p in self.params]
with host_memory(self.device):
    self.inner = torch.optim.AdamW(self.host)
''', "lr and weight_decay not passed on (AdamW's defaults)"),
    # predict_paged_bytes(shapes, optim_bits=32)
    Case("paged-strict-threshold", "co-paged", '''
per_value = 4 if optim_bits == 32 else 1
total = 0
for shape in shapes:
    numel = 1
    for d in shape:
        numel *= d
    if numel > PAGED_MIN_NUMEL:
        total += 2 * numel * per_value
return total
''', "> instead of >= at the paging threshold"),
    Case("paged-bits-ignored", "co-paged", '''
total = 0
for shape in shapes:
    numel = 1
    for d in shape:
        numel *= d
    if numel >= PAGED_MIN_NUMEL:
        total += 2 * numel * 4
return total
''', "optim_bits ignored (always fp32 states)"),
    Case("paged-all-tensors", "co-paged", '''
per_value = 4 if optim_bits == 32 else 1
total = 0
for shape in shapes:
    numel = 1
    for d in shape:
        numel *= d
    total += 2 * numel * per_value
return total
''', "every tensor paged (the size threshold ignored)"),
    Case("paged-one-state", "co-paged", '''
per_value = 4 if optim_bits == 32 else 1
total = 0
for shape in shapes:
    numel = 1
    for d in shape:
        numel *= d
    if numel >= PAGED_MIN_NUMEL:
        total += numel * per_value
return total
''', "one state per parameter, not AdamW's two"),
]
