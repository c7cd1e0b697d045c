"""`make lab` serves JupyterLab: start it on a free port, expect HTTP 200 at /lab, stop it."""
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_lab_serves_jupyterlab():
    if not (ROOT / ".venv" / ".memopt-installed").exists():
        pytest.skip("run `make test` or `make lab` once first: this test does not install")
    port = free_port()
    args = "--no-browser --ServerApp.token= --ServerApp.password= --ServerApp.ip=127.0.0.1"
    proc = subprocess.Popen(["make", "-s", "lab", f"PORT={port}", f"JUPYTER_ARGS={args}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, status = time.time() + 120, None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/lab", timeout=5) as resp:
                    status = resp.status
                    body = resp.read(200_000).decode("utf-8", "replace")
                break
            except OSError:
                time.sleep(1)
        assert status == 200, (proc.stdout.read1(20_000) if proc.poll() is not None else b"").decode()
        assert "JupyterLab" in body or "jupyter" in body.lower()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _make(*args, cwd=ROOT, timeout=300):
    return subprocess.run(["make", "--no-print-directory", "-C", str(cwd), *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_venv_recovers_from_a_failed_first_attempt(tmp_path):
    """The issue's trap: no python3-venv, so `python3 -m venv` leaves .venv/bin/python without pip."""
    import sys
    real = sys.executable
    venv = tmp_path / ".venv"
    fake = tmp_path / "python3-without-venv"
    # what Debian's python3 does without python3-venv: the venv's python is made, ensurepip fails
    fake.write_text(f'#!/bin/sh\n"{real}" -m venv --without-pip "$3"\n'
                    'echo "The virtual environment was not created successfully because ensurepip is not '
                    'available." >&2\nexit 1\n')
    fake.chmod(0o755)

    first = _make("venv", f"VENV={venv}", f"PYTHON={fake}")
    assert first.returncode != 0
    assert "sudo apt install python3-venv" in first.stdout and "run the same make command again" in first.stdout
    assert not venv.exists(), "a half-made .venv must not be left behind"

    # an older Makefile left exactly that half-made venv; the next run (python3-venv installed) rebuilds it
    subprocess.run([real, "-m", "venv", "--without-pip", str(venv)], check=True)
    assert subprocess.run([str(venv / "bin" / "python"), "-c", "import pip"], capture_output=True).returncode != 0
    second = _make("venv", f"VENV={venv}", f"PYTHON={real}")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "incomplete" in second.stdout and "rebuilding" in second.stdout
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--version"], capture_output=True, text=True)
    assert pip.returncode == 0 and str(venv) in pip.stdout

    third = _make("venv", f"VENV={venv}", f"PYTHON={real}")  # a good venv is kept as it is
    assert third.returncode == 0 and "rebuilding" not in third.stdout and "creating" not in third.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_clean_removes_the_venv_and_build_files_only(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    for d in (".venv/bin", "build/lib", "memopt.egg-info", "pkg/__pycache__", ".pytest_cache"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "pkg" / "code.py").write_text("x = 1\n")
    res = _make("clean", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert left == ["Makefile", "pkg", "pkg/code.py"]


def test_setup_installs_one_kernel_inside_the_venv_and_shows_pip_progress():
    text = (ROOT / "Makefile").read_text()
    recipe = text.split("$(STAMP): pyproject.toml", 1)[1].split("\n\n", 1)[0]
    assert "--user" not in recipe and recipe.count("ipykernel install") == 1 and "--sys-prefix" in recipe
    torch_line = next(line for line in recipe.splitlines() if '"$(TORCH)"' in line)
    assert "--quiet" not in torch_line and "-q " not in torch_line
    assert re.search(r"^clean:", text, re.M)
