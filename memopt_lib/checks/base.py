"""The lab-check machinery: evidence collected where the student's code runs, a verdict decided elsewhere.

A check has two halves.

* **collect** ``(ns, ctx) -> dict`` runs in the process that holds the student's code (the notebook's
  kernel, or the grader's sandboxed child). It calls the student's functions on inputs drawn from
  ``ctx`` (seeded per run) and returns *plain data* -- numbers, strings, lists, dicts: a loss, a
  count, a :func:`fingerprint` of gradients. It decides nothing.
* **judge** ``(got, ref, ctx) -> dict | None`` runs where no student code ever ran (the grader's own
  process). ``got`` and ``ref`` are :class:`Evidence`: the data the collect returned on the student's
  namespace and on the reference namespace (the same inputs: both collects see a fresh context with
  the same seed), plus the memory each collect used, measured *around* the call by whoever ran it
  (in the notebook: the in-process tracker; in the grader: the grader, from outside the child). The
  judge passes by returning (optionally measurements to show), fails by raising ``AssertionError``
  with a message that names the likely mistake and uses numbers of this run's inputs only.

::

    CHECKS = Registry(lab="04", reference=lambda: {"count_target_tokens": accumulation.count_target_tokens})

    @CHECKS.check(points=1, needs=["count_target_tokens"])
    def target_tokens(ns, ctx):
        return {"counts": [int(ns["count_target_tokens"](labels)) for labels in draw_labels(ctx)]}

    @target_tokens.judge
    def _(got, ref, ctx):
        assert got.data["counts"] == ref.data["counts"], "..."

``measures_memory=True`` asks whoever runs the collect to measure memory around the whole call
(the collect is the measurement window, so it should hold only what the memory verdict is about;
student and reference run the same collect, so what the collect itself builds cancels out in the
comparison). The in-process tracker's breakdown is explanation shown in feedback; in the grader the
deciding number comes from outside the student's process.

Legacy checks (one function that asserts in-process, no judge) still run in notebooks during the
move to this design; ``Check.trusted`` is False for them and the grader does not count them.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import random
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

STATUSES = ("passed", "failed", "error", "timeout", "oom", "crashed", "not_run")


@dataclass
class MemoryReading:
    """Memory used while one collect ran. ``source`` says who measured it and how.

    * ``tracker``: in-process, live tensor storage bytes (:class:`~memopt_lib.profiler.MemoryTracker`);
      on CUDA, ``torch.cuda.max_memory_allocated``. Explanatory in the grader, deciding in a notebook.
    * ``rss`` / ``cgroup`` / ``cuda-driver``: measured by the grader from outside the child.
    """

    peak_bytes: int
    baseline_bytes: int
    source: str
    breakdown_bytes: dict = field(default_factory=dict)

    @property
    def delta_bytes(self) -> int:
        return max(0, int(self.peak_bytes) - int(self.baseline_bytes))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "MemoryReading | None":
        if not d:
            return None
        return cls(int(d["peak_bytes"]), int(d["baseline_bytes"]), str(d["source"]),
                   dict(d.get("breakdown_bytes") or {}))


@dataclass
class Evidence:
    """What a collect handed back (``data``) and the memory measured around it (``memory``)."""

    data: dict
    memory: MemoryReading | None = None
    duration_s: float = 0.0


@dataclass
class Check:
    name: str
    lab: str
    points: float
    needs: tuple[str, ...]
    collect_fn: Callable[[Mapping[str, Any], "CheckContext"], dict | None]
    judge_fn: Callable[[Evidence, Evidence, "CheckContext"], dict | None] | None = None
    gpu_only: bool = False
    measures_memory: bool = False

    def judge(self, fn: Callable[[Evidence, Evidence, "CheckContext"], dict | None]) -> "Check":
        """Decorator: attach the judge half (runs where no student code ran)."""
        self.judge_fn = fn
        return self

    @property
    def trusted(self) -> bool:
        """A check whose verdict can be decided outside the student's process."""
        return self.judge_fn is not None

    @property
    def fn(self):  # legacy name
        return self.collect_fn

    @property
    def description(self) -> str:
        return (self.collect_fn.__doc__ or self.name).strip().splitlines()[0]


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
    """What a check may use: the device, the hardware profile and a seeded RNG for its inputs.

    :meth:`fork` gives a fresh context with the same seed: the student's and the reference collect
    each get one, so both draw the same inputs.
    """

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

    def fork(self) -> "CheckContext":
        return CheckContext(self.device, self.profile, self.seed)

    def torch_generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded from this run's seed (and ``salt``), for tensors of inputs."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + salt) % (2**63))

    @property
    def is_gpu(self) -> bool:
        return self.device.type == "cuda"


