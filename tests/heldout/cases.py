"""What a held-out wrong answer is: one graded cell's solution region(s) replaced by a learner's plausible mistake.

Each ``tests/heldout/labNN.py`` holds ``CASES``, a list of :class:`Case`. A case becomes a submission notebook:
the instructor's solution with the solution region ``region`` of graded cell ``cell`` replaced by ``body``
(written without the region's indentation; :func:`student_notebook` indents it), every other region as the
instructor wrote it. ``origin`` says where the case comes from: ``"heldout"`` (new, not in
``tests/wrong_answers/``) or ``"memory-only"`` (a wrong answer of ``tests/wrong_answers/`` that only changes
memory, graded here by the grader's outside meter instead of the in-process tracker).
"""
from __future__ import annotations

import copy
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

from memopt_lib.grading.rebuild import template
from memopt_lib.labgen import BEGIN, END


@dataclass(frozen=True)
class Case:
    name: str           # short id (a submission folder name: letters, digits, - _ .)
    cell: str           # graded cell id
    body: str           # the learner's region text (dedented)
    why: str = ""       # the mistake, in words
    region: int = 0     # which solution region of the cell the body replaces
    origin: str = "heldout"
    others: tuple = ()  # ((region, body), ...): further regions of the same cell the mistake changes


def _regions(source: str) -> list[list[str]]:
    out, cur = [], None
    for line in source.splitlines():
        s = line.strip()
        if s.startswith(BEGIN):
            cur = []
        elif s.startswith(END):
            out.append(cur)
            cur = None
        elif cur is not None:
            cur.append(line)
    return out


def cell_source(solution_source: str, region: int, body: str, others: tuple = ()) -> str:
    """The learner's cell: the lab's lines around each region, the solution's text in the others, ``body`` in one."""
    parsed = template(solution_source)
    if parsed is None:
        raise ValueError("solution cell markers do not pair up")
    chunks, indents = parsed
    sol = _regions(solution_source)
    if not 0 <= region < len(indents):
        raise ValueError(f"the cell has {len(indents)} solution region(s), not a region {region}")
    bodies = {region: body, **dict(others)}
    out = list(chunks[0])
    for k, indent in enumerate(indents):
        if k in bodies:
            text = textwrap.dedent(bodies[k]).strip("\n")
            out += [indent + line if line.strip() else "" for line in text.splitlines()]
        else:
            out += sol[k]
        out += chunks[k + 1]
    return "\n".join(out) + "\n"


def student_notebook(solution: Path, case: Case) -> dict:
    """The solution notebook (as JSON) with ``case`` applied to its graded cell."""
    nb = json.loads(Path(solution).read_text())
    cells = [c for c in nb["cells"] if c.get("id") == case.cell and c.get("cell_type") == "code"]
    if len(cells) != 1:
        raise KeyError(f"{solution.name} has no graded code cell {case.cell!r}")
    cell = cells[0]
    cell["source"] = cell_source("".join(cell["source"]), case.region, case.body, case.others)
    return copy.deepcopy(nb)
