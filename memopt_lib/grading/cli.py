"""``memopt-grade``: grade a folder of submissions, or build a Gradescope autograder.

    memopt-grade --lab 01 --submissions DIR --out OUT [--workers N] [--timeout SECONDS]
    memopt-grade gradescope --lab 01 --out autograder.zip

``DIR/<student_id>/`` holds that student's ``01_*.ipynb``. Writes ``OUT/grades.csv`` (one row per
submission: ``graded`` flag, score -- empty when ungradable --, per-check scores and statuses, peak
memory in MiB and bytes), ``OUT/results/<student_id>.json`` (Gradescope's schema),
``OUT/feedback/<student_id>.html`` (checks, measured memory against the reference, the learner's
explanations) and, for labs with written explanations, ``OUT/explanations.html`` and
``OUT/explanations.csv`` for the instructor. Exit status 0 whenever the batch ran, whatever the grades.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

SUBCOMMANDS = {"gradescope": "build a Gradescope autograder zip (setup.sh + run_autograder); "
                             "`memopt-grade gradescope --help`"}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Show each option's default (options whose default is "not given" say theirs in words)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and not action.required and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _version() -> str:
    from .. import __version__
    return f"memopt-grade (memopt {__version__})"


def _lab_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--version", action="version", version=_version())
    ap.add_argument("--lab", required=True, help="lab number, e.g. 01")
    ap.add_argument("--solutions", type=Path, default=None,
                    help="folder with the instructor's NN_*.ipynb (default: the repository's solutions/)")
    ap.add_argument("--checks-module", default=None,
                    help="dotted module defining CHECKS (default: memopt_lib.checks.labNN_<topic>)")


def _need_nbformat() -> None:
    try:
        import nbformat  # noqa: F401
    except ImportError:
        raise SystemExit("memopt-grade reads notebooks with nbformat: pip install \"memopt[grade]\"") from None


def grade_parser() -> argparse.ArgumentParser:
    epilog = "subcommands:\n" + "\n".join(f"  {k:<12}{v}" for k, v in SUBCOMMANDS.items())
    usage = ("%(prog)s --lab NN --submissions DIR --out OUT [options]\n"
             "       %(prog)s gradescope --lab NN --out ZIP [options]")
    ap = argparse.ArgumentParser(prog="memopt-grade", usage=usage, description=__doc__, epilog=epilog,
                                 formatter_class=_Formatter)
    _lab_args(ap)
    ap.add_argument("--submissions", type=Path, required=True, help="folder of <student_id>/ folders")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--workers", type=int, default=1, help="submissions graded in parallel")
    ap.add_argument("--timeout", type=float, default=600.0, help="wall-clock seconds per submission")
    ap.add_argument("--memory-mb", type=int, default=6144, help="heap limit per submission in MiB (RLIMIT_DATA)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def grade_main(argv: list[str]) -> int:
    ap = grade_parser()
    args = ap.parse_args(argv)
    _need_nbformat()
    from . import explanations as ex
    from .grade import Lab, grade_batch, student_dirs
    from .report import write_csv, write_one
    from .sandbox import Limits, isolation

    lab = Lab.load(args.lab, args.solutions, args.checks_module)
    if not args.submissions.is_dir():
        ap.error(f"--submissions {args.submissions} is not a folder")
    for w in isolation().warnings:
        print(f"WARNING: {w}", file=sys.stderr)
    dirs, skipped = student_dirs(args.submissions)
    for name in skipped:
        print(f"WARNING: skipped {name!r}: not a folder named like a student id", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    limits = Limits(timeout_s=args.timeout, memory_mb=args.memory_mb)
    questions = ex.questions(lab.solution)
    answers: dict[str, dict[str, str]] = {}

    def on_grade(g):
        # read as bounded JSON by the grader itself, after the submission's sandbox is gone
        answers[g.student_id] = ex.collect(questions, args.submissions / g.student_id, lab.lab, lab.solution.name)
        write_one(g, args.out, ex.answers_html(questions, answers[g.student_id]))

    t0 = time.perf_counter()
    grades = grade_batch(lab, args.submissions, args.out, workers=max(1, args.workers), limits=limits,
                         progress=not args.quiet, on_grade=on_grade)
    elapsed = time.perf_counter() - t0
    write_csv(grades, args.out / "grades.csv", [c.name for c in lab.registry.checks])
    ex.write_report(lab.lab, questions, answers, args.out)
    per = elapsed / len(grades) if grades else 0.0
    print(f"graded {len(grades)} submission(s) of lab {lab.lab} in {elapsed:.1f} s "
          f"({per:.2f} s per submission, {args.workers} worker(s)); wrote {args.out / 'grades.csv'}")
    return 0


def gradescope_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="memopt-grade gradescope", formatter_class=_Formatter,
                                 description="Build a Gradescope autograder zip (setup.sh + run_autograder). "
                                             "setup.sh installs Python 3.11 where the image's python3 is older.")
    _lab_args(ap)
    ap.add_argument("--out", type=Path, required=True, help="the zip to write, e.g. autograder.zip")
    ap.add_argument("--timeout", type=float, default=600.0, help="wall-clock seconds per submission")
    ap.add_argument("--memory-mb", type=int, default=6144, help="heap limit per submission in MiB (RLIMIT_DATA)")
    return ap


def gradescope_main(argv: list[str]) -> int:
    args = gradescope_parser().parse_args(argv)
    _need_nbformat()
    from .gradescope import build_autograder
    path = build_autograder(args.lab, args.out, solutions=args.solutions, checks_module=args.checks_module,
                            timeout_s=args.timeout, memory_mb=args.memory_mb)
    print(f"wrote {path}: upload it as the assignment's autograder (Ubuntu image)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "gradescope":
        return gradescope_main(argv[1:])
    return grade_main(argv)


if __name__ == "__main__":
    sys.exit(main())
