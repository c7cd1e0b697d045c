"""Child side of the sandbox: confine this process before any student code is read.

Runs first thing in the grading child (stdlib only), in this order:

1. **Mounts** (only inside the private mount namespace that ``unshare --mount`` gave us,
   so nothing here is visible to the rest of the machine): every path the grader must
   hide (instructor solutions, reference modules, other students' submissions, the output
   folder) is covered by an empty, mode-000 tmpfs (a file by ``/dev/null``); ``/tmp``,
   ``/var/tmp`` and ``/dev/shm`` become fresh size-limited tmpfs (paths the grader must
   keep, such as the model cache, are bind-mounted back read-only); a closed folder holding
   the interpreter (``/root`` with a pyenv Python) is replaced by an empty one with only the
   interpreter bound back (:func:`expose`); the scratch folder
   ``/tmp/work`` lives on that tmpfs and vanishes with the namespace.
2. **rlimits**: CPU seconds, data segment (heap) bytes, processes/threads, file size,
   no core dumps.
3. **Privileges**: supplementary groups dropped, gid/uid set to the sandbox user (this is
   what makes ``RLIMIT_NPROC`` bite: the kernel does not enforce it for root), and
   ``PR_SET_NO_NEW_PRIVS`` so no setuid binary can give root back.
"""
from __future__ import annotations

import ctypes
import os
import resource

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 4, 38
WORKDIR = "/tmp/work"

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    rc = _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                     data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _hide(path: str) -> None:
    if os.path.isdir(path):
        _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "size=4k,mode=000")
    elif os.path.exists(path):
        _mount("/dev/null", path, None, MS_BIND)


def _fresh_tmpfs(path: str, size_mb: int, keep: list[str]) -> None:
    if not os.path.isdir(path):
        return
    keep_here = [k for k in _open_dirs(keep) if k.startswith(path.rstrip("/") + "/")]
    fds = [(k, os.open(k, os.O_PATH | os.O_DIRECTORY)) for k in keep_here]
    _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_mb}m,mode=1777")
    for k, fd in fds:  # the grader's read-only inputs under /tmp (e.g. MEMOPT_CACHE)
        os.makedirs(k, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", k, None, MS_BIND)
        _mount("none", k, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(fd)


def _open_dirs(paths: list[str]) -> list[str]:
    """Real paths of the folders others may list and enter (a closed one, e.g. a 700 cwd, is left out),
    shallow first, so that a deeper bind mount lands on top of a shallower one."""
    out = set()
    for p in paths:
        try:
            if os.path.isdir(p) and os.stat(p).st_mode & 0o005 == 0o005:
                out.add(os.path.realpath(p))
        except OSError:
            pass
    return sorted(out, key=lambda q: (q.count("/"), q))


def _closed_ancestor(path: str) -> str | None:
    """The highest folder above ``path`` that others may not enter (e.g. ``/root``, mode 700)."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        anc = "/" + "/".join(parts[:i])
        try:
            if not os.stat(anc).st_mode & 0o001:
                return anc
        except OSError:
            return None
    return None


def expose(paths: list[str]) -> None:
    """Make ``paths`` (the interpreter, site-packages, the course code) reachable for the sandbox uid.

    A path below a closed folder (a venv whose base Python lives in ``/root``) is reached by
    covering the closed folder with an empty tmpfs and bind-mounting the path back, read-only,
    at the same place: the sandbox sees the interpreter and nothing else of that folder.
    """
    veils: dict[str, list[str]] = {}
    for p in _open_dirs(paths):
        anc = _closed_ancestor(p)
        if anc is not None:
            veils.setdefault(anc, []).append(p)
    for anc, inner in veils.items():
        fds = [(p, os.open(p, os.O_PATH | os.O_DIRECTORY)) for p in inner]
        _mount("tmpfs", anc, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
        for p, fd in fds:
            os.makedirs(p, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
            _mount("none", p, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
            os.close(fd)


def apply_mounts(hide: list[str], keep: list[str], tmpfs_mb: int, visible: list[str] = ()) -> None:
    _mount("none", "/", None, MS_REC | MS_PRIVATE)  # our mounts never propagate to the host
    expose(list(visible))
    for path in ("/tmp", "/var/tmp", "/dev/shm"):  # code the child imports may live under /tmp: bind it back
        _fresh_tmpfs(path, tmpfs_mb, list(keep) + list(visible))
    for path in hide:  # last, so that nothing bound back above can uncover a secret
        _hide(path)


def apply_rlimits(limits: dict) -> None:
    mb = 1024 * 1024
    pairs = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, int(limits["cpu_s"])),
             (resource.RLIMIT_DATA, int(limits["memory_mb"]) * mb),
             (resource.RLIMIT_FSIZE, int(limits["fsize_mb"]) * mb)]
    if limits.get("nproc"):  # counts every process of the uid: only meaningful for a uid of our own
        pairs.append((resource.RLIMIT_NPROC, int(limits["nproc"])))
    for which, value in pairs:
        hard = value + 5 if which == resource.RLIMIT_CPU else value  # SIGXCPU first, SIGKILL 5 s later
        resource.setrlimit(which, (value, hard))


def drop_privileges(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise RuntimeError("could not drop privileges")


def confine(cfg: dict) -> str:
    """Apply the sandbox described by ``cfg`` (see :func:`memopt_lib.grading.sandbox.child_config`).

    Returns the working directory the student code runs in.
    """
    workdir = cfg.get("workdir") or WORKDIR
    if cfg.get("mounts"):
        apply_mounts(cfg.get("hide", []), cfg.get("keep", []), int(cfg["limits"]["tmpfs_mb"]), cfg.get("expose", []))
        os.makedirs(workdir, exist_ok=True)
    uid = cfg.get("uid")
    if uid is not None and os.path.isdir(workdir):
        os.chown(workdir, uid, cfg["gid"])
        os.chmod(workdir, 0o700)
    apply_rlimits(cfg["limits"])
    if uid is not None:
        drop_privileges(uid, cfg["gid"])
        # setuid clears "dumpable", which makes /proc/self root-owned; checks need /proc/self/clear_refs
        _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    os.chdir(workdir)
    return workdir
