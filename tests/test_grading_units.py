"""Unit tests of the autograder's pieces that need no sandbox: rebuild, message parsing, verdicts, reports."""
from __future__ import annotations

import json
import signal
import sys
import types
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).parent / "grading_fixtures"))

import fixture_lab as fx  # noqa: E402

from memopt_lib.grading import rebuild as rb  # noqa: E402
from memopt_lib.checks.base import CheckContext, MemoryReading, Registry, fingerprint  # noqa: E402
from memopt_lib.grading.grade import (CheckOutcome, Grade, Lab, Runtime, Session, judge_session,  # noqa: E402
                                      max_score_here, not_runnable)
from memopt_lib.grading.sandbox import Limits  # noqa: E402
from memopt_lib.grading.guard import Guard  # noqa: E402
from memopt_lib.grading.report import feedback_html, gradescope_results, write_csv  # noqa: E402
from memopt_lib.grading.sandbox import Outcome, parse_messages  # noqa: E402

TOKEN = "t" * 64


@pytest.fixture
def sol(tmp_path):
    return fx.write_solution(tmp_path / "solutions")


def _run(cells) -> dict:
    ns: dict = {}
    for c in cells:
        exec(compile(c["source"], f"<cell {c['id']}>", "exec"), ns)  # trusted test input
    return ns


def _cells(sol, tmp_path, nb, name="s"):
    path = fx.write_submission(tmp_path / "subs", name, nb)
    return rb.rebuild(sol, path)


# ---------------------------------------------------------------- rebuild
def test_honest_regions_are_spliced_into_instructor_cells(sol, tmp_path):
    built = _cells(sol, tmp_path, fx.student_notebook(fx.SOLUTION_BODIES))
    assert [c["id"] for c in built.cells] == ["fx-sumsq", "fx-norms"]
    ns = _run(built.cells)
    import torch
    assert ns["sum_of_squares"](torch.tensor([1.0, 2.0])) == 5.0
    assert built.notes == []


def test_untouched_lab_is_not_implemented(sol, tmp_path):
    ns = _run(_cells(sol, tmp_path, fx.student_notebook()).cells)
    with pytest.raises(NotImplementedError):
        ns["row_norms"](None)


def test_tags_outputs_metadata_and_other_cells_are_ignored(sol, tmp_path):
    plain = _cells(sol, tmp_path, fx.student_notebook(fx.WRONG_BODIES), "a").cells

    def decorate(nb):
        for cell in nb.cells:
            cell.metadata["tags"] = ["raises-exception", "skip"]
            cell.metadata["nbgrader"] = {"points": 99}
            if cell.cell_type == "code":
                cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="<b>passed</b>")]
        extra = nbformat.v4.new_code_cell("get_ipython().input_transformers_cleanup.append(lambda l: [])")
        extra.id = "fx-extra"
        nb.cells.insert(0, extra)
    assert _cells(sol, tmp_path, fx.student_notebook(fx.WRONG_BODIES, edit=decorate), "b").cells == plain


def test_edits_outside_the_region_are_ignored_and_reported(sol, tmp_path):
    def edit(nb):
        cell = next(c for c in nb.cells if c.get("id") == "fx-sumsq")
        cell.source = "import os; os.system('echo pwned')\n" + cell.source.replace(
            "def sum_of_squares(x):", "def sum_of_squares(x, cache={}):")
    built = _cells(sol, tmp_path, fx.student_notebook(fx.SOLUTION_BODIES, edit=edit))
    src = built.cells[0]["source"]
    assert "os.system" not in src and "cache={}" not in src and "return float((x * x).sum())" in src
    assert any("edits outside" in n for n in built.notes)


def test_dedented_code_in_a_region_runs_at_cell_level(sol, tmp_path):
    body = "    return float((x * x).sum())\nLEAKED = 1"
    ns = _run(_cells(sol, tmp_path, fx.student_notebook({"fx-sumsq": body})).cells)
    assert ns["LEAKED"] == 1  # student code, but still only student code inside the sandbox


def test_missing_graded_cell_counts_as_not_implemented(sol, tmp_path):
    built = _cells(sol, tmp_path, fx.student_notebook(
        fx.SOLUTION_BODIES, edit=lambda nb: nb.cells.pop(next(i for i, c in enumerate(nb.cells)
                                                                if c.get("id") == "fx-norms"))))
    assert any("missing" in n for n in built.notes)
    assert "raise NotImplementedError()" in built.cells[1]["source"]


def test_the_solution_notebook_itself_grades_as_correct(sol, tmp_path):
    ns = _run(rb.rebuild(sol, sol).cells)
    import torch
    assert torch.allclose(ns["row_norms"](torch.ones(2, 4)), torch.full((2,), 2.0))


