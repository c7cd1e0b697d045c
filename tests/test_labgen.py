import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from memopt_lib.labgen import MarkerError, make_lab, strip_regions


def test_strip_keeps_indent_and_code_outside():
    src = "def f(x):\n    y = 1\n    ### BEGIN SOLUTION\n    return x + y\n    ### END SOLUTION\n# after"
    assert strip_regions(src, "raise NotImplementedError()") == \
        "def f(x):\n    y = 1\n    raise NotImplementedError()\n# after"


@pytest.mark.parametrize("src", ["### BEGIN SOLUTION\nx", "x\n### END SOLUTION",
                                 "### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION"])
def test_unbalanced_markers_are_errors(src):
    with pytest.raises(MarkerError):
        strip_regions(src, "pass")


def test_make_lab_drops_solution_cells_and_clears_outputs():
    nb = new_notebook()
    c1 = new_code_cell("print(1)\n### BEGIN SOLUTION\nx = 2\n### END SOLUTION", execution_count=3,
                       outputs=[new_output("stream", text="1")])
    c2 = new_code_cell("secret = 42")
    c2.metadata["tags"] = ["solution"]
    c3 = new_markdown_cell("Answer:\n### BEGIN SOLUTION\nbecause\n### END SOLUTION")
    nb.cells = [c1, c2, c3]
    lab = make_lab(nb)
    assert [c.id for c in lab.cells] == [c1.id, c3.id]
    assert lab.cells[0].source == "print(1)\nraise NotImplementedError()"
    assert lab.cells[0].outputs == [] and lab.cells[0].execution_count is None
    assert lab.cells[1].source == "Answer:\nYOUR ANSWER HERE"
    assert nb.cells[0].outputs  # the input notebook is not modified
    nbformat.validate(lab)
