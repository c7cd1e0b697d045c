"""Lab 11 checks: design a recipe for a card, predict its peak and its cost.

Graded interface (the lab's graded cell):

* ``design_recipe(card_gb, model, batch, seq) -> memopt_lib.recipe.Recipe`` -- the learner's choice of techniques
  for a ``card_gb`` GB card (12, 16 or 24; compute capability 8.6), full fine-tuning for GPT-2, QLoRA r=16 for the
  7B (no card of the course holds its full fine-tune);
* ``predict_peak_gib(recipe, model, batch, seq) -> float`` -- the learner's prediction of the steady step's peak
  allocated memory in GiB (``torch.cuda.max_memory_allocated``);
* ``predict_step_time_ratio(recipe, model, batch, seq) -> float`` -- the learner's prediction of the step time
  relative to ``memopt_lib.predict.cost.time_base(model)`` (fp32 full fine-tuning for GPT-2, the default QLoRA
  stack for a Llama) at the same batch and length.

Reference namespace: :mod:`memopt_lib.budget_design`. The collects only call the learner's three functions on tasks
drawn per run (:func:`tasks`) and hand back plain data (``Recipe.to_dict()``, two numbers). The judges rebuild the
``Recipe`` from that data (its own validation), check it is a recipe of the task (full fine-tuning for GPT-2;
4-bit + LoRA r=16 with the default targets for the 7B) and predict it with the library, in the grader's process:

* peak: :func:`memopt_lib.predict.predict_step` on the task's card (:data:`memopt_lib.predict.cost.CARDS`);
* cost: :func:`memopt_lib.predict.cost.time_ratio` (FLOPs counted on a meta step, host bytes over PCIe).

Predictions are cached per (card, model, shape, recipe) in the grader's process, so the checks of one submission,
and submissions that choose the same recipe, share them. The predictor composes
the recipe itself (:func:`memopt_lib.recipe.compose` on a meta "GPU"), so every ``Recipe`` field is predicted; a
field added to ``Recipe`` before the predictor models it raises ``NotImplementedError``, which fails the check with
"cannot be predicted here", never a crash.

Where the thresholds come from
------------------------------
* ``fits_the_card``: the predictor's ``peak_reserved_bytes`` (what the caching allocator holds, the bench's
  protocol) + :data:`CUDA_CONTEXT_BYTES` (0.5 GiB, lab 09's budget) + a paged optimizer's state (the predictor leaves
  it off the GPU; when memory is short it comes back) <= the card's memory.
* ``pays_only_for_what_it_needs``: the recipe's cost-model ratio at most ``(1 + COST_SLACK)`` x the reference
  design's (the cheapest fitting candidate of :func:`memopt_lib.budget_design.candidates`). Every technique switched
  on for every card costs checkpointing's +24 % (GPT-2) where a 24 GB card needs none.
* ``peak_prediction_accurate``: within ``PEAK_TOL`` (15 %) of the predictor's peak allocated. The reference's
  anchor-calibrated model measures +1 % to +3 % (GPT-2) and within 0.5 % (7B) on its designs for all 21 tasks of
  the pool (12 GPT-2, 9 7B); the lab 01 calculator alone -41 % to +23 % on 33 GPT-2 recipes at 8 x 512 and 8 x 1024;
  "weights + optimizer only" and "MiB instead of GiB" fail with their own hint (``tests/wrong_answers/lab11.py``).
  Calling the library's predictor (or cost model) from a prediction function fails: the exercise is the arithmetic.
* ``step_time_prediction_accurate``: within ``TIME_TOL`` (15 %) of the cost model's ratio. The reference's FLOP
  arithmetic (2N forward, 4N / 2N backward, +2N of the blocks for checkpointing) is within 7 % on the same 21
  tasks; "1.0 for every recipe" is about +90 % or more off for the half-precision recipes every design uses.
* GPU (``gpu_only``), on the first GPT-2 task: the recipe composed by :func:`memopt_lib.recipe.compose` at the real
  shape, two steps. ``measured_fit``: the memory the grader measures from outside the child (``cuda-driver``: the
  driver's per-process used memory, CUDA context included) must fit the card, and the learner's peak must be within
  ``GPU_PEAK_TOL`` of ``torch.cuda.max_memory_allocated`` of the step. ``measured_step_time``: the learner's ratio
  within ``GPU_TIME_TOL`` (35 %) of the measured ratio to the time base on this GPU (the cost model's card is an
  sm86 card; an H200 runs bf16 ~2.4x faster than fp32, not 2x: ``.ci/gpu_results/h200-bench-gpt2.json``).
  Step times are measured inside the child (the grader has no outside clock of a kernel); the step and the
  timing are the checker's code, the learner's code only chose the recipe. Not run on the CPU machine this kit is
  developed on.
"""
from __future__ import annotations