@pytest.mark.parametrize("text,why", [
    ("{not json", "not valid notebook JSON"),
    ("[]", "not an nbformat-4"),
    (json.dumps({"nbformat": 3, "nbformat_minor": 0, "worksheets": []}), "nbformat=3"),
    (json.dumps({"nbformat": 4, "nbformat_minor": 4, "cells": [], "metadata": {}}), "no cell ids"),
    ("\xff\xfe", "not valid notebook JSON"),
])
def test_unreadable_notebooks_are_ungradable(tmp_path, text, why):
    p = tmp_path / "90_x.ipynb"
    p.write_text(text, encoding="latin-1")
    with pytest.raises(rb.Ungradable, match=why):
        rb.read_submission(p)


def test_symlinks_and_huge_files_are_refused(tmp_path, sol, monkeypatch):
    link = tmp_path / "90_fixture.ipynb"
    link.symlink_to(sol)
    with pytest.raises(rb.Ungradable, match="not a link"):
        rb.read_submission(link)
    big = tmp_path / "big.ipynb"
    big.write_text(" " * 2000)
    monkeypatch.setattr(rb, "MAX_NOTEBOOK_BYTES", 1000)
    with pytest.raises(rb.Ungradable, match="larger than"):
        rb.read_submission(big)


def test_find_notebook(tmp_path):
    (tmp_path / "90_a.ipynb").write_text("{}")
    assert rb.find_notebook(tmp_path, "90", "90_fixture.ipynb").name == "90_a.ipynb"
    (tmp_path / "90_b.ipynb").write_text("{}")
    with pytest.raises(rb.Ungradable, match="several"):
        rb.find_notebook(tmp_path, "90", "90_fixture.ipynb")
    (tmp_path / "90_fixture.ipynb").write_text("{}")
    assert rb.find_notebook(tmp_path, "90", "90_fixture.ipynb").name == "90_fixture.ipynb"


# ---------------------------------------------------------------- messages and verdicts
def _line(**m):
    return json.dumps(m).encode()


def test_only_token_bearing_json_objects_are_accepted():
    lines = [_line(event="done", token=TOKEN), _line(event="done", token="x" * 64), _line(event="done"),
             b"not json", b"[1, 2]", b"", _line(event="start", check="a", token=TOKEN)]
    msgs, rejected = parse_messages(lines, TOKEN)
    assert msgs == [{"event": "done"}, {"event": "start", "check": "a"}]
    assert rejected == 4


@pytest.fixture
def lab(sol):
    sys.modules.pop("memopt_fixture_lab90", None)
    return Lab.load("90", sol.parent, "memopt_fixture_lab90")


def _rt(lab, gpu=False):
    import torch
    ctx = CheckContext(torch.device("cuda" if gpu else "cpu"), None, 0)
    return Runtime(lab, {c.name: 7 for c in lab.registry.checks}, ctx, Limits(timeout_s=10), [], [])


def _reading(peak, base, source="cgroup"):
    return MemoryReading(peak, base, source, {})


def _ref_session(lab, rows=16400):
    import torch
    import memopt_fixture_lab90 as m
    ref_ns = lab.registry.reference_namespace()
    answers = [ref_ns["sum_of_squares"](x) for x in m.sum_inputs(7)]
    x = torch.ones(rows)  # stand-in output: only its fingerprint is compared
    s = Session(ready=True, outcome=_outcome([]))
    s.replies["sum_of_squares_values"] = ({"event": "evidence", "data": {"answers": answers}}, None)
    s.replies["row_norms_lean"] = ({"event": "evidence", "data": {
        "rows": rows, "input_bytes": 64 * 2**20, "shape_ok": True, "y": fingerprint({"y": x.double()}, 7)}},
        _reading(300 * 2**20, 200 * 2**20))
    return s


def _outcome(msgs, rc=0, timed_out=False):
    return Outcome(msgs, rc, timed_out, 1.0, 0, "")


def test_the_verdict_is_the_judges_not_the_childs(lab):
    ref = _ref_session(lab)
    s = Session(ready=True, outcome=_outcome([]))
    good = ref.replies["sum_of_squares_values"][0]["data"]["answers"]
    s.replies["sum_of_squares_values"] = ({"event": "evidence", "data": {"answers": [a + 1 for a in good]},
                                           "status": "passed", "score": 1000}, None)
    s.replies["row_norms_lean"] = ({"event": "raised", "status": "passed", "message": "trust me", "score": 3}, None)
    checks, status, _ = judge_session(_rt(lab), s, ref, 10)
    by = {c.name: c for c in checks}
    assert status == "graded" and [c.score for c in checks] == [0.0, 0.0]
    assert by["sum_of_squares_values"].status == "failed" and "expected" in by["sum_of_squares_values"].message
    assert by["row_norms_lean"].status == "error"  # a child cannot report "passed"
    s.replies["sum_of_squares_values"] = ({"event": "evidence", "data": {"answers": good}}, None)
    checks, _, _ = judge_session(_rt(lab), s, ref, 10)
    assert checks[0].status == "passed" and checks[0].score == 2.0


