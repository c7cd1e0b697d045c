"""The grader's outside memory measurement (memopt_lib.grading.meter) on a real child process.

Which source is reliable: a memory cgroup's high-water mark sees a spike of any length but also
the page cache of files the child is first to read (the trap); the RssAnon+RssShmem sampler
ignores page cache but can miss a spike shorter than its interval. The grader's cgroup reading
subtracts the window's file-cache growth; these tests show both effects on one child.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from memopt_lib.grading.meter import Meter

MiB = 2**20
CHILD = r"""
import os, sys, time
def wait(tag):
    assert sys.stdin.readline().strip() == tag
path = sys.argv[1]
wait("read")
with open(path, "rb") as f:  # 64 MiB of page cache, charged to whoever reads it first: this child
    while f.read(1 << 20):
        pass
print("ok", flush=True)
wait("long")
buf = bytearray(80 << 20)  # 80 MiB of anonymous memory for 0.3 s
time.sleep(0.3)
del buf
print("ok", flush=True)
wait("short")
buf = bytearray(80 << 20)  # the same, freed at once (a few ms: bytearray zero-fills it)
del buf
print("ok", flush=True)
wait("end")
"""

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="memory cgroups need root")


@pytest.fixture
def cold_file(tmp_path):
    path = tmp_path / "cold.bin"
    with open(path, "wb") as f:
        f.write(os.urandom(64 * MiB))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # out of the page cache: the child reads it cold
    return path


def _window(meter, proc, tag):
    meter.open()
    proc.stdin.write(tag + "\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "ok"
    return meter.close()


def test_cgroup_sees_every_spike_and_not_the_page_cache(cold_file):
    meter = Meter.create()
    if meter.cgroup is None:
        pytest.skip("no memory cgroup on this machine")
    proc = subprocess.Popen(meter.wrap([sys.executable, "-c", CHILD, str(cold_file)]), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    meter.attach(proc.pid)
    try:
        time.sleep(0.5)
        read = _window(meter, proc, "read")
        long = _window(meter, proc, "long")
        short = _window(meter, proc, "short")
        proc.stdin.write("end\n")
        proc.stdin.flush()
        proc.wait(timeout=30)
    finally:
        proc.kill()
        meter.finish()
    d = read.breakdown_bytes
    # the trap: reading a cold file charges its page cache to this cgroup...
    assert d["file_cache_growth_bytes"] > 48 * MiB and d["cgroup_raw_peak_bytes"] - d["cgroup_start_bytes"] > 48 * MiB
    # ... and the grader's reading takes it out
    assert read.source == "cgroup" and read.delta_bytes < 8 * MiB, d
    for w in (long, short):  # 80 MiB of anonymous memory, long or short: the cgroup sees it every time
        assert 76 * MiB < w.delta_bytes < 90 * MiB, w
    # the sampler sees the long one (it is anonymous memory) -- whether it caught the short one is luck
    assert long.breakdown_bytes["rss_peak_bytes"] - long.breakdown_bytes["rss_start_bytes"] > 76 * MiB
    assert long.breakdown_bytes["rss_samples"] > 20


def test_without_a_cgroup_the_sampler_decides():
    meter = Meter(None)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, "/dev/null"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    meter.attach(proc.pid)
    try:
        time.sleep(0.3)
        _window(meter, proc, "read")
        long = _window(meter, proc, "long")
        proc.kill()
    finally:
        meter.finish()
    assert long.source == "rss" and long.delta_bytes > 76 * MiB
