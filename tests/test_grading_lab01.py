"""End to end on the real lab 01: memopt-grade grades an honest, a wrong, an untouched and a tampering notebook."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import nbformat
import pytest

from memopt_lib.grading import cli
from memopt_lib.labgen import BEGIN, END, make_lab

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = ROOT / "solutions" / "01_memory_anatomy.ipynb"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not SOLUTION.exists(), reason="lab 01 is not in this checkout")]


def _regions(source: str) -> list[str]:
    out, cur = [], None
    for line in source.splitlines():
        if line.strip().startswith(BEGIN):
            cur = []
        elif line.strip().startswith(END):
            out.append("\n".join(cur))
            cur = None
        elif cur is not None:
            cur.append(line)
    return out


def _student(bodies: dict[str, str], top: str = "") -> nbformat.NotebookNode:
    """The generated lab with the solution's region text (or ``bodies[id]``) in place of NotImplementedError."""
    sol = nbformat.read(str(SOLUTION), as_version=4)
    lab = make_lab(sol, SOLUTION.name)
    answers = {c.id: _regions(c.source) for c in sol.cells if c.cell_type == "code" and BEGIN in c.source}
    for cell in lab.cells:
        if cell.get("id") in answers:
            body = bodies.get(cell.id, answers[cell.id][0])
            cell.source = cell.source.replace("    raise NotImplementedError()", body, 1)
    first = next(c for c in lab.cells if c.get("id") in answers)
    first.source += ("\n" + top) if top else ""
    return lab


def test_lab01_end_to_end(tmp_path, monkeypatch):
    from memopt_lib.grading import sandbox
    monkeypatch.setattr(sandbox, "UID_BASE", 64300)  # apart from a concurrent grader of an older version
    subs, out = tmp_path / "subs", tmp_path / "out"
    nbs = {
        "honest": _student({}),
        "wrong": _student({"count-params": "    return 124_439_808",
                           "train-step": "    loss = model(**batch).loss\n    loss.backward()\n"
                                         "    optimizer.step()\n    return loss"}),
        "untouched": make_lab(nbformat.read(str(SOLUTION), as_version=4), SOLUTION.name),
        "tamper": _student({}, top="import sys, memopt_lib.profiler as _p\n_p.measure = lambda fn, **kw: None\n"
                                   "sys.modules['memopt_lib.checks.lab01_memory_anatomy'].measure = _p.measure"),
    }
    for sid, nb in nbs.items():
        (subs / sid).mkdir(parents=True)
        (subs / sid / SOLUTION.name).write_text(json.dumps(nbformat.from_dict(nb)), encoding="utf-8")
    assert cli.main(["--lab", "01", "--submissions", str(subs), "--out", str(out), "--workers", "2",
                     "--timeout", "400", "--quiet"]) == 0
    with open(out / "grades.csv", newline="") as f:
        rows = {r["student_id"]: r for r in csv.DictReader(f)}
    full = rows["honest"]["max_score"]
    assert (rows["honest"]["status"], rows["honest"]["score"]) == ("graded", full), rows["honest"]
    assert int(rows["honest"]["peak_allocated_bytes"]) > 0
    assert rows["wrong"]["param_count_status"] == "failed"
    assert rows["wrong"]["training_step_is_correct_and_lean_status"] == "failed"
    assert rows["wrong"]["training_state_matches_profiler_status"] == "passed"
    assert (rows["untouched"]["status"], rows["untouched"]["score"]) == ("graded", "0")
    assert (rows["tamper"]["status"], rows["tamper"]["score"]) == ("tampering", "0"), rows["tamper"]
    assert rows["honest"]["lab"] == "lab01" and float(rows["honest"]["peak_allocated_MiB"]) > 0
    # every graded row has the grader's resident-memory reading; a check's peak where that check measured one
    assert all(float(rows[s]["max_rss_MiB"]) > 0 for s in ("honest", "wrong", "untouched"))
    page = (out / "feedback" / "honest.html").read_text()
    assert "Measured memory" in page and "weights" in page and "Your explanations" in page
    assert "gap-answer-md" in (out / "explanations.html").read_text()
