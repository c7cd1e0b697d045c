"""Grade submissions: rebuild, run sandboxed, and turn what was observed into statuses and scores.

Everything here runs in the grader's own process and trusts nothing that came out of
the child except token-bearing JSON messages about checks it asked for; it computes
every score itself (a check's points if it passed, else 0), re-verifies answers
against the reference in this process where the check module offers a verifier, and
decides what a silent death means (timeout, oom, crashed) from what it saw itself.
"""
from __future__ import annotations

import importlib
import re
import secrets
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from queue import Queue
from types import ModuleType

from ..checks.base import STATUSES, CheckResult, Registry
from .rebuild import Ungradable, find_notebook, rebuild
from .sandbox import Limits, Outcome, UidPool, run_child

STUDENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,99}$")
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Lab:
    """The instructor's side of one lab: solution notebook, check module, optional reference verifier."""

    lab: str
    solution: Path
    checks_module: str
    registry: Registry
    reference: ModuleType | None = None

    @classmethod
    def load(cls, lab: str, solutions: Path | None = None, checks_module: str | None = None) -> "Lab":
        lab = f"{int(lab):02d}"
        solutions = Path(solutions or REPO_ROOT / "solutions")
        found = sorted(solutions.glob(f"{lab}_*.ipynb"))
        if len(found) != 1:
            raise SystemExit(f"expected one {lab}_*.ipynb in {solutions}, found {[p.name for p in found]}")
        if checks_module is None:
            from ..checks import lab_topics
            topics = lab_topics()
            if lab not in topics:
                raise SystemExit(f"no check module for lab {lab} in memopt_lib/checks")
            checks_module = f"memopt_lib.checks.lab{lab}_{topics[lab]}"
        module = importlib.import_module(checks_module)
        ref_name = getattr(module, "REFERENCE", None)
        reference = importlib.import_module(ref_name) if ref_name else None
        return cls(lab, found[0], checks_module, module.CHECKS, reference)

    @property
    def secret_paths(self) -> list[str]:
        """Files the student's code must not read while it runs."""
        paths = [str(self.solution.parent.resolve()), str((REPO_ROOT / "solutions").resolve())]
        if self.reference is not None and getattr(self.reference, "__file__", None):
            paths.append(str(Path(self.reference.__file__).resolve()))
        return paths


# The grader's record of a check is the same plain data a notebook's check run produces
# (name, status, score, max_score, message, measurements); only the grader fills it, from the child's report.
CheckOutcome = CheckResult


