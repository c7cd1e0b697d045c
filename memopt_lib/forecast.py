"""The course's real shapes, predicted for the learner's GPU, beside a lab's CPU measurement.

A CPU learner measures a scale model (:mod:`memopt_lib.profiles`). What the lessons are about is
GPT-2 at batch 8 x 512 and 8 x 1024 and the Llama-2-7B at 8 x 512 on a real GPU. This module asks the
GPU-peak predictor (:func:`memopt_lib.predict.predict_step`: the bench's own step on meta tensors, CUDA's
kernels and caching allocator replayed, seconds per row) for those shapes on the GPU the learner names,
and puts next to each prediction the H200 measurement the repository holds for the same configuration
(:func:`memopt_lib.predict.anchors.measurements`: ``assets/h200_anchors.json`` and
``.ci/gpu_results/``), so a lab can print, in one call, "what you measured here / what your GPU would
do / what an H200 did".

    from memopt_lib.forecast import show_forecast
    show_forecast("t4", ["fp32 baseline", "checkpointing"], llama_rows=["QLoRA nf4+dq no ckpt",
                                                                    "QLoRA nf4+dq + ckpt"])

Rows are the bench's row names (``[r.name for r in memopt_lib.bench.rows_for(model)]``). Each 7B row costs a
few seconds of CPU (more for a 4-bit stack); a lab asks only for the rows its technique changes.
"""
from __future__ import annotations

from typing import Iterable

GiB = float(1 << 30)
GPT2_SHAPES = ((8, 512), (8, 1024))
LLAMA_SHAPES = ((8, 512),)


def _row_name(row) -> str:
    return row if isinstance(row, str) else row.name


def anchor_for(model: str, batch: int, seq: int, row) -> dict | None:
    """The H200 measurement of this configuration, if the repository holds one.

    Returns ``{"name", "source", "peak_allocated_bytes"}`` (the steady-state peak), preferring a
    measurement of the bench's exact step (default options: foreach AdamW, SDPA), else one that differs only
    in options (e.g. fused AdamW, within 0.1 % for GPT-2). ``None`` when nothing matches.
    """
    from .predict.anchors import measurements
    name = _row_name(row).lower()
    found = [c for c in measurements()
             if c["config"][:3] == (model, batch, seq) and _row_name(c["config"][3]).lower() == name]
    if not found:
        return None
    best = sorted(found, key=lambda c: (bool(c["config"][4]), c["source"] != ".ci/gpu_results/h200-bench-gpt2.json"))[0]
    return {"name": best["name"], "source": best["source"], "peak_allocated_bytes": best["measured"]["steady"]}


def bench_record(row: str, model: str = "gpt2", batch: int = 8, seq: int = 512) -> dict | None:
    """The bench's own H200 run of one row (``.ci/gpu_results/h200-bench-gpt2.json``), with its breakdown.

    ``breakdown_bytes`` there is what was alive at the measured peak (``weights``, ``gradients``,
    ``optimizer``, ``activations``, ``temporaries``, ``unattributed``). ``None`` if the file or row is absent.
    """
    import json

    from .predict.anchors import repo_root
    path = repo_root() / ".ci" / "gpu_results" / "h200-bench-gpt2.json"
    if not path.exists():
        return None
    for r in json.loads(path.read_text()):
        if (r.get("status") == "ok" and r["name"].lower() == row.lower()
                and (r["model"], r["batch"], r["seq"]) == (model, batch, seq)):
            return r
    return None


