"""The grader's fixture lab 90: a solution notebook and student notebooks made from its lab version."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from memopt_lib.labgen import make_lab

SUMSQ = '''import torch


def sum_of_squares(x):
    """The sum of x_i ** 2 over a 1-D tensor, as a Python float."""
    ### BEGIN SOLUTION
    return float((x * x).sum())
    ### END SOLUTION'''

NORMS = '''import torch


def row_norms(x):
    """The L2 norm of each row of the 2-D tensor x, without a temporary as large as x."""
    ### BEGIN SOLUTION
    return torch.linalg.vector_norm(x, dim=1)
    ### END SOLUTION'''

SOLUTION_BODIES = {"fx-sumsq": "    return float((x * x).sum())", "fx-norms": "    return torch.linalg.vector_norm(x, dim=1)"}
WRONG_BODIES = {"fx-sumsq": "    return float(x.sum())", "fx-norms": "    return (x * x).sum(1).sqrt()"}
NAME = "90_fixture.ipynb"


def _cell(cls, cid, source, **kw):
    c = cls(source, **kw)
    c.id = cid
    return c


def solution_notebook() -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [_cell(new_markdown_cell, "fx-title", "# Lab 90: a fixture for the grader"),
                _cell(new_code_cell, "fx-setup", "import torch\nprint('setup')"),
                _cell(new_code_cell, "fx-sumsq", SUMSQ),
                _cell(new_code_cell, "fx-norms", NORMS),
                _cell(new_code_cell, "fx-use", "print(sum_of_squares(torch.arange(4.0)))")]
    return nb


def write_solution(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / NAME
    nbformat.write(solution_notebook(), str(path))
    return path


def lab_notebook() -> nbformat.NotebookNode:
    return make_lab(solution_notebook(), NAME)


def student_notebook(bodies: dict[str, str] | None = None, *, edit=None) -> nbformat.NotebookNode:
    """The lab with ``raise NotImplementedError()`` in cell ``id`` replaced by ``bodies[id]``; ``edit(nb)`` after."""
    nb = lab_notebook()
    for cell in nb.cells:
        if bodies and cell.get("id") in bodies:
            cell.source = cell.source.replace("    raise NotImplementedError()", bodies[cell.id])
    if edit is not None:
        edit(nb)
    return nb


def write_submission(root: Path, student: str, nb=None, *, text: str | None = None, name: str = NAME) -> Path:
    folder = root / student
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if text is not None:
        path.write_text(text, encoding="utf-8")
    else:
        path.write_text(json.dumps(nbformat.from_dict(nb), indent=1), encoding="utf-8")
    return path
