"""labs/ is generated from solutions/: regenerate and compare; no outputs, no markers, no answers leak."""
from pathlib import Path

import nbformat

from memopt_lib.labgen import BEGIN, END, generate, solution_notebooks

ROOT = Path(__file__).resolve().parent.parent


def test_labs_match_a_fresh_generation(tmp_path):
    for p in (ROOT / "labs").glob("*.ipynb"):
        (tmp_path / p.name).write_text(p.read_text(encoding="utf-8"), encoding="utf-8")
    differ = generate(ROOT / "solutions", tmp_path, check=True)
    assert not differ, f"labs out of date with solutions (run `make labs`): {differ}"


def test_every_solution_has_a_lab_and_names_follow_the_pattern():
    sols = {p.name for p in solution_notebooks(ROOT / "solutions")}
    labs = {p.name for p in (ROOT / "labs").glob("*.ipynb")}
    assert sols and sols == labs


def test_no_outputs_or_markers_in_labs_and_no_outputs_in_solutions():
    for folder in ("labs", "solutions"):
        for p in (ROOT / folder).glob("*.ipynb"):
            nb = nbformat.read(str(p), as_version=4)
            nbformat.validate(nb)
            for cell in nb.cells:
                assert cell.get("outputs", []) == [], f"{folder}/{p.name} cell {cell.id} has outputs"
                assert cell.get("execution_count") is None, f"{folder}/{p.name} cell {cell.id} has a count"
                if folder == "labs":
                    assert BEGIN not in cell.source and END not in cell.source, f"{p.name} {cell.id}"
                    assert "solution" not in cell.metadata.get("tags", [])
