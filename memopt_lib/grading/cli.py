"""``memopt-grade``: grade a folder of submissions, or build a Gradescope autograder.

    memopt-grade --lab 01 --submissions DIR --out OUT [--workers N] [--timeout SECONDS]
    memopt-grade gradescope --lab 01 --out autograder.zip

``DIR/<student_id>/`` holds that student's ``01_*.ipynb``. Writes ``OUT/grades.csv``,
``OUT/results/<student_id>.json`` (Gradescope's schema) and ``OUT/feedback/<student_id>.html``.
Exit status 0 when the batch ran, whatever the grades; 2 when the reference run or the canary
(the instructor's solution must get full marks of what can run here, the unsolved lab 0) failed
and no student was graded; 3 when every submission was ungradable.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _lab_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--lab", required=True, help="lab number, e.g. 01")
    ap.add_argument("--solutions", type=Path, default=None,
                    help="folder with the instructor's NN_*.ipynb (default: the repository's solutions/)")
    ap.add_argument("--checks-module", default=None,
                    help="dotted module defining CHECKS (default: memopt_lib.checks.labNN_<topic>)")


def grade_main(argv: list[str]) -> int:
    from .grade import Lab, grade_batch, student_dirs
    from .report import write_csv, write_one
    from .sandbox import Limits, isolation

    ap = argparse.ArgumentParser(prog="memopt-grade", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    _lab_args(ap)
    ap.add_argument("--submissions", type=Path, required=True, help="folder of <student_id>/ folders")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--workers", type=int, default=1, help="submissions graded in parallel")
    ap.add_argument("--timeout", type=float, default=600.0, help="wall-clock seconds per submission")
    ap.add_argument("--memory-mb", type=int, default=6144, help="heap limit per submission (RLIMIT_DATA)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

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
    t0 = time.perf_counter()
    from .grade import BatchError
    try:
        grades = grade_batch(lab, args.submissions, args.out, workers=max(1, args.workers), limits=limits,
                             progress=not args.quiet, on_grade=lambda g: write_one(g, args.out))
    except BatchError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t0
    write_csv(grades, args.out / "grades.csv", [c.name for c in lab.registry.checks])
    per = elapsed / len(grades) if grades else 0.0
    print(f"graded {len(grades)} submission(s) of lab {lab.lab} in {elapsed:.1f} s "
          f"({per:.2f} s per submission, {args.workers} worker(s)); wrote {args.out / 'grades.csv'}")
    if grades and all(g.status == "ungradable" for g in grades):
        print("ERROR: every submission was ungradable (see the reason column of grades.csv)", file=sys.stderr)
        return 3
    return 0


def gradescope_main(argv: list[str]) -> int:
    from .gradescope import build_autograder
    ap = argparse.ArgumentParser(prog="memopt-grade gradescope",
                                 description="Build a Gradescope autograder zip (setup.sh + run_autograder).")
    _lab_args(ap)
    ap.add_argument("--out", type=Path, required=True, help="the zip to write, e.g. autograder.zip")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--memory-mb", type=int, default=6144)
    args = ap.parse_args(argv)
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
