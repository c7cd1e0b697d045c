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
    assert {"setup.sh", "run_autograder", "constraints.txt", "solutions/90_fixture.ipynb", "extra/memopt_fixture_lab90.py",
            "reference/memopt_fixture_lab90_ref.py", "memopt/pyproject.toml",
            "memopt/memopt_lib/grading/runner.py"} <= names
    pins = (root / "source" / "constraints.txt").read_text()
    from importlib.metadata import version
    assert f"torch=={version('torch').split('+')[0]}\n" in pins and f"transformers=={version('transformers')}" in pins
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


# ---------------------------------------------------------------- setup.sh's choice of Python
def _fake_bin(tmp_path, pythons: dict[str, str], apt_install_fails_first=False):
    """A PATH holding only fake interpreters (each prints "MAJOR MINOR") and a recording apt-get."""
    import textwrap
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "apt.log"

    def script(name, body):
        (bin_ / name).write_text("#!/bin/sh\n" + textwrap.dedent(body))
        (bin_ / name).chmod(0o755)

    for name, ver in pythons.items():
        script(name, f'echo "{ver}"\n')
    fail = "1" if apt_install_fails_first else "0"
    script("apt-get", f"""\
        echo "apt-get $*" >> "{log}"
        case "$*" in *"install"*"python3.11"*)
          if [ "{fail}" = 1 ] && [ ! -e "{tmp_path}/ppa" ]; then exit 100; fi
          printf '#!/bin/sh\\necho "3 11"\\n' > "{bin_}/python3.11"; /bin/chmod 755 "{bin_}/python3.11";;
        esac
        """)
    script("add-apt-repository", f'echo "add-apt-repository $*" >> "{log}"; : > "{tmp_path}/ppa"\n')
    return bin_, log


def _pick(tmp_path, bin_):
    from memopt_lib.grading.gradescope import SETUP_SH
    setup = tmp_path / "setup.sh"
    setup.write_text(SETUP_SH.format(solution="90_fixture.ipynb", checks_module="x"))
    return subprocess.run(["/bin/bash", str(setup), "--pick-python"], env={"PATH": str(bin_)}, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=60)


def test_setup_installs_python311_on_an_image_whose_python3_is_310(tmp_path):
    bin_, log = _fake_bin(tmp_path, {"python3": "3 10", "python3.10": "3 10"})
    res = _pick(tmp_path, bin_)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(bin_ / "python3.11")
    assert "install -y -qq python3.11 python3.11-venv" in log.read_text()
    assert "no Python >= 3.11" in res.stderr


def test_setup_uses_the_image_python_when_it_is_new_enough(tmp_path):
    bin_, log = _fake_bin(tmp_path, {"python3": "3 12"})
    res = _pick(tmp_path, bin_)
    assert res.returncode == 0 and res.stdout.strip() == str(bin_ / "python3")
    assert not log.exists(), "nothing is installed when the image's python3 will do"


def test_setup_falls_back_to_deadsnakes_and_fails_clearly_without_any_python(tmp_path):
    bin_, log = _fake_bin(tmp_path, {"python3": "3 10"}, apt_install_fails_first=True)
    res = _pick(tmp_path, bin_)
    assert res.returncode == 0 and res.stdout.strip() == str(bin_ / "python3.11")
    assert "add-apt-repository -y ppa:deadsnakes/ppa" in log.read_text()

    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "bin").mkdir()
    res = _pick(empty, empty / "bin")  # no python, and apt-get is missing too
    assert res.returncode != 0
