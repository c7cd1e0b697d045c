"""Generate student labs from solution notebooks (authors edit ``solutions/`` only).

Rules, as in nbgrader:

* in a code cell, every region between ``### BEGIN SOLUTION`` and ``### END SOLUTION``
  becomes ``raise NotImplementedError()`` at the marker's indentation;
* in a markdown cell, such a region becomes ``YOUR ANSWER HERE``;
* cells tagged ``solution`` are dropped whole;
* outputs, execution counts and run metadata are cleared; cell ids are kept, so the
  grader can match a student's cell to the instructor's;
* two cells open every lab (solutions stay without them): an "Open in Colab" badge and an
  install cell that does nothing where ``memopt_lib`` is importable (``make lab``, the grader)
  and ``pip install``-s the kit from the repository elsewhere (a fresh Colab runtime). Both
  read the repository's address from ``[project.urls] Repository`` in ``pyproject.toml``,
  the one place it is written.

``python -m memopt_lib.labgen solutions labs`` writes every lab; ``--check`` only
reports differences (exit 1), which is what the sync test does.
"""
from __future__ import annotations

import argparse
import re
import sys
from functools import lru_cache
from pathlib import Path

import nbformat

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
SOLUTION_TAG = "solution"
LAB_NAME = re.compile(r"^\d\d_[a-z0-9_]+\.ipynb$")
_VOLATILE_METADATA = ("execution", "collapsed", "scrolled", "ExecuteTime")
REPO_ROOT = Path(__file__).resolve().parent.parent
BRANCH = "main"  # the branch whose labs/ the Colab badges open
BADGE_ID, INSTALL_ID = "colab-badge", "colab-install"
COLAB_TAG = "colab"

INSTALL_CELL = """\
# Colab, or any Python without the kit: install memopt (a few minutes: torch and transformers
# are large). Where memopt is already installed (`make lab`, the grader) this cell does nothing.
import importlib, importlib.util, subprocess, sys
if importlib.util.find_spec("memopt_lib") is None:
    cmd = [sys.executable, "-m", "pip", "install", "{requirement}"]
    print("installing:", " ".join(cmd[3:]), flush=True)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as pip:
        for line in pip.stdout:  # pip's lines, shown as they come (downloads name their size)
            print(line, end="", flush=True)
    if pip.returncode:
        raise RuntimeError(f"pip failed (exit {{pip.returncode}}); the lines above say why")
    importlib.invalidate_caches()
print("memopt", importlib.import_module("memopt_lib").__version__)"""


class MarkerError(ValueError):
    """A solution notebook whose markers do not pair up."""


def strip_regions(source: str, replacement: str, where: str = "cell") -> str:
    """Replace each BEGIN/END SOLUTION region of ``source`` with ``replacement`` (indented like BEGIN)."""
    out, inside, indent = [], False, ""
    for n, line in enumerate(source.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith(BEGIN):
            if inside:
                raise MarkerError(f"{where}, line {n}: '{BEGIN}' inside another solution region")
            inside, indent = True, line[: len(line) - len(line.lstrip())]
            out.append(indent + replacement)
        elif stripped.startswith(END):
            if not inside:
                raise MarkerError(f"{where}, line {n}: '{END}' without a matching '{BEGIN}'")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise MarkerError(f"{where}: '{BEGIN}' is never closed by '{END}'")
    return "\n".join(out)


def has_markers(source: str) -> bool:
    return BEGIN in source or END in source


def clear_cell(cell) -> None:
    if cell.cell_type == "code":
        cell.outputs = []
        cell.execution_count = None
    for key in _VOLATILE_METADATA:
        cell.metadata.pop(key, None)


@lru_cache(maxsize=None)
def repository_url() -> str:
    """``[project.urls] Repository`` of ``pyproject.toml`` (of the installed package's metadata if no source tree)."""
    pyproject = REPO_ROOT / "pyproject.toml"
    if pyproject.exists():
        try:
            import tomllib
            url = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"].get("urls", {}).get("Repository")
        except ModuleNotFoundError:  # Python 3.10: no tomllib; the line is simple enough to read
            m = re.search(r'^Repository\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), re.M)
            url = m.group(1) if m else None
    else:
        from importlib import metadata
        urls = metadata.metadata("memopt").get_all("Project-URL") or []
        url = next((u.split(",", 1)[1].strip() for u in urls if u.lower().startswith("repository,")), None)
    if not url or not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url.rstrip("/")):
        raise ValueError(f"[project.urls] Repository in pyproject.toml must be https://github.com/OWNER/NAME, "
                         f"got {url!r}: the Colab badge and install cell are built from it")
    return url.rstrip("/")


def colab_cells(name: str, url: str | None = None) -> list[nbformat.NotebookNode]:
    """The badge and install cells that open the lab ``labs/<name>``."""
    from nbformat.v4 import new_code_cell, new_markdown_cell
    url = url or repository_url()
    slug = url.removeprefix("https://github.com/")
    colab = f"https://colab.research.google.com/github/{slug}/blob/{BRANCH}/labs/{name}"
    badge = new_markdown_cell(
        f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab})  \n"
        "On Colab pick a GPU runtime (Runtime -> Change runtime type -> T4 GPU) before running the first cell.",
        id=BADGE_ID)
    install = new_code_cell(INSTALL_CELL.format(requirement=f"memopt @ git+{url}"), id=INSTALL_ID)
    for cell in (badge, install):
        cell.metadata["tags"] = [COLAB_TAG]
    return [badge, install]


