"""Checks of lab 00, setup: the rule that decides bf16 vs fp16 on a GPU, and bytes -> GiB.

``torch.cuda.is_bf16_supported()`` is not that rule: it can answer True on a T4
(compute capability 7.5), where bf16 is emulated. Native bf16 starts at 8.0.
Collect in the student's process (answers on capabilities and byte counts drawn per run),
judge where no student code ran (compared with the reference rule on the same inputs).
"""
from __future__ import annotations

from .base import Registry

FIXED = [(6, 1), (7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]

CHECKS = Registry(lab="00", reference=lambda: {"native_bf16": lambda cap: tuple(cap) >= (8, 0),
                                               "gib": lambda n: n / 2**30})


def _plain(value):
    if isinstance(value, (bool, int, float)):
        return value
    return {"type": type(value).__name__}


@CHECKS.check(points=1, needs=["native_bf16"])
def native_bf16_rule(ns, ctx):
    """native_bf16((major, minor)) is True exactly from compute capability 8.0."""
    caps = FIXED + [(ctx.rng.randint(3, 13), ctx.rng.randint(0, 9)) for _ in range(6)]
    ctx.rng.shuffle(caps)
    return {"caps": [list(c) for c in caps], "answers": [_plain(ns["native_bf16"](c)) for c in caps]}


@native_bf16_rule.judge
def _(got, ref, ctx):
    assert len(got.data["answers"]) == len(ref.data["caps"]), "the check collected the wrong number of answers"
    for cap, mine, want in zip(ref.data["caps"], got.data["answers"], ref.data["answers"]):
        assert isinstance(mine, bool), f"return a bool, got {mine['type'] if isinstance(mine, dict) else type(mine).__name__}"
        assert mine == want, (f"native_bf16({tuple(cap)}) returned {mine}; a GPU of compute capability "
                              f"{cap[0]}.{cap[1]} {'has' if want else 'does not have'} native bf16 (Ampere, 8.0, is the first)")


@CHECKS.check(points=1, needs=["gib"])
def gib_conversion(ns, ctx):
    """gib(n_bytes) converts bytes to GiB (2**30 bytes), as PyTorch and nvidia-smi count."""
    ns_ = [0, 2**30] + [ctx.rng.randint(1, 10**12) for _ in range(4)] + [ctx.rng.randint(1, 64) * 2**29]
    return {"n": ns_, "answers": [_plain(ns["gib"](n)) for n in ns_]}


@gib_conversion.judge
def _(got, ref, ctx):
    assert len(got.data["answers"]) == len(ref.data["n"]), "the check collected the wrong number of answers"
    for n, mine, want in zip(ref.data["n"], got.data["answers"], ref.data["answers"]):
        assert isinstance(mine, (int, float)) and not isinstance(mine, bool) and abs(mine - want) < 1e-9, (
            f"gib({n}) returned {mine}; a GiB is 2**30 = 1,073,741,824 bytes (a GB is 10**9: the seed text mixes "
            "the two)")
