"""The memory calculator: arithmetic, and the same categories from the GPU-peak predictor."""
import pytest

from memopt_lib import anchors
from memopt_lib.calculator import calculator_widget, predicted_breakdown

GiB = 1024**3


def test_predictor_mode_gives_the_anchor_and_the_categories():
    est = predicted_breakdown("h200", "gpt2", batch=8, seq=512)
    assert set(est) == {"weights", "gradients", "optimizer", "activations", "temporaries"}
    anchor = anchors.row("gpt2 B8 S512 fp32 adamw(fused)")["peak_steady_GiB"] * GiB
    assert abs(sum(est.values()) / anchor - 1) < 0.05
    assert max(est, key=est.get) == "activations"
    ckpt = predicted_breakdown("h200", "gpt2", batch=8, seq=512, checkpointing=True)
    assert sum(ckpt.values()) < 0.6 * sum(est.values())


def test_predictor_mode_refuses_what_it_does_not_model():
    with pytest.raises(ValueError, match="predictor models"):
        predicted_breakdown("t4", "gpt2", batch=8, seq=512, optimizer="sgd")


def test_widget_offers_both_methods():
    ui = calculator_widget()
    methods = ui.children[0].options
    assert methods[0] == "arithmetic" and "predictor: t4" in methods and "predictor: h200" in methods
