"""Tamper detection for the grading child: were the instruments replaced while student code ran?

The child imports torch, the profiler and the check module *before* it executes any
student code, and :class:`Guard` photographs what the grade depends on:

* every function, class and submodule bound in the protected modules (``torch.cuda``,
  ``memopt_lib.profiler.*``, the check module, ``builtins``, ``gc``, ``weakref`` ...)
  together with each function's ``__code__``/defaults, and the ``__dict__`` of the
  protected classes (``torch.Tensor``, ``UntypedStorage``, ``MemoryTracker`` ...);
* the ``sys.modules`` entries of those modules;
* global hooks: the Python dispatch-mode and torch-function-mode stacks, ``sys.settrace``
  / ``setprofile`` (and threading's), ``gc.callbacks``, torch's global optimizer hooks,
  signal handlers and interval timers.

:meth:`Guard.verify` compares against the photograph before and after each check.
An audit hook (``sys.addaudithook``: it cannot be removed from Python) adds what a
photograph cannot see: patches that were put back before the next photograph
(``__code__`` swaps and attribute writes on protected classes), processes started
started from the submission's own code (``fork``, ``subprocess``), ``ctypes``, and
introspection (``sys._getframe``, ``gc.get_objects``, ``compile``/``exec``) called
directly from the student's cells.

What it cannot do: code running in the same process can always, with enough effort
(for example through memory writes from native code it loaded before the hook saw it,
or by mutating the tracker's counters through objects it reached without a flagged
call) defeat an in-process check. The audit hook and the sandbox make that hard and
visible, not impossible; see :mod:`memopt_lib.grading` for the whole model.
"""
from __future__ import annotations

import builtins
import gc
import signal
import sys
import threading
import types

ALWAYS_FLAGGED = ("os.system", "os.exec", "os.spawn", "pty.spawn", "sys.settrace", "sys.setprofile", "sys.addaudithook",
                  "code.__new__", "signal.pthread_kill")
# introspection: flagged when the student's cell called it, directly or through one helper
# (``inspect.currentframe()``); compile/exec only when called directly, because library
# helpers a student may use honestly (namedtuple, dataclass) exec code of their own
# (libraries load native code with ctypes during checks -- transformers does -- so ctypes counts only here)
# processes: the grader's meter measures the child's whole process tree, so a process the kit starts
# (lab 10's ranks) hides nothing, and the kit stops its own ranks (os.kill) when one fails; a process
# started or signalled by the submission's own code is still flagged
NEAR_STUDENT = ("sys._getframe", "sys._current_frames", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
                "ctypes.", "os.fork", "os.forkpty", "os.posix_spawn", "subprocess.Popen", "os.kill", "os.killpg")
DIRECT_FROM_STUDENT = ("compile", "exec", "function.__new__")
STUDENT_PREFIX = "<cell "
# torch rebinds these itself, lazily (importing torch._dynamo wraps torch.manual_seed in
# ``_disable_dynamo``): a wrapper whose ``__wrapped__`` is the photographed function is accepted
LAZY_WRAPPED = {("torch", "manual_seed")}


def _student_nearby(depth: int) -> bool:
    f = sys._getframe(3)  # 0: here, 1: _record, 2: _audit, 3: the code that made the audited call
    for _ in range(depth):
        if f is None:
            return False
        if f.f_code.co_filename.startswith(STUDENT_PREFIX):
            return True
        f = f.f_back
    return False