class Registry:
    """The ordered list of a lab's checks, and the lab's reference namespace.

    ``reference``: a zero-argument callable returning ``{graded name: reference implementation}``
    (the library's own implementation of each graded function). The judge compares the student's
    evidence with the reference's, collected on the same inputs.
    """

    def __init__(self, lab: str, reference: Callable[[], Mapping[str, Any]] | None = None):
        self.lab = lab
        self.checks: list[Check] = []
        self.reference = reference

    def check(self, points: float = 1, needs: Iterable[str] = (), gpu_only: bool = False,
              measures_memory: bool = False):
        def deco(fn) -> Check:
            chk = Check(fn.__name__, self.lab, float(points), tuple(needs), fn, None, gpu_only, measures_memory)
            self.checks.append(chk)
            return chk
        return deco

    def reference_namespace(self) -> dict:
        if self.reference is None:
            raise RuntimeError(f"lab {self.lab}'s check module declares no reference namespace")
        return dict(self.reference())

    @property
    def max_score(self) -> float:
        return sum(c.points for c in self.checks)

    @property
    def needs(self) -> list[str]:
        return sorted({n for c in self.checks for n in c.needs})

    def __iter__(self):
        return iter(self.checks)


# ---------------------------------------------------------------- evidence helpers

def plain(obj, depth: int = 0):
    """``obj`` as plain JSON data (what a collect may hand back); raises ``TypeError`` otherwise."""
    if depth > 6:
        raise TypeError("collected data nests too deeply")
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else repr(obj)
    if isinstance(obj, (list, tuple)):
        return [plain(x, depth + 1) for x in obj]
    if isinstance(obj, dict):
        return {str(k): plain(v, depth + 1) for k, v in obj.items()}
    if torch.is_tensor(obj) and obj.numel() == 1:
        return plain(obj.item(), depth)
    raise TypeError(f"collected data must be plain JSON values, got {type(obj).__name__}")


def fingerprint(tensors: Mapping[str, torch.Tensor], seed: int, k: int = 3) -> dict[str, list[float]]:
    """Each tensor as ``k`` projections onto random +-1 vectors and its norm, in float64.

    Small enough to send as JSON, impossible to produce without the tensor itself: the projection
    vectors depend on ``seed``, which the student's code never chooses. :func:`fingerprint_error`
    compares two fingerprints. ``None`` entries (no gradient) are kept as ``None``.
    """
    out: dict[str, list[float] | None] = {}
    for name, t in tensors.items():
        if t is None:
            out[name] = None
            continue
        flat = t.detach().to("cpu", torch.float64).reshape(-1)
        salt = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
        g = torch.Generator().manual_seed((seed * 7919 + salt) % (2**63))
        signs = torch.randint(0, 2, (k, flat.numel()), generator=g, dtype=torch.int8).to(torch.float64) * 2 - 1
        out[name] = [float(v) for v in (signs @ flat).tolist()] + [float(flat.norm())]
    return out


def fingerprint_error(got: Mapping[str, Any], ref: Mapping[str, Any]) -> float:
    """Largest relative difference between two fingerprints (``inf`` if names or ``None``-ness differ)."""
    if set(got) != set(ref):
        return math.inf
    worst = 0.0
    for name, r in ref.items():
        g = got[name]
        if (g is None) != (r is None):
            return math.inf
        if r is None:
            continue
        if len(g) != len(r):
            return math.inf
        scale = max(abs(r[-1]), 1e-30)  # the norm: projections are at most sqrt(n) x norm
        worst = max(worst, max(abs(a - b) for a, b in zip(g, r)) / scale)
    return worst


# ---------------------------------------------------------------- running checks in one process

@contextlib.contextmanager
def _tracked(device: torch.device) -> Iterator[dict]:
    """Measure live tensor bytes (or the CUDA allocator's peak) around a block, in this process."""
    from ..profiler import MemoryTracker
    from ..profiler.cuda import read_stats, settle
    out: dict = {}
    settle(device)
    start = read_stats(device) if device.type == "cuda" else None
    with MemoryTracker(device, timeline=False) as tracker:
        yield out
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tr = tracker.result()
    if start is not None:
        end = read_stats(device)
        out["reading"] = MemoryReading(end.max_allocated_bytes, start.allocated_bytes, "tracker",
                                       dict(tr.peak_breakdown_bytes))
    else:
        out["reading"] = MemoryReading(tr.peak_bytes, tr.start_bytes, "tracker", dict(tr.peak_breakdown_bytes))


def collect_evidence(check: Check, ns: Mapping[str, Any], ctx: CheckContext) -> Evidence:
    """Run ``check``'s collect on ``ns`` in this process (memory by the in-process tracker)."""
    t0 = time.perf_counter()
    if check.measures_memory:
        with _tracked(ctx.device) as box:
            data = check.collect_fn(ns, ctx)
        memory = box["reading"]
    else:
        data, memory = check.collect_fn(ns, ctx), None
    return Evidence(plain(data or {}), memory, time.perf_counter() - t0)


