"""Lab 11 (budget design): the cost model, the reference design, the checks' wrong answers and unpredictable recipes."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from memopt_lib import budget_design
from memopt_lib.checks import CheckContext, registry
from memopt_lib.checks.base import classify_exception, collect_evidence, decide
from memopt_lib.notebook import namespace_from
from memopt_lib.predict import cost
from memopt_lib.recipe import FP32, Recipe

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
SEED = 1234  # the seed of tests/test_lab_checks.py: the same tasks, so the judges' cached predictions are shared


def test_flops_count_checkpointing_lora_and_extrapolate_layers():
    base = cost.step_flops("gpt2", 8, 512, FP32)
    blocks, head = budget_design._matmul_weights("gpt2")
    # 6 N per token for every matmul weight, plus attention (QK^T and AV), within 10 %
    assert base == pytest.approx(6 * (blocks + head) * 8 * 512, rel=0.10)
    ckpt = cost.step_flops("gpt2", 8, 512, FP32.with_(checkpointing=True))
    assert ckpt - base == pytest.approx(2 * blocks * 8 * 512, rel=0.15)  # the blocks' forward, not the lm_head
    lora = cost.step_flops("gpt2", 8, 512, Recipe(lora_rank=16))
    assert lora / base == pytest.approx(4 / 6, rel=0.06)  # frozen weights: no weight-gradient matmul
    assert cost.step_flops("gpt2", 8, 512, FP32.with_(micro_batches=4)) == base  # same work in pieces


def test_time_ratio_terms_precision_micro_batches_and_host_bytes():
    c = cost.CARDS[12]
    assert cost.time_ratio(c, "gpt2", 8, 512, FP32) == pytest.approx(1.0)
    assert cost.time_ratio(c, "gpt2", 8, 512, Recipe(precision="amp")) == pytest.approx(1 / cost.HALF_PRECISION_SPEEDUP)
    t4, t1 = 2 * 512, 8 * 512
    want = (t1 / (t1 + cost.HALF_SATURATION_TOKENS)) / (t4 / (t4 + cost.HALF_SATURATION_TOKENS))
    assert cost.time_ratio(c, "gpt2", 8, 512, FP32.with_(micro_batches=4)) == pytest.approx(want)
    host = Recipe(lora_rank=16, embedding="host")
    terms = cost.step_time_s(c, "gpt2", 8, 512, host)
    assert terms["host_transfer_bytes"] == 8 * 512 * 768 * 2 and terms["transfer_s"] > 0
    assert cost.step_time_s(c, "gpt2", 8, 512, host, {"flops": 1e12, "host_transfer_bytes": 0})["flops"] == 1e12
    with pytest.raises(ValueError, match="memory_gib"):
        cost.card(0)


def test_design_depends_on_the_card_and_shrinks_with_it():
    big, small = (budget_design.design_recipe(gb, "gpt2", 16, 1024) for gb in (24, 12))
    assert big != small
    assert budget_design.predict_peak_gib(small, "gpt2", 16, 1024) < budget_design.predict_peak_gib(big, "gpt2", 16, 1024)
    with pytest.raises(ValueError, match="no candidate"):
        budget_design.design_recipe(1, "llama-7b", 8, 1024)


# ------------------------------------------------------------------------------ the checks on wrong answers
_SOL: dict = {}
_REF: dict = {}


def _grade(check_name, ns):
    reg = registry("11")
    check = next(c for c in reg if c.name == check_name)
    ctx = CheckContext.here(seed=SEED)
    try:
        got = collect_evidence(check, ns, ctx.fork())
    except Exception as err:  # noqa: BLE001
        status, msg = classify_exception(err)
        return status, msg
    if check_name not in _REF:
        _REF[check_name] = collect_evidence(check, reg.reference_namespace(), ctx.fork())
    r = decide(check, got, _REF[check_name], ctx)
    return r.status, r.message


def _solution():
    if not _SOL:
        p = ROOT / "solutions" / "11_budget_design.ipynb"
        _SOL.update(namespace_from(p, p))
    return dict(_SOL)


def _cases():
    from wrong_answers.lab11 import WRONG
    return [pytest.param(w, id=w.name) for w in WRONG]


@pytest.mark.slow
@pytest.mark.parametrize("wrong", _cases())
def test_lab11_wrong_answers_fail(wrong):
    ns = {**_solution(), wrong.graded: wrong.fn}
    for name in wrong.checks:
        status, msg = _grade(name, ns)
        assert status != "passed", f"{wrong.name!r} passed {name}"
        assert re.search(wrong.message, msg, re.I), f"{wrong.name!r} on {name}: {msg}"


def test_a_recipe_the_predictor_cannot_model_fails_with_a_clear_message(monkeypatch):
    from memopt_lib.checks import lab11_budget_design as lab11

    def refuse(*a, **k):
        raise NotImplementedError("the predictor does not model chunked_loss yet (recipe 'x')")
    monkeypatch.setattr("memopt_lib.predict.predict_step", refuse)
    lab11._predicted.cache_clear()
    answer = {"card_gb": 12, "model": "gpt2", "batch": 8, "seq": 512,
              "recipe": Recipe("x", precision="amp", chunked_loss=True).to_dict()}
    try:
        with pytest.raises(AssertionError, match="cannot be predicted here.*chunked_loss"):
            lab11.predicted(answer, lab11.rebuild(answer))
    finally:
        lab11._predicted.cache_clear()


def test_rebuild_holds_the_recipe_to_the_task():
    from memopt_lib.checks.lab11_budget_design import rebuild
    task = {"card_gb": 12, "model": "llama-7b", "batch": 8, "seq": 512}
    with pytest.raises(AssertionError, match="QLoRA with LoRA r=16"):
        rebuild({**task, "recipe": Recipe(lora_rank=8, quantization="nf4", precision="amp").to_dict()})
    with pytest.raises(AssertionError, match="not a valid Recipe"):
        rebuild({**task, "recipe": {**Recipe().to_dict(), "precision": "fp8"}})
    with pytest.raises(AssertionError, match="not a valid Recipe"):
        rebuild({**task, "recipe": {**Recipe().to_dict(), "warp_drive": True}})


def _gpu_answer(**measured):
    return {"card_gb": 12, "model": "gpt2", "batch": 16, "seq": 512, "peak_gib": 7.5, "time_ratio": 0.53,
            "recipe": Recipe("amp x2", precision="amp", micro_batches=2).to_dict(),
            "measured": {"max_allocated_bytes": int(7.4 * 2**30), "max_reserved_bytes": int(8.0 * 2**30),
                         "step_time_s": 0.05, **measured}}


def test_gpu_judges_read_the_outside_meter_and_the_measured_times():
    """The GPU checks' judges on evidence shaped as a GPU run hands it back (no GPU on the development machine)."""
    from memopt_lib.checks import lab11_budget_design as lab11
    from memopt_lib.checks.base import Evidence, MemoryReading
    fit = next(c for c in registry("11") if c.name == "measured_fit")
    timing = next(c for c in registry("11") if c.name == "measured_step_time")
    ctx = CheckContext.here(seed=SEED)

    def reading(gib):
        return MemoryReading(int(gib * 2**30), 2**29, "cuda-driver")
    card = next(t for t in lab11.tasks(ctx.fork()) if t["model"] == "gpt2")["card_gb"]  # the judge's own draw
    ok = fit.judge_fn(Evidence({"answer": _gpu_answer()}, reading(8.6)), None, ctx.fork())
    assert ok["used_GiB"] == 8.6
    with pytest.raises(AssertionError, match=f"more than the {card} GiB card"):
        fit.judge_fn(Evidence({"answer": _gpu_answer()}, reading(card + 0.4)), None, ctx.fork())
    with pytest.raises(AssertionError, match="checker error"):  # the child claims more than the driver saw
        fit.judge_fn(Evidence({"answer": _gpu_answer()}, reading(7.0)), None, ctx.fork())
    with pytest.raises(AssertionError, match="measured peak allocated"):
        fit.judge_fn(Evidence({"answer": {**_gpu_answer(), "peak_gib": 3.0}}, reading(8.6)), None, ctx.fork())
    # in a notebook (in-process tracker): reserved + the stated CUDA context
    assert fit.judge_fn(Evidence({"answer": _gpu_answer()}, MemoryReading(1, 0, "tracker")), None, ctx.fork())["used_GiB"] == 8.5
    timed = {**_gpu_answer(), "base": {"step_time_s": 0.1}}
    assert timing.judge_fn(Evidence({"answer": timed}), None, ctx.fork())["measured_time_ratio"] == 0.5
    with pytest.raises(AssertionError, match="measured 0.50x"):
        timing.judge_fn(Evidence({"answer": {**timed, "time_ratio": 1.0}}), None, ctx.fork())
    assert lab11.GPU_TIME_TOL < 0.5


def test_the_judges_use_the_tasks_they_draw_not_the_childs_copy():
    from memopt_lib.checks import lab11_budget_design as lab11
    from memopt_lib.checks.base import Evidence
    ctx = CheckContext.here(seed=SEED)
    drawn = lab11.tasks(ctx.fork())
    forged = [{**t, "card_gb": 24, "batch": 1, "seq": 1, "peak_gib": 1.0} for t in drawn]
    got = lab11.answers(Evidence({"answers": forged}), ctx.fork())
    assert [(a["card_gb"], a["batch"], a["seq"]) for a in got] == [(t["card_gb"], t["batch"], t["seq"]) for t in drawn]
    with pytest.raises(AssertionError, match="checker error"):
        lab11.answers(Evidence({"answers": forged[:1]}), ctx.fork())
