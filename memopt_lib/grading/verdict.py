"""One child's session with the grader, and the verdict on it: the protocol and the judging, both in the grader.

:func:`run_session` starts a sandboxed child (:class:`~.child.Child`), waits for it to be ready,
then for each check that can run on this machine opens a memory window (:mod:`.meter`), sends
"run X with seed S", and records the first reply and the memory measured; anything out of order
is ``tampering``. :func:`judge_session` turns that record and the batch's reference run into
statuses and scores, running every judge here, in the grader's process.
"""
from __future__ import annotations

import secrets
import signal
from dataclasses import asdict, dataclass, field

from ..checks.base import STATUSES, Check, CheckContext, CheckResult, Evidence, MemoryReading, Registry, decide
from .child import Child
from .meter import Meter
from .sandbox import Limits

CheckOutcome = CheckResult  # the grader's record of a check: the same plain data a notebook's run produces


def not_runnable(check: Check, ctx: CheckContext) -> str | None:
    """Why the grader will not run ``check`` on this machine (None: it runs)."""
    if not check.trusted:
        return ("legacy check (its verdict would come from inside the student's process): "
                "not run and not counted by the grader")
    if check.gpu_only and not ctx.is_gpu:
        return "needs a CUDA GPU; this grader has none: not run and not counted in max_score_here"
    return None


def max_score_here(registry: Registry, ctx: CheckContext) -> float:
    return sum(c.points for c in registry.checks if not_runnable(c, ctx) is None)


@dataclass
class Runtime:
    """The batch's shared settings for starting children."""

    lab: object  # grade.Lab
    seeds: dict[str, int]
    ctx: CheckContext
    limits: Limits
    hide: list[str]
    keep: list[str]
    threads: int = 1
    cache: str | None = None


@dataclass
class Session:
    """What the grader saw of one child: its replies per check (with the memory it measured) and its end."""

    replies: dict[str, tuple[dict, MemoryReading | None]] = field(default_factory=dict)
    cell_errors: list[tuple[str, str]] = field(default_factory=list)
    setup_error: str = ""
    tampering: list[str] = field(default_factory=list)
    ready: bool = False
    stopped_at: str | None = None  # the check running when the child went silent
    outcome: object = None


def run_session(rt: Runtime, mode: str, cells: list[dict], uid: int | None, timeout_s: float | None = None) -> Session:
    """Start one child, run every check that can run here through it, and record what came back."""
    limits = rt.limits if timeout_s is None else Limits(**{**asdict(rt.limits), "timeout_s": timeout_s})
    job = {"token": secrets.token_hex(32), "checks_module": rt.lab.checks_module, "mode": mode, "cells": cells}
    meter = Meter.create(gpu=rt.ctx.is_gpu)
    child = Child(job, uid=uid, limits=limits, hide=rt.hide, keep=rt.keep + rt.lab.extra_allowed,
                  threads=rt.threads, cache=rt.cache, meter=meter)
    s = Session()
    try:
        while True:
            msg = child.next()
            if msg is None:
                break
            ev = msg.get("event")
            if ev == "cell":
                if msg.get("status") != "ok":
                    s.cell_errors.append((str(msg.get("status")), f"cell {msg.get('id')}: {str(msg.get('message'))[:1000]}"))
            elif ev == "setup_error":
                s.setup_error = str(msg.get("message"))[:1000]
                break
            elif ev == "tampering":
                s.tampering += [str(p)[:300] for p in (msg.get("problems") or ["unspecified"])][:20]
                break
            elif ev == "ready":
                s.ready = True
                break
            else:
                s.tampering.append(f"unexpected message {str(ev)[:40]!r} before the checks")
                break
        if s.ready:
            for check in rt.lab.registry.checks:
                if not_runnable(check, rt.ctx):
                    continue
                if check.measures_memory:
                    meter.open()
                child.send(run=check.name, seed=rt.seeds[check.name])
                msg = child.next()
                reading = meter.close() if check.measures_memory else None
                if msg is None:
                    s.stopped_at = check.name
                    break
                if msg.get("event") in ("evidence", "raised", "missing") and msg.get("check") == check.name:
                    s.replies[check.name] = (msg, reading)
                elif msg.get("event") == "tampering":
                    s.tampering += [str(p)[:300] for p in (msg.get("problems") or ["unspecified"])][:20]
                    break
                else:
                    s.tampering.append(f"unexpected message {str(msg.get('event'))[:40]!r} while {check.name} ran")
                    break
    finally:
        s.outcome = child.finish()
    extra = [m for m in s.outcome.messages if m.get("event") != "done"]
    if s.ready and extra and not s.tampering and s.stopped_at is None:
        s.tampering.append(f"unexpected message {str(extra[0].get('event'))[:40]!r} after the checks")
    return s


def _death(outcome, timeout_s: float) -> tuple[str, str]:
    sig = outcome.signal
    if outcome.timed_out or sig == signal.SIGXCPU:
        return "timeout", f"time limit reached ({timeout_s:g} s wall clock or the CPU-time limit)"
    if sig == signal.SIGKILL:
        return "oom", "the process was killed (SIGKILL), most likely for using too much memory"
    if sig == signal.SIGXFSZ:
        return "crashed", "a file grew past the file-size limit"
    if sig is not None:
        return "crashed", f"the process died of signal {signal.Signals(sig).name}"
    return "crashed", f"the process exited (code {outcome.returncode}) before reporting"


