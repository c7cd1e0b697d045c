"""Adversarial submissions of the real labs 01 and 04, each = an honest failing answer + one trick.

Every attack class of the grading issue is here: forging the result channel from a traceback
frame (then ``os._exit``), overwriting check constants (directly and through ``/proc/self/mem``),
resetting or muting the in-process tracker (its peak through the dispatch-mode stack, a method
patched and restored within the call, ``_disable_current_modes()``, the work moved to another
thread, ``gc.get_objects`` from a thread pool), scratch memory held in numpy, reading the caller's
``f_locals``, hard-coded answers, a step that never computes a loss, and importing a copy of the
solutions from elsewhere on disk (``@COPY@``: a folder the test fills with copies).

``LAB01[sid] = (bodies, max_score, {check: status it must not have})``: ``bodies`` maps graded
cell ids to region text (a body may dedent to run code when the cell executes). ``max_score`` is
the score of the honest failing submission the attack starts from.
"""
from __future__ import annotations

# ---------------------------------------------------------------- lab 01
COUNT_WRONG = "    return 124_439_808"
STATE_WRONG = '    return {"weights": 4 * n_params, "gradients": 4 * n_params, "optimizer": 8 * n_params}'
STEP_BODY = """    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss.item()"""
# trains (zero_grad keeps the semantics) but keeps zero-filled gradients alive through the forward
STEP_WASTEFUL = "    optimizer.zero_grad(set_to_none=False)\n" + STEP_BODY
STEP_LEAN = "    optimizer.zero_grad(set_to_none=True)\n" + STEP_BODY


def indent(code: str, n: int = 4) -> str:
    return "\n".join((" " * n + line) if line.strip() else line for line in code.strip("\n").splitlines())


def lab01(count=COUNT_WRONG, state=STATE_WRONG, step=STEP_WASTEFUL, top=""):
    return {"count-params": count + ("\n" + top.strip("\n") if top else ""), "state-bytes": state,
            "train-step": step}


FIND_CHANNEL = """
    import os
    try:
        raise RuntimeError("where am I")
    except RuntimeError as e:
        f = e.__traceback__.tb_frame
    chan = None
    while f is not None:
        for v in list(f.f_locals.values()):
            if type(v).__name__ == "Channel":
                chan = v
        f = f.f_back
"""

