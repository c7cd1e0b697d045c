"""Lab 01 graded end to end by memopt-grade, in ONE batch: honest, wrong, untouched, tampering and every red-team
attack of grading_fixtures/real_attacks.py (each an honest failing answer plus one trick).

Each attack must score no more than the honest failing submission it starts from and must not pass the
check it targets; the honest solution gets full marks of what can run here; the batch's canary ran.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import nbformat
import pytest

from memopt_lib.grading import cli
from memopt_lib.labgen import BEGIN, END, make_lab

sys.path.insert(0, str(Path(__file__).parent / "grading_fixtures"))
import real_attacks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = ROOT / "solutions" / "01_memory_anatomy.ipynb"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not SOLUTION.exists(), reason="lab 01 is not in this checkout")]


def regions(source: str) -> list[str]:
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


def student(solution: Path, bodies: dict[str, str], top: str = "") -> nbformat.NotebookNode:
    """The generated lab with the solution's region text (or ``bodies[id]``) in place of NotImplementedError."""
    sol = nbformat.read(str(solution), as_version=4)
    lab = make_lab(sol, solution.name)
    answers = {c.id: regions(c.source) for c in sol.cells if c.cell_type == "code" and BEGIN in c.source}
    for cell in lab.cells:
        if cell.get("id") in answers:
            body = bodies.get(cell.id, answers[cell.id][0])
            cell.source = cell.source.replace("    raise NotImplementedError()", body, 1)
    first = next(c for c in lab.cells if c.get("id") in answers)
    first.source += ("\n" + top) if top else ""
    return lab


def solution_module(solution: Path) -> str:
    """The solution's graded cells as one Python module (what a student might copy around)."""
    sol = nbformat.read(str(solution), as_version=4)
    return "\n\n".join(c.source for c in sol.cells if c.cell_type == "code" and BEGIN in c.source)


def run_batch(tmp_path_factory, solution: Path, lab: str, nbs: dict, attacks: dict, uid_base: int):
    from memopt_lib.grading import sandbox
    root = tmp_path_factory.mktemp(f"lab{lab}")
    subs, out, copy = root / "subs", root / "out", root / "copies"
    # copies of the solutions where a student might find them: under /tmp, /var/tmp, as a module
    copy.mkdir()
    shutil.copy(solution, copy / solution.name)
    (copy / "sol_copy.py").write_text(solution_module(solution))
    var_copy = Path("/var/tmp") / f"memopt-redteam-{os.getpid()}"
    var_copy.mkdir(exist_ok=True)
    shutil.copy(solution, var_copy / solution.name)
    for sid, (bodies, _, _) in attacks.items():
        nbs[sid] = student(solution, {k: v.replace("@COPY@", str(copy)) for k, v in bodies.items()})
    for sid, nb in nbs.items():
        (subs / sid).mkdir(parents=True)
        (subs / sid / solution.name).write_text(json.dumps(nbformat.from_dict(nb)), encoding="utf-8")
    old, sandbox.UID_BASE = sandbox.UID_BASE, uid_base  # apart from a concurrent grader of an older version
    try:
        rc = cli.main(["--lab", lab, "--submissions", str(subs), "--out", str(out), "--workers", "2",
                       "--timeout", "400", "--quiet"])
    finally:
        sandbox.UID_BASE = old
        shutil.rmtree(var_copy, ignore_errors=True)
    with open(out / "grades.csv", newline="", encoding="utf-8") as f:
        rows = {r["student_id"]: r for r in csv.DictReader(f)}
    return rc, rows, out


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    nbs = {
        "honest": student(SOLUTION, {}),
        "honest_failing": student(SOLUTION, real_attacks.lab01()),
        "wrong": student(SOLUTION, {"count-params": "    return 124_439_808",
                                    "train-step": "    loss = model(**batch).loss\n    loss.backward()\n"
                                                  "    optimizer.step()\n    return loss"}),
        "untouched": make_lab(nbformat.read(str(SOLUTION), as_version=4), SOLUTION.name),
        "tamper": student(SOLUTION, {}, top="import sys, memopt_lib.profiler as _p\n_p.measure = lambda fn, **kw: None\n"
                                            "sys.modules['memopt_lib.checks.lab01_memory_anatomy'].measure = _p.measure"),
    }
    rc, rows, out = run_batch(tmp_path_factory, SOLUTION, "01", nbs, real_attacks.LAB01, 64300)
    return {"rc": rc, "rows": rows, "out": out}


def test_batch_ran_and_every_submission_has_a_record(batch):
    assert batch["rc"] == 0
    assert set(batch["rows"]) == {"honest", "honest_failing", "wrong", "untouched", "tamper"} | set(real_attacks.LAB01)


def test_honest_gets_full_marks_of_what_runs_here(batch):
    row = batch["rows"]["honest"]
    assert (row["status"], row["score"], row["max_score_here"]) == ("graded", "8", "8"), row
    res = json.loads((batch["out"] / "results" / "honest.json").read_text())
    lean = next(t for t in res["tests"] if t["name"] == "training_step_is_correct_and_lean")
    meas = lean["extra_data"]["measurements"]
    assert meas["measured_by"] in ("cgroup", "rss") and meas["rise_bytes"] > 50 * 2**20
    assert "tracker_peak_bytes" in meas  # the tracker's view is shown, as explanation


def test_wrong_untouched_and_tampering(batch):
    rows = batch["rows"]
    assert rows["wrong"]["param_count_status"] == "failed"
    assert "memopt_lib" in rows["r13_solutions_copy_elsewhere"]["review_flags"]  # a human is pointed at it
    assert rows["wrong"]["training_state_matches_profiler_status"] == "passed"
    assert rows["wrong"]["training_step_trains_status"] == "failed"  # returned the loss tensor
    assert (rows["untouched"]["status"], rows["untouched"]["score"]) == ("graded", "0")
    assert (rows["tamper"]["status"], rows["tamper"]["score"]) == ("tampering", "0"), rows["tamper"]
    assert rows["honest"]["lab"] == "lab01" and float(rows["honest"]["peak_allocated_MiB"]) > 0
    # every graded row has the grader's resident-memory reading; a check's peak where that check measured one
    assert all(float(rows[s]["max_rss_MiB"]) > 0 for s in ("honest", "wrong", "untouched"))
    page = (batch["out"] / "feedback" / "honest.html").read_text()
    assert "Measured memory" in page and "weights" in page and "Your explanations" in page
    assert "gap-answer-md" in (batch["out"] / "explanations.html").read_text()


def test_honest_failing_submission_is_what_the_attacks_start_from(batch):
    """Correct but wasteful step (zero-filled gradients kept through the forward): it trains, it is not lean."""
    row = batch["rows"]["honest_failing"]
    assert (row["training_step_trains_status"], row["training_step_is_correct_and_lean_status"]) == ("passed", "failed"), row
    assert row["score"] == "1"


@pytest.mark.parametrize("sid", sorted(real_attacks.LAB01))
def test_attack_earns_nothing(batch, sid):
    _, most, forbidden = real_attacks.LAB01[sid]
    row = batch["rows"][sid]
    assert row["status"] in ("graded", "tampering"), row
    assert float(row["score"]) <= most, f"{sid} scored {row['score']} (honest failing: {most}): {row}"
    for check, status in forbidden.items():
        assert row[f"{check}_status"] != status, row
