"""The GPU beside the CPU: a lab's technique predicted at the course's real shapes, for the learner's GPU.

A lab on a CPU measures a scale model (``memopt_lib.profiles``). Beside that measurement it shows what the same
technique costs where the course is about: GPT-2 at batch 8 x 512 and 8 x 1024, the Llama-2-7B at 8 x 512, on the
GPU the learner picked (``"t4"``, ``"a100"``, ``"h100"``, ``"h200"``), predicted from this machine by
:func:`memopt_lib.predict.predict_step` (meta tensors, CUDA's kernels and caching allocator replayed; a GPT-2 row
takes a few seconds, a 7B row about ten on two cores). Where the repository holds an H200 measurement of exactly
that configuration (:func:`memopt_lib.predict.anchors.measurements`), the table shows it too, so the learner sees
how far the prediction is from a real GPU.

Each case replays two steps (``StepOptions(steps=2)``: step 1 creates the optimizer state, step 2 is the steady
one) instead of the predictor's default three, to keep a notebook inside its time budget; the steady allocated peak
stays within 0.1 % (measured: identical for GPT-2 fp32 at 8 x 512, 1 KiB apart for the 7B QLoRA at 8 x 512, 0.02 %
for GPT-2 at 1 x 128, ``tests/test_predict_in_labs.py``; reserved within 0.1 %), and it takes about half the time.

A technique the predictor does not model (optimizer offloading: ZeRO-Offload is not a recipe field) is listed with
the reason instead of a number (``Case(not_modelled=...)``, or the predictor's own ``NotImplementedError``), and
nothing is made up meanwhile.

Two views of the same cases (one memo, one anchor lookup):

    from memopt_lib.predict.in_labs import Case, show_predictions, show_forecast
    show_predictions("t4", [Case("gpt2", 8, 512, "8-bit AdamW"), Case("llama-7b", 8, 512, "QLoRA default")])
    show_forecast("t4", ["fp32 baseline", "checkpointing"], llama_rows=["QLoRA nf4+dq + ckpt"])  # a table

``show_predictions`` prints a line per case; ``show_forecast`` a table per model, each row against the first at the
same shape (``vs 1st``), whether it fits the GPU, and the largest part of the peak.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

GiB = float(1 << 30)
GPUS_FOR_LABS = ("t4", "a100", "h100", "h200")
STEPS = 2  # steps replayed per case (see the module docstring)
BENCH_RECORD = ".ci/gpu_results/h200-bench-gpt2.json"
GPT2_SHAPES = ((8, 512), (8, 1024))
LLAMA_SHAPES = ((8, 512),)


@dataclass(frozen=True)
class Case:
    """One configuration to predict: a model, a shape and a bench row (its name or a ``bench.Row``).

    ``options`` are :class:`memopt_lib.predict.StepOptions` fields (``optimizer="fused"``, ...). ``label``
    defaults to the row's name. ``not_modelled`` names a technique the predictor cannot express at all (e.g.
    activation offloading, which is not a bench row): the case is then shown as a placeholder, not predicted.
    """

    model: str
    batch: int
    seq: int
    row: object
    label: str = ""
    options: dict = field(default_factory=dict)
    not_modelled: str = ""

    @property
    def row_name(self) -> str:
        return self.row if isinstance(self.row, str) else self.row.name

    @property
    def title(self) -> str:
        return self.label or self.row_name


_MEMO: dict = {}


def _anchor_for(case: Case, *, loose: bool = False) -> dict | None:
    """The H200 measurement of exactly this configuration, if the repository holds one.

    ``loose``: failing an exact match, accept one that differs only in step options (e.g. fused instead of
    foreach AdamW: within 0.1 % for GPT-2). The bench's own record is preferred among equals.
    """
    from .anchors import measurements
    def key(opts):  # how many steps are replayed is not part of the configuration
        return tuple(sorted((k, v) for k, v in opts.items() if k != "steps"))
    want = (case.model, case.batch, case.seq, case.row_name.lower())
    same = [m for m in measurements() if (*m["config"][:3], _name(m["config"][3]).lower()) == want]
    same.sort(key=lambda m: m["source"] != BENCH_RECORD)  # the bench's own run of the step first
    exact = [m for m in same if key(m["config"][4]) == key(case.options)]
    if exact or not loose:
        return exact[0] if exact else None
    return same[0] if same else None


def _name(row) -> str:
    return row if isinstance(row, str) else row.name


def bench_record(row: str, model: str = "gpt2", batch: int = 8, seq: int = 512) -> dict | None:
    """The bench's own H200 run of one row (``.ci/gpu_results/h200-bench-gpt2.json``), with its breakdown.

    ``breakdown_bytes`` there is what was alive at the measured peak (``weights``, ``gradients``,
    ``optimizer``, ``activations``, ``temporaries``, ``unattributed``). ``None`` if the file or row is absent.
    """
    import json

    from .anchors import repo_root
    path = repo_root() / BENCH_RECORD
    if not path.exists():
        return None
    for r in json.loads(path.read_text()):
        if (r.get("status") == "ok" and r["name"].lower() == row.lower()
                and (r["model"], r["batch"], r["seq"]) == (model, batch, seq)):
            return r
    return None


def _recipe_of(case: Case) -> dict:
    from ..bench import row_recipe
    rc = row_recipe(case.row, case.model) if isinstance(case.row, str) else case.row.recipe
    return rc.to_dict()


@lru_cache(maxsize=1)
def code_digest() -> str:
    """A hash of everything a prediction depends on: memopt_lib's source and the versions of the libraries it runs.

    Computed once per process (the modules a process has imported do not change under it), not once per case."""
    import hashlib
    from importlib import metadata
    from pathlib import Path
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    for dist in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            h.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist}=absent".encode())
    return h.hexdigest()


def _disk_path(key_data: dict):
    import hashlib
    import json
    from ..models import cache_dir
    digest = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return cache_dir() / "predictions" / f"{digest}.json"


def _predict_cached(g, case: Case) -> tuple[dict | None, str]:
    """predict_step for ``case``, kept on disk keyed by :func:`code_digest` and the whole configuration.

    A notebook is its own process, so the in-process memo cannot spare a lab's second run the seconds a 7B row
    costs; the disk copy can. It is a copy of what this very code computed on this machine (any change to
    memopt_lib or to a library version changes the key). ``MEMOPT_PREDICTION_CACHE=0`` turns it off.
    """
    import json
    import os
    from .step import predict_step
    opts = {"steps": STEPS, **case.options}
    use_disk = os.environ.get("MEMOPT_PREDICTION_CACHE", "1") != "0"
    path = None
    if use_disk:
        path = _disk_path({"code": code_digest(), "gpu": g.name, "model": case.model, "batch": case.batch,
                           "seq": case.seq, "recipe": _recipe_of(case), "options": opts})
        try:
            saved = json.loads(path.read_text())
            return saved["predicted"], saved["why_not"]
        except (OSError, ValueError, KeyError):
            pass  # not computed yet (or an unreadable copy): compute it
    try:
        out = (predict_step(g, case.model, case.batch, case.seq, case.row, **opts), "")
    except NotImplementedError as err:  # the recipe uses a technique the predictor does not model
        out = (None, str(err))
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"predicted": out[0], "why_not": out[1]}))
            os.replace(tmp, path)  # atomic: a concurrent notebook reads the old file or the new one
        except (OSError, TypeError, ValueError):
            pass  # a read-only cache or a result JSON cannot hold: keep the in-process copy only
    return out


def predict_case(gpu: str, case: Case, *, loose_anchor: bool = False) -> dict:
    """``{"case", "gpu", "predicted": predict_step's dict or None, "why_not": str, "anchor": dict or None}``.

    ``why_not`` is the predictor's own reason when it does not model the recipe (or ``case.not_modelled``).
    The anchor is looked up whatever the GPU (it is an H200 measurement: compare it with the ``"h200"``
    prediction; on another GPU it shows the order of magnitude only). Results are memoized in the process and
    on disk (:func:`_predict_cached`).
    """
    from .gpus import gpu as get_gpu
    g = get_gpu(gpu)  # a clear error for an unknown GPU name
    if case.not_modelled:
        return {"case": case, "gpu": g.name, "predicted": None, "why_not": case.not_modelled, "anchor": None}
    key = (g.name, case.model, case.batch, case.seq, repr(_recipe_of(case)), tuple(sorted(case.options.items())))
    if key not in _MEMO:
        _MEMO[key] = _predict_cached(g, case)
    pred, why = _MEMO[key]
    return {"case": case, "gpu": g.name, "predicted": pred, "why_not": why,
            "anchor": _anchor_for(case, loose=loose_anchor)}


def format_prediction(res: dict) -> str:
    """One line: the case, its predicted peaks, the H200 anchor and the prediction's error against it."""
    c = res["case"]
    head = f"{c.model} {c.batch} x {c.seq}, {c.title}"
    anchor = res["anchor"]
    measured = anchor["measured"]["steady"] if anchor else None
    if res["predicted"] is None:
        text = f"{head}: not predicted yet ({res['why_not']}); the predicted peak will appear here once it is"
        return text + (f"; H200 measured {measured / GiB:.2f} GiB" if measured else "")
    p = res["predicted"]
    text = (f"{head}: predicted on {res['gpu']} {p['peak_allocated_bytes'] / GiB:.2f} GiB allocated, "
            f"{p['peak_reserved_bytes'] / GiB:.2f} GiB reserved")
    if measured:
        text += f"; H200 measured {measured / GiB:.2f} GiB"
        if res["gpu"] == "h200":
            text += f" (prediction {p['peak_allocated_bytes'] / measured - 1:+.1%})"
    return text


def show_predictions(gpu: str, cases: list[Case], *, title: str = "") -> list[dict]:
    """Predict every case for ``gpu``, print one line each (see :func:`format_prediction`), return the results."""
    from .gpus import gpu as get_gpu
    g = get_gpu(gpu)
    print(title or f"predicted from this machine for {g.about or g.name} (meta tensors, not measured):")
    out = []
    for c in cases:
        res = predict_case(g.name, c)
        print("  " + format_prediction(res))
        out.append(res)
    return out


def forecast(gpu: str, rows, *, model: str = "gpt2", shapes=None) -> list[dict]:
    """Predict each bench row of ``rows`` at each shape on ``gpu``: one plain dict per (shape, row).

    Keys: ``model``, ``batch``, ``seq``, ``row``, ``gpu``, ``peak_allocated_bytes``, ``peak_reserved_bytes``,
    ``breakdown_bytes``, ``vs_first`` (peak / the first row's at the same shape), ``fits`` (reserved bytes
    within the GPU's memory), ``gpu_memory_bytes``, ``anchor`` (the H200 record, loosely matched: see
    :func:`_anchor_for`) and ``why_not`` (set, with the numbers ``None``, for a recipe the predictor rejects).
    """
    from ..models import spec
    from .gpus import gpu as get_gpu
    g = get_gpu(gpu)
    rows = list(rows)
    if not rows:
        raise ValueError("rows is empty: name at least one bench row (memopt_lib.bench.rows_for(model) lists them)")
    shapes = list(shapes if shapes is not None else (GPT2_SHAPES if spec(model).family == "gpt2" else LLAMA_SHAPES))
    out = []
    for batch, seq in shapes:
        first = None
        for row in rows:
            res = predict_case(g.name, Case(model, batch, seq, row), loose_anchor=True)
            p = res["predicted"] or {}
            peak = p.get("peak_allocated_bytes")
            first = first or peak
            anchor = res["anchor"]
            out.append({"model": model, "batch": batch, "seq": seq, "row": _name(row), "gpu": g.name,
                        "peak_allocated_bytes": peak, "peak_reserved_bytes": p.get("peak_reserved_bytes"),
                        "breakdown_bytes": dict(p.get("breakdown_bytes", {})),
                        "vs_first": peak / first if peak and first else None,
                        "fits": p["peak_reserved_bytes"] <= g.memory_bytes if p else None,
                        "gpu_memory_bytes": g.memory_bytes, "why_not": res["why_not"],
                        "anchor": {"name": anchor["name"], "source": anchor["source"],
                                   "peak_allocated_bytes": anchor["measured"]["steady"]} if anchor else None})
    return out


def format_forecast(results: list[dict]) -> str:
    """The table :func:`show_forecast` prints (GiB = 2**30 bytes)."""
    if not results:
        return "(nothing predicted)"
    lines = [f"predicted on {results[0]['gpu']} ({results[0]['gpu_memory_bytes'] / GiB:.1f} GiB), meta tensors, "
             "not measured:",
             f"  {'model':<9}{'shape':>10}  {'row':<26}{'peak alloc':>11}{'vs 1st':>8}{'reserved':>10}"
             f"{'fits':>6}  largest part at the peak   H200 measured"]
    for r in results:
        head = f"  {r['model']:<9}{str(r['batch']) + ' x ' + str(r['seq']):>10}  {r['row']:<26}"
        if r["peak_allocated_bytes"] is None:
            lines.append(head + f"not predicted ({r['why_not']})")
            continue
        bd = r["breakdown_bytes"]
        big = max(bd, key=bd.get)
        a = r["anchor"]
        anchor = (f"{a['peak_allocated_bytes'] / GiB:.2f} GiB ({r['peak_allocated_bytes'] / a['peak_allocated_bytes'] - 1:+.1%})"
                  if a else "-")
        lines.append(head + f"{r['peak_allocated_bytes'] / GiB:>7.2f} GiB{r['vs_first']:>7.2f}x"
                     f"{r['peak_reserved_bytes'] / GiB:>6.2f} GiB{'yes' if r['fits'] else 'NO':>6}  "
                     f"{big} {100 * bd[big] / r['peak_allocated_bytes']:.0f} %{'':<{max(0, 15 - len(big))}}{anchor}")
    lines.append("  (vs 1st: the peak over the first row's at the same shape; H200 measured: the repository's "
                 "record of the same step, with the prediction's error)")
    return "\n".join(lines)


def show_forecast(gpu: str, rows, *, llama_rows=(), gpt2_shapes=GPT2_SHAPES, llama_shapes=LLAMA_SHAPES) -> list[dict]:
    """Print and return :func:`forecast` for GPT-2 (``rows``) and the 7B (``llama_rows``, if any)."""
    results = forecast(gpu, rows, model="gpt2", shapes=gpt2_shapes) if rows else []
    llama_rows = list(llama_rows)
    if llama_rows:
        results += forecast(gpu, llama_rows, model="llama-7b", shapes=llama_shapes)
    print(format_forecast(results))
    return results
