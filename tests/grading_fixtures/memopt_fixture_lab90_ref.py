"""Reference answers of the fixture lab 90, used only in the grader's process (hidden from the sandbox)."""
from __future__ import annotations

from memopt_fixture_lab90 import sum_inputs


def verify_sum_of_squares_values(measurements: dict, seed: int) -> None:
    answers = measurements.get("answers")
    expected = [float((x * x).sum()) for x in sum_inputs(seed)]
    assert isinstance(answers, list) and len(answers) == len(expected), "wrong number of answers"
    for got, want in zip(answers, expected):
        assert isinstance(got, (int, float)) and abs(got - want) <= 1e-6 * max(1.0, abs(want)), \
            f"sum_of_squares gave {got}, expected {want:.6g}"
