"""memopt_lib.predict.in_labs: the labs' predicted GPU peaks beside their CPU measurements."""
import pytest

from memopt_lib.predict import predict_step
from memopt_lib.predict.in_labs import (STEPS, Case, bench_record, forecast, format_forecast, format_prediction,
                                        predict_case, show_predictions)


def test_two_replayed_steps_give_the_default_replays_steady_peak():
    # the labs replay STEPS (2) steps to save time; the steady allocated peak must stay within 0.1 %
    two = predict_step("h200", "gpt2", 1, 128, "fp32 baseline", steps=STEPS)
    three = predict_step("h200", "gpt2", 1, 128, "fp32 baseline")
    assert abs(two["peak_allocated_bytes"] / three["peak_allocated_bytes"] - 1) < 1e-3


def test_a_technique_the_predictor_cannot_express_is_a_placeholder_with_its_reason(capsys, monkeypatch):
    import memopt_lib.predict.in_labs as in_labs

    def rejects(*a, **k):
        raise NotImplementedError("the predictor does not model X")
    monkeypatch.setattr("memopt_lib.predict.step.predict_step", rejects)
    monkeypatch.setattr(in_labs, "_MEMO", {})
    monkeypatch.setenv("MEMOPT_PREDICTION_CACHE", "0")
    res = show_predictions("t4", [Case("gpt2", 8, 512, "chunked cross-entropy"),
                                  Case("gpt2", 8, 512, "fp32 baseline", label="optimizer offload",
                                       not_modelled="optimizer offloading is not a recipe field")])
    assert [r["predicted"] for r in res] == [None, None]
    assert "does not model X" in res[0]["why_not"]
    assert res[1]["anchor"] is None  # a placeholder never borrows another configuration's measurement
    out = capsys.readouterr().out
    assert out.count("not predicted yet") == 2 and "GiB" not in out


def test_the_recipes_labs_08_and_09_show_are_predicted_now():
    # chunked loss / activation offloading were placeholders before the predictor composed the recipe
    res = [predict_case("t4", Case("gpt2", 1, 128, r)) for r in ("chunked cross-entropy", "activation offloading")]
    assert all(r["predicted"] and r["predicted"]["peak_allocated_bytes"] > 0 for r in res)


def test_forecast_is_plain_data_relative_to_the_first_row_and_printable():
    out = forecast("t4", ["fp32 baseline", "pure bf16"], shapes=[(2, 64)])
    assert [r["row"] for r in out] == ["fp32 baseline", "pure bf16"] and out[0]["vs_first"] == 1.0
    assert out[1]["peak_allocated_bytes"] < out[0]["peak_allocated_bytes"] and out[0]["fits"]
    assert out[0]["gpu"] == "t4" and out[0]["anchor"] is None
    text = format_forecast(out)
    assert "predicted on t4" in text and "pure bf16" in text


def test_forecast_needs_rows():
    with pytest.raises(ValueError, match="rows is empty"):
        forecast("h200", [])


def test_forecast_anchor_is_loose_about_options_and_prefers_the_benchs_record():
    from memopt_lib.predict.in_labs import _anchor_for
    a = _anchor_for(Case("gpt2", 8, 512, "fp32 baseline"), loose=True)
    assert a["source"] == ".ci/gpu_results/h200-bench-gpt2.json" and a["measured"]["steady"] > 7 * 2**30
    assert _anchor_for(Case("llama-7b", 8, 512, "QLoRA nf4+dq + ckpt"), loose=True)["source"].endswith(
        "h200-foundation.json")
    assert _anchor_for(Case("gpt2", 8, 1024, "fp32 baseline"), loose=True) is None


def test_bench_record_carries_the_breakdown_at_the_peak():
    full, lora = bench_record("fp32 baseline"), bench_record("LoRA r16")
    assert full["breakdown_bytes"]["gradients"] == 0  # the fp32 peak is before any gradient exists
    assert lora["breakdown_bytes"]["activations"] < full["breakdown_bytes"]["activations"]
    assert bench_record("no such row") is None


def test_the_anchor_of_exactly_this_configuration_is_found():
    res = predict_case("h200", Case("gpt2", 8, 512, "fp32 baseline", not_modelled="skip the prediction"))
    assert res["anchor"] is None
    from memopt_lib.predict.in_labs import _anchor_for
    anchor = _anchor_for(Case("gpt2", 8, 512, "fp32 baseline", options={"optimizer": "fused"}))
    assert anchor is not None and anchor["name"] == "gpt2 B8 S512 fp32 adamw(fused)"
    assert _anchor_for(Case("gpt2", 8, 1024, "fp32 baseline")) is None  # no H200 run at 8 x 1024


def test_a_prediction_line_names_the_gpu_the_peaks_and_the_error_against_the_anchor():
    fake = {"case": Case("gpt2", 8, 512, "fp32 baseline"), "gpu": "h200", "why_not": "",
            "predicted": {"peak_allocated_bytes": 2 * 2**30, "peak_reserved_bytes": 3 * 2**30},
            "anchor": {"measured": {"steady": 2 * 2**30 * 1.01}}}
    line = format_prediction(fake)
    assert "h200 2.00 GiB allocated, 3.00 GiB reserved" in line and "H200 measured 2.02 GiB" in line
    assert "(prediction -1.0%)" in line
    assert "prediction" not in format_prediction({**fake, "gpu": "t4"}).split("measured")[1]


def test_unknown_gpu_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown GPU"):
        predict_case("v100", Case("gpt2", 8, 512, "fp32 baseline"))


def test_a_prediction_is_kept_on_disk_for_the_same_code_and_recomputed_for_changed_code(tmp_path, monkeypatch):
    import memopt_lib.predict.in_labs as in_labs
    import memopt_lib.predict.step as step
    monkeypatch.setenv("MEMOPT_CACHE", str(tmp_path))
    monkeypatch.setattr(in_labs, "_MEMO", {})
    calls = []
    real = step.predict_step

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)
    monkeypatch.setattr(step, "predict_step", counting)
    case = Case("gpt2", 1, 64, "fp32 baseline")
    first = predict_case("t4", case)["predicted"]
    assert len(calls) == 1 and len(list((tmp_path / "predictions").glob("*.json"))) == 1
    monkeypatch.setattr(in_labs, "_MEMO", {})  # a new notebook process: only the disk copy is left
    again = predict_case("t4", case)["predicted"]
    assert len(calls) == 1 and again["peak_allocated_bytes"] == first["peak_allocated_bytes"]
    assert predict_case("h200", case)["predicted"] and len(calls) == 2  # another GPU is another configuration
    monkeypatch.setattr(in_labs, "_MEMO", {})
    monkeypatch.setattr(in_labs, "code_digest", lambda: "changed")  # an edit to memopt_lib or a new library
    predict_case("t4", case)
    assert len(calls) == 3
