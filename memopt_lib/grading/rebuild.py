"""Rebuild what runs from the instructor's notebook, taking only the student's solution regions.

A submission is read as plain JSON, never executed or validated by nbformat/IPython
machinery. From it the grader takes exactly one thing: for each *graded cell* of the
instructor's solution notebook (a code cell holding ``### BEGIN SOLUTION``), what the
student wrote in place of each ``raise NotImplementedError()`` of the lab, in the student's
code cell *with the same id* (found by aligning that cell with the instructor's lines).
That text replaces the instructor's solution region; every line outside the regions
comes from the instructor. Tags (``raises-exception``, ``skip``), comments for nbval/papermill
(``# NBVAL_SKIP``), metadata, outputs, execution counts and every other cell of the
submission are ignored -- they cannot change what runs or how it is graded.

A missing graded cell counts as "not implemented" (with a note that says why); a file that is not a
readable nbformat-4.5 notebook makes the submission ``ungradable``.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..labgen import BEGIN, END
from ..notebook import graded_cell_ids, load_notebook

MAX_NOTEBOOK_BYTES = 20 * 1024 * 1024
NOT_DONE = "raise NotImplementedError()"
SUSPICIOUS = re.compile(r"\b(ctypes|_getframe|f_back|f_locals|f_globals|gc\.get_(objects|referrers|referents)|"
                        r"__code__|settrace|setprofile|addaudithook|max_memory_allocated|reset_peak_memory_stats|"
                        r"MemoryTracker|memopt_lib|os\.fork|subprocess|pickle|"
                        r"torch\.load|os\._exit|sys\.exit|sys\.modules|builtins|importlib|exec|compile|threading|socket)\b")


class Ungradable(ValueError):
    """This submission cannot be graded; the message is the reason shown to the student."""


@dataclass
class Rebuilt:
    cells: list[dict]  # [{"id", "source"}] in the instructor's order: what the child executes
    notes: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)  # names worth a human look (never a grade by themselves)
    notebook: str = ""


def template(source: str) -> tuple[list[list[str]], list[str]] | None:
    """The instructor cell as ``(outside chunks, region indents)``; None if its markers do not pair up.

    ``chunks[k]`` are the lines before region ``k`` (``chunks[-1]``: after the last one),
    marker lines excluded -- exactly the lines the student's lab shows around each
    ``raise NotImplementedError()``.
    """
    chunks, indents, inside = [[]], [], False
    for line in source.splitlines():
        s = line.strip()
        if s.startswith(BEGIN):
            if inside:
                return None
            inside = True
            indents.append(line[: len(line) - len(line.lstrip())])
        elif s.startswith(END):
            if not inside:
                return None
            inside = False
            chunks.append([])
        elif not inside:
            chunks[-1].append(line)
    return None if inside else (chunks, indents)


def extract_regions(chunks: list[list[str]], student: str) -> tuple[list[list[str]], list[str]]:
    """The student's text for each region, found by aligning the cell with the instructor's lines.

    Non-blank lines of the instructor's code are anchors (difflib alignment, so a student who
    also edited a docstring or added a line elsewhere still gets their region); region ``k`` is
    what lies between the last anchor before it and the first anchor after it. Student lines
    outside every region are returned as ``ignored``: they never run.
    """
    flat = [line for chunk in chunks for line in chunk]
    bounds, n = [], 0
    for chunk in chunks[:-1]:
        n += len(chunk)
        bounds.append(n)
    lines = student.splitlines()
    sm = difflib.SequenceMatcher(None, [x.rstrip() for x in flat], [x.rstrip() for x in lines], autojunk=False)
    match = {}
    for a, b, size in sm.get_matching_blocks():
        for j in range(size):
            if flat[a + j].strip():
                match[a + j] = b + j
    regions, used = [], set(match.values())
    for b in bounds:
        before = [match[i] for i in range(b) if i in match]
        after = [match[i] for i in range(b, len(flat)) if i in match]
        start = max(before) + 1 if before else 0
        stop = min(after) if after else len(lines)
        regions.append(lines[start:stop])
        used |= set(range(start, stop))
    ignored = [lines[i].strip() for i in range(len(lines))
               if i not in used and lines[i].strip() and not lines[i].strip().startswith("#")]
    return regions, ignored


def splice(chunks: list[list[str]], indents: list[str], regions: list[list[str]] | None) -> str:
    """The instructor's cell with region k replaced by the student's region k (or NotImplementedError)."""
    out = list(chunks[0])
    for k, indent in enumerate(indents):
        body = regions[k] if regions is not None else []
        if not any(line.strip() and not line.strip().startswith("#") for line in body):
            body = [indent + NOT_DONE]
        out += body + chunks[k + 1]
    return "\n".join(out)


def read_submission(path: Path) -> dict:
    """Parse a submitted notebook as untrusted JSON (no symlinks, bounded size, nbformat 4.5+)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        raise Ungradable(f"{path.name}: cannot open ({err.strerror}); hand in a regular file, not a link")
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise Ungradable(f"{path.name} is not a regular file")
        data = f.read(MAX_NOTEBOOK_BYTES + 1)
    if len(data) > MAX_NOTEBOOK_BYTES:
        raise Ungradable(f"{path.name} is larger than {MAX_NOTEBOOK_BYTES // 2**20} MiB: clear the outputs")
    try:
        nb = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise Ungradable(f"{path.name} is not valid notebook JSON ({type(err).__name__}: {str(err)[:120]}); "
                         "download the lab again and copy your solutions into it")
    if not isinstance(nb, dict) or nb.get("nbformat") != 4 or not isinstance(nb.get("cells"), list):
        version = nb.get("nbformat") if isinstance(nb, dict) else None
        raise Ungradable(f"{path.name} is not an nbformat-4 notebook (nbformat={version!r})")
    if not isinstance(nb.get("nbformat_minor"), int) or nb["nbformat_minor"] < 5:
        raise Ungradable(f"{path.name} has no cell ids (nbformat 4.{nb.get('nbformat_minor')}); "
                         "work in the lab notebook you were given, do not copy cells into a new notebook")
    return nb


