"""What autograd keeps for backward, module by module: ``torch.autograd.graph.saved_tensors_hooks``.

Every tensor an operation saves for its backward passes through the ``pack`` hook of the innermost
``saved_tensors_hooks`` context while the forward runs. This instrument installs one, notes which module's
forward was running (forward pre-/post-hooks keep a stack of module names), and counts each *storage* once
(an op that saves a view of a tensor another op saved costs no new bytes). Storages of parameters and
buffers are not counted: a weight saved for the input's gradient was alive anyway.

What it shows that a peak cannot:

* A frozen ``Linear``/``Conv1D`` (``requires_grad=False`` weight) saves **no input**: ``addmm``/``mm``
  saves its input only to compute the weight's gradient. So LoRA, which freezes the base layers, removes
  those saved inputs -- its activations fall (GPT-2 on an H200: the bench's ``LoRA r16`` row).
* A block wrapped in non-reentrant ``torch.utils.checkpoint`` saves **only its inputs** (torch saves them
  through autograd, ``_NoopSaveInputs``, to run the forward again in backward); inside it the checkpoint
  installs its own hooks, which store a placeholder and let every other tensor go.

It measures saved tensors only -- not the logits or other temporaries alive at the peak, and not
tensors kept alive by Python references: that is what :func:`memopt_lib.profiler.measure`
and :func:`memopt_lib.checkpointing.block_kept_bytes` are for.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.autograd.graph import saved_tensors_hooks

OUTSIDE = "(no module)"


@dataclass
class SavedTensors:
    """Bytes autograd saved during one forward, by the module that was running (innermost)."""

    by_module: dict[str, int] = field(default_factory=dict)
    saves: int = 0           # pack calls, including repeats of a storage already counted
    result: object = None    # what the measured call returned (it holds the graph: drop it when done)

    @property
    def total_bytes(self) -> int:
        return sum(self.by_module.values())

    def by_kind(self, strip: tuple[str, ...] = ("base_model.model.",)) -> dict[str, int]:
        """Bytes summed over the layers: ``transformer.h.3.mlp.c_fc`` -> ``transformer.h.mlp.c_fc``.

        ``strip``: prefixes removed first (peft's wrapper), so a plain model and its LoRA version line up.
        """
        out: dict[str, int] = {}
        for name, n in self.by_module.items():
            for p in strip:
                name = name[len(p):] if name.startswith(p) else name
            kind = ".".join(part for part in name.split(".") if not part.isdigit())
            out[kind] = out.get(kind, 0) + n
        return out


def saved_for_backward(model: torch.nn.Module, fn) -> SavedTensors:
    """Run ``fn()`` (a forward of ``model``) and count what autograd saves for backward, by module.

    ``fn`` is called with grad enabled. Module names are ``model.named_modules()``'s; saves made outside
    every submodule (e.g. the loss, computed in the model's own forward) are under the model's class name,
    or :data:`OUTSIDE` when ``fn`` runs code outside ``model``.
    """
    if not callable(fn):
        raise TypeError(f"fn must be a callable that runs a forward, got {type(fn).__name__}")
    known = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    stack = [OUTSIDE]
    # the graph keeps the hooks (each saved tensor holds its pack/unpack pair), so ``pack`` must not reach
    # the result: it writes into these two containers only, never into the returned object
    by_module: dict[str, int] = {}
    counts = {"saves": 0}
    seen: set[int] = set()

    def pre(name):
        def hook(*_):  # must return None: a value would replace the module's inputs
            stack.append(name)
        return hook

    def post(*_):  # must return None: a value would replace the module's output
        stack.pop()

    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(pre(name or type(model).__name__)))
        handles.append(m.register_forward_hook(post))

    def pack(t: torch.Tensor):
        counts["saves"] += 1
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in known and key not in seen and storage.nbytes():
            seen.add(key)
            by_module[stack[-1]] = by_module.get(stack[-1], 0) + storage.nbytes()
        # a detached alias (same storage, no copy): returning ``t`` itself would make a reference cycle
        # (output -> grad_fn -> saved output) that keeps the whole graph alive until the garbage collector runs
        return t.detach()

    try:
        with torch.enable_grad(), saved_tensors_hooks(pack, lambda t: t):
            result = fn()
    finally:
        for h in handles:
            h.remove()
    return SavedTensors(by_module, counts["saves"], result)
