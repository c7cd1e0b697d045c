"""Lab 04 graded end to end by memopt-grade, in ONE batch: honest, untouched and every red-team attack of
grading_fixtures/real_attacks.py. On a CPU grader the GPU-only check is not_run and not counted."""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest

from memopt_lib.labgen import make_lab

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "grading_fixtures"))
import real_attacks  # noqa: E402
from test_grading_lab01 import run_batch, student  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = ROOT / "solutions" / "04_gradient_accumulation.ipynb"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not SOLUTION.exists(), reason="lab 04 is not in this checkout")]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    nbs = {"honest": student(SOLUTION, {}), "honest_failing": student(SOLUTION, real_attacks.lab04()),
           "untouched": make_lab(nbformat.read(str(SOLUTION), as_version=4), SOLUTION.name)}
    rc, rows, out = run_batch(tmp_path_factory, SOLUTION, "04", nbs, real_attacks.LAB04, 64350)
    return {"rc": rc, "rows": rows, "out": out}


def test_honest_gets_full_marks_of_what_runs_here_and_gpu_check_is_not_counted(batch):
    import torch
    assert batch["rc"] == 0
    row = batch["rows"]["honest"]
    if torch.cuda.is_available():
        assert (row["score"], row["max_score_here"]) == ("8", "8"), row
    else:
        assert (row["status"], row["score"], row["max_score"], row["max_score_here"]) == ("graded", "6", "8", "6")
        assert row["gpu_budget_gpt2_status"] == "not_run"
    assert (batch["rows"]["untouched"]["status"], batch["rows"]["untouched"]["score"]) == ("graded", "0")


def test_honest_failing_keeps_every_graph_until_one_backward(batch):
    row = batch["rows"]["honest_failing"]
    assert (row["gradient_equals_full_batch_status"], row["peak_is_one_micro_batch_status"]) == ("passed", "failed")
    assert row["score"] == "3", row


@pytest.mark.parametrize("sid", sorted(real_attacks.LAB04))
def test_attack_earns_nothing(batch, sid):
    _, most, forbidden = real_attacks.LAB04[sid]
    row = batch["rows"][sid]
    assert row["status"] in ("graded", "tampering"), row
    assert float(row["score"]) <= most, f"{sid} scored {row['score']} (honest failing: {most}): {row}"
    for check, status in forbidden.items():
        assert row[f"{check}_status"] != status, row
