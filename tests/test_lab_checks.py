"""Every lab's checks pass on its solution and never pass on the generated (unsolved) lab."""
from pathlib import Path

import pytest

from memopt_lib.checks import CheckContext, lab_topics, registry, run_checks
from memopt_lib.notebook import namespace_from

ROOT = Path(__file__).resolve().parent.parent
LABS = sorted(lab_topics().items())


def _paths(lab, topic):
    name = f"{lab}_{topic}.ipynb"
    return ROOT / "solutions" / name, ROOT / "labs" / name


def _ctx():
    return CheckContext.here(seed=1234)


@pytest.mark.slow
@pytest.mark.parametrize("lab,topic", LABS)
def test_checks_pass_on_solution(lab, topic):
    sol, _ = _paths(lab, topic)
    results = run_checks(registry(lab), namespace_from(sol, sol), _ctx())
    bad = [(r.name, r.status, r.message) for r in results if r.status != "passed" and r.status != "not_run"]
    assert not bad
    assert any(r.status == "passed" for r in results)


@pytest.mark.slow
@pytest.mark.parametrize("lab,topic", LABS)
def test_checks_fail_on_unsolved_lab(lab, topic):
    sol, lab_nb = _paths(lab, topic)
    results = run_checks(registry(lab), namespace_from(lab_nb, sol), _ctx())
    assert results and all(r.status != "passed" for r in results), [(r.name, r.status) for r in results]
    assert all(r.score == 0 for r in results)


def test_gpu_budget_helper_uses_the_anchor_and_a_margin():
    from memopt_lib import anchors
    from memopt_lib.checks.base import within_anchor_budget
    row = "gpt2 B8 S512 fp32 adamw(fused)"
    budget = anchors.row(row)["peak_steady_GiB"] * 1.1 * 1024**3
    assert within_anchor_budget(int(budget) - 1, row, 1.1)["budget_bytes"] == int(budget)
    with pytest.raises(AssertionError, match="budget"):
        within_anchor_budget(int(budget) + 1024, row, 1.1)
    with pytest.raises(KeyError, match="no anchor row"):
        within_anchor_budget(1, "gpt2 B9", 1.1)
