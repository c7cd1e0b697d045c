"""The labs' "at the course's real shapes" helper: predictions for a named GPU, the H200 record beside them."""
import pytest

from memopt_lib.forecast import anchor_for, bench_record, forecast, format_forecast


def test_anchor_for_finds_the_benchs_own_record_and_nothing_it_lacks():
    a = anchor_for("gpt2", 8, 512, "fp32 baseline")
    assert a["source"] == ".ci/gpu_results/h200-bench-gpt2.json" and a["peak_allocated_bytes"] > 7 * 2**30
    assert anchor_for("gpt2", 8, 512, "LoRA r16")["peak_allocated_bytes"] < a["peak_allocated_bytes"]
    assert anchor_for("llama-7b", 8, 512, "QLoRA nf4+dq + ckpt")["source"].endswith("h200-foundation.json")
    assert anchor_for("gpt2", 8, 1024, "fp32 baseline") is None


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


def test_bench_record_carries_the_breakdown_at_the_peak():
    full, lora = bench_record("fp32 baseline"), bench_record("LoRA r16")
    assert full["breakdown_bytes"]["gradients"] == 0  # the fp32 peak is before any gradient exists
    assert lora["breakdown_bytes"]["activations"] < full["breakdown_bytes"]["activations"]
    assert bench_record("no such row") is None
