"""Graded checks, one module per lab, named after the lab's topic.

``run_lab_checks("01", globals())`` is what a notebook's check cell calls: it
prints a table and raises ``AssertionError`` if any check did not pass.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from .base import STATUSES, Check, CheckContext, CheckResult, Registry, format_results, run_check, run_checks

LAB_FILE = re.compile(r"^(\d\d)_([a-z0-9_]+)\.ipynb$")


def lab_topics() -> dict[str, str]:
    """``{"01": "memory_anatomy", ...}`` for every lab that has a check module."""
    here = Path(__file__).parent
    out = {}
    for path in sorted(here.glob("lab*.py")):
        m = re.match(r"^lab(\d\d)_([a-z0-9_]+)\.py$", path.name)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def registry(lab: str) -> Registry:
    """The :class:`Registry` of lab ``lab`` ("01" or 1)."""
    lab = f"{int(lab):02d}"
    topics = lab_topics()
    if lab not in topics:
        raise KeyError(f"no checks for lab {lab}; labs with checks: {sorted(topics)}")
    module = importlib.import_module(f"{__name__}.lab{lab}_{topics[lab]}")
    return module.CHECKS


def run_lab_checks(lab: str, ns: Mapping[str, Any], only: Iterable[str] | str | None = None,
                   ctx: CheckContext | None = None, raise_on_failure: bool = True) -> list[CheckResult]:
    """Run lab ``lab``'s checks (or the ``only`` ones) against the names in ``ns`` and print the results."""
    if isinstance(only, str):
        only = [only]
    results = run_checks(registry(lab), ns, ctx, only)
    print(format_results(results))
    bad = [r for r in results if r.status != "passed"]
    if raise_on_failure and bad:
        raise AssertionError(f"{len(bad)} check(s) did not pass: " + ", ".join(r.name for r in bad))
    return results


__all__ = ["STATUSES", "Check", "CheckContext", "CheckResult", "Registry", "format_results", "lab_topics",
           "registry", "run_check", "run_checks", "run_lab_checks"]