@dataclass
class Grade:
    student_id: str
    lab: str
    status: str  # graded | tampering | ungradable
    score: float
    max_score: float
    reason: str = ""
    notebook: str = ""
    checks: list[CheckOutcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    peak_allocated_bytes: int | None = None
    max_rss_bytes: int | None = None
    wall_s: float = 0.0
    output_tail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def interpret(lab: Lab, outcome: Outcome, seed: int, timeout_s: float) -> tuple[list[CheckOutcome], str, str]:
    """Checks' statuses from the child's messages and its death; ``(checks, status, reason)``."""
    asked = [c for c in lab.registry.checks]
    results: dict[str, CheckOutcome] = {}
    started: list[str] = []
    tampering: list[str] = []
    cell_errors = []
    setup_error = ""
    for msg in outcome.messages:
        ev = msg.get("event")
        if ev == "cell" and msg.get("status") != "ok":
            cell_errors.append((str(msg.get("status")), f"cell {msg.get('id')}: {str(msg.get('message'))[:1000]}"))
        elif ev == "start" and msg.get("check") in {c.name for c in asked}:
            started.append(msg["check"])
        elif ev == "result":
            name = msg.get("check")
            check = next((c for c in asked if c.name == name), None)
            if check is None or name in results or not started or started[-1] != name:
                tampering.append(f"unexpected result message for {name!r}")
                continue
            status = msg.get("status") if msg.get("status") in STATUSES else "error"
            meas = msg.get("measurements") if isinstance(msg.get("measurements"), dict) else {}
            results[name] = CheckOutcome(name, status, 0.0, check.points, str(msg.get("message", ""))[:2000], meas)
        elif ev == "tampering":
            tampering += [str(p)[:300] for p in (msg.get("problems") or ["unspecified"])][:20]
        elif ev == "setup_error":
            setup_error = str(msg.get("message"))[:1000]
    if len(started) != len(set(started)):
        tampering.append("a check was started twice")
    done = any(m.get("event") == "done" for m in outcome.messages)
    if tampering:
        why = "tampering: " + "; ".join(dict.fromkeys(tampering))
        return [CheckOutcome(c.name, "failed", 0.0, c.points, why) for c in asked], "tampering", why
    if setup_error:
        return ([CheckOutcome(c.name, "not_run", 0.0, c.points, "grader setup failed") for c in asked],
                "ungradable", f"grader setup failed: {setup_error}")
    death_status, death_msg = _death(outcome, timeout_s)
    out = []
    for c in asked:
        r = results.get(c.name)
        if r is None:
            if done:
                r = CheckOutcome(c.name, "not_run", 0.0, c.points, "the grader got no result for this check")
            elif started and started[-1] == c.name or not started:
                r = CheckOutcome(c.name, death_status, 0.0, c.points, death_msg)
            else:
                r = CheckOutcome(c.name, "not_run", 0.0, c.points, f"not run: the submission stopped ({death_msg})")
        elif r.status == "not_run" and cell_errors:
            r.status, r.message = cell_errors[0][0] if cell_errors[0][0] in STATUSES else "error", cell_errors[0][1]
        if r.status == "passed":
            r = _reverify(lab, r, seed)
        r.score = r.max_score if r.status == "passed" else 0.0
        out.append(r)
    return out, "graded", ""


def _death(outcome: Outcome, timeout_s: float) -> tuple[str, str]:
    import signal
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


def _reverify(lab: Lab, r: CheckOutcome, seed: int) -> CheckOutcome:
    """Re-check a passed check's answers in the grader's process, if the lab has a verifier for it."""
    fn = getattr(lab.reference, f"verify_{r.name}", None) if lab.reference else None
    if fn is None:
        return r
    try:
        fn(r.measurements, seed)
    except AssertionError as err:
        return CheckOutcome(r.name, "failed", 0.0, r.max_score, f"answer check in the grader: {err}")
    except Exception as err:  # noqa: BLE001 - malformed values sent by the child
        return CheckOutcome(r.name, "failed", 0.0, r.max_score, f"answers could not be verified: {err!r}"[:500])
    return r


def grade_one(lab: Lab, student_dir: Path, *, uid: int | None, limits: Limits, hide: list[str], keep: list[str],
              threads: int = 1, cache: str | None = None) -> Grade:
    sid = student_dir.name
    base = dict(student_id=sid, lab=lab.lab, max_score=lab.registry.max_score)
    try:
        nb_path = find_notebook(student_dir, lab.lab, lab.solution.name)
        built = rebuild(lab.solution, nb_path)
    except Ungradable as err:
        return Grade(status="ungradable", score=0.0, reason=str(err), **base)
    seed = secrets.randbelow(2**31)
    job = {"token": secrets.token_hex(32), "checks_module": lab.checks_module, "seed": seed,
           "checks": [c.name for c in lab.registry.checks], "cells": built.cells}
    outcome = run_child(job, uid=uid, limits=limits, hide=hide, keep=keep, threads=threads, cache=cache)
    checks, status, reason = interpret(lab, outcome, seed, limits.timeout_s)
    peaks = [c.measurements.get("peak_allocated_bytes") for c in checks]
    peaks = [int(p) for p in peaks if isinstance(p, (int, float)) and not isinstance(p, bool)]
    return Grade(status=status, score=sum(c.score for c in checks), reason=reason, notebook=built.notebook,
                 checks=checks, notes=built.notes, flags=built.flags,
                 peak_allocated_bytes=max(peaks) if peaks else None, max_rss_bytes=outcome.max_rss_bytes,
                 wall_s=outcome.wall_s, output_tail=outcome.output_tail[-8000:], **base)


def student_dirs(submissions: Path) -> tuple[list[Path], list[str]]:
    """Submission folders with a usable student id; ``(dirs, skipped names)``."""
    dirs, skipped = [], []
    for p in sorted(Path(submissions).iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_symlink() or not p.is_dir() or not STUDENT_ID.match(p.name):
            skipped.append(p.name)
            continue
        dirs.append(p)
    return dirs, skipped


def grade_batch(lab: Lab, submissions: Path, out: Path, *, workers: int = 1, limits: Limits | None = None,
                progress: bool = True, on_grade=None) -> list[Grade]:
    """Grade every ``submissions/<student_id>/``; one failure never stops the batch."""
    import os

    from tqdm import tqdm
    limits = limits or Limits()
    dirs, _ = student_dirs(submissions)
    hide = sorted(set(lab.secret_paths + [str(Path(submissions).resolve()), str(Path(out).resolve())]))
    import shutil

    from ..models import cache_dir
    from .sandbox import readable_cache
    cache = readable_cache(str(cache_dir()))
    keep = [cache] if cache else []
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    slots: Queue = Queue()

    def task(d: Path) -> Grade:
        uid = slots.get()
        try:
            return grade_one(lab, d, uid=uid, limits=limits, hide=hide, keep=keep, threads=threads, cache=cache)
        except Exception as err:  # noqa: BLE001 - a grader bug on one submission must not stop the batch
            return Grade(student_id=d.name, lab=lab.lab, status="ungradable", score=0.0,
                         max_score=lab.registry.max_score,
                         reason=f"grader error: {type(err).__name__}: {err}",
                         output_tail=traceback.format_exc()[-4000:])
        finally:
            slots.put(uid)

    grades = []
    try:
        with UidPool(workers) as pool_uids, ThreadPoolExecutor(max_workers=workers) as pool:
            for uid in pool_uids.uids:
                slots.put(uid)
            futures = [pool.submit(task, d) for d in dirs]
            for fut in tqdm(as_completed(futures), total=len(futures), desc=f"lab {lab.lab}", unit="submission",
                            disable=not progress):
                g = fut.result()
                grades.append(g)
                if on_grade:
                    on_grade(g)
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    return sorted(grades, key=lambda g: g.student_id)