class Guard:
    """Photograph the instruments now; :meth:`verify` lists what changed since."""

    def __init__(self, modules: list[types.ModuleType], classes: list[type]):
        self.modules = list(modules)
        self.classes = list(classes)
        self._mod_snap = {m.__name__: (m, self._snap(vars(m))) for m in self.modules}
        self._cls_snap = [(c, self._snap(dict(vars(c)))) for c in self.classes]
        self._cls_keys = [(c, set(vars(c))) for c in self.classes]  # a new key can shadow an inherited method
        self._protected_ids = {id(c) for c in self.classes} | {id(m) for m in self.modules}
        for _, snap in self._mod_snap.values():
            self._protected_ids |= {id(v) for v, _ in snap.values() if isinstance(v, types.FunctionType)}
        self._hooks = self._global_hooks()
        self.events: list[str] = []
        self._armed = self._busy = False
        sys.addaudithook(self._audit)

    # ------------------------------------------------------------------ photograph
    @staticmethod
    def _snap(d: dict) -> dict:
        out = {}
        for name, value in list(d.items()):
            if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type,
                                  types.ModuleType, staticmethod, classmethod, property)) or callable(value):
                code = getattr(value, "__code__", None)
                out[name] = (value, (code, getattr(value, "__defaults__", None),
                                     getattr(value, "__kwdefaults__", None)) if code is not None else None)
        return out

    def _global_hooks(self) -> dict:
        from torch.optim import optimizer as optim_mod
        from torch.overrides import _get_current_function_mode_stack
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
        hooks = {
            "dispatch modes": len(_get_current_dispatch_mode_stack()),
            "torch function modes": len(_get_current_function_mode_stack()),
            "sys.gettrace": sys.gettrace(), "sys.getprofile": sys.getprofile(),
            "threading trace": getattr(threading, "_trace_hook", None),
            "threading profile": getattr(threading, "_profile_hook", None),
            "gc.callbacks": [id(c) for c in gc.callbacks],
            "optimizer hooks": [tuple(getattr(optim_mod, n, {}).keys()) for n in
                                ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")],
            "interval timer": signal.getitimer(signal.ITIMER_REAL),
        }
        for sig in (signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF, signal.SIGUSR1, signal.SIGUSR2,
                    signal.SIGTERM, signal.SIGXCPU):
            hooks[f"signal handler {sig.name}"] = id(signal.getsignal(sig))
        return hooks

    # ------------------------------------------------------------------ audit
    def arm(self) -> None:
        """Start recording audit events (call right before the first student code runs)."""
        self._armed = True

    def _audit(self, event: str, args: tuple) -> None:
        if not self._armed or self._busy:  # _busy: our own sys._getframe call is audited too
            return
        self._busy = True
        try:
            self._record(event, args)
        finally:
            self._busy = False

    def _record(self, event: str, args: tuple) -> None:
        if event.startswith(ALWAYS_FLAGGED):
            self.events.append(event)
        elif event in ("object.__setattr__", "object.__delattr__"):
            if args and id(args[0]) in self._protected_ids:
                self.events.append(f"{event} on {getattr(args[0], '__qualname__', type(args[0]).__name__)}"
                                   f".{args[1] if len(args) > 1 else '?'}")
        elif (event.startswith(NEAR_STUDENT) and _student_nearby(2)) or \
                (event in DIRECT_FROM_STUDENT and _student_nearby(1)):
            self.events.append(f"{event} called from the submission")

    # ------------------------------------------------------------------ verify
    def verify(self) -> list[str]:
        """Every difference from the photograph, as short messages (empty: intact)."""
        problems = []
        for name, (module, snap) in self._mod_snap.items():
            if sys.modules.get(name) is not module:
                problems.append(f"sys.modules[{name!r}] was replaced")
            problems += self._diff(name, vars(module), snap)
        for cls, snap in self._cls_snap:
            problems += self._diff(cls.__qualname__, dict(vars(cls)), snap)
        for cls, keys in self._cls_keys:  # new names are fine (transformers adds Module.smart_apply) unless they
            for k in sorted(set(vars(cls)) - keys, key=str):  # shadow an inherited one (Storage.nbytes)
                if any(k in vars(base) for base in cls.__mro__[1:]):
                    problems.append(f"{cls.__qualname__}.{k} was added, hiding {cls.__mro__[1].__qualname__}.{k}")
        now = self._global_hooks()
        problems += [f"{k} changed" for k in self._hooks if now[k] != self._hooks[k]]
        if builtins.__dict__.get("__import__") is not self._mod_snap["builtins"][1]["__import__"][0]:
            problems.append("builtins.__import__ was replaced")
        seen = set()
        for ev in self.events:
            if ev not in seen:
                seen.add(ev)
                problems.append(f"audit: {ev}")
        return problems

    @staticmethod
    def _diff(where: str, current: dict, snap: dict) -> list[str]:
        out = []
        for name, (value, code) in snap.items():
            now = current.get(name, _MISSING)
            if now is not value and (where, name) in LAZY_WRAPPED and getattr(now, "__wrapped__", None) is value:
                continue
            if now is not value:
                out.append(f"{where}.{name} was replaced")
            elif code is not None and (value.__code__, value.__defaults__, value.__kwdefaults__) != code:
                out.append(f"{where}.{name}.__code__ was replaced")
        return out


_MISSING = object()
