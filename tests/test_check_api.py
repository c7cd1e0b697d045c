"""The check API: collect hands back plain data, judge decides from two pieces of evidence."""
import math

import pytest
import torch

from memopt_lib.checks.base import (CheckContext, Evidence, Registry, fingerprint, fingerprint_error, plain,
                                    run_checks)


def _registry():
    reg = Registry(lab="98", reference=lambda: {"square": lambda x: x * x})

    @reg.check(points=2, needs=["square"])
    def squares(ns, ctx):
        xs = [ctx.rng.randint(-50, 50) for _ in range(5)]
        return {"xs": xs, "ys": [ns["square"](x) for x in xs]}

    @squares.judge
    def _(got, ref, ctx):
        assert got.data["xs"] == ref.data["xs"], "checker error: the two collects drew different inputs"
        assert got.data["ys"] == ref.data["ys"], f"expected {ref.data['ys']}, got {got.data['ys']}"

    @reg.check(points=1, needs=["square"], measures_memory=True)
    def lean(ns, ctx):
        x = torch.ones(1000)
        return {"y": float(ns["square"](x).sum())}

    @lean.judge
    def _(got, ref, ctx):
        assert got.memory.source == "tracker" and ref.memory is not None
        # the rise above the start: tensors other code left alive count in both peaks, not in the rise
        assert got.memory.delta_bytes <= 1.5 * ref.memory.delta_bytes + 4096, "uses more memory than the reference"

    return reg


def _ctx():
    return CheckContext(torch.device("cpu"), None, seed=3)


def test_right_answer_passes_and_wrong_answer_fails():
    reg = _registry()
    assert [r.status for r in run_checks(reg, {"square": lambda x: x * x}, _ctx())] == ["passed", "passed"]
    res = run_checks(reg, {"square": lambda x: x * 2}, _ctx(), only=["squares"])
    assert res[0].status == "failed" and "expected" in res[0].message and res[0].score == 0


def test_memory_is_measured_around_the_collect():
    reg = _registry()

    def wasteful(x):
        junk = [torch.empty(10_000) for _ in range(4)]  # 160 kB alive during the call
        return x * x + 0 * len(junk)

    res = run_checks(reg, {"square": wasteful}, _ctx(), only=["lean"])[0]
    ok = run_checks(reg, {"square": lambda x: x * x}, _ctx(), only=["lean"])[0]
    assert ok.status == "passed" and ok.measurements["memory_source"] == "tracker"
    assert ok.measurements["peak_bytes"] >= 4000
    # a failing check still shows what was measured, next to the reference
    assert res.status == "failed" and res.measurements["peak_bytes"] > ok.measurements["peak_bytes"] + 150_000
    assert res.measurements["reference_peak_bytes"] == ok.measurements["reference_peak_bytes"]


def test_student_exceptions_are_classified_and_missing_names_not_run():
    reg = _registry()
    res = run_checks(reg, {"square": lambda x: (_ for _ in ()).throw(NotImplementedError())}, _ctx(), only=["squares"])
    assert res[0].status == "failed" and "not implemented" in res[0].message
    res = run_checks(reg, {"square": lambda x: 1 / 0}, _ctx(), only=["squares"])
    assert res[0].status == "error" and "ZeroDivisionError" in res[0].message
    assert run_checks(reg, {}, _ctx())[0].status == "not_run"


def test_fingerprint_tells_tensors_apart_and_survives_json():
    a = {"w": torch.randn(50, 7, dtype=torch.float64), "b": None}
    fa = fingerprint(a, seed=11)
    assert fingerprint_error(plain(fa), fa) == 0.0
    b = {"w": a["w"].clone(), "b": None}
    b["w"][3, 2] += 1e-3 * a["w"].norm()
    assert 1e-5 < fingerprint_error(fingerprint(b, seed=11), fa) < 1e-2
    assert fingerprint_error(fingerprint({"w": a["w"]}, seed=11), fa) == math.inf  # names differ
    assert fingerprint(a, seed=12)["w"] != fa["w"]  # the projections depend on the seed


def test_plain_rejects_objects():
    assert plain({"a": (1, 2.5, torch.tensor(3.0))}) == {"a": [1, 2.5, 3.0]}
    with pytest.raises(TypeError):
        plain({"model": torch.nn.Linear(2, 2)})
    assert isinstance(Evidence({}).data, dict)


def test_fingerprint_is_chunked_light_and_still_sees_one_element():
    from memopt_lib.checks.base import FINGERPRINT_CHUNK
    from memopt_lib.profiler import MemoryTracker
    w = torch.randn(40 * FINGERPRINT_CHUNK + 17, dtype=torch.float32)  # 10 MB: unchunked it would cost ~100 MB
    with MemoryTracker("cpu", timeline=False) as tr:
        fw = fingerprint({"w": w}, seed=5)
    assert tr.result().peak_bytes - tr.result().start_bytes < 12 * FINGERPRINT_CHUNK * 8  # chunk-sized, not w-sized
    v = w.clone()
    v[-1] += 1e-2 * w.norm()  # in the last, partial chunk
    assert fingerprint_error(fingerprint({"w": v}, seed=5), fw) > 1e-4


def test_memory_rise_within_uses_the_sources_slack_and_says_both_numbers():
    from memopt_lib.checks.base import MEMORY_SLACK_BYTES, MemoryReading, memory_rise_within
    ref = MemoryReading(300 * 2**20, 200 * 2**20, "cgroup")
    ok = MemoryReading(310 * 2**20, 200 * 2**20, "cgroup")  # +10 % of the rise: within x1.05 + slack
    shown = memory_rise_within(ok, ref, 1.05, "the step", "hint")
    assert shown["allowed_rise_bytes"] == int(1.05 * 100 * 2**20 + MEMORY_SLACK_BYTES["cgroup"])
    with pytest.raises(AssertionError, match=r"the step raised memory by 130.00 MiB, the reference by 100.00 MiB.*hint"):
        memory_rise_within(MemoryReading(330 * 2**20, 200 * 2**20, "cgroup"), ref, 1.05, "the step", "hint")
    with pytest.raises(AssertionError, match="without a memory measurement"):
        memory_rise_within(None, ref, 1.05, "the step", "hint")
