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


def test_every_lab_opens_with_a_colab_badge_and_an_install_cell_built_from_the_repository_url():
    import tomllib
    from pathlib import Path

    from memopt_lib.labgen import BADGE_ID, INSTALL_ID, repository_url
    root = Path(__file__).resolve().parent.parent
    url = tomllib.loads((root / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    assert repository_url() == url
    labs = sorted((root / "labs").glob("*.ipynb"))
    assert labs
    for path in labs:
        nb = nbformat.read(str(path), as_version=4)
        badge, install = nb.cells[0], nb.cells[1]
        assert (badge.id, install.id) == (BADGE_ID, INSTALL_ID), path.name
        slug = url.removeprefix("https://github.com/")
        assert f"colab.research.google.com/github/{slug}/blob/main/labs/{path.name}" in badge.source
        assert f'"memopt @ git+{url}"' in install.source
    sol = nbformat.read(str(root / "solutions" / labs[0].name), as_version=4)
    assert BADGE_ID not in {c.get("id") for c in sol.cells}, "solutions stay without the Colab cells"


def _run_install_cell(importable: bool):
    """Execute the generated install cell with pip replaced by a recorder; return the commands it ran."""
    import importlib.util
    import subprocess
    from unittest import mock

    from memopt_lib.labgen import colab_cells
    source = colab_cells("01_memory_anatomy.ipynb", "https://github.com/someone/memopt")[1].source
    ran = []

    class FakePip:
        def __init__(self, cmd, **kw):
            ran.append(cmd)
            self.stdout, self.returncode = iter(["Collecting memopt\n"]), 0

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    real_find = importlib.util.find_spec
    find = (lambda n, *a: None if n == "memopt_lib" and not ran else real_find(n, *a))
    with mock.patch.object(subprocess, "Popen", FakePip), \
            mock.patch.object(importlib.util, "find_spec", real_find if importable else find):
        exec(compile(source, "<install cell>", "exec"), {})
    return ran


def test_install_cell_is_a_no_op_where_memopt_is_importable():
    assert _run_install_cell(importable=True) == []


def test_install_cell_pip_installs_the_kit_from_the_repository_elsewhere(capsys):
    import sys
    ran = _run_install_cell(importable=False)
    assert ran == [[sys.executable, "-m", "pip", "install", "memopt @ git+https://github.com/someone/memopt"]]
    out = capsys.readouterr().out
    assert "Collecting memopt" in out and "memopt 0." in out


def test_reserved_cell_ids_in_a_solution_are_an_error():
    nb = new_notebook()
    nb.cells = [new_code_cell("x = 1", id="colab-install")]
    with pytest.raises(ValueError, match="reserved"):
        make_lab(nb, "01_x.ipynb")
