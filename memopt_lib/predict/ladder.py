"""The bench's ladder, predicted: the same rows and the same row dicts as ``python -m memopt_lib.bench``.

    python -m memopt_lib.predict --gpu h200 --model gpt2 --batch 8 --seq 1024 --json out.json --plot out.png

Every row is one :func:`memopt_lib.predict.predict_step` (meta tensors, replayed caching allocator), so
the ladder takes seconds per row on a CPU and no GPU. Each row dict has the keys of the bench's JSON,
``predicted: True``, ``device`` = ``"predicted:<gpu>"``, and ``reason`` = ``"predicted"`` (so the
bench's table marks it). A row whose predicted reserved memory exceeds the GPU gets status ``"oom"``
(its numbers are kept: that is how much it would need).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .gpus import GPUS, gpu as get_gpu
from .step import predict_step


def _rows(model: str, names: list[str] | None):
    from ..bench import BASELINE, rows_for
    rows = rows_for(model)
    if not names:
        return rows
    table = {r.name.lower(): r for r in rows}
    unknown = [n for n in names if n.lower() not in table]
    if unknown:
        raise KeyError(f"unknown row(s) {unknown} for {model}; rows: " + "; ".join(r.name for r in rows))
    return [BASELINE] + [table[n.lower()] for n in names if n.lower() != BASELINE.name.lower()]


def predict_ladder(gpu: str, model: str, batch: int, seq: int, rows: list[str] | None = None, *,
                   steps: int = 2) -> list[dict]:
    """Predict every row of the bench's ladder (or the named ``rows``, after the fp32 baseline)."""
    from ..bench import _predicted_bytes, add_ratios
    from ..models import model_config
    g = get_gpu(gpu)
    cfg = model_config(model)
    out = []
    for row in _rows(model, rows):
        t0 = time.perf_counter()
        try:
            p = predict_step(g, model, batch, seq, row, steps=steps)
        except ValueError as err:  # compose refuses the recipe on this GPU (e.g. fp16 + optimizer in backward on a T4)
            out.append({"name": row.name, "device": f"predicted:{g.name}", "model": model, "batch": batch,
                        "seq": seq, "status": "skipped", "reason": f"cannot run on {g.name}: {err}",
                        "peak_allocated_bytes": None, "peak_reserved_bytes": None, "device_used_bytes": None,
                        "step_time_s": None, "ratio": None, "time_ratio": None, "breakdown_bytes": None,
                        "trainable_params": None, "loss": None, "flags": row.recipe.to_dict(), "predicted": True,
                        "predicted_bytes": _predicted_bytes(row.recipe, cfg, batch, seq)})
            continue
        r = {"name": row.name, "device": f"predicted:{g.name}", "model": model, "batch": batch, "seq": seq,
             "status": "ok", "reason": "predicted", "peak_allocated_bytes": p["peak_allocated_bytes"],
             "peak_reserved_bytes": p["peak_reserved_bytes"], "device_used_bytes": None, "step_time_s": None,
             "ratio": None, "time_ratio": None, "breakdown_bytes": p["breakdown_bytes"],
             "trainable_params": p["trainable_params"], "predicted_bytes": _predicted_bytes(row.recipe, cfg, batch, seq),
             "flags": row.recipe.to_dict(), "loss": None, "predicted": True, "peak_step1_bytes": p["peak_step1_bytes"],
             "sdpa_backends": p["sdpa_backends"], "flops": p["flops"],
             "host_transfer_bytes": p["host_transfer_bytes"], "predict_time_s": time.perf_counter() - t0}
        if p["peak_reserved_bytes"] > g.memory_bytes:
            r.update(status="oom", reason=f"predicted: needs {p['peak_reserved_bytes'] / 2**30:.1f} GiB reserved, "
                                          f"{g.name} has {g.memory_bytes / 2**30:.1f} GiB")
        out.append(r)
    add_ratios(out)
    return out


def main(argv=None) -> int:
    from ..bench import plot, table
    from ..models import SPECS
    p = argparse.ArgumentParser(prog="python -m memopt_lib.predict",
                                description="Predict the bench's ladder on a named GPU, from a CPU (meta tensors).")
    p.add_argument("--gpu", required=True, choices=sorted(GPUS), help="the GPU to predict for")
    p.add_argument("--model", choices=sorted(SPECS), default="gpt2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rows", default="", help="comma-separated row names (the fp32 baseline always comes first)")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--plot", default=None, help="write a bar chart (PNG) to this file")
    args = p.parse_args(argv)
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations, once per row
    if args.batch < 1 or args.seq < 1:
        p.error("--batch and --seq must be >= 1")
    names = [s.strip() for s in args.rows.split(",") if s.strip()]
    try:
        _rows(args.model, names)
    except KeyError as err:
        p.error(str(err.args[0]))
    g = get_gpu(args.gpu)
    print(f"memopt ladder, PREDICTED for {g.about}: {args.model} batch {args.batch} x {args.seq}", flush=True)
    t0 = time.perf_counter()
    rows = predict_ladder(args.gpu, args.model, args.batch, args.seq, names or None)
    print(table(rows))
    print(f"every row is a prediction (meta tensors + a model of the CUDA caching allocator), "
          f"{time.perf_counter() - t0:.0f} s on this CPU")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot, f"{args.model} B{args.batch} S{args.seq}, predicted for {g.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