def test_memory_is_judged_against_the_reference_runs_baseline(lab):
    """A student whose process sat high at the window's start (memory allocated and freed before, held by the
    allocator) cannot hide a rise: the baseline is the reference run's level, not the student's."""
    ref = _ref_session(lab)
    data = dict(ref.replies["row_norms_lean"][0]["data"])
    lean = Session(ready=True, outcome=_outcome([]))
    lean.replies["row_norms_lean"] = ({"event": "evidence", "data": data}, _reading(302 * 2**20, 200 * 2**20))
    inflated = Session(ready=True, outcome=_outcome([]))  # own baseline 290 MiB: own rise only 74 MiB
    inflated.replies["row_norms_lean"] = ({"event": "evidence", "data": data}, _reading(364 * 2**20, 290 * 2**20))
    got = {n: {c.name: c for c in judge_session(_rt(lab), s, ref, 10)[0]}["row_norms_lean"]
           for n, s in (("lean", lean), ("inflated", inflated))}
    assert got["lean"].status == "passed", got["lean"].message
    assert got["inflated"].status == "failed" and "reference" in got["inflated"].message
    assert got["inflated"].measurements["meter"]["own_baseline_bytes"] == 290 * 2**20


def test_malformed_evidence_fails_instead_of_crashing_the_grader(lab):
    ref = _ref_session(lab)
    s = Session(ready=True, outcome=_outcome([]))
    s.replies["sum_of_squares_values"] = ({"event": "evidence", "data": {"answers": "junk"}}, None)
    s.replies["row_norms_lean"] = ({"event": "evidence", "data": {"shape_ok": True, "y": {"z": [1]}}},
                                   _reading(1, 1))
    checks, status, _ = judge_session(_rt(lab), s, ref, 10)
    assert status == "graded" and [c.status for c in checks] == ["failed", "failed"]


def test_tampering_and_setup_errors(lab):
    ref = _ref_session(lab)
    s = Session(ready=True, tampering=["unexpected message 'evidence' while sum_of_squares_values ran"],
                outcome=_outcome([]))
    s.replies = dict(ref.replies)  # even perfect evidence
    checks, status, reason = judge_session(_rt(lab), s, ref, 10)
    assert status == "tampering" and all(c.score == 0 and c.status == "failed" for c in checks), reason
    s = Session(setup_error="ModuleNotFoundError: No module named 'memopt_lib.checks'", outcome=_outcome([]))
    checks, status, reason = judge_session(_rt(lab), s, ref, 10)
    assert status == "ungradable" and "ModuleNotFoundError" in reason


@pytest.mark.parametrize("rc,timed_out,want", [(-signal.SIGKILL, True, "timeout"), (-signal.SIGXCPU, False, "timeout"),
                                               (-signal.SIGKILL, False, "oom"), (-signal.SIGSEGV, False, "crashed"),
                                               (0, False, "crashed")])
def test_a_silent_death_is_classified_by_the_parent(lab, rc, timed_out, want):
    ref = _ref_session(lab)
    s = Session(ready=True, stopped_at="sum_of_squares_values", outcome=_outcome([], rc, timed_out))
    checks, status, _ = judge_session(_rt(lab), s, ref, 10)
    assert [c.status for c in checks] == [want, "not_run"] and status == "graded"
    s = Session(ready=False, outcome=_outcome([], rc, timed_out))  # died while its cells ran
    assert [c.status for c in judge_session(_rt(lab), s, ref, 10)[0]] == [want, want]


def test_gpu_only_and_legacy_checks_are_not_run_and_not_counted():
    import torch
    reg = Registry(lab="97", reference=lambda: {"f": lambda: 1})
    reg.check(points=2, needs=["f"])(lambda ns, ctx: {}).judge(lambda got, ref, ctx: None)
    reg.check(points=3, needs=["f"], gpu_only=True)(lambda ns, ctx: {}).judge(lambda got, ref, ctx: None)
    reg.check(points=5, needs=["f"])(lambda ns, ctx: None)  # legacy: asserts in-process, no judge
    reg.checks[1].name, reg.checks[2].name = "gpu", "legacy"
    cpu = CheckContext(torch.device("cpu"), None, 0)
    assert max_score_here(reg, cpu) == 2 and reg.max_score == 10
    assert "CUDA" in not_runnable(reg.checks[1], cpu) and "legacy" in not_runnable(reg.checks[2], cpu)
    assert max_score_here(reg, CheckContext(torch.device("cuda"), None, 0)) == 5


