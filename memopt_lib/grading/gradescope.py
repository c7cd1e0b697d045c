"""Build a Gradescope autograder zip that runs ``memopt-grade`` on Gradescope's machines.

Gradescope unzips the package into ``/autograder/source``, runs ``setup.sh`` once when it
builds the image, and ``run_autograder`` per submission (as root); the student's files
are in ``/autograder/submission`` and the grade goes to ``/autograder/results/results.json``.
The zip holds:

* ``memopt/`` -- this package's source (``pyproject.toml`` + ``memopt_lib``), no solutions;
* ``solutions/NN_*.ipynb`` -- the instructor's notebook of this one lab (made unreadable to
  the sandbox by ``setup.sh`` and hidden again by the mount namespace at grading time);
* ``extra/`` and ``reference/`` -- a check module / reference verifier that live outside
  ``memopt_lib`` (only when ``--checks-module`` points elsewhere);
* ``constraints.txt`` -- the versions of torch, transformers, ... installed where the zip was built
  (the stack the instructor tested); ``setup.sh`` installs exactly those, on Python >= 3.11 (it
  installs python3.11 where the image's ``python3`` is older, as on Gradescope's Ubuntu 22.04);
* ``setup.sh`` and ``run_autograder``. ``AUTOGRADER_ROOT`` and ``MEMOPT_PYTHON`` override
  ``/autograder`` and the interpreter, which is how the test suite runs the package locally.
"""
from __future__ import annotations

import importlib
import shlex
import zipfile
from pathlib import Path

from .grade import REPO_ROOT, Lab

SETUP_SH = """#!/usr/bin/env bash
# Runs once when Gradescope builds the autograder image (Ubuntu, as root).
# The kit is tested on Python >= 3.11; Gradescope's Ubuntu 22.04 image has python3 3.10, so a
# python3.11 is installed from the distribution (then from the deadsnakes archive) where needed.
# `bash setup.sh --pick-python` only chooses (and if need be installs) the interpreter and prints it.
set -euo pipefail
MIN_MINOR=11  # Python 3.MIN_MINOR or newer

version_ok() {{  # "$1" is a python >= 3.$MIN_MINOR
  local v
  v="$("$1" -c 'import sys; print("%d %d" % sys.version_info[:2])' 2>/dev/null)" || return 1
  set -- $v
  [ "$1" -eq 3 ] && [ "$2" -ge "$MIN_MINOR" ]
}}

find_python() {{
  local py
  for py in python3.13 python3.12 python3.11 python3; do
    if command -v "$py" >/dev/null 2>&1 && version_ok "$(command -v "$py")"; then
      command -v "$py"; return 0
    fi
  done
  return 1
}}

pick_python() {{
  find_python && return 0
  echo "[setup] no Python >= 3.$MIN_MINOR on this image: installing python3.11" >&2
  apt-get update -qq >&2
  if ! apt-get install -y -qq python3.11 python3.11-venv >&2; then
    apt-get install -y -qq software-properties-common >&2
    add-apt-repository -y ppa:deadsnakes/ppa >&2
    apt-get update -qq >&2
    apt-get install -y -qq python3.11 python3.11-venv >&2
  fi
  find_python || {{ echo "[setup] could not install Python >= 3.$MIN_MINOR" >&2; return 1; }}
}}

if [ "${{1:-}}" = "--pick-python" ]; then pick_python; exit; fi

apt-get update -qq && apt-get install -y -qq util-linux >/dev/null
PY="$(pick_python)"
"$PY" -m venv /autograder/venv || {{
  apt-get install -y -qq "python3.$("$PY" -c 'import sys; print(sys.version_info[1])')-venv" >/dev/null
  "$PY" -m venv /autograder/venv; }}
/autograder/venv/bin/pip install --quiet --upgrade pip
# The stack this package was built and tested with (constraints.txt: the instructor's versions).
# CPU wheel of torch: Gradescope machines have no GPU.
/autograder/venv/bin/pip install --quiet -c /autograder/source/constraints.txt torch \\
    --index-url https://download.pytorch.org/whl/cpu
/autograder/venv/bin/pip install --quiet -c /autograder/source/constraints.txt "/autograder/source/memopt[grade]"
# the instructor's notebook and reference code: root only (the sandbox runs as another uid)
chmod -R go-rwx /autograder/source/solutions /autograder/source/reference
chmod 755 /autograder/source /autograder/source/extra
# Warm the model cache (the sandbox may read it, not build it) by running the checks on the
# instructor's solution, as root, once: this also proves the image grades the solution full marks.
export MEMOPT_CACHE=/autograder/cache
cd /autograder/source
PYTHONPATH=extra:reference /autograder/venv/bin/python - <<'PY'
import importlib
from memopt_lib.checks.base import format_results, run_checks
from memopt_lib.notebook import namespace_from
sol = "solutions/{solution}"
results = run_checks(importlib.import_module("{checks_module}").CHECKS, namespace_from(sol, sol))
print(format_results(results))
assert all(r.status == "passed" for r in results), "the solution does not pass its own checks on this image"
PY
"""

