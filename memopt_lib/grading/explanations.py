"""The learner's written explanations, collected for the instructor (never graded automatically).

Labs ask the learner to *explain the gap* between prediction and measurement in words. Those
answers live in markdown cells: in the solution notebook a markdown cell holding a
``### BEGIN SOLUTION`` region (the lab shows ``YOUR ANSWER HERE`` there), or any cell tagged
``explanation``. The grader finds the learner's cell **by the solution cell's id**, reads the
notebook as bounded, untrusted JSON (:func:`.rebuild.read_submission`), keeps the learner's own
lines (the question's lines and the placeholder are removed), caps each answer at
:data:`MAX_ANSWER_CHARS`, and writes it escaped: into the learner's feedback page and into
``explanations.html`` / ``explanations.csv`` for the instructor.

The instructor grades by a rubric written in the solution's region: the region's text is the **model answer**,
and from a line starting with ``**Rubric`` to the region's end, the **rubric** (one criterion per line, e.g.
``- 1: names the logits ...``). The instructor's report shows both beside every learner's answer (HTML: a rubric
column with a box per criterion; CSV: ``rubric`` and ``model_answer`` columns and an empty ``score`` column to
fill in). The learner's feedback page never shows them.
"""
from __future__ import annotations

import csv
import html
from dataclasses import dataclass
from pathlib import Path

from ..labgen import BEGIN, END, strip_regions
from ..notebook import load_notebook
from .rebuild import Ungradable, _source, find_notebook, read_submission

TAG = "explanation"
PLACEHOLDER = "YOUR ANSWER HERE"
MAX_ANSWER_CHARS = 4000


RUBRIC = "**Rubric"


@dataclass(frozen=True)
class Question:
    cell_id: str
    prompt: str             # the cell as the lab shows it, placeholder removed
    model_answer: str = ""  # the solution region(s), rubric removed
    rubric: str = ""        # from the region's "**Rubric" line on; "" if the solution has none

    def criteria(self) -> list[str]:
        """The rubric's criteria: its lines after the ``**Rubric`` heading, list markers removed."""
        lines = [line.strip() for line in self.rubric.splitlines()[1:]]
        return [line.lstrip("-* ").strip() for line in lines if line.lstrip("-* ").strip()]


def solution_regions(source: str) -> list[str]:
    """The text inside each ``### BEGIN SOLUTION`` / ``### END SOLUTION`` region of a cell, in order."""
    regions, current = [], None
    for line in source.splitlines():
        if line.strip().startswith(BEGIN):
            current = []
        elif line.strip().startswith(END) and current is not None:
            regions.append("\n".join(current).strip())
            current = None
        elif current is not None:
            current.append(line)
    return regions


def split_rubric(solution: str) -> tuple[str, str]:
    """``(model answer, rubric)`` of a solution region: the rubric starts at a line beginning ``**Rubric``."""
    lines = solution.splitlines()
    at = next((i for i, line in enumerate(lines) if line.strip().startswith(RUBRIC)), len(lines))
    return "\n".join(lines[:at]).strip(), "\n".join(lines[at:]).strip()


def questions(solution_path: Path) -> list[Question]:
    """The explanation cells of the instructor's notebook, in order, with their model answers and rubrics."""
    out = []
    for cell in load_notebook(solution_path).cells:
        tagged = TAG in cell.metadata.get("tags", [])
        if cell.get("id") and (tagged or (cell.cell_type == "markdown" and BEGIN in cell.source)):
            prompt = strip_regions(cell.source, "", cell.id).strip()
            answer, rubric = split_rubric("\n\n".join(solution_regions(cell.source)))
            out.append(Question(cell.id, prompt, answer, rubric))
    return out


