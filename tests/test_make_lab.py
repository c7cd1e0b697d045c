"""`make lab` serves JupyterLab: start it on a free port, expect HTTP 200 at /lab, stop it."""
import os
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