def classify_exception(err: BaseException) -> tuple[str, str]:
    """Status and message for an exception raised while a collect ran the student's code."""
    if isinstance(err, NotImplementedError):
        return "failed", "not implemented yet: replace `raise NotImplementedError()` with your code"
    if isinstance(err, AssertionError):
        return "failed", str(err) or "assertion failed"
    if isinstance(err, torch.OutOfMemoryError):
        return "oom", f"out of memory: {str(err).splitlines()[0]}"
    tb = traceback.extract_tb(err.__traceback__)
    where = next((f"line {f.lineno} of {f.name}()" for f in reversed(tb) if f.filename.startswith("<")), "")
    return "error", f"{type(err).__name__}: {err}" + (f" (at {where})" if where else "")


def decide(check: Check, got: Evidence, ref: Evidence, ctx: CheckContext) -> CheckResult:
    """The judge half: status and score from two pieces of evidence. Never runs student code."""
    t0 = time.perf_counter()
    try:
        shown = check.judge_fn(got, ref, ctx.fork()) or {}
        status, score, msg = "passed", check.points, ""
    except AssertionError as err:
        shown, status, score, msg = {}, "failed", 0.0, str(err) or "assertion failed"
    shown = dict(shown)
    if got.memory is not None:
        shown.setdefault("peak_bytes", got.memory.peak_bytes)
        shown.setdefault("memory_source", got.memory.source)
        if got.memory.breakdown_bytes:  # explanation for the feedback page (weights, gradients, ...)
            shown.setdefault("breakdown_bytes", dict(got.memory.breakdown_bytes))
    if ref.memory is not None:
        shown.setdefault("reference_peak_bytes", ref.memory.peak_bytes)
        if ref.memory.breakdown_bytes:
            shown.setdefault("reference_breakdown_bytes", dict(ref.memory.breakdown_bytes))
    return CheckResult(check.name, status, score, check.points, msg, shown,
                       got.duration_s + (time.perf_counter() - t0))


def precheck(check: Check, ns: Mapping[str, Any], ctx: CheckContext) -> CheckResult | None:
    """``not_run`` when the check cannot run here (missing names, GPU-only on a CPU), else ``None``."""
    missing = [n for n in check.needs if n not in ns]
    if missing:
        return CheckResult(check.name, "not_run", 0.0, check.points,
                           f"define {', '.join(missing)} (in the lab's graded cells) first")
    if check.gpu_only and not ctx.is_gpu:
        return CheckResult(check.name, "not_run", 0.0, check.points, "needs a CUDA GPU; skipped on this machine")
    return None


def _run_legacy(check: Check, ns: Mapping[str, Any], ctx: CheckContext) -> CheckResult:
    t0 = time.perf_counter()
    try:
        measurements = check.collect_fn(ns, ctx) or {}
        status, score, msg = "passed", check.points, ""
    except BaseException as err:  # noqa: BLE001
        if not isinstance(err, Exception):
            raise
        (status, msg), measurements, score = classify_exception(err), {}, 0.0
    return CheckResult(check.name, status, score, check.points, msg, measurements, time.perf_counter() - t0)


def run_check(check: Check, ns: Mapping[str, Any], ctx: CheckContext,
              reference_ns: Mapping[str, Any] | None = None) -> CheckResult:
    """Run one check entirely in this process: collect on ``ns`` and on the reference, then judge.

    This is the notebook's (and the test suite's) path; the grader runs the two halves in different
    processes (:mod:`memopt_lib.grading`).
    """
    skipped = precheck(check, ns, ctx)
    if skipped is not None:
        return skipped
    if not check.trusted:
        return _run_legacy(check, ns, ctx)
    try:
        got = collect_evidence(check, ns, ctx.fork())
    except Exception as err:  # the student's code raised: say where
        status, msg = classify_exception(err)
        return CheckResult(check.name, status, 0.0, check.points, msg)
    if reference_ns is None:
        raise RuntimeError(f"check {check.name} needs the lab's reference namespace")
    ref = collect_evidence(check, reference_ns, ctx.fork())
    return decide(check, got, ref, ctx)


def run_checks(registry: Registry, ns: Mapping[str, Any], ctx: CheckContext | None = None,
               only: Iterable[str] | None = None) -> list[CheckResult]:
    if ctx is None:
        ctx = CheckContext.here()
    wanted = set(only) if only else None
    chosen = [c for c in registry if wanted is None or c.name in wanted]
    reference_ns = registry.reference_namespace() if any(c.trusted for c in chosen) else None
    return [run_check(c, ns, ctx, reference_ns) for c in chosen]


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


def format_results(results: list[CheckResult]) -> str:
    width = max([len(r.name) for r in results] + [5])
    lines = []
    for r in results:
        mark = {"passed": "PASS"}.get(r.status, r.status.upper())
        lines.append(f"{mark:<8}{r.name:<{width}}  {r.score:g}/{r.max_score:g}" + (f"  {r.message}" if r.message else ""))
    total, maxi = sum(r.score for r in results), sum(r.max_score for r in results)
    lines.append(f"{'':8}{'total':<{width}}  {total:g}/{maxi:g}")
    return "\n".join(lines)