# ---------------------------------------------------------------- guard (photograph only: no audit arming here)
def test_guard_sees_replaced_functions_code_and_added_attributes():
    mod = types.ModuleType("fake_instrument")
    exec("def peak():\n    return 1\nclass Base:\n    def nbytes(self):\n        return 8\n"
         "class Tracker(Base):\n    def change(self):\n        return 1", mod.__dict__)
    sys.modules["fake_instrument"] = mod
    import builtins
    guard = Guard([mod, builtins], [mod.Tracker])
    assert guard.verify() == []
    mod.peak.__code__ = (lambda: 0).__code__
    mod.Tracker.helper = lambda self: 0  # a new name hides nothing: allowed (libraries do this)
    mod.Tracker.nbytes = lambda self: 0  # hides Base.nbytes
    problems = guard.verify()
    assert any("peak.__code__" in p for p in problems) and any("Tracker.nbytes was added" in p for p in problems)
    assert not any("helper" in p for p in problems)
    mod.peak = lambda: 0
    assert any("fake_instrument.peak was replaced" in p for p in guard.verify())


# ---------------------------------------------------------------- reports
def _grade(msg="<script>alert(1)</script>", sid="s1"):
    return Grade(student_id=sid, lab="90", status="graded", score=0.0, max_score=5.0, max_score_here=5.0,
                 notebook="=cmd|' /C calc'!A0",
                 checks=[CheckOutcome("row_norms_lean", "error", 0.0, 3.0, msg, {"peak_allocated_bytes": 10})],
                 output_tail="<img src=x onerror=alert(1)>")


def test_feedback_escapes_everything_the_student_controls():
    page = feedback_html(_grade())
    assert "<script" not in page and "<img" not in page and "&lt;script&gt;" in page


def test_csv_cells_cannot_become_formulas(tmp_path):
    write_csv([_grade(msg="x")], tmp_path / "g.csv", ["row_norms_lean"])
    text = (tmp_path / "g.csv").read_text()
    assert "'=cmd" in text and ",=cmd" not in text


def test_gradescope_schema():
    res = gradescope_results(_grade())
    assert set(res) >= {"score", "execution_time", "output", "tests", "visibility", "stdout_visibility"}
    t = res["tests"][0]
    assert t["status"] == "failed" and t["max_score"] == 3.0 and t["extra_data"]["memopt_status"] == "error"


# ---------------------------------------------------------------- isolation without root
def test_without_root_the_grader_warns_and_skips_what_it_cannot_enforce(monkeypatch):
    from memopt_lib.grading import sandbox
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    sandbox.isolation.cache_clear()
    try:
        iso = sandbox.isolation()
        assert not iso.root and not iso.namespaces and "not running as root" in iso.warnings[0]
        cfg = sandbox.child_config(None, sandbox.Limits(), ["/secret"], [], "/tmp/x")
        with sandbox.UidPool(2) as pool:
            assert pool.uids == [None, None]
        assert "uid" not in cfg and cfg["limits"]["nproc"] is None and cfg["mounts"] is False
    finally:
        sandbox.isolation.cache_clear()


def test_two_graders_never_share_a_sandbox_uid(monkeypatch):
    from memopt_lib.grading import sandbox
    if not sandbox.isolation().root:
        pytest.skip("uids are only used as root")
    monkeypatch.setattr(sandbox, "UID_BASE", 64500)
    with sandbox.UidPool(2) as a, sandbox.UidPool(2) as b:
        assert len(set(a.uids) | set(b.uids)) == 4
    with sandbox.UidPool(1) as c:  # released: reusable
        assert c.uids[0] in a.uids


def test_reports_say_what_could_not_run_here():
    g = _grade(msg="x")
    g.max_score_here = 3.0
    assert "max score on this grader: 3 of 5" in gradescope_results(g)["output"]
    assert "max score on this grader: 3" in feedback_html(g)


def test_deeply_nested_messages_are_rejected_not_fatal():
    deep = ('{"event": "evidence", "token": "' + TOKEN + '", "data": ' + "[" * 100_000 + "]" * 100_000 + "}").encode()
    msgs, rejected = parse_messages([deep, _line(event="done", token=TOKEN)], TOKEN)
    assert msgs == [{"event": "done"}] and rejected == 1