def forecast(gpu: str, rows: Iterable, *, model: str = "gpt2", shapes: Iterable[tuple[int, int]] | None = None,
             steps: int = 2) -> list[dict]:
    """Predict each of ``rows`` at each shape on ``gpu``; one dict per (shape, row), plain data.

    Keys: ``model``, ``batch``, ``seq``, ``row``, ``peak_allocated_bytes``, ``peak_reserved_bytes``,
    ``breakdown_bytes``, ``vs_first`` (peak / the first row's at the same shape), ``fits`` (reserved
    bytes within the GPU's memory), ``gpu_memory_bytes`` and ``anchor`` (:func:`anchor_for`, or None).
    ``steps=2``: step 1 creates the optimizer state, step 2 is the steady step whose peak is reported
    (the same peak allocated as the predictor's default of 3 steps; a third step only settles reserved
    segments further).
    """
    from .models import spec
    from .predict import gpu as get_gpu, predict_step
    g = get_gpu(gpu)
    rows = list(rows)
    if not rows:
        raise ValueError("rows is empty: name at least one bench row (memopt_lib.bench.rows_for(model) lists them)")
    family = spec(model).family
    shapes = list(shapes if shapes is not None else (GPT2_SHAPES if family == "gpt2" else LLAMA_SHAPES))
    out = []
    for batch, seq in shapes:
        first = None
        for row in rows:
            p = predict_step(g, model, batch, seq, row, steps=steps)
            peak = p["peak_allocated_bytes"]
            first = first or peak
            out.append({"model": model, "batch": batch, "seq": seq, "row": _row_name(row), "gpu": g.name,
                        "peak_allocated_bytes": peak, "peak_reserved_bytes": p["peak_reserved_bytes"],
                        "breakdown_bytes": dict(p["breakdown_bytes"]), "vs_first": peak / first,
                        "fits": p["peak_reserved_bytes"] <= g.memory_bytes, "gpu_memory_bytes": g.memory_bytes,
                        "anchor": anchor_for(model, batch, seq, row)})
    return out


def format_forecast(results: list[dict]) -> str:
    """The table :func:`show_forecast` prints (GiB = 2**30 bytes)."""
    if not results:
        return "(nothing predicted)"
    g = results[0]["gpu"]
    lines = [f"predicted on {g} ({results[0]['gpu_memory_bytes'] / GiB:.1f} GiB), meta tensors, not measured:",
             f"  {'model':<9}{'shape':>10}  {'row':<26}{'peak alloc':>11}{'vs 1st':>8}{'reserved':>12}"
             f"{'fits':>5}  largest part at the peak   H200 measured"]
    for r in results:
        bd = r["breakdown_bytes"]
        big = max(bd, key=bd.get)
        a = r["anchor"]
        anchor = (f"{a['peak_allocated_bytes'] / GiB:.2f} GiB ({r['peak_allocated_bytes'] / a['peak_allocated_bytes'] - 1:+.1%})"
                  if a else "-")
        lines.append(f"  {r['model']:<9}{str(r['batch']) + ' x ' + str(r['seq']):>10}  {r['row']:<26}"
                     f"{r['peak_allocated_bytes'] / GiB:>7.2f} GiB{r['vs_first']:>7.2f}x"
                     f"{r['peak_reserved_bytes'] / GiB:>8.2f} GiB{'yes' if r['fits'] else 'NO':>5}  "
                     f"{big} {100 * bd[big] / r['peak_allocated_bytes']:.0f} %{'':<{max(0, 15 - len(big))}}{anchor}")
    lines.append("  (vs 1st: the peak over the first row's at the same shape; H200 measured: the repository's "
                 "record of the same step, with the prediction's error)")
    return "\n".join(lines)


def show_forecast(gpu: str, rows: Iterable, *, llama_rows: Iterable = (), gpt2_shapes=GPT2_SHAPES,
                  llama_shapes=LLAMA_SHAPES, steps: int = 2) -> list[dict]:
    """Print and return :func:`forecast` for GPT-2 (``rows``) and the 7B (``llama_rows``, if any)."""
    results = forecast(gpu, rows, model="gpt2", shapes=gpt2_shapes, steps=steps) if rows else []
    llama_rows = list(llama_rows)
    if llama_rows:
        results += forecast(gpu, llama_rows, model="llama-7b", shapes=llama_shapes, steps=steps)
    print(format_forecast(results))
    return results
