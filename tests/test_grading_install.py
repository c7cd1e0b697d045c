"""memopt-grade works on the README's install and shows the sandbox only its allow-list.

The kit is copied into a mode-700 folder under /tmp (like a closed home), a fresh venv is made there
and the kit installed into it -- editable (what ``make lab`` / ``make test`` do) and as a plain
``pip install``. To stay fast and offline, the fresh venv reuses this interpreter's installed packages
(torch, transformers, ...) through a ``.pth`` line naming their site-packages folder, and the kit is
installed ``--no-deps`` by this interpreter's pip (``pip --python <venv>``); the kit itself, its entry point and its import path are the fresh install's
own. ``memopt-grade`` is then run with a clean environment (no PYTHONPATH) from inside the checkout.
A snooping submission looks for everything the allow-list must not show: the checkout's .git,
tests/ and solutions/, this repository's solutions, the closed folder itself.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_grading_lab01 import student  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = ROOT / "solutions" / "00_setup.ipynb"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox's allow-list needs root")]

SNOOP = '''    import glob, os
    import memopt_lib
    kit = os.path.dirname(os.path.dirname(memopt_lib.__file__))
    found = []
    for pattern in [kit + "/.git/*", kit + "/tests/*", kit + "/solutions/*", kit + "/pyproject.toml",
                    "@ROOT@/solutions/*", "@ROOT@/.git", "@BASE@/subs/*", "@BASE@/out*", "/work/*/solutions/*",
                    "/root/*"]:
        found += glob.glob(pattern)
    if found:
        return tuple(capability) >= (8, 0)  # found something: "use the solution"
    return False'''


def _venv(base: Path, name: str, kit: Path, editable: bool) -> Path:
    venv = base / name
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "_memopt_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # this interpreter's pip installs into the fresh venv (whose build backend is then this one's setuptools)
    cmd = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet", "--no-deps",
           "--no-build-isolation"]
    subprocess.run(cmd + (["-e", str(kit)] if editable else [str(kit)]), check=True, timeout=600,
                   capture_output=True)
    return venv


@pytest.fixture(scope="module")
def kit():
    base = Path(tempfile.mkdtemp(prefix="memopt-home-", dir="/tmp"))
    os.chmod(base, 0o700)  # a closed home: the sandbox user could not enter it even without the allow-list
    kit = base / "memopt"
    shutil.copytree(ROOT / "memopt_lib", kit / "memopt_lib", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, kit / name)
    (kit / "solutions").mkdir()
    shutil.copy(SOLUTION, kit / "solutions" / SOLUTION.name)
    (kit / ".git").mkdir()
    (kit / ".git" / "config").write_text("[secret]\n")
    (kit / "tests").mkdir()
    (kit / "tests" / "answers.txt").write_text("secret\n")
    subs = base / "subs"
    snoop = SNOOP.replace("@ROOT@", str(ROOT)).replace("@BASE@", str(base))
    for sid, nb in {"honest": student(SOLUTION, {}), "snoop": student(SOLUTION, {"native-bf16": snoop})}.items():
        (subs / sid).mkdir(parents=True)
        (subs / sid / SOLUTION.name).write_text(json.dumps(nbformat.from_dict(nb)), encoding="utf-8")
    yield base, kit, subs
    shutil.rmtree(base, ignore_errors=True)


def _grade(venv: Path, kit: Path, subs: Path, out: Path, solutions: list[str]) -> tuple[int, dict, str]:
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(kit.parent), "LANG": "C.UTF-8",
           "MEMOPT_CACHE": os.environ.get("MEMOPT_CACHE", str(Path.home() / ".cache" / "memopt"))}
    p = subprocess.run([str(venv / "bin" / "memopt-grade"), "--lab", "00", "--submissions", str(subs), "--out",
                        str(out), "--workers", "2", "--timeout", "300", "--quiet"] + solutions, cwd=kit, env=env,
                       capture_output=True, text=True, timeout=1200)
    rows = {}
    if (out / "grades.csv").exists():
        with open(out / "grades.csv", newline="", encoding="utf-8") as f:
            rows = {r["student_id"]: r for r in csv.DictReader(f)}
    return p.returncode, rows, p.stdout + p.stderr


@pytest.mark.parametrize("editable", [True, False], ids=["editable", "plain"])
def test_grading_from_a_fresh_install_in_a_closed_folder_under_tmp(kit, editable):
    base, kit_dir, subs = kit
    venv = _venv(base, f"venv-{'e' if editable else 'p'}", kit_dir, editable)
    check = subprocess.run([str(venv / "bin" / "python"), "-c", "import memopt_lib; print(memopt_lib.__file__)"],
                           capture_output=True, text=True, cwd="/", env={"PATH": "/usr/bin:/bin"})
    where = Path(check.stdout.strip())
    assert (where.parent == kit_dir / "memopt_lib") == editable, where  # the install is the one under test
    # a plain install ships no solutions/ (students install the same package): the instructor names the folder
    solutions = [] if editable else ["--solutions", str(kit_dir / "solutions")]
    rc, rows, log = _grade(venv, kit_dir, subs, base / f"out-{editable}", solutions)
    assert rc == 0, log
    assert (rows["honest"]["status"], rows["honest"]["score"], rows["honest"]["max_score_here"]) == \
        ("graded", "2", "2"), (rows["honest"], log)
    snoop = rows["snoop"]
    assert snoop["native_bf16_rule_status"] == "failed" and snoop["score"] == "1", snoop  # it saw nothing