import contextlib
import math
from functools import lru_cache

import torch

from .. import budget_design
from ..predict import cost
from ..profiler import GiB
from ..recipe import Recipe
from .base import Registry

CUDA_CONTEXT_BYTES = GiB // 2
COST_SLACK = 0.10
PEAK_TOL = 0.15
TIME_TOL = 0.15
GPU_PEAK_TOL = 0.25
GPU_TIME_TOL = 0.35
GPT2_SHAPES = ((16, 1024), (32, 512), (8, 1024), (16, 512))
LLAMA_SHAPES = ((8, 512), (8, 1024), (4, 512))

CHECKS = Registry(lab="11", reference=lambda: {"design_recipe": budget_design.design_recipe,
                                               "predict_peak_gib": budget_design.predict_peak_gib,
                                               "predict_step_time_ratio": budget_design.predict_step_time_ratio})
NEEDS = ["design_recipe", "predict_peak_gib", "predict_step_time_ratio"]


def tasks(ctx) -> list[dict]:
    """Two GPT-2 tasks on two different cards and one 7B task, drawn per run."""
    cards = ctx.rng.sample(sorted(cost.CARDS), 3)
    g1, g2 = ctx.rng.sample(GPT2_SHAPES, 2)
    ll = ctx.rng.choice(LLAMA_SHAPES)
    return [{"card_gb": cards[0], "model": "gpt2", "batch": g1[0], "seq": g1[1]},
            {"card_gb": cards[1], "model": "gpt2", "batch": g2[0], "seq": g2[1]},
            {"card_gb": cards[2], "model": "llama-7b", "batch": ll[0], "seq": ll[1]}]


