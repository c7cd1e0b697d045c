"""Parameter offloading of a frozen base: its weights live on the host and visit the device per layer.

accelerate's ``cpu_offload`` (the machinery behind ``device_map="auto"`` with ``max_memory``) puts a module's
weights in a host-side ``weights_map``, leaves ``meta`` tensors in the module, and attaches a hook that copies
the weights to the execution device just before the module's forward and drops them right after. The
device then holds one module's weights at a time -- in *inference*.

In *training* there is a catch: autograd saves a linear layer's weight for backward whenever the layer's
input requires grad (to compute ``grad_input = grad_output @ W``). Under LoRA every block's input requires
grad (the adapters upstream make it so), so the device copies of the frozen weights are **kept alive by the
graph** until backward reaches them: at the end of forward the device holds all of them again. What
offloading saves in training is what is alive *between* steps (and during the optimizer step), not the
forward/backward peak. :func:`frozen_weights_saved` measures that share; :func:`offload_frozen_base` counts
the bytes each step moves (each offloaded module's weights once per forward call).

:func:`plan_device_map` is the planning side of ``device_map="auto"`` with ``max_memory``: which blocks land on
the host for a GPU budget, and how many bytes the hooks then copy per forward.

Only modules whose own parameters are all frozen are offloaded (LoRA's ``base_layer``, a frozen MLP);
tied weights (GPT-2's ``wte`` is also its ``lm_head``) stay on the device: two hooks would fetch one tensor.
"""
from __future__ import annotations

import torch

from .offload import OffloadStats


def _frozen_leaves(model: torch.nn.Module, min_bytes: int):
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[p.data_ptr()] = owners.get(p.data_ptr(), 0) + 1
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if not own or any(p.requires_grad for p in own) or list(m.children()):
            continue
        if any(owners[p.data_ptr()] > 1 for p in own):  # tied weight: keep it on the device
            continue
        if sum(p.numel() * p.element_size() for p in own) < min_bytes:
            continue
        yield name, m


def offload_frozen_base(model: torch.nn.Module, execution_device: torch.device | str | None = None, *,
                        min_bytes: int = 1 << 16) -> torch.nn.Module:
    """Attach accelerate's ``cpu_offload`` to every frozen, untied leaf module with >= ``min_bytes`` of weights.

    ``model._memopt_offload_stats`` (an :class:`~memopt_lib.offload.OffloadStats`) counts the bytes the hooks
    move to the device per forward; ``model._memopt_offloaded`` lists the module names. Raises if nothing is
    frozen (offloading trainable weights would leave their gradients nowhere).
    """
    from accelerate import cpu_offload
    device = torch.device(execution_device) if execution_device is not None else next(model.parameters()).device
    chosen = list(_frozen_leaves(model, min_bytes))
    if not chosen:
        raise ValueError("no frozen module to offload: freeze the base first (e.g. peft.get_peft_model), "
                         "accelerate's hooks cannot train offloaded weights")
    stats = OffloadStats()
    handles = []
    for _, m in chosen:
        nbytes = sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
        cpu_offload(m, execution_device=device)
        stats.add_host(nbytes)
        # accelerate's pre-forward hook copies the weights in; count what it moves
        handles.append(m.register_forward_pre_hook(lambda _m, _a, n=nbytes: _count(stats, n)))
    model._memopt_offload_stats = stats
    model._memopt_offload_handles = handles
    model._memopt_offloaded = [n for n, _ in chosen]
    return model


def _count(stats: OffloadStats, nbytes: int) -> None:
    stats.to_device_bytes += nbytes
    stats.tensors_offloaded += 1


def remove_offload(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`offload_frozen_base`: weights back on the execution device, hooks removed."""
    from accelerate.hooks import remove_hook_from_module
    for name in getattr(model, "_memopt_offloaded", []):
        m = model.get_submodule(name)
        hook = getattr(m, "_hf_hook", None)
        weights = getattr(hook, "weights_map", None)
        device = getattr(hook, "execution_device", "cpu")
        remove_hook_from_module(m)
        if weights is not None:
            from accelerate.utils import set_module_tensor_to_device
            for pname, _ in list(m.named_parameters(recurse=False)):
                set_module_tensor_to_device(m, pname, device, value=weights[pname])
    for handle in getattr(model, "_memopt_offload_handles", []):
        handle.remove()
    for attr in ("_memopt_offload_stats", "_memopt_offloaded", "_memopt_offload_handles"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def frozen_weights_saved(model: torch.nn.Module, forward) -> dict:
    """Bytes of frozen weights autograd saves during ``forward()`` -- kept on the device until backward.

    A measurement through the saved-tensor hooks: a saved tensor counts if it shares storage with a frozen
    parameter of ``model`` (each storage once). Returns ``{"saved_frozen_bytes", "frozen_bytes"}``.
    """
    frozen = {p.untyped_storage().data_ptr(): p.numel() * p.element_size()
              for p in model.parameters() if not p.requires_grad and p.device.type != "meta"}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr() if t.device.type != "meta" else None
        if ptr in frozen:
            seen[ptr] = frozen[ptr]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return {"saved_frozen_bytes": sum(seen.values()), "frozen_bytes": sum(frozen.values())}


def plan_device_map(model: torch.nn.Module, max_memory: dict, *, dtype: torch.dtype = torch.float16) -> dict:
    """Where ``from_pretrained(device_map="auto", max_memory=...)`` would put each block, and its per-step cost.

    Wraps ``accelerate.infer_auto_device_map`` (works on a ``meta`` model: no weights needed) with the model's
    ``_no_split_modules`` (a decoder layer stays whole). Returns plain data: the device map, weight bytes per
    device in ``dtype``, and ``moved_per_forward_bytes`` -- the host-placed weights, which accelerate's hooks
    copy to the GPU once per forward.
    """
    import warnings

    from accelerate import infer_auto_device_map
    if not max_memory:
        raise ValueError("max_memory must name a budget per device, e.g. {0: '8GiB', 'cpu': '64GiB'}")
    no_split = sorted(getattr(model, "_no_split_modules", None) or [])
    with warnings.catch_warnings():  # "Device 0 is not available" on a machine without that GPU: planning only
        warnings.simplefilter("ignore")
        dmap = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    size = torch.empty((), dtype=dtype).element_size()
    per_device: dict[str, int] = {}
    seen: set[int] = set()  # a tied weight (GPT-2's wte / lm_head) is stored once
    for name, dev in dmap.items():
        module = model.get_submodule(name) if name else model
        params = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        per_device[str(dev)] = per_device.get(str(dev), 0) + sum(p.numel() for p in params) * size
    host = sum(v for k, v in per_device.items() if k in ("cpu", "disk"))
    return {"device_map": {k: str(v) for k, v in dmap.items()}, "bytes_per_device": per_device,
            "moved_per_forward_bytes": host}
