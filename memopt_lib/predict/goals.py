"""Issue 11's goals table, predicted: the default stack against memopt's recipe at the goal shapes.

    python -m memopt_lib.predict goals --gpu h200 --json .ci/predictions/goals-h200.json

Each run of the table is two :func:`memopt_lib.predict.predict_step` calls, the default stack (the 7B: HF + PEFT,
``prepare_model_for_kbit_training``, AdamW, checkpointing, one micro-batch -- :data:`memopt_lib.recipe.QLORA_DEFAULT`;
GPT-2: the fp32 baseline) and :func:`memopt_lib.recipe.memopt_recipe`, at the same shape. Reported per run:
peak allocated and reserved memory, the goal and whether the prediction meets it, the H200 measurement of the
default where the repository holds one, and a **FLOP-based step-time ratio** (memopt's FLOPs / the default's:
checkpointing's recomputation and the chunked loss's second lm_head pass are in it). That ratio is a lower
bound on the time ratio, not a timing, and it weighs an fp32 FLOP like a bf16 one (GPT-2's default is fp32, memopt's
recipe bf16 autocast: ``flops_by_dtype`` has the split). It leaves out what costs time without FLOPs -- bitsandbytes' 4-bit
dequantization and 8-bit optimizer kernels, per-parameter optimizer launches in backward, and the host link
(its bytes are reported as ``host_transfer_bytes``; :mod:`memopt_lib.predict.cost` turns them into time).
The loss goal (GPT-2 within 2 % of fp32 after 200 steps) cannot be predicted: ``.ci/gpu_check.py
--only gpt2_200`` measures it on a GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

GiB = float(1 << 30)
TIME_GOAL = 1.3  # memopt's step time <= 1.3x the default's

# label, model, batch, seq, memory goal (GiB) for memopt's recipe -- issue 11's table, row by row
GOALS = [("7b B1x512", "llama-7b", 1, 512, 3.8),
         ("7b B8x512 one micro-batch", "llama-7b", 8, 512, 4.5),
         ("7b B1x2048", "llama-7b", 1, 2048, 4.2),
         ("gpt2 B8x1024", "gpt2", 8, 1024, 2.0)]


def default_recipe(model: str):
    """The stack memopt's recipe is measured against: QLoRA default (Llama), the fp32 baseline (GPT-2)."""
    from ..models import spec
    from ..recipe import FP32, QLORA_DEFAULT
    return QLORA_DEFAULT if spec(model).family == "llama" else FP32


def _measured_default(model: str, batch: int, seq: int) -> float | None:
    """The H200 measurement of the default stack at this shape, if the repository holds one (bytes)."""
    from ..bench import row_recipe
    from .anchors import measurements
    want = default_recipe(model)
    for c in measurements():
        m, b, s, row, opts = c["config"]
        if (m, b, s) != (model, batch, seq) or opts:
            continue
        rc = row.recipe if hasattr(row, "recipe") else row_recipe(row, m)
        if rc.with_(name=want.name) == want:
            return c["measured"]["steady"]
    return None


def _entry(p: dict, rc) -> dict:
    return {"recipe": rc.name, "flags": rc.to_dict(), "peak_allocated_GiB": p["peak_allocated_bytes"] / GiB,
            "peak_reserved_GiB": p["peak_reserved_bytes"] / GiB, "flops": p["flops"],
            "flops_by_dtype": p["flops_by_dtype"],
            "host_transfer_bytes": p["host_transfer_bytes"], "breakdown_GiB": {
                k: round(v / GiB, 4) for k, v in p["breakdown_bytes"].items()}}


def predict_goals(gpu: str = "h200", progress=None) -> list[dict]:
    """Every run of the goals table, predicted (see the module docstring for the fields)."""
    from ..bench import Row
    from ..recipe import memopt_recipe
    from .step import predict_step
    out = []
    for label, model, batch, seq, goal in GOALS:
        t0 = time.perf_counter()
        base, ours = default_recipe(model), memopt_recipe(model)
        pb = predict_step(gpu, model, batch, seq, Row(base.name, base))
        pm = predict_step(gpu, model, batch, seq, Row(ours.name, ours))
        measured = _measured_default(model, batch, seq) if gpu == "h200" else None
        mem = pm["peak_allocated_bytes"] / GiB
        ratio = pm["flops"] / pb["flops"]
        row = {"run": label, "model": model, "batch": batch, "seq": seq, "goal_GiB": goal,
               "default": _entry(pb, base), "memopt": _entry(pm, ours),
               "measured_default_GiB": None if measured is None else measured / GiB,
               "memory_ratio": pm["peak_allocated_bytes"] / pb["peak_allocated_bytes"],
               "meets_memory_goal": mem <= goal, "flop_time_ratio": ratio, "time_goal": TIME_GOAL,
               "meets_time_goal_by_flops": ratio <= TIME_GOAL, "predict_time_s": time.perf_counter() - t0}
        out.append(row)
        if progress:
            progress(row)
    return out


def table(rows: list[dict]) -> str:
    head = (f"{'run':<27} {'default':>9} {'(H200)':>8} {'memopt':>8} {'goal':>6} {'met':>4} "
            f"{'FLOPs x':>8} {'met':>4} {'host MiB':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        meas = f"{r['measured_default_GiB']:.2f}" if r["measured_default_GiB"] is not None else "-"
        lines.append(f"{r['run']:<27} {r['default']['peak_allocated_GiB']:>9.2f} {meas:>8} "
                     f"{r['memopt']['peak_allocated_GiB']:>8.2f} {r['goal_GiB']:>6.1f} "
                     f"{'yes' if r['meets_memory_goal'] else 'NO':>4} {r['flop_time_ratio']:>8.2f} "
                     f"{'yes' if r['meets_time_goal_by_flops'] else 'NO':>4} "
                     f"{r['memopt']['host_transfer_bytes'] / 2**20:>9.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from .gpus import GPUS
    p = argparse.ArgumentParser(prog="python -m memopt_lib.predict goals",
                                description="Issue 11's goals table, predicted from a CPU (meta tensors).")
    p.add_argument("--gpu", default="h200", choices=sorted(GPUS))
    p.add_argument("--json", default=None, help="write the table (marked predicted, with this command) here")
    args = p.parse_args(argv)
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    t0 = time.perf_counter()
    print(f"issue 11 goals, PREDICTED for {args.gpu} (GiB = peak allocated; FLOPs x = memopt / default)", flush=True)
    rows = predict_goals(args.gpu)
    print(table(rows))
    print(f"every number is a prediction (meta tensors + a model of the CUDA caching allocator), "
          f"{time.perf_counter() - t0:.0f} s on this CPU; the GPT-2 loss goal needs a GPU run")
    if args.json:
        command = "python -m memopt_lib.predict goals --gpu " + args.gpu + " --json " + args.json
        doc = {"predicted": True, "command": command, "gpu": args.gpu,
               "note": ("Predicted, not measured: memopt_lib.predict (meta tensors, replayed caching allocator). "
                        "flop_time_ratio counts matmul/attention FLOPs only, fp32 and bf16 alike (flops_by_dtype splits "
                        "them); kernels without FLOPs (4-bit dequantization, 8-bit optimizer) and host copies are "
                        "not in it; "
                        "the GPT-2 loss goal is measured by .ci/gpu_check.py --only gpt2_200 on a GPU."),
               "rows": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