def _number(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else repr(v)


class _LibraryModelCalled(Exception):
    """A prediction function called the model it is graded against (stopped at once: no seconds spent)."""


@contextlib.contextmanager
def _watch_library_models(calls: list):
    """Stop and note a call of the library's predictor or cost model (the answers to be predicted) inside."""
    from unittest import mock

    from ..predict import step

    def spy(orig, what):
        def f(*a, **k):
            calls.append(what)
            raise _LibraryModelCalled(what)
        return f
    with mock.patch.object(step, "_run", spy(step._run, "memopt_lib.predict.predict_step")), \
            mock.patch.object(cost, "_flops", spy(cost._flops, "memopt_lib.predict.cost")):
        yield


def _answer(ns, t: dict) -> dict:
    rc = ns["design_recipe"](t["card_gb"], t["model"], t["batch"], t["seq"])  # a design may use any tool
    if not isinstance(rc, Recipe):
        return {**t, "error": f"design_recipe returned {type(rc).__name__}, not a memopt_lib.recipe.Recipe"}
    args = (rc, t["model"], t["batch"], t["seq"])
    peak_calls, time_calls, peak, ratio = [], [], None, None
    try:
        with _watch_library_models(peak_calls):
            peak = ns["predict_peak_gib"](*args)
    except _LibraryModelCalled:
        pass
    try:
        with _watch_library_models(time_calls):
            ratio = ns["predict_step_time_ratio"](*args)
    except _LibraryModelCalled:
        pass
    return {**t, "recipe": rc.to_dict(), "peak_gib": _number(peak), "time_ratio": _number(ratio),
            "peak_used": sorted(set(peak_calls)), "time_used": sorted(set(time_calls))}


def _collect(ns, ctx):
    return {"answers": [_answer(ns, t) for t in tasks(ctx)]}


# ------------------------------------------------------------------------------- the judge's side (no learner code)
def answers(got, ctx) -> list[dict]:
    """The learner's answers, each under the task the judge draws itself (the child's copy is not trusted)."""
    mine, drawn = got.data.get("answers") or [], tasks(ctx)
    assert len(mine) == len(drawn), f"checker error: {len(mine)} answers for {len(drawn)} tasks"
    return [{**a, **t} for a, t in zip(mine, drawn)]


def _label(a: dict) -> str:
    return f"{a['model']} at {a['batch']} x {a['seq']} on a {a['card_gb']} GB card"


def rebuild(a: dict) -> Recipe:
    """The learner's recipe from plain data, validated by ``Recipe`` and held to the task's terms."""
    assert "error" not in a, f"{_label(a)}: {a['error']}"
    d = dict(a["recipe"])
    if d.get("lora_targets") is not None:
        d["lora_targets"] = tuple(d["lora_targets"])
    try:
        rc = Recipe(**d)
    except (TypeError, ValueError) as err:
        raise AssertionError(f"{_label(a)}: not a valid Recipe: {err}") from None
    if a["model"] == "gpt2":
        assert rc.lora_rank == 0 and not rc.quantization, (
            f"{_label(a)}: the GPT-2 tasks are full fine-tuning (every weight trains): lora_rank=0, no quantization; "
            "find the memory with precision, the optimizer, checkpointing and micro-batches")
    else:
        assert rc.quantization and rc.lora_rank == 16 and rc.lora_targets is None, (
            f"{_label(a)}: the 7B task is QLoRA with LoRA r=16 on the default targets (lora_rank=16, "
            f"lora_targets=None, quantization='nf4-dq' or 'nf4'); got quantization={rc.quantization!r}, "
            f"lora_rank={rc.lora_rank}, lora_targets={rc.lora_targets}")
    return rc


def _key(a: dict, rc: Recipe) -> tuple:
    return (a["card_gb"], a["model"], a["batch"], a["seq"], tuple(sorted((k, str(v)) for k, v in rc.to_dict().items()
                                                                      if k not in ("name", "notes", "lr"))))


@lru_cache(maxsize=256)
def _predicted(key: tuple, rc: Recipe) -> dict:
    from ..bench import Row
    from ..predict import predict_step
    card_gb, model, batch, seq, _ = key
    c = cost.CARDS[card_gb]
    try:
        # no FLOP count here: time_ratio takes both sides' FLOPs from cost.step_flops (it drops the predictor's)
        p = predict_step(c.gpu, model, batch, seq, row=Row(rc.name, rc), steps=2, count_flops=False)
    except NotImplementedError as err:
        return {"unpredictable": str(err)}
    paged = 2 * p["trainable_params"] if rc.optimizer == "paged_adamw_8bit" else 0  # 8-bit state, off the GPU
    return {"peak_allocated_bytes": p["peak_allocated_bytes"], "peak_reserved_bytes": p["peak_reserved_bytes"],
            "paged_state_bytes": paged, "breakdown_bytes": p["breakdown_bytes"],
            "time_ratio": cost.time_ratio(c, model, batch, seq, rc, p)}


def predicted(a: dict, rc: Recipe) -> dict:
    """The library's prediction of answer ``a``'s recipe; AssertionError when the predictor cannot model it."""
    p = _predicted(_key(a, rc), rc)
    assert "unpredictable" not in p, (
        f"{_label(a)}: your recipe cannot be predicted here ({p.get('unpredictable')}); choose techniques the "
        "predictor models (every field of memopt_lib.recipe.Recipe it lists in its error)")
    return p


def _used_bytes(p: dict) -> int:
    return p["peak_reserved_bytes"] + CUDA_CONTEXT_BYTES + p["paged_state_bytes"]


def _recipe_text(rc: Recipe) -> str:
    on = [rc.precision]
    if rc.quantization:
        on.append(f"{rc.quantization} ({rc.prepare})")
    if rc.checkpointing:
        on.append("checkpointing")
    if rc.micro_batches > 1:
        on.append(f"{rc.micro_batches} micro-batches")
    on.append(rc.optimizer)
    for f in ("chunked_loss", "optimizer_in_backward"):
        if getattr(rc, f):
            on.append(f)
    return " + ".join(on)


@CHECKS.check(points=3, needs=NEEDS)
def fits_the_card(ns, ctx):
    """each recipe is predicted to fit its card: reserved + 0.5 GiB CUDA context <= the card"""
    return _collect(ns, ctx)


@fits_the_card.judge
def _(got, ref, ctx):
    shown = []
    for a in answers(got, ctx):
        rc = rebuild(a)
        p = predicted(a, rc)
        used, card = _used_bytes(p), cost.CARDS[a["card_gb"]].memory_bytes
        assert used <= card, (
            f"{_label(a)}: {_recipe_text(rc)} is predicted to reserve {p['peak_reserved_bytes'] / GiB:.2f} GiB "
            f"(peak allocated {p['peak_allocated_bytes'] / GiB:.2f} GiB) + 0.5 GiB CUDA context"
            + (f" + {p['paged_state_bytes'] / GiB:.2f} GiB paged state" if p["paged_state_bytes"] else "")
            + f" = {used / GiB:.2f} GiB > {card / GiB:.0f} GiB: it does not fit. Reserved memory is above the "
            "allocated peak (the allocator's cached blocks): leave room for it; fewer tokens per micro-batch or "
            "checkpointing shrink the activations, 8-bit AdamW the optimizer state")
        shown.append(round(used / GiB, 2))
    return {"predicted_used_GiB": shown}


@CHECKS.check(points=2, needs=NEEDS)
def pays_only_for_what_it_needs(ns, ctx):
    """each recipe costs little more step time than the cheapest design that fits (cost model)"""
    return _collect(ns, ctx)


@pays_only_for_what_it_needs.judge
def _(got, ref, ctx):
    mine, theirs = answers(got, ctx), answers(ref, ctx)
    same = len({str(sorted(a.get("recipe", {}).items())) for a in mine if a["model"] == "gpt2"}) == 1
    shown = []
    for a, r in zip(mine, theirs):
        rc, rrc = rebuild(a), rebuild(r)
        p = predicted(a, rc)
        if _used_bytes(p) > cost.CARDS[a["card_gb"]].memory_bytes:
            raise AssertionError(f"{_label(a)}: the recipe does not fit the card (see fits_the_card); a recipe that "
                                 "does not run has no step time")
        best = cost.time_ratio(cost.CARDS[r["card_gb"]], r["model"], r["batch"], r["seq"], rrc)
        if p["time_ratio"] > (1 + COST_SLACK) * best:
            extra = [f for f in ("checkpointing", "micro_batches", "optimizer") if getattr(rc, f) != getattr(rrc, f)]
            raise AssertionError(
                f"{_label(a)}: {_recipe_text(rc)} costs {p['time_ratio']:.2f}x the time base's step, a design that "
                f"fits costs {best:.2f}x ({_recipe_text(rrc)}; they differ in {', '.join(extra) or 'precision'}). "
                "Switch on only what this card needs: checkpointing recomputes the forward (+~24 %), small "
                "micro-batches use the GPU less well"
                + (". design_recipe returns the same GPT-2 recipe for every card: it must depend on card_gb "
                   "(and on batch and seq)" if same else ""))
        shown.append(round(p["time_ratio"] / best, 3))
    return {"cost_over_best": shown}


@CHECKS.check(points=2, needs=NEEDS)
def peak_prediction_accurate(ns, ctx):
    """predict_peak_gib is within 15 % of the predictor's peak for each chosen recipe"""
    return _collect(ns, ctx)


@peak_prediction_accurate.judge
def _(got, ref, ctx):
    shown = []
    for a in answers(got, ctx):
        rc = rebuild(a)
        p = predicted(a, rc)
        want = p["peak_allocated_bytes"] / GiB
        assert not a.get("peak_used"), (f"{_label(a)}: predict_peak_gib called {a['peak_used'][0]}, the model it is "
                                        "graded against: the exercise is your own arithmetic (static state + tokens "
                                        "of one micro-batch x bytes per token)")
        assert isinstance(a["peak_gib"], float), f"{_label(a)}: predict_peak_gib returned {a['peak_gib']}, not GiB"
        err = a["peak_gib"] / want - 1
        if abs(err) > PEAK_TOL:
            parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in p["breakdown_bytes"].items() if v > 0.01 * GiB)
            hint = ("about 1024 x the truth: return GiB, not MiB" if 500 < a["peak_gib"] / want < 2000
                    else "does it count the activations of one micro-batch (they grow with its tokens)?"
                    if err < -0.4 else "are gradients counted while none is alive (one micro-batch: they are "
                    "freed before the next forward and made after the peak)?" if err > 0 else
                    "what does autocast keep in fp32? the logits of the loss?")
            raise AssertionError(
                f"{_label(a)}: predict_peak_gib says {a['peak_gib']:.2f} GiB for {_recipe_text(rc)}, the predictor "
                f"{want:.2f} GiB ({err:+.0%}; allowed +-{PEAK_TOL:.0%}); at its peak: {parts} GiB. Likely: {hint}")
        shown.append(round(err, 3))
    return {"peak_relative_error": shown}


