"""The grader's handle on one running child: start it sandboxed, send it commands, read its messages, bounded."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from queue import Queue

from .sandbox import (MAX_RESULT_BYTES, RUNNER, TAIL_BYTES, UNSHARE, Limits, Outcome, _drain, _kill_uid, _killpg, read_chunks,
                      child_config, child_env, child_sys_path, isolation, parse_messages)


class Child:
    """One sandboxed child (see :mod:`.runner`): start it, send it commands, read its messages, bounded.

    Messages are token-bearing JSON lines on the result pipe, read by a thread into a queue;
    :meth:`next` returns the next one, or None when the child died, closed the pipe or ran past
    the wall-clock ``deadline`` (then everything it started is killed). ``meter`` (a
    :class:`~.meter.Meter`) runs the child in a memory cgroup and measures it from outside.
    """

    def __init__(self, job: dict, *, uid: int | None, limits: Limits, hide: list[str], keep: list[str],
                 threads: int = 1, cache: str | None = None, meter=None):
        self.iso = isolation()
        self.token = job["token"]
        self.limits, self.meter = limits, meter
        self.scratch = None if self.iso.namespaces else tempfile.mkdtemp(prefix="memopt-grade-")
        self.sandbox = child_config(uid, limits, hide, keep, self.scratch)
        if self.scratch and self.iso.root and "uid" in self.sandbox:
            os.chown(self.scratch, self.sandbox["uid"], self.sandbox["gid"])
        home = "/tmp/work" if self.iso.namespaces else self.scratch
        r_fd, w_fd = os.pipe()
        o_fd, ow_fd = os.pipe()
        c_fd, cw_fd = os.pipe()
        sys_path = child_sys_path(self.sandbox["allow"]) if self.iso.namespaces else [p for p in sys.path if p]
        job = dict(job, result_fd=w_fd, command_fd=c_fd, sandbox=self.sandbox, threads=threads, sys_path=sys_path)
        cmd = (UNSHARE + ["--"] if self.iso.namespaces else []) + [sys.executable, "-I", str(RUNNER)]
        if meter is not None:
            cmd = meter.wrap(cmd)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + limits.timeout_s
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=ow_fd, stderr=ow_fd, pass_fds=(w_fd, c_fd),
                                     env=child_env(threads, home, cache), cwd="/", start_new_session=True,
                                     close_fds=True)
        for fd in (w_fd, ow_fd, c_fd):
            os.close(fd)
        self._cmd_fd = cw_fd
        if meter is not None:
            meter.attach(self.proc.pid)
        self.queue: Queue = Queue()
        self.rejected = 0
        self.tail: deque = deque()
        self.timed_out = False
        self.status = self.rusage = None
        self._readers = [threading.Thread(target=self._read_results, args=(r_fd,), daemon=True),
                         threading.Thread(target=_drain, args=(o_fd, self.tail, TAIL_BYTES), daemon=True)]
        for t in self._readers:
            t.start()
        try:
            self.proc.stdin.write(json.dumps(job).encode())
            self.proc.stdin.close()
        except OSError:
            pass

    def _read_results(self, fd: int) -> None:
        total, buf = 0, b""
        for chunk in read_chunks(fd):
            total += len(chunk)
            if total > MAX_RESULT_BYTES:
                self.rejected += 1
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                msgs, bad = parse_messages([raw], self.token)
                self.rejected += bad
                for m in msgs:
                    self.queue.put(m)
        self.queue.put(None)  # EOF

    def send(self, **cmd) -> None:
        try:
            os.write(self._cmd_fd, (json.dumps(cmd) + "\n").encode())
        except OSError:
            pass

    def _reap(self, block: bool = False) -> bool:
        if self.status is not None:
            return True
        pid, st, ru = os.wait4(self.proc.pid, 0 if block else os.WNOHANG)
        if pid:
            self.status, self.rusage = st, ru
            self.proc.returncode = os.waitstatus_to_exitcode(st)
            return True
        return False

    def next(self) -> dict | None:
        """The next message; None once the child is gone (or was killed at the deadline)."""
        from queue import Empty
        while True:
            try:
                msg = self.queue.get(timeout=0.02)
                if msg is None:
                    self.queue.put(None)  # stay at EOF
                return msg
            except Empty:
                pass
            if self._reap():
                try:  # the reader may still hold a last line
                    msg = self.queue.get(timeout=1.0)
                except Empty:
                    return None
                if msg is None:
                    self.queue.put(None)
                return msg
            if time.monotonic() > self.deadline:
                self.kill(timed_out=True)
                return None

    def kill(self, timed_out: bool = False) -> None:
        self.timed_out = self.timed_out or timed_out
        _killpg(self.proc.pid)

    def finish(self, grace_s: float = 5.0) -> Outcome:
        """Tell the child to exit, wait (bounded), kill what is left, and say what was seen."""
        self.send(exit=True)
        try:
            os.close(self._cmd_fd)
        except OSError:
            pass
        end = min(self.deadline, time.monotonic() + grace_s)
        while not self._reap() and time.monotonic() < end:
            time.sleep(0.02)
        if self.status is None:
            self.kill(timed_out=time.monotonic() >= self.deadline)
            self._reap(block=True)
        wall = time.monotonic() - self.t0
        _killpg(self.proc.pid)  # anything left in the group (without a PID namespace)
        if self.iso.root and "uid" in self.sandbox:
            _kill_uid(self.sandbox["uid"])
        for t in self._readers:
            t.join(timeout=5)
        if self.meter is not None:
            self.meter.finish()
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
        rest = []
        while not self.queue.empty():
            m = self.queue.get()
            if m is not None:
                rest.append(m)
        return Outcome(rest, self.proc.returncode, self.timed_out, wall,
                       self.rusage.ru_maxrss * 1024 if self.rusage else 0,
                       b"".join(self.tail).decode("utf-8", "replace"), self.rejected)