def _with_reference_baseline(reading: MemoryReading | None, ref: MemoryReading | None) -> MemoryReading | None:
    """The student's window measured against the reference run's level at the start of the same check."""
    if reading is None or ref is None:
        return reading
    detail = dict(reading.breakdown_bytes, own_baseline_bytes=reading.baseline_bytes)
    return MemoryReading(reading.peak_bytes, ref.baseline_bytes, reading.source, detail)


def judge_session(rt: Runtime, s: Session, ref: Session, timeout_s: float) -> tuple[list[CheckOutcome], str, str]:
    """Statuses and scores of every check of the lab from one session and the batch's reference."""
    checks = rt.lab.registry.checks
    if s.tampering:
        why = "tampering: " + "; ".join(dict.fromkeys(s.tampering))
        return [CheckOutcome(c.name, "failed", 0.0, c.points, why) for c in checks], "tampering", why
    if s.setup_error:
        return ([CheckOutcome(c.name, "not_run", 0.0, c.points, "grader setup failed") for c in checks],
                "ungradable", f"grader setup failed: {s.setup_error}")
    death_status, death_msg = _death(s.outcome, timeout_s)
    out, stopped = [], False
    for c in checks:
        why = not_runnable(c, rt.ctx)
        if why:
            out.append(CheckOutcome(c.name, "not_run", 0.0, c.points, why))
            continue
        reply = s.replies.get(c.name)
        if reply is None:
            if not s.ready:  # died (or was killed) before any check: every check shares that end
                out.append(CheckOutcome(c.name, death_status, 0.0, c.points, death_msg))
                continue
            if not stopped and s.stopped_at == c.name:
                r = CheckOutcome(c.name, death_status, 0.0, c.points, death_msg)
                stopped = True
            else:
                r = CheckOutcome(c.name, "not_run", 0.0, c.points, f"not run: the submission stopped ({death_msg})")
            out.append(r)
            continue
        msg, reading = reply
        ev = msg["event"]
        if ev == "missing":
            if s.cell_errors:
                st, text = s.cell_errors[0]
                r = CheckOutcome(c.name, st if st in STATUSES and st != "passed" else "error", 0.0, c.points, text)
            else:
                names = ", ".join(str(n) for n in (msg.get("names") or []))[:200]
                r = CheckOutcome(c.name, "not_run", 0.0, c.points, f"define {names} (in the lab's graded cells) first")
        elif ev == "raised":
            st = msg.get("status") if msg.get("status") in ("failed", "error", "oom") else "error"
            r = CheckOutcome(c.name, st, 0.0, c.points, str(msg.get("message", ""))[:2000])
        else:
            r = _judge(rt, c, msg, reading, ref.replies[c.name])
        r.score = c.points if r.status == "passed" else 0.0
        out.append(r)
    return out, "graded", ""


def _judge(rt: Runtime, c: Check, msg: dict, reading, ref_reply) -> CheckOutcome:
    ref_msg, ref_reading = ref_reply
    data = msg.get("data") if isinstance(msg.get("data"), dict) else {}
    got = Evidence(data, _with_reference_baseline(reading, ref_reading), float(msg.get("duration_s") or 0.0))
    ref = Evidence(ref_msg["data"], ref_reading, float(ref_msg.get("duration_s") or 0.0))
    ctx = CheckContext(rt.ctx.device, rt.ctx.profile, rt.seeds[c.name])
    try:
        r = decide(c, got, ref, ctx)
    except Exception as err:  # noqa: BLE001 - data of the wrong shape sent by the child
        r = CheckOutcome(c.name, "failed", 0.0, c.points,
                         f"the evidence your code produced could not be compared ({type(err).__name__}: {err})"[:500])
    if got.memory is not None:
        r.measurements["measured_by"] = got.memory.source
        r.measurements["reference_baseline_bytes"] = got.memory.baseline_bytes
        r.measurements["meter"] = got.memory.breakdown_bytes
        r.measurements.pop("breakdown_bytes", None)  # the meter's details are not a breakdown by category
        r.measurements.pop("reference_breakdown_bytes", None)
    tracker = msg.get("tracker") if isinstance(msg.get("tracker"), dict) else None
    if tracker:  # the in-process tracker's view: explanation in feedback, never the deciding number
        r.measurements["tracker_peak_bytes"] = tracker.get("peak_bytes")
        r.measurements["tracker_breakdown_bytes"] = tracker.get("breakdown_bytes")
        r.measurements["breakdown_bytes"] = tracker.get("breakdown_bytes")  # weights, gradients, ... at the peak
    ref_tracker = ref_msg.get("tracker") if isinstance(ref_msg.get("tracker"), dict) else None
    if ref_tracker:
        r.measurements["reference_breakdown_bytes"] = ref_tracker.get("breakdown_bytes")
    return r