@CHECKS.check(points=2, needs=NEEDS)
def step_time_prediction_accurate(ns, ctx):
    """predict_step_time_ratio is within 15 % of the cost model's ratio for each chosen recipe"""
    return _collect(ns, ctx)


@step_time_prediction_accurate.judge
def _(got, ref, ctx):
    shown = []
    for a in answers(got, ctx):
        rc = rebuild(a)
        want = predicted(a, rc)["time_ratio"]
        assert not a.get("time_used"), (f"{_label(a)}: predict_step_time_ratio called {a['time_used'][0]}, the model "
                                        "it is graded against: the exercise is your own FLOP arithmetic")
        assert isinstance(a["time_ratio"], float), f"{_label(a)}: predict_step_time_ratio returned {a['time_ratio']}"
        err = a["time_ratio"] / want - 1
        assert abs(err) <= TIME_TOL, (
            f"{_label(a)}: predict_step_time_ratio says {a['time_ratio']:.2f}x for {_recipe_text(rc)}, the cost model "
            f"{want:.2f}x ({err:+.0%}; allowed +-{TIME_TOL:.0%}) relative to "
            f"{cost.time_base(a['model']).name!r}. Likely: "
            + ("16-bit matmuls run at twice the fp32 rate" if abs(a["time_ratio"] - 2 * want) < 0.1 * want
               or abs(2 * a["time_ratio"] - want) < 0.1 * want else
               "checkpointing recomputes the blocks' forward (not the lm_head); a frozen weight needs no weight "
               "gradient; micro-batches of few tokens run the GPU below its peak"))
        shown.append(round(err, 3))
    return {"time_relative_error": shown}


