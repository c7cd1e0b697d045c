"""The held-out wrong answers, graded by the real ``memopt-grade``: each must score below the instructor's solution.

    python tests/heldout/run.py                 # every lab 02-10: one memopt-grade batch per lab (minutes)
    python tests/heldout/run.py --lab 09 07     # some labs
    python tests/heldout/run.py --quick --lab 09   # in-process (the notebook's path, tracker memory): seconds

Each lab's batch holds every case of ``tests/heldout/labNN.py`` (a submission notebook each: the instructor's
solution with one graded region replaced, see ``cases.py``) and the unchanged solution (``solution``). The grader
draws its own seeds per batch, grades its canary (solution full marks, unsolved lab 0) and every submission in a
sandboxed child, memory measured from outside (cgroup). Exit 1 if any case scores as much as the solution.
``--record FILE`` writes the table as markdown (``tests/heldout/RESULTS.md`` is the committed record).
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from cases import Case, student_notebook  # noqa: E402

LABS = ("02", "03", "04", "05", "06", "07", "08", "09", "10")


def solution_path(lab: str) -> Path:
    found = sorted((ROOT / "solutions").glob(f"{lab}_*.ipynb"))
    assert len(found) == 1, found
    return found[0]


def cases(lab: str) -> list[Case]:
    mod = importlib.import_module(f"lab{lab}")
    out = list(mod.CASES)
    names = [c.name for c in out]
    assert len(names) == len(set(names)), f"lab {lab}: duplicate case names"
    return out


def write_submissions(lab: str, folder: Path, chosen: list[Case]) -> None:
    sol = solution_path(lab)
    (folder / "solution").mkdir(parents=True)
    (folder / "solution" / sol.name).write_text(sol.read_text())
    for case in chosen:
        (folder / case.name).mkdir()
        (folder / case.name / sol.name).write_text(json.dumps(student_notebook(sol, case), indent=1))


# ------------------------------------------------------------------------------------------- the real grader
def grade_lab(lab: str, chosen: list[Case], workers: int, timeout: float) -> tuple[dict, str]:
    """``({submission: (score, statuses)}, command)`` from one memopt-grade batch."""
    tmp = Path(tempfile.mkdtemp(prefix=f"heldout-{lab}-"))
    os.chmod(tmp, 0o755)
    subs, out = tmp / "subs", tmp / "out"
    write_submissions(lab, subs, chosen)
    cmd = [sys.executable, "-m", "memopt_lib.grading.cli", "--lab", lab, "--submissions", str(subs), "--out", str(out),
           "--workers", str(workers), "--timeout", str(timeout), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    print(proc.stdout[-2000:], proc.stderr[-3000:], sep="\n", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"lab {lab}: memopt-grade exited {proc.returncode} after {time.perf_counter() - t0:.0f} s")
    rows = {}
    with open(out / "grades.csv", newline="") as f:
        reader = csv.DictReader(f)
        checks = [c for c in reader.fieldnames if c.endswith("_status")]
        for row in reader:
            failed = [c[:-7] for c in checks if row[c] not in ("passed", "not_run", "")]
            rows[row["student_id"]] = (float(row["score"] or 0), row["status"], failed)
    return rows, "memopt-grade --lab {} --submissions SUBS --out OUT --workers {}".format(lab, workers)


# ------------------------------------------------------------------------------------------- in-process (quick)
def quick_lab(lab: str, chosen: list[Case], seed: int) -> tuple[dict, str]:
    from memopt_lib.checks import CheckContext, registry
    from memopt_lib.checks.base import classify_exception, collect_evidence, decide, precheck
    from memopt_lib.grading.rebuild import rebuild
    reg = registry(lab)
    ctx = CheckContext.here(seed=seed)
    ref_ns = reg.reference_namespace()
    refs = {}
    tmp = Path(tempfile.mkdtemp(prefix=f"heldout-quick-{lab}-"))
    write_submissions(lab, tmp, chosen)
    rows = {}
    for sub in ["solution"] + [c.name for c in chosen]:
        ns = {"__name__": "student"}
        try:
            for cell in rebuild(solution_path(lab), tmp / sub / solution_path(lab).name).cells:
                exec(compile(cell["source"], f"<cell {cell['id']}>", "exec"), ns)  # noqa: S102 - our own cases
        except Exception as err:  # noqa: BLE001
            rows[sub] = (0.0, f"cells raised {type(err).__name__}: {err}", [])
            continue
        score, failed = 0.0, []
        for check in reg:
            if precheck(check, ns, ctx) is not None:
                continue
            try:
                got = collect_evidence(check, ns, ctx.fork())
            except Exception as err:  # noqa: BLE001
                failed.append(f"{check.name}: {classify_exception(err)[1][:150]}")
                continue
            if check.name not in refs:
                refs[check.name] = collect_evidence(check, ref_ns, ctx.fork())
            res = decide(check, got, refs[check.name], ctx)
            if res.status == "passed":
                score += check.points
            else:
                failed.append(f"{check.name}: {res.message[:150]}")
        rows[sub] = (score, "graded", failed)
        print(f"  {sub:40s} {score:g}  {failed[:1]}", flush=True)
    return rows, f"python tests/heldout/run.py --quick --lab {lab} --seed {seed}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lab", nargs="+", default=list(LABS))
    ap.add_argument("--only", nargs="+", default=None, help="case names")
    ap.add_argument("--quick", action="store_true", help="in-process, tracker memory, no sandbox")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--record", type=Path, default=None, help="write the results as markdown here")
    args = ap.parse_args(argv)
    bad, sections = [], []
    for lab in [f"{int(x):02d}" for x in args.lab]:
        chosen = [c for c in cases(lab) if args.only is None or c.name in args.only]
        t0 = time.perf_counter()
        rows, cmd = quick_lab(lab, chosen, args.seed) if args.quick else grade_lab(lab, chosen, args.workers,
                                                                                     args.timeout)
        took = time.perf_counter() - t0
        best = rows["solution"][0]
        lines = [f"### lab {lab} ({len(chosen)} cases, {took:.0f} s on this machine)", "",
                 f"`{cmd}`; the solution scored **{best:g}**.", "",
                 "| case | origin | mistake | score | solution | failed checks |", "|---|---|---|---|---|---|"]
        for c in chosen:
            score, status, failed = rows.get(c.name, (None, "missing", []))
            ok = score is not None and score < best
            if not ok:
                bad.append(f"lab {lab} {c.name}: {score} vs solution {best} ({status})")
            names = ", ".join(f.split(":")[0] for f in failed) or "-"
            lines.append(f"| {c.name} | {c.origin} | {c.why} | {score if score is None else f'{score:g}'}"
                         f"{'' if ok else ' **NOT BELOW**'} | {best:g} | {names} |")
        sections.append("\n".join(lines))
        print(sections[-1], flush=True)
    if args.record:
        args.record.write_text("\n\n".join(sections) + "\n")
    if bad:
        print("\nFAILED: cases that scored as much as the solution:\n  " + "\n  ".join(bad))
        return 1
    print("\nevery held-out case scored below the solution")
    return 0


if __name__ == "__main__":
    sys.exit(main())
