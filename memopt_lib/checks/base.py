"""The lab-check machinery: graded checks as plain functions, run on the checker's inputs.

A lab's check module (``memopt_lib/checks/<topic>.py``) declares its checks with
the :class:`Registry` decorator::

    CHECKS = Registry(lab="01")

    @CHECKS.check(points=2, needs=["count_gpt2_params"])
    def param_count(ns, ctx):
        count = ns["count_gpt2_params"]
        for cfg in ctx.configs():      # inputs the *checker* chooses
            assert count(cfg) == reference(cfg), "... a message that says what to fix"
        return {"peak_allocated_bytes": ...}   # optional measurements

``ns`` is the student's namespace (the graded cells only), ``ctx`` a
:class:`CheckContext` (device, profile, seeded RNG). A check passes by returning,
fails by raising ``AssertionError``; ``NotImplementedError`` means "not done yet".
The same functions run in a notebook (``run_lab_checks("01", globals())``), in
the test suite, and in the autograder's sandbox -- which calls them itself and
never trusts a value the student's code computed about itself.
"""
from __future__ import annotations

import random
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

STATUSES = ("passed", "failed", "error", "timeout", "oom", "crashed", "not_run")


@dataclass(frozen=True)
class Check:
    name: str
    lab: str
    points: float
    needs: tuple[str, ...]
    fn: Callable[[Mapping[str, Any], "CheckContext"], dict | None]
    gpu_only: bool = False

    @property
    def description(self) -> str:
        return (self.fn.__doc__ or self.name).strip().splitlines()[0]


@dataclass
class CheckResult:
    name: str
    status: str
    score: float
    max_score: float
    message: str = ""
    measurements: dict = field(default_factory=dict)
    duration_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CheckContext:
    """What a check may use: the device, the hardware profile and a seeded RNG for its inputs."""

    device: torch.device
    profile: Any
    seed: int = 0
    rng: random.Random = field(init=False)

    def __post_init__(self):
        self.rng = random.Random(self.seed)

    @classmethod
    def here(cls, seed: int = 0) -> "CheckContext":
        """The context of this machine: its hardware profile's device and shapes."""
        from ..profiles import pick_profile
        prof = pick_profile()
        return cls(prof.device, prof, seed)

    @property
    def is_gpu(self) -> bool:
        return self.device.type == "cuda"


class Registry:
    """The ordered list of a lab's checks."""

    def __init__(self, lab: str):
        self.lab = lab
        self.checks: list[Check] = []

    def check(self, points: float = 1, needs: Iterable[str] = (), gpu_only: bool = False):
        def deco(fn):
            self.checks.append(Check(fn.__name__, self.lab, float(points), tuple(needs), fn, gpu_only))
            return fn
        return deco

    @property
    def max_score(self) -> float:
        return sum(c.points for c in self.checks)

    @property
    def needs(self) -> list[str]:
        return sorted({n for c in self.checks for n in c.needs})

    def __iter__(self):
        return iter(self.checks)


def within_anchor_budget(peak_allocated_bytes: int, anchor_row: str, margin: float) -> dict:
    """The GPU budget of a check: an H200 anchor's steady peak times ``margin`` (other GPUs' kernels differ).

    Raises ``AssertionError`` with both numbers when the peak is over; returns the measurements otherwise.
    """
    from .. import anchors
    from ..profiler import GiB, fmt_bytes
    budget = anchors.row(anchor_row)["peak_steady_GiB"] * margin * GiB
    assert peak_allocated_bytes <= budget, (
        f"peak {fmt_bytes(peak_allocated_bytes)} > budget {fmt_bytes(budget)} (H200 anchor '{anchor_row}' x {margin})")
    return {"peak_allocated_bytes": int(peak_allocated_bytes), "budget_bytes": int(budget)}


def run_check(check: Check, ns: Mapping[str, Any], ctx: CheckContext) -> CheckResult:
    """Run one check in this process and classify the outcome."""
    missing = [n for n in check.needs if n not in ns]
    if missing:
        return CheckResult(check.name, "not_run", 0.0, check.points,
                           f"define {', '.join(missing)} (in the lab's graded cells) first")
    if check.gpu_only and not ctx.is_gpu:
        return CheckResult(check.name, "not_run", 0.0, check.points, "needs a CUDA GPU; skipped on this machine")
    t0 = time.perf_counter()
    try:
        measurements = check.fn(ns, ctx) or {}
        status, score, msg = "passed", check.points, ""
    except NotImplementedError:
        measurements, status, score = {}, "failed", 0.0
        msg = "not implemented yet: replace `raise NotImplementedError()` with your code"
    except AssertionError as err:
        measurements, status, score, msg = {}, "failed", 0.0, str(err) or "assertion failed"
    except torch.OutOfMemoryError as err:
        measurements, status, score, msg = {}, "oom", 0.0, f"out of memory: {str(err).splitlines()[0]}"
    except Exception as err:  # a bug in the student's code: say where
        tb = traceback.extract_tb(err.__traceback__)
        where = next((f"line {f.lineno} of {f.name}()" for f in reversed(tb) if f.filename.startswith("<")), "")
        measurements, status, score = {}, "error", 0.0
        msg = f"{type(err).__name__}: {err}" + (f" (at {where})" if where else "")
    return CheckResult(check.name, status, score, check.points, msg, measurements, time.perf_counter() - t0)


def run_checks(registry: Registry, ns: Mapping[str, Any], ctx: CheckContext | None = None,
               only: Iterable[str] | None = None) -> list[CheckResult]:
    if ctx is None:
        ctx = CheckContext.here()
    wanted = set(only) if only else None
    return [run_check(c, ns, ctx) for c in registry if wanted is None or c.name in wanted]


def format_results(results: list[CheckResult]) -> str:
    width = max([len(r.name) for r in results] + [5])
    lines = []
    for r in results:
        mark = {"passed": "PASS"}.get(r.status, r.status.upper())
        lines.append(f"{mark:<8}{r.name:<{width}}  {r.score:g}/{r.max_score:g}" + (f"  {r.message}" if r.message else ""))
    total, maxi = sum(r.score for r in results), sum(r.max_score for r in results)
    lines.append(f"{'':8}{'total':<{width}}  {total:g}/{maxi:g}")
    return "\n".join(lines)
