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

A recipe the predictor does not model yet (chunked cross-entropy, the optimizer step in backward, embedding /
``lm_head`` placement, the lean 4-bit preparation, offloading) is listed with the reason instead of a number: the
row says where a prediction will appear once the predictor models it, and nothing is made up meanwhile.

    from memopt_lib.predict.in_labs import Case, show_predictions
    show_predictions("t4", [Case("gpt2", 8, 512, "8-bit AdamW"), Case("llama-7b", 8, 512, "QLoRA default")])
"""
from __future__ import annotations

from dataclasses import dataclass, field

GiB = float(1 << 30)
GPUS_FOR_LABS = ("t4", "a100", "h100", "h200")
STEPS = 2  # steps replayed per case (see the module docstring)


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


def _anchor_for(case: Case) -> dict | None:
    """The H200 measurement of exactly this configuration, if the repository holds one."""
    from .anchors import measurements
    def key(opts):  # how many steps are replayed is not part of the configuration
        return tuple(sorted((k, v) for k, v in opts.items() if k != "steps"))
    want = (case.model, case.batch, case.seq, case.row_name.lower(), key(case.options))
    for m in measurements():
        model, batch, seq, row, opts = m["config"]
        name = row if isinstance(row, str) else row.name
        if (model, batch, seq, name.lower(), key(opts)) == want:
            return m
    return None


def predict_case(gpu: str, case: Case) -> dict:
    """``{"case", "gpu", "predicted": predict_step's dict or None, "why_not": str, "anchor": dict or None}``.

    ``why_not`` is the predictor's own reason when it does not model the recipe (or ``case.not_modelled``).
    The anchor is looked up whatever the GPU (it is an H200 measurement: compare it with the ``"h200"``
    prediction; on another GPU it shows the order of magnitude only).
    """
    from .gpus import gpu as get_gpu
    from .step import predict_step
    g = get_gpu(gpu)  # a clear error for an unknown GPU name
    key = (g.name, case.model, case.batch, case.seq, case.row_name, tuple(sorted(case.options.items())))
    if case.not_modelled:
        return {"case": case, "gpu": g.name, "predicted": None, "why_not": case.not_modelled, "anchor": None}
    if key not in _MEMO:
        try:
            opts = {"steps": STEPS, **case.options}
            _MEMO[key] = (predict_step(g, case.model, case.batch, case.seq, case.row, **opts), "")
        except NotImplementedError as err:  # the recipe uses a technique the predictor does not model yet
            _MEMO[key] = (None, str(err))
    pred, why = _MEMO[key]
    return {"case": case, "gpu": g.name, "predicted": pred, "why_not": why, "anchor": _anchor_for(case)}


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
