"""What the instructor and the learner read: grades.csv, the feedback page, the explanations report, --help."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from memopt_lib.grading import cli
from memopt_lib.grading import explanations as ex
from memopt_lib.grading.grade import CheckOutcome, Grade
from memopt_lib.grading.report import feedback_html, gradescope_results, write_csv

MiB = 2**20
BREAKDOWN = {"weights": 100 * MiB, "gradients": 100 * MiB, "optimizer": 200 * MiB, "activations": 50 * MiB,
             "temporaries": 10 * MiB}


def _grades():
    mem = {"peak_bytes": 460 * MiB, "reference_peak_bytes": 230 * MiB, "memory_source": "tracker",
           "breakdown_bytes": BREAKDOWN, "reference_breakdown_bytes": {**BREAKDOWN, "optimizer": 0}}
    failed_mem = CheckOutcome("lean_step", "failed", 0.0, 3.0, "peak 2.00 x the reference", mem)
    return [
        Grade("alice", "01", "graded", 2.0, 5.0, checks=[CheckOutcome("count", "passed", 2.0, 2.0), failed_mem],
              max_rss_bytes=900 * MiB, notebook="01_memory_anatomy.ipynb"),
        Grade("bob", "01", "ungradable", 0.0, 5.0, reason="no 01_*.ipynb notebook in the submission"),
        Grade("carol", "01", "tampering", 0.0, 5.0, reason="tampering: measure was replaced",
              checks=[CheckOutcome("count", "failed", 0.0, 2.0), CheckOutcome("lean_step", "failed", 0.0, 3.0)],
              max_rss_bytes=800 * MiB),
    ]


def test_grades_csv_imports_cleanly(tmp_path):
    write_csv(_grades(), tmp_path / "grades.csv", ["count", "lean_step"])
    with open(tmp_path / "grades.csv", newline="") as f:
        rows = {r["student_id"]: r for r in csv.DictReader(f)}
    a, b, c = rows["alice"], rows["bob"], rows["carol"]
    assert a["lab"] == b["lab"] == "lab01"  # not 01, which a spreadsheet turns into 1
    assert (a["graded"], a["score"], a["count"], a["lean_step"]) == ("true", "2", "2", "0")
    assert (b["graded"], b["score"], b["count"], b["status"]) == ("false", "", "", "ungradable")
    assert (c["graded"], c["score"]) == ("true", "0")  # tampering is a decided grade: 0
    # the failing submission's memory is there too, in MiB and bytes
    assert (a["peak_allocated_MiB"], a["peak_allocated_bytes"]) == ("460.0", str(460 * MiB))
    assert a["max_rss_MiB"] == "900.0" and c["max_rss_MiB"] == "800.0" and b["max_rss_MiB"] == ""
    for r in rows.values():
        assert r["score"] == "" or float(r["score"]) >= 0


def test_feedback_shows_measured_memory_against_the_reference_with_the_breakdown():
    page = feedback_html(_grades()[0])
    mem = page.split("<h2>Measured memory</h2>", 1)[1]
    assert "460.0" in mem and "230.0" in mem and "2.00 x" in mem and "tracker" in mem
    for cat in BREAKDOWN:
        assert f"<td>{cat}</td>" in mem
    assert "<td>optimizer</td><td>200.0</td><td>0.0</td>" in mem
    assert "Measured memory" not in feedback_html(_grades()[1]) and "not graded" in feedback_html(_grades()[1])
    out = gradescope_results(_grades()[0])
    assert "measured peak: 460.0 MiB (reference solution: 230.0 MiB)" in out["tests"][1]["output"]


def _explained_lab(tmp_path, answer: str | None, tag=False, rubric=False):
    sol = new_notebook()
    grading = "\n**Rubric** (2 points):\n- 1: names the gradients\n- 1: says <when> they exist" if rubric else ""
    q = new_markdown_cell("**Explain** why the peak is in backward.\n### BEGIN SOLUTION\n"
                          f"Because gradients and activations coexist.{grading}\n### END SOLUTION", id="why-md")
    tagged = new_markdown_cell("Write one sentence about fragmentation.", id="frag-md")
    tagged.metadata["tags"] = ["explanation"]
    sol.cells = [new_code_cell("x = 1", id="c1"), q, tagged]
    sol_path = tmp_path / "sol" / "01_demo.ipynb"
    sol_path.parent.mkdir()
    nbformat.write(sol, str(sol_path))
    from memopt_lib.labgen import make_lab
    lab = make_lab(sol, "01_demo.ipynb")
    if answer is not None:
        cell = next(c for c in lab.cells if c.id == "why-md")
        cell.source = cell.source.replace("YOUR ANSWER HERE", answer)
    sub = tmp_path / "subs" / "alice"
    sub.mkdir(parents=True)
    (sub / "01_demo.ipynb").write_text(json.dumps(nbformat.from_dict(lab)))
    return sol_path, sub


def test_explanations_are_collected_by_cell_id_bounded_and_escaped(tmp_path):
    answer = "The AdamW <script>alert(1)</script> state exists from step 2.\n" + "x" * 10_000
    sol, sub = _explained_lab(tmp_path, answer)
    qs = ex.questions(sol)
    assert [q.cell_id for q in qs] == ["why-md", "frag-md"]
    assert "Because gradients" not in qs[0].prompt and "Explain" in qs[0].prompt  # the answer never leaks
    got = ex.collect(qs, sub, "01", sol.name)
    assert got["why-md"].startswith("The AdamW <script>") and "Explain" not in got["why-md"]
    assert len(got["why-md"]) < ex.MAX_ANSWER_CHARS + 100 and "cut at" in got["why-md"]
    assert got["frag-md"] == ""  # untouched: the prompt alone is no answer
    frag = ex.answers_html(qs, got)
    assert "<script>" not in frag and "&lt;script&gt;" in frag and "(no answer)" in frag
    ex.write_report("01", qs, {"alice": got, "bob": {}}, tmp_path)
    page = (tmp_path / "explanations.html").read_text()
    assert "&lt;script&gt;" in page and "<script>" not in page and "1 of 2 answered" in page
    with open(tmp_path / "explanations.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["student_id"], r["cell_id"]) for r in rows][:2] == [("alice", "why-md"), ("alice", "frag-md")]


def test_explanations_of_an_unreadable_submission_are_empty(tmp_path):
    sol, sub = _explained_lab(tmp_path, None)
    (sub / "01_demo.ipynb").write_text("{not json")
    assert ex.collect(ex.questions(sol), sub, "01", sol.name) == {}


def test_the_instructor_sees_the_rubric_beside_each_answer_the_learner_never(tmp_path):
    sol, sub = _explained_lab(tmp_path, "Gradients exist only after backward.", rubric=True)
    qs = ex.questions(sol)
    q = qs[0]
    assert q.model_answer == "Because gradients and activations coexist." and q.rubric.startswith("**Rubric")
    assert q.criteria() == ["1: names the gradients", "1: says <when> they exist"]
    assert qs[1].rubric == "" and qs[1].criteria() == []  # a tagged cell without a solution region
    got = ex.collect(qs, sub, "01", sol.name)
    assert "Rubric" not in got["why-md"] and "names the gradients" not in ex.answers_html(qs, got)
    ex.write_report("01", qs, {"alice": got, "bob": {}}, tmp_path)
    page = (tmp_path / "explanations.html").read_text()
    row = page.split("<td>alice</td>", 1)[1].split("</tr>", 1)[0]  # alice's row: her answer, then the rubric
    assert "Gradients exist only after backward." in row and "names the gradients" in row
    assert "says &lt;when&gt; they exist" in row and "<when>" not in page
    assert "model answer" in page and "(no rubric in the solution)" in page
    with open(tmp_path / "explanations.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    first = rows[0]
    assert (first["cell_id"], first["score"]) == ("why-md", "") and first["rubric"].startswith("**Rubric")
    assert first["model_answer"] == "Because gradients and activations coexist."


@pytest.mark.parametrize("lab", ["01", "02", "03", "04", "05"])
def test_each_lab_explanation_has_a_model_answer_and_a_rubric(lab):
    from pathlib import Path
    sol = next((Path(__file__).parents[1] / "solutions").glob(f"{lab}_*.ipynb"))
    qs = ex.questions(sol)
    assert qs, f"lab {lab} has no explanation cell"
    for q in qs:
        assert q.model_answer and len(q.criteria()) >= 2, f"lab {lab} {q.cell_id}: model answer and rubric needed"
        assert "### BEGIN" not in q.prompt and q.rubric not in q.prompt


def test_help_shows_defaults_every_subcommand_and_the_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "gradescope" in text and "(default: 600.0)" in text and "(default: 6144)" in text
    assert "(default: 1)" in text and "(default: None)" not in text
    with pytest.raises(SystemExit):
        cli.main(["gradescope", "--help"])
    sub = capsys.readouterr().out
    assert "--out" in sub and "(default: 600.0)" in sub and "3.11" in sub
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    from memopt_lib import __version__
    assert e.value.code == 0 and __version__ in capsys.readouterr().out
