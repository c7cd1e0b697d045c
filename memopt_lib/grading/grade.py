"""Grade a batch: one reference run, a canary, then every submission; every verdict decided here.

The protocol, for one batch of one lab:

1. **Seeds.** The grader draws one seed per check, fresh for this batch. A child learns a
   check's seed only in the command that starts that check.
2. **Reference run.** A sandboxed child in ``reference`` mode builds the lab's reference
   namespace (``Registry.reference``: the library's implementations, never student code) and
   runs every check's *collect* on those seeds; the grader keeps the evidence and, for memory
   checks, the memory it measured from outside (:mod:`.meter`).
3. **Canary.** The instructor's solution and the unsolved lab are graded exactly like students
   (same sandbox, same seeds). The solution must get full marks of what can run here and the
   unsolved lab 0, or the batch stops with :class:`BatchError` before any student is graded.
4. **Students**, ``workers`` at a time. For each check that can run on this machine the grader
   opens a memory window, sends "run check X with seed S", and closes the window when the
   evidence arrives. The *judge* then runs here, in the grader, on the student's evidence and
   the reference's: answers compared with the reference's on the same inputs, memory compared
   with the reference's window in this batch, with the reference run's level at the window's
   start as the baseline of both (the student's process cannot inflate it).

A check that cannot run here -- GPU-only on a CPU grader, or a *legacy* check whose verdict
would have to come from inside the student's process -- is ``not_run`` by the grader's own
decision, and ``max_score_here`` leaves it out. Every other number in a :class:`Grade` is
computed here; nothing the child says is a score. One child's session and its judging are in
:mod:`.verdict`.
"""
from __future__ import annotations

import importlib
import os
import re
import secrets
import shutil
import tempfile
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from queue import Queue

from ..checks.base import Check, CheckContext, Registry
from .rebuild import Ungradable, find_notebook, rebuild
from .sandbox import Limits, UidPool, kit_package_dir
from .verdict import CheckOutcome, Runtime, Session, judge_session, max_score_here, not_runnable, run_session

STUDENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,99}$")
REPO_ROOT = Path(__file__).resolve().parents[2]
CANARY_TIMEOUT_S = 600.0  # the instructor's code gets at least this long, whatever --timeout says


class BatchError(RuntimeError):
    """The batch cannot be graded fairly (reference run or canary failed); the message says why."""


@dataclass
class Lab:
    """The instructor's side of one lab: solution notebook and check module."""

    lab: str
    solution: Path
    checks_module: str
    registry: Registry
    module_file: str | None = None

    @classmethod
    def load(cls, lab: str, solutions: Path | None = None, checks_module: str | None = None) -> "Lab":
        lab = f"{int(lab):02d}"
        solutions = Path(solutions or REPO_ROOT / "solutions")
        found = sorted(solutions.glob(f"{lab}_*.ipynb"))
        if len(found) != 1:
            hint = "" if solutions.is_dir() else (" (a pip-installed kit ships no solutions: pass --solutions with the "
                                                  "folder of the instructor's notebooks)")
            raise SystemExit(f"expected one {lab}_*.ipynb in {solutions}, found {[p.name for p in found]}{hint}")
        if checks_module is None:
            from ..checks import lab_topics
            topics = lab_topics()
            if lab not in topics:
                raise SystemExit(f"no check module for lab {lab} in memopt_lib/checks")
            checks_module = f"memopt_lib.checks.lab{lab}_{topics[lab]}"
        module = importlib.import_module(checks_module)
        return cls(lab, found[0], checks_module, module.CHECKS, getattr(module, "__file__", None))

    @property
    def secret_paths(self) -> list[str]:
        """Folders the student's code must not see (also covered if they lie inside an allowed folder)."""
        return [str(self.solution.parent.resolve()), str((REPO_ROOT / "solutions").resolve())]

    @property
    def extra_allowed(self) -> list[str]:
        """A check module outside the kit's package (``--checks-module``): the child must import it."""
        if not self.module_file:
            return []
        path = str(Path(self.module_file).resolve())
        return [] if path.startswith(kit_package_dir() + os.sep) else [path]


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
    max_score_here: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _grade(rt: Runtime, sid: str, cells: list[dict], uid, notes=(), flags=(), notebook="",
           timeout_s: float | None = None, ref: Session | None = None) -> Grade:
    timeout = timeout_s or rt.limits.timeout_s
    s = run_session(rt, "student", cells, uid, timeout)
    checks, status, reason = judge_session(rt, s, ref, timeout)
    peaks = [c.measurements.get("peak_bytes") for c in checks if c.measurements.get("measured_by")]
    peaks = [int(p) for p in peaks if isinstance(p, (int, float)) and not isinstance(p, bool)]
    o = s.outcome
    return Grade(student_id=sid, lab=rt.lab.lab, status=status, score=sum(c.score for c in checks),
                 max_score=rt.lab.registry.max_score, max_score_here=max_score_here(rt.lab.registry, rt.ctx),
                 reason=reason, notebook=notebook, checks=checks, notes=list(notes), flags=list(flags),
                 peak_allocated_bytes=max(peaks) if peaks else None, max_rss_bytes=o.max_rss_bytes, wall_s=o.wall_s,
                 output_tail=o.output_tail[-8000:])


def grade_one(rt: Runtime, student_dir: Path, uid, ref: Session) -> Grade:
    sid = student_dir.name
    try:
        nb_path = find_notebook(student_dir, rt.lab.lab, rt.lab.solution.name)
        built = rebuild(rt.lab.solution, nb_path)
    except Ungradable as err:
        return Grade(student_id=sid, lab=rt.lab.lab, status="ungradable", score=0.0,
                     max_score=rt.lab.registry.max_score, max_score_here=max_score_here(rt.lab.registry, rt.ctx),
                     reason=str(err))
    return _grade(rt, sid, built.cells, uid, built.notes, built.flags, built.notebook, ref=ref)