# What setup.sh pins: the runtime dependencies (and the grader's) at the versions installed where the
# package is built, i.e. where the instructor ran the lab and its checks.
PINNED = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "tokenizers", "safetensors", "tqdm",
          "matplotlib", "ipywidgets", "nbformat")


def constraints() -> str:
    """``name==version`` lines of :data:`PINNED` as installed here (local tags such as ``+cpu`` dropped)."""
    from importlib import metadata
    lines = ["# the versions memopt-grade gradescope found where it built this package"]
    for name in PINNED:
        try:
            lines.append(f"{name}=={metadata.version(name).split('+', 1)[0]}")
        except metadata.PackageNotFoundError:
            pass
    return "\n".join(lines) + "\n"


RUN_AUTOGRADER = """#!/usr/bin/env bash
# Grades /autograder/submission/*.ipynb with memopt-grade; writes /autograder/results/results.json.
set -uo pipefail
ROOT="${{AUTOGRADER_ROOT:-/autograder}}"
PY="${{MEMOPT_PYTHON:-$ROOT/venv/bin/python}}"
SRC="$ROOT/source"
export MEMOPT_CACHE="${{MEMOPT_CACHE:-$ROOT/cache}}"
work="$(mktemp -d)"
mkdir -p "$work/submissions/student" "$ROOT/results"
# regular files only (a symlink would point the grader at a file of its own choosing)
find "$ROOT/submission" -maxdepth 1 -type f -name '*.ipynb' -exec cp -- {{}} "$work/submissions/student/" \\;
export PYTHONPATH="$SRC/extra:$SRC/reference${{PYTHONPATH:+:$PYTHONPATH}}"
"$PY" -m memopt_lib.grading.cli --lab {lab} --solutions "$SRC/solutions" {checks_arg} \\
    --submissions "$work/submissions" --out "$work/out" --workers 1 --timeout {timeout} \\
    --memory-mb {memory_mb} --quiet
if [ -s "$work/out/results/student.json" ]; then
  cp "$work/out/results/student.json" "$ROOT/results/results.json"
else
  echo '{{"score": 0, "output": "The autograder could not grade this submission; please contact the course staff."}}' \\
    > "$ROOT/results/results.json"
fi
rm -rf "$work"
"""


def _module_file(name: str) -> tuple[str, Path]:
    """``(arcname, file)`` of a dotted module. Its packages become namespace packages in the zip (no
    ``__init__.py``), so ``extra/`` and ``reference/`` can both hold parts of the same package."""
    module = importlib.import_module(name)
    path = Path(module.__file__)
    return "/".join(name.split(".")[:-1] + [path.name]), path


def build_autograder(lab: str, out: Path, *, solutions: Path | None = None, checks_module: str | None = None,
                     timeout_s: float = 600.0, memory_mb: int = 6144) -> Path:
    spec = Lab.load(lab, solutions, checks_module)
    external = not spec.checks_module.startswith("memopt_lib.")
    checks_arg = f"--checks-module {shlex.quote(spec.checks_module)}" if checks_module else ""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        def add_text(arc: str, text: str, mode: int = 0o644) -> None:
            info = zipfile.ZipInfo(arc)
            info.external_attr = (0o100000 | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, text)

        add_text("setup.sh", SETUP_SH.format(solution=spec.solution.name, checks_module=spec.checks_module), 0o755)
        add_text("constraints.txt", constraints())
        add_text("run_autograder", RUN_AUTOGRADER.format(lab=spec.lab, checks_arg=checks_arg, timeout=timeout_s,
                                                          memory_mb=memory_mb), 0o755)
        z.write(REPO_ROOT / "pyproject.toml", "memopt/pyproject.toml")
        readme = REPO_ROOT / "README.md"
        add_text("memopt/README.md", readme.read_text(encoding="utf-8") if readme.exists() else "memopt\n")
        for f in sorted((REPO_ROOT / "memopt_lib").rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc":
                z.write(f, "memopt/" + f.relative_to(REPO_ROOT).as_posix())
        z.write(spec.solution, f"solutions/{spec.solution.name}")
        add_text("extra/README", "check modules that live outside memopt_lib\n")
        add_text("reference/README", "reference verifiers (grader process only)\n")
        if external:
            arc, f = _module_file(spec.checks_module)
            z.write(f, f"extra/{arc}")
        if spec.reference is not None:
            arc, f = _module_file(spec.reference.__name__)
            z.write(f, f"reference/{arc}")
    return out
