"""Checks of the grader's fixture lab 90 (two tiny graded functions), used only by tests/test_grading*.py.

* ``sum_of_squares_values`` -- correctness on inputs drawn from the grader's per-run seed. The
  child only sanity-checks the answers; the grader re-verifies them in its own process with
  :mod:`memopt_fixture_lab90_ref` (``REFERENCE``), a file the sandbox cannot read.
* ``row_norms_lean`` -- memory: ``row_norms(x)`` must not materialise a copy of ``x``. Measured
  twice, by the profiler's tracker (exact, torch storages) and by the kernel's resident-memory
  high-water mark (:mod:`memopt_lib.grading.rss`: sees numpy, other threads, tampered counters).
  Threshold: a quarter of the input's bytes, on a 64 MiB input; the lean answer needs ~0.
"""
from __future__ import annotations

import math

import torch

from memopt_lib.checks.base import Registry
from memopt_lib.grading.rss import rss_growth
from memopt_lib.profiler import measure

CHECKS = Registry(lab="90")
REFERENCE = "memopt_fixture_lab90_ref"


def sum_inputs(seed: int) -> list[torch.Tensor]:
    """The grader's inputs for ``sum_of_squares``: their shapes and values depend on the seed."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(3, 50, (3,), generator=g).tolist()
    return [torch.randn(n, generator=g, dtype=torch.float64) for n in sizes]


@CHECKS.check(points=2, needs=["sum_of_squares"])
def sum_of_squares_values(ns, ctx):
    """sum_of_squares(x) on the grader's inputs."""
    answers = []
    for x in sum_inputs(ctx.seed):
        value = ns["sum_of_squares"](x.clone())
        assert isinstance(value, (int, float)) and not isinstance(value, bool), \
            f"sum_of_squares must return a Python float, got {type(value).__name__}"
        assert math.isfinite(value) and value >= 0, f"a sum of squares is finite and >= 0, got {value}"
        answers.append(float(value))
    return {"answers": answers}


@CHECKS.check(points=3, needs=["row_norms"])
def row_norms_lean(ns, ctx):
    """row_norms(x) is right and allocates (almost) nothing beyond its output."""
    rows = 16384 + ctx.rng.randrange(64)
    x = torch.randn(rows, 1024, generator=torch.Generator().manual_seed(ctx.seed))
    holder = {}
    report = measure(lambda: holder.__setitem__("y", ns["row_norms"](x)), device="cpu", timeline=False)
    y, tracked = holder.pop("y"), report.peak_allocated_bytes - report.start_allocated_bytes
    assert isinstance(y, torch.Tensor) and tuple(y.shape) == (rows,), "row_norms must return one norm per row"
    expected = x.double().pow(2).sum(1).sqrt()
    assert torch.allclose(y.double(), expected, rtol=1e-4, atol=1e-4), "row_norms gives wrong values"
    _, resident = rss_growth(lambda: holder.__setitem__("y", ns["row_norms"](x)))
    limit = x.nbytes // 4
    assert tracked <= limit, f"row_norms allocated {tracked} B of tensors beyond its input (limit {limit} B)"
    assert resident <= limit, (f"resident memory grew by {resident} B while row_norms ran (limit {limit} B): "
                               "memory used outside torch's view still counts")
    return {"peak_allocated_bytes": report.peak_allocated_bytes, "tracked_extra_bytes": tracked,
            "resident_growth_bytes": resident, "input_bytes": x.nbytes}
