"""How long one lab's checks take on the solution (the notebook's path: student and reference collects, judges).

    python tests/heldout/time_checks.py [LAB ...]      # default: labs 02-10, one fresh process each

Prints, per lab, the wall time and the CPU time (user + sys of this process and its children, all threads) of
``run_checks`` on the solution notebook's graded namespace, and the load average. On a shared machine the wall
time is inflated by load; the CPU time is not (much): on 2 otherwise idle cores the wall time is at most about
the CPU time (and at least half of it). Bar: 30 s per lab.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LABS = ("02", "03", "04", "05", "06", "07", "08", "09", "10")


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def one(lab: str, seed: int = 1234) -> dict:
    from memopt_lib.checks import CheckContext, lab_topics, registry, run_checks
    from memopt_lib.notebook import namespace_from
    path = ROOT / "solutions" / f"{lab}_{lab_topics()[lab]}.ipynb"
    ns = namespace_from(path, path)
    w, c = time.perf_counter(), _cpu()
    results = run_checks(registry(lab), ns, CheckContext.here(seed=seed))
    return {"lab": lab, "wall_s": time.perf_counter() - w, "cpu_s": _cpu() - c,
            "statuses": sorted({r.status for r in results}), "load": os.getloadavg()[0]}


def main(argv: list[str]) -> int:
    if argv[:1] == ["--one"]:
        print("RESULT " + json.dumps(one(argv[1])), flush=True)
        return 0
    print("| lab | wall s | CPU s | statuses | load (1 min) |\n|---|---|---|---|---|")
    for lab in argv or LABS:
        proc = subprocess.run([sys.executable, __file__, "--one", lab], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"| {lab} | failed: {proc.stderr[-300:]!r} | | | |", flush=True)
            continue
        r = json.loads(line[7:])
        print(f"| {lab} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {', '.join(r['statuses'])} | {r['load']:.1f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
