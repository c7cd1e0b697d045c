"""The grading child: confine itself, build a namespace, then collect evidence when the grader asks.

Started by :mod:`memopt_lib.grading.sandbox` as ``python -I runner.py`` (inside ``unshare``
namespaces and the grader's memory cgroup when the grader is root). The job arrives as one
JSON document on stdin (then replaced by ``/dev/null``). The child *decides nothing*:

1. read the job and :func:`~.confine.confine` this process (allow-list root, rlimits, uid);
2. import torch and the check module; in ``student`` mode photograph the instruments
   (:class:`~.guard.Guard`, defence in depth only), then execute the rebuilt graded cells with
   ``exec`` (no IPython); in ``reference`` mode build the lab's reference namespace
   (``Registry.reference``, the library's own implementations -- no student code at all);
3. say ``ready``, then wait for commands on the command pipe. ``{"run": name, "seed": s}``: run
   that check's *collect* with a context seeded ``s`` (the grader draws the seed per batch and
   sends it only now, so nothing can be computed ahead) and send back its plain-data evidence
   (plus the in-process tracker's breakdown, explanation only), or how the student's code
   raised. ``{"exit": true}``: stop.

The grader measures memory from outside while a collect runs and runs every judge itself;
a message this process sends can only be data to compare with the reference, never a verdict.
"""
from __future__ import annotations

import json
import os
import sys
import time

MAX_MESSAGE_CHARS = 4000


class Channel:
    """One JSON line per message on the result pipe (never pickle)."""

    def __init__(self, fd: int, token: str):
        self._fd, self._token = fd, token

    def send(self, **msg) -> None:
        msg["token"] = self._token
        data = (json.dumps(msg, default=str, allow_nan=False) + "\n").encode()
        try:
            os.write(self._fd, data)
        except OSError:
            pass


def read_command(fd: int) -> dict | None:
    """The next JSON line on the command pipe (None at EOF)."""
    buf = b""
    while not buf.endswith(b"\n"):
        try:
            chunk = os.read(fd, 1)
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk
    try:
        cmd = json.loads(buf)
    except ValueError:
        return None
    return cmd if isinstance(cmd, dict) else None


