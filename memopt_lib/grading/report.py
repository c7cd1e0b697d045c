"""Write what the grader decided: ``grades.csv``, Gradescope ``results.json`` files, feedback pages.

Everything a student controls (exception messages, printed output, notebook names) is
treated as text: escaped in HTML (no student tag or script survives), and in CSV a
cell that a spreadsheet would read as a formula (``=``, ``+``, ``-``, ``@``) gets a
leading apostrophe.
"""
from __future__ import annotations

import csv
import html
import json
from pathlib import Path

from .grade import Grade

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


def write_csv(grades: list[Grade], path: Path, check_names: list[str]) -> None:
    cols = (["student_id", "lab", "score", "max_score", "max_score_here", "status", "reason"] + check_names
            + [f"{n}_status" for n in check_names]
            + ["peak_allocated_bytes", "max_rss_bytes", "wall_s", "notebook", "notes", "review_flags"])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for g in grades:
            by = {c.name: c for c in g.checks}
            here = "" if g.max_score_here is None else f"{g.max_score_here:g}"  # the checks that can run on this grader
            row = [g.student_id, g.lab, f"{g.score:g}", f"{g.max_score:g}", here, g.status, g.reason[:300]]
            row += [f"{by[n].score:g}" if n in by else "" for n in check_names]
            row += [by[n].status if n in by else "" for n in check_names]
            row += [g.peak_allocated_bytes if g.peak_allocated_bytes is not None else "", g.max_rss_bytes or "",
                    f"{g.wall_s:.2f}", g.notebook, " | ".join(g.notes)[:500], " | ".join(g.flags)[:300]]
            w.writerow([_cell(v) for v in row])


def gradescope_results(g: Grade) -> dict:
    """Gradescope's results.json schema (score, execution_time, output, tests[...])."""
    tests = []
    for i, c in enumerate(g.checks, 1):
        tests.append({"name": c.name, "number": str(i), "score": c.score, "max_score": c.max_score,
                      "status": "passed" if c.status == "passed" else "failed",
                      "output": f"[{c.status}] {c.message}".strip(), "visibility": "visible",
                      "extra_data": {"memopt_status": c.status,
                                     "measurements": {k: v for k, v in c.measurements.items()
                                                      if isinstance(v, (int, float, str))}}})
    lines = [f"status: {g.status}" + (f" ({g.reason})" if g.reason else "")]
    if g.max_score_here is not None and g.max_score_here != g.max_score:
        lines.append(f"max score on this grader: {g.max_score_here:g} of {g.max_score:g} "
                     "(checks that cannot run here are not_run and not counted)")
    lines += [f"note: {n}" for n in g.notes]
    if g.peak_allocated_bytes is not None:
        lines.append(f"measured peak allocated: {g.peak_allocated_bytes} bytes")
    return {"score": g.score, "execution_time": round(g.wall_s, 2), "output": "\n".join(lines),
            "visibility": "visible", "stdout_visibility": "hidden", "tests": tests,
            "extra_data": {"student_id": g.student_id, "lab": g.lab, "status": g.status,
                           "max_rss_bytes": g.max_rss_bytes}}


def feedback_html(g: Grade) -> str:
    e = html.escape
    rows = "".join(f"<tr class='{e(c.status)}'><td>{e(c.name)}</td><td>{e(c.status)}</td>"
                   f"<td>{c.score:g} / {c.max_score:g}</td><td><pre>{e(c.message)}</pre></td></tr>"
                   for c in g.checks)
    notes = "".join(f"<li>{e(n)}</li>" for n in g.notes)
    reason = f"<p><b>{e(g.status)}</b>: {e(g.reason)}</p>" if g.reason else ""
    out = f"<h2>Output of your code (last lines)</h2><pre>{e(g.output_tail[-4000:])}</pre>" if g.output_tail else ""
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>Lab {e(g.lab)} feedback: {e(g.student_id)}</title>"
        "<style>td,th{border:1px solid #ccc;padding:4px;vertical-align:top}.passed{background:#e8f5e9}"
        ".failed,.error,.timeout,.oom,.crashed{background:#ffebee}pre{white-space:pre-wrap;margin:0}</style>"
        f"</head><body><h1>Lab {e(g.lab)}: {g.score:g} / {g.max_score:g}</h1>{reason}"
        + (f"<p>max score on this grader: {g.max_score_here:g} (checks that cannot run here are not_run and not "
           "counted)</p>" if g.max_score_here is not None and g.max_score_here != g.max_score else "")
        + f"<p>notebook: {e(g.notebook)}</p>" + (f"<ul>{notes}</ul>" if notes else "")
        + f"<table><tr><th>check</th><th>status</th><th>points</th><th>message</th></tr>{rows}</table>{out}"
        "</body></html>\n")


def write_one(g: Grade, out: Path) -> None:
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "feedback").mkdir(parents=True, exist_ok=True)
    (out / "results" / f"{g.student_id}.json").write_text(json.dumps(gradescope_results(g), indent=1),
                                                         encoding="utf-8")
    (out / "feedback" / f"{g.student_id}.html").write_text(feedback_html(g), encoding="utf-8")