LAB01 = {
    "r01_traceback_channel_forgery": (lab01(count=FIND_CHANNEL + """
    if chan is not None:
        for name in ("param_count", "training_state_matches_profiler", "training_step_trains",
                     "training_step_is_correct_and_lean"):
            chan.send(event="result", check=name, status="passed", score=99)
            chan.send(event="evidence", check=name, data={"counts": [124439808]}, duration_s=0.1)
        chan.send(event="done")
        os._exit(0)
    return 124_439_808"""), 0, {}),
    "r02_overwrite_check_constants": (lab01(top="""
import sys
_m = sys.modules["memopt_lib.checks.lab01_memory_anatomy"]
_m.STEP_RATIO, _m.LOSS_RTOL, _m.PARAM_RTOL = 1e9, 1e9, 1e9
import memopt_lib.checks.base as _b
_b.MEMORY_SLACK_BYTES.update({k: 10**12 for k in list(_b.MEMORY_SLACK_BYTES)})"""), 1,
                                      {"training_step_is_correct_and_lean": "passed"}),
    "r03_proc_self_mem_constant": (lab01(top="""
import struct, sys
_m = sys.modules["memopt_lib.checks.lab01_memory_anatomy"]
try:
    with open("/proc/self/mem", "r+b", buffering=0) as _f:
        for _name in ("STEP_RATIO", "PARAM_RTOL"):
            _f.seek(id(getattr(_m, _name)) + 16)  # a float's ob_fval
            _f.write(struct.pack("d", 1e9))
except OSError:
    pass"""), 1, {"training_step_is_correct_and_lean": "passed"}),
    "r04_tracker_peak_reset_via_mode_stack": (lab01(step=STEP_WASTEFUL.replace("    return loss.item()", """
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    for mode in _get_current_dispatch_mode_stack():
        if hasattr(mode, "peak_bytes"):
            mode.peak_bytes = mode.current_bytes
    return loss.item()""")), 1, {"training_step_is_correct_and_lean": "passed"}),
    "r05_tracker_method_patched_and_restored": (lab01(step="""
    from memopt_lib.profiler import MemoryTracker
    saved = MemoryTracker.__torch_dispatch__
    MemoryTracker.__torch_dispatch__ = lambda self, func, types, args=(), kwargs=None: func(*args, **(kwargs or {}))
    try:
""" + indent(STEP_WASTEFUL, 8) + """
    finally:
        MemoryTracker.__torch_dispatch__ = saved"""), 1, {"training_step_is_correct_and_lean": "passed"}),
    "r06_disable_current_modes": (lab01(step="""
    from torch.utils._python_dispatch import _disable_current_modes
    with _disable_current_modes():
""" + indent(STEP_WASTEFUL, 8)), 1, {"training_step_is_correct_and_lean": "passed"}),
    "r07_work_in_another_thread": (lab01(step="""
    import threading
    box = {}
    def work():
""" + indent(STEP_WASTEFUL.replace("return loss.item()", "box['loss'] = loss.item()"), 8) + """
    t = threading.Thread(target=work)
    t.start()
    t.join()
    return box["loss"]"""), 1, {"training_step_is_correct_and_lean": "passed"}),
    "r08_gc_objects_from_a_thread_pool": (lab01(step=STEP_WASTEFUL.replace("    return loss.item()", """
    import gc
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1) as pool:
        objs = pool.submit(gc.get_objects).result()
    for o in objs:
        if type(o).__name__ == "MemoryTracker":
            o.peak_bytes = o.current_bytes
            o.start_bytes = o.current_bytes
    return loss.item()""")), 1, {"training_step_is_correct_and_lean": "passed"}),
    "r09_numpy_scratch_memory": (lab01(step="""
    import numpy as np
    optimizer.zero_grad(set_to_none=True)
    scratch = np.ones(48 * 2**20 // 8)  # 48 MiB the tracker never sees, alive through the step
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss.item() + 0.0 * float(scratch[0] - 1.0)"""), 1, {"training_step_is_correct_and_lean": "passed"}),
    "r10_caller_frame_f_locals": (lab01(count="""
    import sys
    f = sys._getframe(1)
    while f is not None:
        for key in ("expected", "want", "ref", "counts", "reference"):
            if isinstance(f.f_locals.get(key), int):
                return f.f_locals[key]
        f = f.f_back
    return 124_439_808""", state="""
    import sys
    f = sys._getframe(1)
    while f is not None:
        if isinstance(f.f_locals.get("measured"), dict):
            return dict(f.f_locals["measured"])
        if isinstance(f.f_locals.get("end_state"), dict):
            return dict(f.f_locals["end_state"])
        f = f.f_back
    return {"weights": 0, "gradients": 0, "optimizer": 0}"""), 1,
                                  {"param_count": "passed", "training_state_matches_profiler": "passed"}),
    "r11_hard_coded_answers": (lab01(count="""
    return {768: 124_439_808, 128: 1_120_640}.get(config.n_embd, 124_439_808)""", state="""
    known = {"adamw": 9_012_416, "sgd-momentum": 4_506_112, "sgd": 0}  # what an older check printed
    return {"weights": 4_506_112, "gradients": 4_506_112, "optimizer": known.get(optimizer, 0)}"""), 1,
                               {"param_count": "passed", "training_state_matches_profiler": "passed"}),
    "r12_step_without_a_loss": (lab01(step="""
    import torch
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    return 3.0"""), 0, {"training_step_trains": "passed", "training_step_is_correct_and_lean": "passed"}),
    "r13_solutions_copy_elsewhere": (lab01(count="""
    import glob, json, os, sys
    import memopt_lib
    kit = os.path.dirname(os.path.dirname(memopt_lib.__file__))
    places = [kit + "/solutions/*.ipynb", "@COPY@/*.ipynb", "@COPY@/**/*.ipynb", "/tmp/**/01_*.ipynb",
              "/var/tmp/**/01_*.ipynb", "/work/*/solutions/01_*.ipynb", "/work/*/*/solutions/01_*.ipynb",
              "/root/**/01_memory_anatomy.ipynb", "/home/**/01_memory_anatomy.ipynb", "/opt/**/01_*.ipynb",
              "/srv/**/01_*.ipynb", "/usr/local/**/01_*.ipynb", "/usr/src/**/01_*.ipynb"]
    g = globals()
    for pattern in places:
        for path in glob.glob(pattern, recursive=True):
            try:
                nb = json.load(open(path))
            except (OSError, ValueError):
                continue
            for cell in nb.get("cells", []):
                src = "".join(cell.get("source", ""))
                if cell.get("cell_type") == "code" and "BEGIN SOLUTION" in src:
                    exec(src, g)
            if g.get("count_gpt2_params") is not count_gpt2_params:
                return g["count_gpt2_params"](config)
    sys.path.append("@COPY@")
    try:
        import sol_copy
        g.update({k: getattr(sol_copy, k) for k in ("training_state_bytes", "full_finetune_step")})
        return sol_copy.count_gpt2_params(config)
    except ImportError:
        raise NotImplementedError()""", state="    raise NotImplementedError()", step="    raise NotImplementedError()"),
                                     0, {}),
}