def make_lab(solution: nbformat.NotebookNode, name: str = "notebook") -> nbformat.NotebookNode:
    """The student version of a solution notebook (a new object; the input is not modified).

    With a lab file ``name`` (``NN_topic.ipynb``) the lab opens with :func:`colab_cells`.
    """
    lab = nbformat.from_dict(solution)
    taken = {c.get("id") for c in lab.cells} & {BADGE_ID, INSTALL_ID}
    if taken:
        raise ValueError(f"{name}: cell ids {sorted(taken)} are reserved for the cells labgen adds")
    cells = colab_cells(name) if LAB_NAME.match(name) else []
    for i, cell in enumerate(lab.cells):
        if SOLUTION_TAG in cell.metadata.get("tags", []):
            continue
        where = f"{name}: cell {i} (id {cell.get('id', '?')})"
        if cell.cell_type == "code":
            cell.source = strip_regions(cell.source, "raise NotImplementedError()", where)
        elif cell.cell_type == "markdown":
            cell.source = strip_regions(cell.source, "YOUR ANSWER HERE", where)
        clear_cell(cell)
        cells.append(cell)
    lab.cells = cells
    return lab


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(str(path), as_version=4)


def dumps(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


def solution_notebooks(solutions_dir: Path) -> list[Path]:
    paths = sorted(p for p in Path(solutions_dir).glob("*.ipynb") if LAB_NAME.match(p.name))
    bad = sorted(p.name for p in Path(solutions_dir).glob("*.ipynb") if not LAB_NAME.match(p.name))
    if bad:
        raise ValueError(f"notebooks must be named NN_topic.ipynb (lowercase, underscores): {bad}")
    return paths


def generate(solutions_dir: Path, labs_dir: Path, check: bool = False) -> list[str]:
    """Write (or with ``check``, compare) every lab; return the names that differ."""
    labs_dir = Path(labs_dir)
    differ = []
    for path in solution_notebooks(Path(solutions_dir)):
        text = dumps(make_lab(read(path), path.name))
        target = labs_dir / path.name
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current != text:
            differ.append(path.name)
            if not check:
                labs_dir.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
    expected = {p.name for p in solution_notebooks(Path(solutions_dir))}
    differ += sorted(p.name for p in labs_dir.glob("*.ipynb") if p.name not in expected)
    return differ


def clean_solutions(solutions_dir: Path) -> list[str]:
    """Clear outputs in solution notebooks in place (authors run this before committing)."""
    changed = []
    for path in solution_notebooks(Path(solutions_dir)):
        nb = read(path)
        for cell in nb.cells:
            clear_cell(cell)
        text = dumps(nb)
        if path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            changed.append(path.name)
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memopt_lib.labgen", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("solutions", type=Path)
    ap.add_argument("labs", type=Path)
    ap.add_argument("--check", action="store_true", help="only report labs that are out of date (exit 1)")
    args = ap.parse_args(argv)
    if not args.check:
        for name in clean_solutions(args.solutions):
            print(f"cleared outputs of solutions/{name}")
    differ = generate(args.solutions, args.labs, check=args.check)
    for name in differ:
        print(("out of date: " if args.check else "wrote: ") + str(args.labs / name))
    return 1 if (args.check and differ) else 0


if __name__ == "__main__":
    sys.exit(main())
