"""Parent side of the sandbox: start one grading child, bounded, talk to it, and collect its messages.

Per child (:class:`Child`) the grader starts ``python -I runner.py`` (see :mod:`.runner`):

* inside the grader's memory cgroup for this child (:class:`~.meter.Meter`: the child and
  everything it forks are measured from outside and cannot leave it);
* as root and where the kernel allows it, inside ``unshare --fork --pid --mount-proc --net --mount``:
  a private PID namespace (when the child's first process exits or is killed, the kernel
  kills every process the submission started, even one that called ``setsid``), an empty
  network namespace (no network, only a down loopback), and a private mount namespace in
  which :mod:`.confine` builds an allow-listed root (:func:`allow_list`: Python prefixes,
  site-packages, the kit's package folder, the model cache copy) and ``chroot``\ s into it;
* in its own session and process group, killed as a group at the wall-clock timeout;
* with rlimits on CPU time, heap, processes and file size, as an unprivileged uid of its
  own (one per worker slot, locked against other graders on the machine: :class:`UidPool`),
  so ``RLIMIT_NPROC`` counts only this submission;
* with a clean environment (no grader secrets), stdin replaced after the job is read,
  stdout/stderr kept only as a bounded tail, a pipe for JSON results and one for the grader's
  commands ("run check X with seed S").

Without root none of the uid / namespace / cgroup measures is possible: :func:`isolation` says
so and the CLI prints the warnings. The child's peak resident memory is read by the
parent from ``wait4`` -- a number the submission cannot forge.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

RUNNER = Path(__file__).with_name("runner.py")
UID_BASE = int(os.environ.get("MEMOPT_GRADE_UID_BASE", "64000"))
UID_SPAN = 4096
LOCK_DIR = Path(os.environ.get("MEMOPT_GRADE_LOCKS", "/tmp/memopt-grade-uids"))
USED_UIDS: set[int] = set()  # every sandbox uid this process has used (tests check none survives)
MAX_RESULT_BYTES = 2 * 1024 * 1024
TAIL_BYTES = 16 * 1024
UNSHARE = ["unshare", "--fork", "--pid", "--mount-proc", "--net", "--mount", "--kill-child"]


@dataclass
class Limits:
    timeout_s: float = 300.0
    memory_mb: int = 6144
    cpu_s: int | None = None  # default: timeout x cores + 10
    nproc: int = 64
    fsize_mb: int = 64
    tmpfs_mb: int = 256

    def for_child(self) -> dict:
        cpu = self.cpu_s or int(self.timeout_s * (os.cpu_count() or 1) + 10)
        return {"cpu_s": cpu, "memory_mb": self.memory_mb, "nproc": self.nproc, "fsize_mb": self.fsize_mb,
                "tmpfs_mb": self.tmpfs_mb}


@dataclass
class Isolation:
    root: bool
    namespaces: bool
    warnings: list[str] = field(default_factory=list)


@functools.lru_cache(maxsize=1)
def isolation() -> Isolation:
    """What this machine lets the grader do, with a warning for each protection that is missing."""
    root = os.geteuid() == 0
    warnings = []
    namespaces = False
    if root and shutil.which("unshare"):
        try:
            namespaces = subprocess.run(UNSHARE + ["true"], capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.SubprocessError):
            namespaces = False
    if not root:
        warnings.append("not running as root: submissions run as YOUR user, can read everything you can "
                        "(make solutions/ unreadable), reach the network, and RLIMIT_NPROC is per-user. "
                        "Run memopt-grade as root in a container (it drops privileges per submission).")
    elif not namespaces:
        warnings.append("`unshare --net --pid --mount` is not available (no CAP_SYS_ADMIN?): the network is "
                        "NOT cut off and solutions are hidden only by file permissions (chmod 700 solutions/).")
    return Isolation(root, namespaces, warnings)


@dataclass
class Outcome:
    """What the parent observed about one child run."""

    messages: list[dict]
    returncode: int | None
    timed_out: bool
    wall_s: float
    max_rss_bytes: int
    output_tail: str
    rejected: int = 0  # lines that were not valid, token-bearing JSON

    @property
    def signal(self) -> int | None:
        return -self.returncode if self.returncode is not None and self.returncode < 0 else None


def read_chunks(fd: int, size: int = 65536):
    """The bytes of pipe ``fd`` as they arrive, until EOF (or a read error); closes ``fd``."""
    with os.fdopen(fd, "rb", buffering=0) as f:
        while True:
            try:
                chunk = f.read(size)
            except OSError:
                return
            if not chunk:
                return
            yield chunk


def _drain(fd: int, sink: deque, limit: int) -> None:
    """Read ``fd`` to EOF; keep its last ``limit`` bytes (at least the last chunk) in ``sink``."""
    for chunk in read_chunks(fd):
        sink.append(chunk)
        while sum(len(c) for c in sink) > limit and len(sink) > 1:
            sink.popleft()


def _kill_uid(uid: int, patience_s: float = 10.0) -> None:
    """SIGKILL every process owned by ``uid`` (one slot's sandbox user) until none is left.

    A PID namespace is torn down asynchronously after its first process dies (a fork bomb
    takes a moment), and the slot's next submission must not inherit its processes."""
    deadline = time.monotonic() + patience_s
    while True:
        alive = 0
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    if os.stat(f"/proc/{pid}").st_uid == uid:
                        alive += 1
                        os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
        if not alive or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def _uid_busy(uid: int) -> bool:
    """A uid that is a real account or owns a running process (e.g. an older grader's sandbox)."""
    import pwd
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        pass
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid:
                return True
        except OSError:
            pass
    return False


class UidPool:
    """``n`` sandbox uids no other grader on this machine uses while we hold them.

    Two graders running at once (two courses, or a test suite beside a real batch) must not
    share a uid: each kills every process of its uids after a submission. A uid is ours
    while we hold an ``flock`` on ``LOCK_DIR/<uid>.lock``; the kernel drops it if we die.
    """

    def __init__(self, n: int):
        self.n, self.uids, self._fds = n, [], []

    def __enter__(self) -> "UidPool":
        if not isolation().root:
            self.uids = [None] * self.n
            return self
        import fcntl
        LOCK_DIR.mkdir(mode=0o755, exist_ok=True)
        for uid in range(UID_BASE, UID_BASE + UID_SPAN):
            if len(self.uids) == self.n:
                break
            fd = os.open(LOCK_DIR / f"{uid}.lock", os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            if _uid_busy(uid):
                os.close(fd)
                continue
            self._fds.append(fd)
            self.uids.append(uid)
        if len(self.uids) < self.n:
            raise RuntimeError(f"no free sandbox uid in {UID_BASE}..{UID_BASE + UID_SPAN - 1}")
        USED_UIDS.update(self.uids)
        return self

    def __exit__(self, *exc) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def kit_package_dir() -> str:
    """The folder of the ``memopt_lib`` package this grader runs (for an editable install: inside the checkout)."""
    import memopt_lib
    return str(Path(memopt_lib.__file__).resolve().parent)


def allow_list(extra: list[str] = ()) -> list[str]:
    """What the child may see (read-only): the Python prefixes, site-packages folders, the kit's package folder.

    Other ``sys.path`` entries (a checkout on ``PYTHONPATH``, the current folder) are *not* shown:
    the kit is reached through its package folder alone.
    """
    prefixes = [sys.base_prefix, sys.prefix, sys.exec_prefix, sys.base_exec_prefix]
    site = [p for p in sys.path if p and os.path.isdir(p) and os.path.basename(p.rstrip("/")) in
            ("site-packages", "dist-packages")]
    out = [p for p in prefixes + site if p and os.path.realpath(p) != "/"]
    return list(dict.fromkeys(out + [kit_package_dir()] + [p for p in extra if p]))


def child_sys_path(allow: list[str]) -> list[str]:
    """The child's ``sys.path``: the kit's parent folder first, then the grader's entries that the child can see."""
    kit_parent = str(Path(kit_package_dir()).parent)
    seen = [os.path.realpath(a) for a in allow]
    visible = [p for p in sys.path if p and any(os.path.realpath(p) == a or os.path.realpath(p).startswith(a + "/")
                                                for a in seen)]
    modules = [os.path.dirname(a) for a in seen if a.endswith(".py")]  # a check module allowed alone: its folder
    return list(dict.fromkeys([kit_parent] + modules + visible))


def child_config(uid: int | None, limits: Limits, hide: list[str], keep: list[str], workdir: str | None) -> dict:
    iso = isolation()
    cfg = {"limits": limits.for_child(), "mounts": iso.namespaces, "hide": hide, "allow": allow_list(keep),
           "workdir": None if iso.namespaces else workdir}
    if iso.root and uid is not None:
        cfg["uid"] = cfg["gid"] = uid
    else:  # the grader's own uid: RLIMIT_NPROC would count the user's other processes too
        cfg["limits"]["nproc"] = None
    return cfg


def readable_cache(src: str | None) -> str | None:
    """A copy of the model cache that the sandbox user may read, or None when there is none.

    Checkpoints are often private to their builder (``model.safetensors`` 0600 in a 0700
    folder). The copy is grader-owned, world-readable, mounted read-only into the sandbox:
    world-readable files are hard links (free), the others are copied. The sandbox cannot
    build a missing checkpoint, so warm the cache first (run the solution notebook once).
    """
    if not src or not os.path.isdir(src):
        return None
    dst = tempfile.mkdtemp(prefix="memopt-grade-cache-")
    os.chmod(dst, 0o755)
    for folder, dirs, files in os.walk(src):
        rel = os.path.relpath(folder, src)
        target = os.path.join(dst, rel) if rel != "." else dst
        os.makedirs(target, mode=0o755, exist_ok=True)
        os.chmod(target, 0o755)
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # half-built checkpoints
        for name in files:
            a, b = os.path.join(folder, name), os.path.join(target, name)
            st = os.lstat(a)
            if not os.path.isfile(a) or os.path.islink(a):
                continue
            try:
                if st.st_mode & 0o004:
                    os.link(a, b)
                    continue
            except OSError:
                pass
            shutil.copyfile(a, b)
            os.chmod(b, 0o644)
    return dst


def child_env(threads: int, home: str, cache: str | None = None) -> dict:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8",
           "MPLBACKEND": "Agg", "MPLCONFIGDIR": home, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0",
           # freed blocks of >= 128 KiB go back to the kernel at once: what the grader measures from
           # outside then follows live memory (same settings for student and reference runs)
           "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    for key in ("MEMOPT_PROFILE", "CUDA_VISIBLE_DEVICES"):
        if key in os.environ:
            env[key] = os.environ[key]
    if cache:
        env["MEMOPT_CACHE"] = cache
    return env


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def parse_messages(lines: list[bytes], token: str) -> tuple[list[dict], int]:
    """Token-bearing JSON objects, in order; everything else is counted and dropped."""
    import hmac
    out, rejected = [], 0
    for raw in lines:
        if not raw.strip():
            continue
        try:
            msg = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nesting deep enough to exhaust the parser
            rejected += 1
            continue
        if not isinstance(msg, dict) or not hmac.compare_digest(str(msg.pop("token", "")), token):
            rejected += 1
            continue
        out.append(msg)
    return out, rejected
