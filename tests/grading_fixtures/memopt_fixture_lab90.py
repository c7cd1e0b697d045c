"""Checks of the grader's fixture lab 90 (two tiny graded functions), used only by tests/test_grading*.py.

Trusted form: the collects run in the sandboxed child and return data; the judges run in the grader.

* ``sum_of_squares_values`` -- answers on inputs drawn from the check's seed (sent by the grader
  when the check starts), compared with the reference's answers on the same inputs.
* ``row_norms_lean`` -- memory: ``row_norms(x)`` must not materialise a copy of ``x``. The collect
  builds a 64 MiB input and calls ``row_norms`` once; the grader measures the child's memory from
  outside while it runs. Allowed: the reference's rise plus a quarter of the input's bytes (the lean
  answer needs ~0 beyond its output; ``(x * x)`` needs the whole input again, in torch or numpy,
  in this thread or another).
"""
from __future__ import annotations

import torch

from memopt_lib.checks.base import Registry, fingerprint, fingerprint_error

CHECKS = Registry(lab="90", reference=lambda: {
    "sum_of_squares": lambda x: float((x * x).sum()),
    "row_norms": lambda x: torch.linalg.vector_norm(x, dim=1),
})


def sum_inputs(seed: int) -> list[torch.Tensor]:
    """The inputs for ``sum_of_squares``: their shapes and values depend on the seed."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(3, 50, (3,), generator=g).tolist()
    return [torch.randn(n, generator=g, dtype=torch.float64) for n in sizes]


@CHECKS.check(points=2, needs=["sum_of_squares"])
def sum_of_squares_values(ns, ctx):
    """sum_of_squares(x) on the grader's inputs."""
    answers = []
    for x in sum_inputs(ctx.seed):
        value = ns["sum_of_squares"](x.clone())
        answers.append(float(value) if isinstance(value, (int, float)) and not isinstance(value, bool)
                       else {"type": type(value).__name__})
    return {"answers": answers}


@sum_of_squares_values.judge
def _(got, ref, ctx):
    assert len(got.data["answers"]) == len(ref.data["answers"]), "wrong number of answers"
    for mine, want in zip(got.data["answers"], ref.data["answers"]):
        assert isinstance(mine, float), f"sum_of_squares must return a Python float, got {mine}"
        assert abs(mine - want) <= 1e-6 * max(1.0, abs(want)), f"sum_of_squares gave {mine}, expected {want:.6g}"


@CHECKS.check(points=3, needs=["row_norms"], measures_memory=True)
def row_norms_lean(ns, ctx):
    """row_norms(x) is right and allocates (almost) nothing beyond its output."""
    rows = 16384 + ctx.rng.randrange(64)
    x = torch.randn(rows, 1024, generator=ctx.torch_generator())
    y = ns["row_norms"](x)
    ok = isinstance(y, torch.Tensor) and tuple(y.shape) == (rows,)
    return {"rows": rows, "input_bytes": x.nbytes, "shape_ok": ok,
            "y": fingerprint({"y": y.double()}, ctx.seed) if ok else None}


@row_norms_lean.judge
def _(got, ref, ctx):
    assert got.data["shape_ok"], "row_norms must return one norm per row (a 1-D tensor)"
    assert fingerprint_error(got.data["y"], ref.data["y"]) <= 1e-4, "row_norms gives wrong values"
    limit = ref.memory.delta_bytes + ref.data["input_bytes"] // 4
    assert got.memory.delta_bytes <= limit, (
        f"memory rose by {got.memory.delta_bytes} B while row_norms ran, the reference's by "
        f"{ref.memory.delta_bytes} B (allowed: + a quarter of the input, {ref.data['input_bytes'] // 4} B; "
        f"measured by {got.memory.source}): memory used outside torch's view counts too")
    return {"rise_bytes": got.memory.delta_bytes, "reference_rise_bytes": ref.memory.delta_bytes}