def reference_run(rt: Runtime, uid) -> Session:
    """The batch's reference evidence; :class:`BatchError` if the reference namespace fails a check."""
    s = run_session(rt, "reference", [], uid, max(rt.limits.timeout_s, CANARY_TIMEOUT_S))
    problems = []
    if s.setup_error:
        problems.append(f"setup failed: {s.setup_error}")
    for c in rt.lab.registry.checks:
        if not_runnable(c, rt.ctx) or s.setup_error:
            continue
        msg = s.replies.get(c.name, ({}, None))[0]
        if msg.get("event") != "evidence":
            problems.append(f"{c.name}: {msg.get('event', 'no reply')} {str(msg.get('message') or msg.get('names') or '')[:300]}")
    if problems or s.tampering:
        tail = s.outcome.output_tail[-1500:] if s.outcome else ""
        raise BatchError(f"lab {rt.lab.lab}: the reference run did not collect evidence for every check "
                         f"({'; '.join(problems + s.tampering)}); output:\n{tail}")
    return s


def canary(rt: Runtime, ref: Session, uids: Queue) -> list[Grade]:
    """Grade the instructor's solution and the unsolved lab like students; :class:`BatchError` unless 'full / 0'."""
    from ..labgen import make_lab, read
    sol = rt.lab.solution
    tmp = Path(tempfile.mkdtemp(prefix="memopt-canary-"))
    try:
        import nbformat
        unsolved = tmp / sol.name
        nbformat.write(make_lab(read(sol), sol.name), str(unsolved))
        jobs = [("canary-solution", rebuild(sol, sol).cells), ("canary-unsolved", rebuild(sol, unsolved).cells)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    timeout = max(rt.limits.timeout_s, CANARY_TIMEOUT_S)

    def one(job):
        uid = uids.get()
        try:
            return _grade(rt, job[0], job[1], uid, timeout_s=timeout, ref=ref)
        finally:
            uids.put(uid)
    with ThreadPoolExecutor(max_workers=2) as pool:
        good, bad = list(pool.map(one, jobs))
    want = max_score_here(rt.lab.registry, rt.ctx)
    why = []
    if good.status != "graded" or good.score != want:
        failing = [f"{c.name}: {c.status} ({c.message[:300]})" for c in good.checks
                   if c.status != "passed" and not not_runnable(_check(rt, c.name), rt.ctx)]
        why.append(f"the instructor's solution scored {good.score:g}/{want:g} "
                   f"({good.status}{': ' + good.reason if good.reason else ''}; {'; '.join(failing)})")
    if bad.score > 0 or bad.status != "graded":
        passing = [c.name for c in bad.checks if c.status == "passed"]
        why.append(f"the unsolved lab scored {bad.score:g} (passed: {', '.join(passing) or '-'}; status {bad.status}"
                   f"{': ' + bad.reason if bad.reason else ''})")
    if why:
        raise BatchError(f"lab {rt.lab.lab}: canary failed, no student graded: " + " and ".join(why)
                         + f"\nsolution output:\n{good.output_tail[-1500:]}")
    return [good, bad]


def _check(rt: Runtime, name: str) -> Check:
    return next(c for c in rt.lab.registry.checks if c.name == name)


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
                progress: bool = True, on_grade=None, canaries: list | None = None) -> list[Grade]:
    """Reference run, canary, then every ``submissions/<student_id>/``; one student's failure never stops it.

    Raises :class:`BatchError` (before any student is graded) when the reference run or the canary fails.
    ``canaries``, if given, receives the two canary grades.
    """
    from tqdm import tqdm

    from ..models import cache_dir
    from .sandbox import readable_cache
    limits = limits or Limits()
    dirs, _ = student_dirs(submissions)
    hide = sorted(set(lab.secret_paths + [str(Path(submissions).resolve()), str(Path(out).resolve())]))
    cache = readable_cache(str(cache_dir()))
    keep = [cache] if cache else []
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    seeds = {c.name: secrets.randbelow(2**31) for c in lab.registry.checks}
    rt = Runtime(lab, seeds, CheckContext.here(), limits, hide, keep, threads, cache)
    slots: Queue = Queue()
    grades = []
    try:
        with UidPool(max(workers, 2)) as pool_uids:
            for uid in pool_uids.uids:
                slots.put(uid)
            uid = slots.get()
            try:
                ref = reference_run(rt, uid)
            finally:
                slots.put(uid)
            got = canary(rt, ref, slots)
            if canaries is not None:
                canaries.extend(got)

            def task(d: Path) -> Grade:
                uid = slots.get()
                try:
                    return grade_one(rt, d, uid, ref)
                except Exception as err:  # noqa: BLE001 - a grader bug on one submission must not stop the batch
                    return Grade(student_id=d.name, lab=lab.lab, status="ungradable", score=0.0,
                                 max_score=lab.registry.max_score, max_score_here=max_score_here(lab.registry, rt.ctx),
                                 reason=f"grader error: {type(err).__name__}: {err}",
                                 output_tail=traceback.format_exc()[-4000:])
                finally:
                    slots.put(uid)

            with ThreadPoolExecutor(max_workers=workers) as pool:
                from concurrent.futures import as_completed
                futures = [pool.submit(task, d) for d in dirs]
                for fut in tqdm(as_completed(futures), total=len(futures), desc=f"lab {lab.lab}",
                                unit="submission", disable=not progress):
                    g = fut.result()
                    grades.append(g)
                    if on_grade:
                        on_grade(g)
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    return sorted(grades, key=lambda g: g.student_id)
