"""The grading child: confine itself, load the instruments, run the rebuilt cells, run the checks.

Started by :mod:`memopt_lib.grading.sandbox` as ``python -I runner.py`` (inside
``unshare`` namespaces when the grader is root). The whole job description arrives
as one JSON document on stdin, which is read and then replaced by ``/dev/null``
(so ``input()`` in a submission gets EOF). Order matters:

1. read the job (including a random per-run token) and :func:`confine` this process
   (mounts, rlimits, unprivileged uid) -- nothing of the student's exists yet;
2. import torch, the profiler and the check module, pick the check list, and let
   :class:`~memopt_lib.grading.guard.Guard` photograph the instruments;
3. execute the rebuilt graded cells (instructor code + the student's solution regions)
   in a fresh namespace with :func:`exec` -- no IPython, so no magics, input
   transformers, custom exception handlers or cell tags; ``SystemExit`` is just an error;
4. for each requested check: verify the guard, run it, verify again, and send one JSON
   line to the grader over the result pipe;
5. ``os._exit`` (no ``atexit`` handlers a submission might have registered).

The grader (parent) decides the grade from these messages; it accepts only messages
that carry the token, only for checks it asked for, each once, and recomputes scores.
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


def safe_str(obj, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``str(obj)`` that survives a hostile ``__str__`` (student exception classes)."""
    try:
        text = str(obj)
    except BaseException:  # noqa: BLE001 - anything the student's __str__ does
        text = f"<unprintable {type(obj).__name__}>"
    return text[:limit] if isinstance(text, str) else "<not a string>"


def classify(err: BaseException) -> tuple[str, str]:
    """Status and message for an exception raised by student code (or a check calling it)."""
    name = type(err).__name__
    text = safe_str(err)
    if isinstance(err, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower():
        return "oom", f"out of memory: {name}: {text.splitlines()[0] if text else ''}"
    if isinstance(err, SystemExit):
        return "error", f"the code called sys.exit({safe_str(err.code, 100)}); graded code must not exit"
    return "error", f"{name}: {text}"


def clean_measurements(obj, depth: int = 0):
    """Keep only plain JSON data (numbers, strings, lists, dicts) from a check's return value."""
    if depth > 4:
        return None
    if isinstance(obj, bool) or obj is None:
        return obj
    if isinstance(obj, (int, float)):
        f = float(obj)
        return obj if f == f and abs(f) != float("inf") else None
    if isinstance(obj, str):
        return obj[:500]
    if isinstance(obj, (list, tuple)):
        return [clean_measurements(x, depth + 1) for x in list(obj)[:1000]]
    if isinstance(obj, dict):
        return {str(k)[:100]: clean_measurements(v, depth + 1) for k, v in list(obj.items())[:200]}
    return safe_str(obj, 200)


def main() -> None:
    job = json.loads(sys.stdin.buffer.read())
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.path[:] = [p for p in job["sys_path"] if p] + [p for p in sys.path if p not in job["sys_path"]]
    from memopt_lib.grading.confine import confine

    channel = Channel(job["result_fd"], job.pop("token"))
    try:
        confine(job["sandbox"])
        env_ok = os.getuid() == job["sandbox"].get("uid", os.getuid())
        import builtins
        import importlib

        import torch
        torch.set_num_threads(int(job["threads"]))
        import memopt_lib.checks.base as base
        import memopt_lib.profiler as profiler
        from memopt_lib.checks.base import CheckContext, run_check
        from memopt_lib.grading.guard import Guard
        from memopt_lib.profiles import pick_profile
        checks_mod = importlib.import_module(job["checks_module"])
        checks = {c.name: c for c in checks_mod.CHECKS.checks}
        wanted = [checks[n] for n in job["checks"]]
        profile = pick_profile()
        ctx = CheckContext(profile.device, profile, seed=int(job["seed"]))
        import gc
        import weakref

        mods = [importlib.import_module(n) for n in ("torch", "torch.cuda", "torch.cuda.memory", "torch.autograd",
                                                     "torch.autograd.graph", "torch.overrides",
                                                     "torch.utils._python_dispatch", "torch.optim.optimizer")]
        mods += [profiler, base, checks_mod, builtins,
                gc, weakref, os, sys, json, time, sys.modules[__name__]]
        mods += [sys.modules[n] for n in list(sys.modules) if n.startswith("memopt_lib.profiler.")]
        classes = [torch.Tensor, torch._C.TensorBase, torch.UntypedStorage, torch._C.StorageBase, torch.nn.Module,
                   torch.optim.Optimizer,
                   type(ctx), profiler.MemoryTracker, profiler.MemoryTracker.__mro__[1], Guard, Channel,
                   torch.autograd.graph.saved_tensors_hooks]
        guard = Guard(mods, classes)
        verify, verify_code = guard.verify, Guard.verify.__code__
    except BaseException as err:  # noqa: BLE001 - report and stop; nothing of the student's ran yet
        channel.send(event="setup_error", message=f"{type(err).__name__}: {safe_str(err)}")
        os._exit(3)
    channel.send(event="ready", uid=os.getuid(), confined=env_ok, device=str(ctx.device))

    def tampering() -> list[str]:
        if verify.__func__.__code__ is not verify_code:
            return ["the grader's guard was modified"]
        try:
            return verify()
        except BaseException as err:  # noqa: BLE001 - e.g. a builtin it relies on was replaced
            return [f"the grader's guard could not run ({type(err).__name__}): something it relies on was replaced"]

    ns = {"__name__": "__submission__", "__builtins__": builtins}
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
    for check in wanted:
        channel.send(event="start", check=check.name)
        try:
            res = run_check(check, ns, ctx)
            status, message, measurements = res.status, res.message, clean_measurements(res.measurements)
            if status == "error" and ("can't allocate memory" in message or "MemoryError" in message):
                status = "oom"
        except BaseException as err:  # noqa: BLE001 - SystemExit etc. raised inside the student's function
            (status, message), measurements = classify(err), {}
        problems = tampering()
        if problems:
            channel.send(event="tampering", problems=problems[:20], check=check.name)
            os._exit(0)
        channel.send(event="result", check=check.name, status=status, message=safe_str(message),
                     measurements=measurements)
    channel.send(event="done")
    os._exit(0)


if __name__ == "__main__":
    main()
