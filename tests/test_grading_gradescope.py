"""The Gradescope package: its contents, and run_autograder grading one submission like Gradescope would."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "grading_fixtures"))

import fixture_lab as fx  # noqa: E402

from memopt_lib.grading import cli  # noqa: E402


def test_autograder_zip_grades_a_submission(tmp_path):
    sol = fx.write_solution(tmp_path / "solutions")
    zpath = tmp_path / "autograder.zip"
    assert cli.main(["gradescope", "--lab", "90", "--solutions", str(sol.parent), "--checks-module",
                     "memopt_fixture_lab90", "--out", str(zpath), "--timeout", "120", "--memory-mb", "3000"]) == 0
    root = tmp_path / "autograder"
    with zipfile.ZipFile(zpath) as z:
        names = set(z.namelist())
        modes = {i.filename: i.external_attr >> 16 for i in z.infolist()}
        z.extractall(root / "source")
    assert {"setup.sh", "run_autograder", "solutions/90_fixture.ipynb", "extra/memopt_fixture_lab90.py",
            "memopt/pyproject.toml",
            "memopt/memopt_lib/grading/runner.py"} <= names
    assert not any(n.startswith("memopt/solutions") or n.startswith("memopt/tests") for n in names)
    assert modes["run_autograder"] & stat.S_IXUSR and modes["setup.sh"] & stat.S_IXUSR
    for name in ("run_autograder", "setup.sh"):
        subprocess.run(["bash", "-n", str(root / "source" / name)], check=True)

    # setup.sh's warm-up: the checks on the instructor's solution, unsandboxed, must all pass
    setup = (root / "source" / "setup.sh").read_text()
    warm = setup.split("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    src = root / "source"
    subprocess.run([sys.executable, "-c", warm], cwd=str(src), check=True, timeout=300,
                   env=dict(os.environ, PYTHONPATH=f"{src / 'extra'}:{src / 'reference'}:{src / 'memopt'}"))

    (root / "submission").mkdir()
    fx.write_submission(root, "submission", fx.student_notebook(fx.SOLUTION_BODIES))
    (root / "submission" / "90_link.ipynb").symlink_to(sol)  # must not be picked up
    env = dict(os.environ, AUTOGRADER_ROOT=str(root), MEMOPT_PYTHON=sys.executable, MEMOPT_CACHE=str(tmp_path / "c"),
               MEMOPT_GRADE_UID_BASE="64400",
               PYTHONPATH=str(root / "source" / "memopt"))
    subprocess.run(["bash", str(root / "source" / "run_autograder")], env=env, check=True, timeout=300,
                   cwd=str(tmp_path))
    res = json.loads((root / "results" / "results.json").read_text())
    assert res["score"] == 5.0, res
    assert [t["status"] for t in res["tests"]] == ["passed", "passed"]
