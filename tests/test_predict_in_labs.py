"""memopt_lib.predict.in_labs: the labs' predicted GPU peaks beside their CPU measurements."""
import pytest

from memopt_lib.predict import predict_step
from memopt_lib.predict.in_labs import STEPS, Case, format_prediction, predict_case, show_predictions


def test_two_replayed_steps_give_the_default_replays_steady_peak():
    # the labs replay STEPS (2) steps to save time; the steady allocated peak must stay within 0.1 %
    two = predict_step("h200", "gpt2", 1, 128, "fp32 baseline", steps=STEPS)
    three = predict_step("h200", "gpt2", 1, 128, "fp32 baseline")
    assert abs(two["peak_allocated_bytes"] / three["peak_allocated_bytes"] - 1) < 1e-3


def test_a_recipe_the_predictor_does_not_model_is_a_placeholder_with_its_reason(capsys):
    res = show_predictions("t4", [Case("gpt2", 8, 512, "chunked cross-entropy"),
                                  Case("gpt2", 8, 512, "fp32 baseline", label="activation offload",
                                       not_modelled="offloading is not modelled yet")])
    assert [r["predicted"] for r in res] == [None, None]
    assert "chunked_loss" in res[0]["why_not"]
    assert res[1]["anchor"] is None  # a placeholder never borrows another configuration's measurement
    out = capsys.readouterr().out
    assert out.count("not predicted yet") == 2 and "GiB" not in out


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
