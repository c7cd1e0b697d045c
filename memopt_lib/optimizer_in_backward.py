"""Optimizer step in backward: update each parameter as soon as its gradient is ready, then free the gradient.

What it saves
-------------
A plain step keeps *every* gradient alive from the moment backward produces it until ``optimizer.step()`` has
run: one full copy of the trainable weights (4 bytes/param in fp32; GPT-2: 0.5 GiB) at the end of backward,
exactly when the optimizer's temporaries join them. Here each parameter gets its own optimizer, and a
``register_post_accumulate_grad_hook`` (torch >= 2.1) runs that optimizer's step the moment the parameter's
gradient has been accumulated, then sets ``.grad = None``. At most a few gradients are alive at any time; the
gradient term of the peak all but disappears. torchtune's single-device recipes do the same
(``optimizer_in_bwd``).

What it costs
-------------
* No gradient accumulation: the step happens inside every ``backward()``, so micro-batches cannot add up
  first. Use one micro-batch per step.
* No global view of the gradients: no gradient clipping by global norm, and no ``GradScaler`` (fp16 needs to
  unscale and check *all* gradients for inf before any update). Use bf16 or fp32.
* ``optimizer.step()`` / ``zero_grad()`` become no-ops: the wrapper returned here keeps the training loop's
  shape (``zero_grad, forward, backward, step``) unchanged -- a disabled step, not a branch.

The updates are the same as a plain step's, parameter by parameter: AdamW's update of one tensor depends only
on that tensor's gradient and state (the equivalence test compares parameters after several steps).
"""
from __future__ import annotations

import weakref
from typing import Callable, Iterable

import torch


class OptimizerInBackward(torch.optim.Optimizer):
    """One optimizer per parameter, stepped by a post-accumulate-grad hook; ``step``/``zero_grad`` do nothing.

    It is a ``torch.optim.Optimizer`` so that code reading ``param_groups`` and ``state`` (the profiler's
    breakdown, ``optimizer_state_bytes``) sees every parameter and every state tensor.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], make_optimizer: Callable[[list], torch.optim.Optimizer]):
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters to optimize in backward")
        self.optimizers = {p: make_optimizer([p]) for p in params}
        first = next(iter(self.optimizers.values()))
        super().__init__(params, dict(first.defaults))
        # the hook holds this wrapper weakly: a strong reference would make a cycle through the parameter's hook
        # dict that Python's gc cannot see, and keep every parameter and optimizer state alive after del
        ref = weakref.ref(self)

        def hook(param):
            wrapper = ref()
            if wrapper is not None:
                wrapper._step_param(param)

        self._handles = [p.register_post_accumulate_grad_hook(hook) for p in params]
        self.steps_in_backward = 0

    def _step_param(self, param: torch.Tensor) -> None:
        self.optimizers[param].step()
        # set_to_none: the gradient is freed now, during backward, not after the whole backward
        self.optimizers[param].zero_grad(set_to_none=True)
        self.steps_in_backward += 1

    @property
    def state(self):  # the per-parameter optimizers' states, keyed by parameter
        out = {}
        for opt in self.optimizers.values():
            out.update(opt.state)
        return out

    @state.setter
    def state(self, value):  # torch.optim.Optimizer.__init__ assigns an empty state
        pass

    def step(self, closure=None):
        """No-op: every parameter was updated during backward."""
        return None if closure is None else closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: gradients are freed as soon as they are applied."""

    def __del__(self):
        self.remove()

    def remove(self) -> None:
        """Unregister the hooks (the parameters go back to plain backward)."""
        for h in getattr(self, "_handles", []):
            h.remove()
        self._handles = []

    def state_dict(self):
        return {id(p): opt.state_dict() for p, opt in self.optimizers.items()}


def apply_optimizer_in_backward(model: torch.nn.Module,
                                make_optimizer: Callable[[list], torch.optim.Optimizer]) -> OptimizerInBackward:
    """Register ``make_optimizer([p])`` for every trainable parameter of ``model``, stepped in backward.

    ``make_optimizer`` builds an optimizer over a list of parameters, e.g.
    ``lambda ps: torch.optim.AdamW(ps, lr=1e-4)`` or bitsandbytes' ``AdamW8bit``. Returns the wrapper to use
    as the loop's optimizer (its ``step`` and ``zero_grad`` are no-ops).
    """
    return OptimizerInBackward(model.parameters(), make_optimizer)