def _source(cell: dict) -> str | None:
    src = cell.get("source")
    if isinstance(src, list) and all(isinstance(s, str) for s in src):
        return "".join(src)
    return src if isinstance(src, str) else None


def rebuild(solution_path: Path, submission_path: Path) -> Rebuilt:
    """The cells to execute for this submission, in the instructor's order."""
    solution = load_notebook(solution_path)
    ids = graded_cell_ids(solution)
    instructor = {c.id: c.source for c in solution.cells if c.get("id") in ids}
    nb = read_submission(submission_path)
    student: dict[str, str] = {}
    for cell in nb["cells"]:
        if isinstance(cell, dict) and cell.get("cell_type") == "code" and isinstance(cell.get("id"), str):
            src = _source(cell)
            if src is not None and cell["id"] in instructor and cell["id"] not in student:
                student[cell["id"]] = src
    cells, notes, flags = [], [], []
    for cid in ids:
        parsed = template(instructor[cid])
        if parsed is None:
            raise ValueError(f"instructor cell {cid!r}: '{BEGIN}' / '{END}' do not pair up")
        chunks, indents = parsed
        regions = None
        if cid not in student:
            notes.append(f"graded cell {cid!r} is missing from the notebook (do not delete or re-create it)")
        else:
            regions, ignored = extract_regions(chunks, student[cid])
            if ignored:
                notes.append(f"graded cell {cid!r}: edits outside the solution part were ignored "
                             f"(first: {ignored[0][:80]!r})")
            found = sorted({m.group(0) for r in regions for m in SUSPICIOUS.finditer("\n".join(r))})
            flags += [f"{cid}: {name}" for name in found]
        cells.append({"id": cid, "source": splice(chunks, indents, regions)})
    return Rebuilt(cells, notes, flags, submission_path.name)


def find_notebook(student_dir: Path, lab: str, solution_name: str) -> Path:
    """The student's ``NN_*.ipynb``: the instructor's file name if present, else the only ``NN_*`` notebook."""
    candidates = sorted(p for p in student_dir.iterdir() if p.name.startswith(f"{lab}_") and p.suffix == ".ipynb")
    exact = [p for p in candidates if p.name == solution_name]
    if exact:
        return exact[0]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise Ungradable(f"no {lab}_*.ipynb notebook in the submission")
    raise Ungradable(f"several {lab}_*.ipynb notebooks ({', '.join(p.name for p in candidates)}); hand in one")
