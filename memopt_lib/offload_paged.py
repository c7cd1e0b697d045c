"""Paged optimizers, honestly: what bitsandbytes puts in unified memory, and when that moves anything.

A *paged* bitsandbytes optimizer (``bnb.optim.PagedAdamW``, ``PagedAdamW8bit``) allocates optimizer state in
CUDA unified memory (``cudaMallocManaged``): pages the driver may evict to host RAM when the device runs out,
and bring back on access. Two facts decide what it does for a given model:

* **The size threshold.** In ``bitsandbytes/optim/optimizer.py`` (``Optimizer8bit.get_state_buffer``):
  ``if not self.is_paged or p.numel() < 1e5: return torch.zeros_like(p, ...)`` -- a parameter with fewer
  than 100,000 elements gets an ordinary device tensor, paged or not. A rank-16 LoRA matrix of a
  4096-wide 7B has ``16 x 4096 = 65,536`` elements: in a QLoRA recipe **nothing is paged**.
* **Paging is a safety net, not a saving.** Unified memory stays on the device while it fits; pages move
  only under memory pressure (then every step pays for the traffic). With room to spare, a paged optimizer
  uses the same device memory as an unpaged one.

On a CPU bitsandbytes falls back to plain tensors (and warns "Paged optimizers are not supported on CPU").
"""
from __future__ import annotations

from typing import Iterable

import torch

PAGED_MIN_NUMEL = 100_000  # bitsandbytes Optimizer8bit.get_state_buffer: ``p.numel() < 1e5`` -> not paged


def paged_split(numels: Iterable[int], min_numel: int = PAGED_MIN_NUMEL) -> dict[str, int]:
    """Which parameter tensors (by number of values) a paged optimizer would really page (arithmetic)."""
    numels = list(numels)
    paged = [n for n in numels if n >= min_numel]
    return {"paged_tensors": len(paged), "paged_values": sum(paged),
            "unpaged_tensors": len(numels) - len(paged), "unpaged_values": sum(numels) - sum(paged)}


def paged_state_plan(params: Iterable[torch.Tensor], *, state_tensors: int = 2, state_bytes: int = 4,
                     min_numel: int = PAGED_MIN_NUMEL) -> dict:
    """What a bitsandbytes paged optimizer would put in paged (unified) memory for these parameters.

    A parameter's state goes to paged memory only if it has at least ``min_numel`` elements; everything else
    is an ordinary device tensor. ``state_tensors`` per parameter (AdamW: 2) of ``state_bytes`` each (32-bit: 4;
    8-bit: 1, plus small quantization maps not counted). Plain data.
    """
    numels = [p.numel() for p in params if p.requires_grad]
    split = paged_split(numels, min_numel)
    per = state_tensors * state_bytes
    return {"tensors": len(numels), "paged_tensors": split["paged_tensors"],
            "paged_bytes": split["paged_values"] * per, "unpaged_bytes": split["unpaged_values"] * per,
            "largest_numel": max(numels, default=0), "min_numel": min_numel}


def paged_tensors(optimizer) -> dict:
    """Measured on a bitsandbytes optimizer after a step: how many state tensors are paged, and their bytes."""
    n = nbytes = total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v) and v.numel() > 1:
                total += 1
                if getattr(v, "is_paged", False):
                    n += 1
                    nbytes += v.numel() * v.element_size()
    return {"state_tensors": total, "paged_tensors": n, "paged_bytes": nbytes}



def predict_paged_bytes(shapes: Iterable[tuple[int, ...]], optim_bits: int = 32,
                      min_numel: int = PAGED_MIN_NUMEL) -> int:
    """Bytes of AdamW state (two tensors per parameter) a paged bitsandbytes optimizer puts in paged memory.

    ``optim_bits``: 32 (4 bytes per state value) or 8 (1 byte; the small per-block maps are not counted).
    """
    if optim_bits not in (8, 32):
        raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits}")
    per = 2 * (4 if optim_bits == 32 else 1)
    total = 0
    for shape in shapes:
        numel = 1
        for d in shape:
            numel *= int(d)
        if numel >= min_numel:
            total += numel * per
    return total
