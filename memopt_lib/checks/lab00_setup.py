"""Checks of lab 00, setup: the rule that decides bf16 vs fp16 on a GPU.

``torch.cuda.is_bf16_supported()`` is not that rule: it can answer True on a T4
(compute capability 7.5), where bf16 is emulated. Native bf16 starts at 8.0.
"""
from __future__ import annotations

from .base import Registry

CHECKS = Registry(lab="00")
CASES = {(6, 1): False, (7, 0): False, (7, 5): False, (8, 0): True, (8, 6): True, (8, 9): True, (9, 0): True,
         (10, 0): True, (12, 0): True}


@CHECKS.check(points=1, needs=["native_bf16"])
def native_bf16_rule(ns, ctx):
    """native_bf16((major, minor)) is True exactly from compute capability 8.0."""
    for cap, expected in CASES.items():
        got = ns["native_bf16"](cap)
        assert isinstance(got, bool), f"return a bool, got {type(got).__name__}"
        assert got == expected, (f"native_bf16({cap}) returned {got}; a GPU of compute capability "
                                 f"{cap[0]}.{cap[1]} {'has' if expected else 'does not have'} native bf16 "
                                 "(Ampere, 8.0, is the first)")
    return {}


@CHECKS.check(points=1, needs=["gib"])
def gib_conversion(ns, ctx):
    """gib(n_bytes) converts bytes to GiB (2**30 bytes), as PyTorch and nvidia-smi count."""
    for n in (0, 1, 2**30, 3 * 2**29, 7_812_345_678, ctx.rng.randint(1, 10**12)):
        got = ns["gib"](n)
        assert abs(got - n / 2**30) < 1e-9, (f"gib({n}) returned {got}; a GiB is 2**30 = 1,073,741,824 bytes "
                                             "(a GB is 10**9: the seed text mixes the two)")
    return {}