def safe_str(obj, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``str(obj)`` that survives a hostile ``__str__`` (student exception classes)."""
    try:
        text = str(obj)
    except BaseException:  # noqa: BLE001 - anything the student's __str__ does
        text = f"<unprintable {type(obj).__name__}>"
    return text[:limit] if isinstance(text, str) else "<not a string>"


def classify(err: BaseException) -> tuple[str, str]:
    """Status and message for an exception raised by student code (or a collect calling it)."""
    name = type(err).__name__
    text = safe_str(err)
    if isinstance(err, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower():
        return "oom", f"out of memory: {name}: {text.splitlines()[0] if text else ''}"
    if isinstance(err, SystemExit):
        return "error", f"the code called sys.exit({safe_str(err.code, 100)}); graded code must not exit"
    if isinstance(err, NotImplementedError):
        return "failed", "not implemented yet: replace `raise NotImplementedError()` with your code"
    if isinstance(err, AssertionError):
        return "failed", text or "assertion failed"
    return "error", f"{name}: {text}"


def _guard(ctx, checks_mod, channel_cls):
    import builtins
    import gc
    import importlib
    import weakref

    import torch

    import memopt_lib.checks.base as base
    import memopt_lib.profiler as profiler
    from memopt_lib.grading.guard import Guard
    mods = [importlib.import_module(n) for n in ("torch", "torch.cuda", "torch.cuda.memory", "torch.autograd",
                                                 "torch.autograd.graph", "torch.overrides",
                                                 "torch.utils._python_dispatch", "torch.optim.optimizer")]
    mods += [profiler, base, checks_mod, builtins, gc, weakref, os, sys, json, time, sys.modules[__name__]]
    mods += [sys.modules[n] for n in list(sys.modules) if n.startswith("memopt_lib.profiler.")]
    classes = [torch.Tensor, torch._C.TensorBase, torch.UntypedStorage, torch._C.StorageBase, torch.nn.Module,
               torch.optim.Optimizer, type(ctx), profiler.MemoryTracker, profiler.MemoryTracker.__mro__[1], Guard,
               channel_cls, torch.autograd.graph.saved_tensors_hooks]
    return Guard(mods, classes)


def main() -> None:
    job = json.loads(sys.stdin.buffer.read())
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.path[:] = [p for p in job["sys_path"] if p] + [p for p in sys.path if p not in job["sys_path"]]
    from memopt_lib.grading.confine import confine

    channel = Channel(job["result_fd"], job.pop("token"))
    cmd_fd = int(job["command_fd"])
    student = job["mode"] == "student"
    try:
        confine(job["sandbox"])
        env_ok = os.getuid() == job["sandbox"].get("uid", os.getuid())
        import builtins
        import importlib

        import torch
        torch.set_num_threads(int(job["threads"]))
        from memopt_lib.checks.base import CheckContext, collect_evidence
        from memopt_lib.profiles import pick_profile
        checks_mod = importlib.import_module(job["checks_module"])
        checks = {c.name: c for c in checks_mod.CHECKS.checks}
        profile = pick_profile()
        base_ctx = CheckContext(profile.device, profile, seed=0)
        guard = _guard(base_ctx, checks_mod, Channel) if student else None
        verify_code = type(guard).verify.__code__ if guard else None
        ns = {"__name__": "__submission__", "__builtins__": builtins}
        if not student:
            ns.update(checks_mod.CHECKS.reference_namespace())
    except BaseException as err:  # noqa: BLE001 - report and stop; nothing of the student's ran yet
        channel.send(event="setup_error", message=f"{type(err).__name__}: {safe_str(err)}")
        os._exit(3)

    def tampering() -> list[str]:
        if guard is None:
            return []
        if type(guard).verify.__code__ is not verify_code:
            return ["the grader's guard was modified"]
        try:
            return guard.verify()
        except BaseException as err:  # noqa: BLE001 - e.g. a builtin it relies on was replaced
            return [f"the grader's guard could not run ({type(err).__name__}): something it relies on was replaced"]

    if student:
        guard.arm()
        for cell in job["cells"]:
            t0 = time.perf_counter()
            try:
                exec(compile(cell["source"], f"<cell {cell['id']}>", "exec"), ns)  # noqa: S102 - sandboxed
                channel.send(event="cell", id=cell["id"], status="ok", duration_s=time.perf_counter() - t0)
            except BaseException as err:  # noqa: BLE001 - SystemExit and KeyboardInterrupt are just errors here
                status, msg = classify(err)
                channel.send(event="cell", id=cell["id"], status=status, message=msg)
        problems = tampering()
        if problems:
            channel.send(event="tampering", problems=problems[:20])
            os._exit(0)
    channel.send(event="ready", uid=os.getuid(), confined=env_ok, device=str(base_ctx.device))
    while True:
        cmd = read_command(cmd_fd)
        if cmd is None or cmd.get("exit"):
            break
        check = checks.get(str(cmd.get("run")))
        if check is None:
            break
        missing = [n for n in check.needs if n not in ns]
        if missing:
            channel.send(event="missing", check=check.name, names=missing)
            continue
        ctx = CheckContext(profile.device, profile, seed=int(cmd["seed"]))
        try:
            ev = collect_evidence(check, ns, ctx)
            reply = {"event": "evidence", "check": check.name, "data": ev.data, "duration_s": ev.duration_s}
            if ev.memory is not None:
                reply["tracker"] = ev.memory.to_dict()
        except BaseException as err:  # noqa: BLE001 - SystemExit etc. raised inside the student's function
            status, message = classify(err)
            reply = {"event": "raised", "check": check.name, "status": status, "message": message}
        problems = tampering()
        if problems:
            channel.send(event="tampering", problems=problems[:20], check=check.name)
            os._exit(0)
        channel.send(**reply)
    channel.send(event="done")
    os._exit(0)


if __name__ == "__main__":
    main()