# ---------------------------------------------------------------- lab 04
COUNT04_WRONG = "    return int((labels != -100).sum())"
ACC_KEEP_GRAPHS = """    total = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches)
    losses = [model(**mb, num_items_in_batch=torch.tensor(total)).loss for mb in micro_batches]
    window = sum(losses)
    window.backward()
    return window.item()"""
ACC_LEAN = """    total = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches)
    window_loss = 0.0
    for mb in micro_batches:
        loss = model(**mb, num_items_in_batch=torch.tensor(total)).loss
        loss.backward()
        window_loss += loss.item()
    return window_loss"""


def lab04(count=COUNT04_WRONG, acc=ACC_KEEP_GRAPHS, top=""):
    return {"ga-count": count + ("\n" + top.strip("\n") if top else ""), "ga-accumulate": acc}


LAB04 = {
    "r41_keep_graphs_in_a_thread": (lab04(acc="""
    import threading
    box = {}
    def work():
""" + indent(ACC_KEEP_GRAPHS.replace("return window.item()", "box['loss'] = window.item()"), 8) + """
    t = threading.Thread(target=work)
    t.start()
    t.join()
    return box["loss"]"""), 3, {"peak_is_one_micro_batch": "passed"}),
    "r42_keep_graphs_with_modes_disabled": (lab04(acc="""
    from torch.utils._python_dispatch import _disable_current_modes
    with _disable_current_modes():
""" + indent(ACC_KEEP_GRAPHS, 8)), 3, {"peak_is_one_micro_batch": "passed"}),
    "r43_count_from_caller_f_locals": (lab04(count="""
    import sys
    f = sys._getframe(1)
    while f is not None:
        for key in ("want", "expected", "ref"):
            if isinstance(f.f_locals.get(key), int):
                return f.f_locals[key]
        f = f.f_back
    return int((labels != -100).sum())"""), 3, {"target_tokens": "passed"}),
    "r44_forged_gpu_only_pass": (lab04(count=FIND_CHANNEL + """
    if chan is not None:
        chan.send(event="result", check="gpu_budget_gpt2", status="passed", score=2)
        chan.send(event="evidence", check="gpu_budget_gpt2", data={"losses": [1.0], "params": {}})
    return int((labels != -100).sum())"""), 3, {"gpu_budget_gpt2": "passed"}),
    "r45_overwrite_ratio_constant": (lab04(top="""
import sys
sys.modules["memopt_lib.checks.lab04_gradient_accumulation"].MAX_RATIO_TO_REFERENCE = 1e9"""), 3,
                                     {"peak_is_one_micro_batch": "passed"}),
    "r46_numpy_scratch_memory": (lab04(acc="""
    import numpy as np
    scratch = np.ones(64 * 2**20 // 8)  # 64 MiB held in numpy through the window
""" + ACC_LEAN.replace("return window_loss", "return window_loss + 0.0 * float(scratch[0] - 1.0)")), 3,
                                 {"peak_is_one_micro_batch": "passed"}),
}
