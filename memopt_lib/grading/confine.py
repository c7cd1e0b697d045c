"""Child side of the sandbox: confine this process before any student code is read.

Runs first thing in the grading child (stdlib only), in this order:

1. **An allow-listed root** (only inside the private mount namespace that ``unshare --mount``
   gave us, so nothing here is visible to the rest of the machine): a fresh tmpfs becomes the
   child's ``/`` (:func:`build_root`), and only what the grader allowed is bind-mounted into
   it, read-only, at its own path: the Python prefix(es) and site-packages folders, the kit's
   *package* folder (``memopt_lib/`` -- for an editable install not the checkout around it: no
   ``.git``, ``tests/``, ``solutions/``), the model cache copy, the system libraries
   (``/usr/lib*``, ``/lib*``), the loader cache, ``/sys/devices/system/cpu`` (torch reads the CPU
   topology), a few ``/dev`` nodes, and ``/proc`` of the child's own PID namespace. ``/tmp``
   (with the scratch folder ``/tmp/work``) and ``/dev/shm`` are fresh size-limited tmpfs.
   Everything else of the machine -- other checkouts, home folders, solutions wherever they
   are copied, other submissions, the output folder -- does not exist in there. Paths in
   ``hide`` that fall inside an allowed folder are covered by empty mounts as well.
2. **rlimits**: CPU seconds, data segment (heap) bytes, processes/threads, file size,
   no core dumps.
3. **Loopback**: ``lo`` brought up in the child's own network namespace (no other interface
   exists there), so the ranks of a multi-process check can meet on 127.0.0.1.
4. **Privileges**: supplementary groups dropped, gid/uid set to the sandbox user (this is
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


DEV_NODES = ("null", "zero", "full", "random", "urandom")
# system libraries only (not /usr as a whole: /usr/local, /usr/src or /usr/share may hold anything, a
# course checkout included); a Python whose prefix is /usr gets /usr through the prefix it needs
SYSTEM = ("/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32", "/lib", "/lib64", "/lib32", "/libx32",
          "/sys/devices/system/cpu")
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/localtime")
ROOT_MOUNT = "/tmp"  # where the new root is assembled (covered: the host /tmp is not visible afterwards)


def _bind_ro(fd: int, target: str, is_dir: bool) -> None:
    if is_dir:
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        if not os.path.exists(target):
            open(target, "w").close()
    _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
    _mount("none", target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def build_root(allow: list[str], hide: list[str], tmpfs_mb: int, uid: int | None) -> str:
    """Assemble the allow-listed root described in the module docstring and ``chroot`` into it."""
    _mount("none", "/", None, MS_REC | MS_PRIVATE)  # our mounts never propagate to the host
    wanted = [p for p in dict.fromkeys(list(SYSTEM) + list(SYSTEM_FILES) + list(allow)) if os.path.lexists(p)]
    links, sources = {}, {}
    for p in wanted:
        real = os.path.realpath(p)
        if real != p.rstrip("/"):
            links[p.rstrip("/")] = real
        if os.path.exists(real) and real != "/":
            sources[real] = os.open(real, os.O_PATH | (os.O_DIRECTORY if os.path.isdir(real) else 0))
    devs = {d: os.open(f"/dev/{d}", os.O_PATH) for d in DEV_NODES if os.path.exists(f"/dev/{d}")}
    proc = os.open("/proc", os.O_PATH | os.O_DIRECTORY)
    new = ROOT_MOUNT
    _mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=8m,mode=755")
    for path in ("/tmp", "/dev/shm"):  # first: allowed folders under /tmp (a kit, the model cache) bind on top
        os.makedirs(new + path, exist_ok=True)
        _mount("tmpfs", new + path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={int(tmpfs_mb)}m,mode=1777")
    for real in sorted(sources, key=lambda q: (q.count("/"), q)):  # shallow first: deeper binds land on top
        _bind_ro(sources[real], new + real, os.path.isdir(f"/proc/self/fd/{sources[real]}"))
    for link, real in links.items():
        dst = new + link
        if not os.path.lexists(dst):
            os.makedirs(os.path.dirname(dst), mode=0o755, exist_ok=True)
            os.symlink(real, dst)
    os.makedirs(new + "/proc", exist_ok=True)
    _mount(f"/proc/self/fd/{proc}", new + "/proc", None, MS_BIND | MS_REC)
    os.makedirs(new + "/dev", mode=0o755, exist_ok=True)
    for d, fd in devs.items():
        open(new + f"/dev/{d}", "w").close()
        _mount(f"/proc/self/fd/{fd}", new + f"/dev/{d}", None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, new + f"/dev/{name}")
    os.makedirs(new + "/var", mode=0o755, exist_ok=True)
    os.symlink("/tmp", new + "/var/tmp")
    os.makedirs(new + "/etc", mode=0o755, exist_ok=True)
    user = f"sandbox:x:{uid}:{uid}:memopt sandbox:/tmp/work:/bin/false\n" if uid is not None else ""
    with open(new + "/etc/passwd", "w") as f:
        f.write("root:x:0:0:root:/root:/bin/false\n" + user)
    with open(new + "/etc/group", "w") as f:
        f.write("root:x:0:\n" + (f"sandbox:x:{uid}:\n" if uid is not None else ""))
    for p in hide:  # a secret inside an allowed folder (e.g. solutions copied into site-packages)
        _hide(new + os.path.realpath(p)) if os.path.lexists(new + os.path.realpath(p)) else None
    for fd in list(sources.values()) + list(devs.values()) + [proc]:
        os.close(fd)  # an O_PATH fd to an outside folder would be a way out of the new root
    _mount("none", new, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=8m,mode=755")
    os.chroot(new)
    os.chdir("/")
    return "/"


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


SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def loopback_up() -> bool:
    """Bring up ``lo`` in this network namespace (``unshare --net`` leaves it down).

    A fresh network namespace has no interface but the loopback, so this opens no network: it only
    lets processes of the same submission talk to each other over 127.0.0.1 (lab 10's ranks meet
    through gloo, which needs it). Needs CAP_NET_ADMIN in the namespace: call it before
    :func:`drop_privileges`. Returns whether ``lo`` is up.
    """
    import fcntl
    import socket
    import struct
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, ifr))[1]
        if not flags & IFF_UP:
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
            flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, ifr))[1]
        return bool(flags & IFF_UP)


def confine(cfg: dict) -> str:
    """Apply the sandbox described by ``cfg`` (see :func:`memopt_lib.grading.sandbox.child_config`).

    Returns the working directory the student code runs in.
    """
    workdir = cfg.get("workdir") or WORKDIR
    if cfg.get("mounts"):
        build_root(cfg.get("allow", []), cfg.get("hide", []), int(cfg["limits"]["tmpfs_mb"]), cfg.get("uid"))
        os.makedirs(workdir, exist_ok=True)
    uid = cfg.get("uid")
    if uid is not None and os.path.isdir(workdir):
        os.chown(workdir, uid, cfg["gid"])
        os.chmod(workdir, 0o700)
    if cfg.get("mounts"):  # inside the namespaces (as root): the submission's own loopback, nothing else
        try:
            loopback_up()
        except OSError:
            pass  # no CAP_NET_ADMIN: multi-process checks (lab 10) report that their ranks could not meet
    apply_rlimits(cfg["limits"])
    if uid is not None:
        drop_privileges(uid, cfg["gid"])
        # setuid clears "dumpable", which makes /proc/self root-owned; libraries read /proc/self/* (maps, status)
        _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    os.chdir(workdir)
    return workdir
