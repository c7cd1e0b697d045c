"""Plausible wrong answers, lab by lab: each changes one graded function of the instructor's solution.

Every module ``labNN.py`` holds ``WRONG``: a list of :class:`Wrong` entries. ``tests/test_wrong_answers.py``
runs each through its lab's checks and asserts that every check it names fails with a message matching
``message`` (a regular expression naming the mistake).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Wrong:
    name: str                 # what the learner did
    graded: str               # the graded name it replaces
    fn: Callable              # the wrong implementation
    checks: tuple[str, ...]   # the checks that must fail
    message: str              # regex the failure message must match (case-insensitive)
