"""Each plausible wrong answer (tests/wrong_answers/labNN.py) fails the checks it names, with a message that
names the mistake; one parametrized test per lab. The reference's evidence is collected once per check."""
from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

from memopt_lib.checks import CheckContext, lab_topics, registry
from memopt_lib.checks.base import classify_exception, collect_evidence, decide, precheck
from memopt_lib.notebook import namespace_from

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/wrong_answers
SEED = 2024
_SOLUTIONS: dict[str, dict] = {}
_REFERENCE: dict[tuple[str, str], object] = {}


def _wrong(lab):
    return importlib.import_module(f"wrong_answers.lab{lab}")


def _solution_ns(lab):
    if lab not in _SOLUTIONS:
        path = ROOT / "solutions" / f"{lab}_{lab_topics()[lab]}.ipynb"
        _SOLUTIONS[lab] = namespace_from(path, path)
    return dict(_SOLUTIONS[lab])


def grade(lab, check_name, ns):
    """Status and message of one check on ``ns`` (the reference evidence is cached)."""
    reg = registry(lab)
    check = next(c for c in reg if c.name == check_name)
    ctx = CheckContext.here(seed=SEED)
    skipped = precheck(check, ns, ctx)
    if skipped is not None:
        return skipped
    assert check.trusted, f"{check_name} is not a collect/judge check"
    try:
        got = collect_evidence(check, ns, ctx.fork())
    except Exception as err:  # noqa: BLE001 - the student's code raised
        status, msg = classify_exception(err)
        return type("R", (), {"status": status, "message": msg})()
    key = (lab, check_name)
    if key not in _REFERENCE:
        _REFERENCE[key] = collect_evidence(check, reg.reference_namespace(), ctx.fork())
    return decide(check, got, _REFERENCE[key], ctx)


def _cases(lab):
    return [pytest.param(w, id=w.name) for w in _wrong(lab).WRONG]


def _run(lab, wrong):
    mod = _wrong(lab)
    if hasattr(mod, "KEPT"):
        mod.KEPT.clear()
    ns = {**_solution_ns(lab), wrong.graded: wrong.fn}
    for name in wrong.checks:
        if hasattr(mod, "KEPT"):
            mod.KEPT.clear()
        res = grade(lab, name, ns)
        assert res.status != "passed", f"{wrong.name!r} passed {name}"
        assert re.search(wrong.message, res.message, re.I), f"{wrong.name!r} on {name}: {res.message}"
    if hasattr(mod, "KEPT"):
        mod.KEPT.clear()


@pytest.mark.parametrize("wrong", _cases("02"))
def test_lab02_wrong_answers_fail(wrong):
    _run("02", wrong)


@pytest.mark.parametrize("wrong", _cases("09"))
def test_lab09_wrong_answers_fail(wrong):
    _run("09", wrong)


@pytest.mark.parametrize("wrong", _cases("07"))
def test_lab07_wrong_answers_fail(wrong):
    _run("07", wrong)


@pytest.mark.parametrize("wrong", _cases("03"))
def test_lab03_wrong_answers_fail(wrong):
    _run("03", wrong)


@pytest.mark.parametrize("wrong", _cases("05"))
def test_lab05_wrong_answers_fail(wrong):
    _run("05", wrong)


@pytest.mark.parametrize("wrong", _cases("06"))
def test_lab06_wrong_answers_fail(wrong):
    _run("06", wrong)
