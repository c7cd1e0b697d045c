"""Pull a student's graded functions out of a notebook, by the instructor's cell ids.

A lab's *graded cells* are the code cells of the solution notebook that contain
``### BEGIN SOLUTION`` markers. Each is self-contained (its own imports) and only
defines things. To check a notebook we execute exactly those cells -- found by id
in the notebook being checked -- into a fresh namespace, never the rest of the
notebook (no training runs, no student outputs, no magics).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat

from .labgen import BEGIN, read


class NotebookError(ValueError):
    """A notebook that cannot be checked (malformed, wrong format, missing graded cells)."""


def graded_cell_ids(solution: nbformat.NotebookNode) -> list[str]:
    ids = [c.get("id") for c in solution.cells if c.cell_type == "code" and BEGIN in c.source]
    if any(i is None for i in ids):
        raise NotebookError("graded cells need ids (nbformat >= 4.5)")
    return ids


def load_notebook(path: str | Path) -> nbformat.NotebookNode:
    try:
        nb = read(Path(path))
        nbformat.validate(nb)
    except FileNotFoundError:
        raise
    except Exception as err:  # JSON errors, schema errors, nbformat 3
        raise NotebookError(f"{Path(path).name} is not a valid nbformat-4 notebook: "
                            f"{type(err).__name__}: {str(err)[:200]}") from err
    return nb


def graded_sources(nb: nbformat.NotebookNode, ids: list[str]) -> list[tuple[str, str]]:
    """``[(cell_id, source)]`` of the graded cells of ``nb``; a missing id is an error."""
    by_id = {c.get("id"): c for c in nb.cells if c.cell_type == "code"}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise NotebookError(f"the notebook lacks graded cell(s) {missing}: do not delete or re-create graded cells")
    return [(i, by_id[i].source) for i in ids]


def exec_graded(nb: nbformat.NotebookNode, ids: list[str], name: str = "student") -> dict[str, Any]:
    """Execute the graded cells in order in a fresh namespace and return it."""
    ns: dict[str, Any] = {"__name__": name}
    for cell_id, source in graded_sources(nb, ids):
        code = compile(source, f"<cell {cell_id}>", "exec")
        exec(code, ns)  # noqa: S102 - trusted in tests; the autograder runs this inside its sandbox
    return ns


def namespace_from(path: str | Path, solution_path: str | Path) -> dict[str, Any]:
    """The graded namespace of ``path``, using the graded cell ids of ``solution_path``."""
    ids = graded_cell_ids(load_notebook(solution_path))
    return exec_graded(load_notebook(path), ids)