def _answer(text: str, prompt: str) -> str:
    prompt_lines = {line.strip() for line in prompt.splitlines() if line.strip()}
    kept = [line for line in text.splitlines()
            if line.strip() not in prompt_lines and line.strip() != PLACEHOLDER]
    answer = "\n".join(kept).strip()
    if len(answer) > MAX_ANSWER_CHARS:
        answer = answer[:MAX_ANSWER_CHARS] + f"\n[... cut at {MAX_ANSWER_CHARS} characters]"
    return answer


def collect(qs: list[Question], student_dir: Path, lab: str, solution_name: str) -> dict[str, str]:
    """``{cell_id: answer}`` of one submission ("" where unanswered); ``{}`` if it has no readable notebook."""
    if not qs:
        return {}
    try:
        nb = read_submission(find_notebook(Path(student_dir), lab, solution_name))
    except (Ungradable, OSError):
        return {}
    by_id: dict[str, str] = {}
    for cell in nb["cells"]:
        if isinstance(cell, dict) and isinstance(cell.get("id"), str) and cell["id"] not in by_id:
            src = _source(cell)
            if src is not None:
                by_id[cell["id"]] = src
    return {q.cell_id: _answer(by_id.get(q.cell_id, ""), q.prompt) for q in qs}


def answers_html(qs: list[Question], answers: dict[str, str]) -> str:
    """The learner's answers as an HTML fragment (everything escaped)."""
    if not qs:
        return ""
    e = html.escape
    parts = []
    for q in qs:
        a = answers.get(q.cell_id, "")
        body = f"<pre>{e(a)}</pre>" if a else "<p><i>(no answer)</i></p>"
        parts.append(f"<h3>{e(q.prompt[:300])}</h3>{body}")
    return "<h2>Your explanations (read by the course staff, not auto-graded)</h2>" + "".join(parts)


def write_report(lab: str, qs: list[Question], by_student: dict[str, dict[str, str]], out: Path) -> None:
    """``out/explanations.html`` (one section per question, one row per learner) and ``explanations.csv``."""
    if not qs:
        return
    e = html.escape
    sections = []
    for q in qs:
        crit = q.criteria()
        boxes = ("".join(f"<div>&#9744; {e(c)}</div>" for c in crit) if crit
                 else "<i>(no rubric in the solution)</i>")
        rows = "".join(f"<tr><td>{e(sid)}</td><td><pre>{e(ans.get(q.cell_id, ''))}</pre></td>"
                       f"<td class='rubric'>{boxes}</td></tr>" for sid, ans in sorted(by_student.items()))
        answered = sum(1 for ans in by_student.values() if ans.get(q.cell_id))
        model = (f"<details><summary>model answer</summary><pre>{e(q.model_answer)}</pre></details>"
                 if q.model_answer else "")
        rubric = f"<pre>{e(q.rubric)}</pre>" if q.rubric else ""
        sections.append(f"<h2>{e(q.prompt[:500])}</h2><p>cell <code>{e(q.cell_id)}</code>: "
                        f"{answered} of {len(by_student)} answered</p>{rubric}{model}"
                        f"<table><tr><th>student</th><th>answer</th><th>rubric</th></tr>{rows}</table>")
    (Path(out) / "explanations.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>Lab {e(lab)}: explanations</title><style>td,th{{border:1px solid #ccc;padding:4px;"
        "vertical-align:top}pre{white-space:pre-wrap;margin:0}td.rubric{font-size:90%;min-width:18em}</style></head><body>"
        f"<h1>Lab {e(lab)}: the learners' explanations</h1>{''.join(sections)}</body></html>\n", encoding="utf-8")
    from .report import _cell
    with open(Path(out) / "explanations.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["student_id", "lab", "cell_id", "answer", "score", "rubric", "model_answer"])
        for sid, ans in sorted(by_student.items()):
            for q in qs:  # score: left empty for the instructor, graded by the rubric beside it
                w.writerow([_cell(v) for v in (sid, f"lab{lab}", q.cell_id, ans.get(q.cell_id, ""), "",
                                                q.rubric, q.model_answer)])