# ------------------------------------------------------------------------------------------------- GPU: measured
def _gpt2_answer(ns, ctx) -> dict:
    return _answer(ns, next(t for t in tasks(ctx) if t["model"] == "gpt2"))


def _timed_steps(rc: Recipe, t: dict, device, steps: int = 3) -> dict:
    import time

    from ..recipe import compose
    from ..text import random_batch
    c = compose(rc, t["model"], device)
    batch = random_batch(c.model.config.vocab_size, t["batch"], t["seq"], device=device, seed=0)
    c.step(batch)  # the first step creates the optimizer state
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        c.step(batch)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    out = {"max_allocated_bytes": torch.cuda.max_memory_allocated(device),
           "max_reserved_bytes": torch.cuda.max_memory_reserved(device), "step_time_s": sorted(times)[len(times) // 2]}
    del c, batch
    torch.cuda.empty_cache()
    return out


@CHECKS.check(points=2, needs=NEEDS, gpu_only=True, measures_memory=True)
def measured_fit(ns, ctx):
    """GPU: the first GPT-2 recipe, composed and run at its shape, fits its card and peaks as predicted"""
    a = _gpt2_answer(ns, ctx)
    torch.cuda.empty_cache()
    if "error" not in a:
        a["measured"] = _timed_steps(rebuild(a), a, ctx.device)
    return {"answer": a}


@measured_fit.judge
def _(got, ref, ctx):
    a = {**got.data["answer"], **next(t for t in tasks(ctx) if t["model"] == "gpt2")}
    rc, m = rebuild(a), a.get("measured") or {}
    card = cost.CARDS[a["card_gb"]].memory_bytes
    if got.memory is not None and got.memory.source == "cuda-driver":
        used = got.memory.peak_bytes  # measured by the grader from outside: reserved + the real CUDA context
        assert m["max_reserved_bytes"] <= used + 64 * 2**20, (
            "checker error: the child reports more reserved memory than the driver measured")
    else:
        used = m["max_reserved_bytes"] + CUDA_CONTEXT_BYTES
    assert used <= card, (f"{_label(a)}: {_recipe_text(rc)} used {used / GiB:.2f} GiB of GPU memory (measured), "
                          f"more than the {card / GiB:.0f} GiB card")
    want = m["max_allocated_bytes"] / GiB
    err = a["peak_gib"] / want - 1 if isinstance(a["peak_gib"], float) else math.inf
    assert abs(err) <= GPU_PEAK_TOL, (f"{_label(a)}: predict_peak_gib says {a['peak_gib']}, measured peak allocated "
                                      f"{want:.2f} GiB ({err:+.0%}; allowed +-{GPU_PEAK_TOL:.0%})")
    return {"used_GiB": round(used / GiB, 2), "peak_allocated_GiB": round(want, 2), "peak_relative_error": err}


@CHECKS.check(points=1, needs=NEEDS, gpu_only=True)
def measured_step_time(ns, ctx):
    """GPU: the first GPT-2 recipe's step time over the time base's, measured, is close to the prediction"""
    a = _gpt2_answer(ns, ctx)
    if "error" not in a:
        a["measured"] = _timed_steps(rebuild(a), a, ctx.device)
        a["base"] = _timed_steps(cost.time_base(a["model"]), a, ctx.device)
    return {"answer": a}


@measured_step_time.judge
def _(got, ref, ctx):
    a = {**got.data["answer"], **next(t for t in tasks(ctx) if t["model"] == "gpt2")}
    rc = rebuild(a)
    ratio = a["measured"]["step_time_s"] / a["base"]["step_time_s"]
    err = a["time_ratio"] / ratio - 1 if isinstance(a["time_ratio"], float) else math.inf
    assert abs(err) <= GPU_TIME_TOL, (
        f"{_label(a)}: predict_step_time_ratio says {a['time_ratio']}x for {_recipe_text(rc)}, measured "
        f"{ratio:.2f}x the time base on this GPU ({err:+.0%}; allowed +-{GPU_TIME_TOL:.0%})")
    return {"measured_time_ratio": round(ratio, 3), "time_relative_error": round(err, 3)}
