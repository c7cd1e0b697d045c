"""Write what the grader decided: ``grades.csv``, Gradescope ``results.json`` files, feedback pages.

Everything a student controls (exception messages, printed output, notebook names) is
treated as text: escaped in HTML (no student tag or script survives), and in CSV a
cell that a spreadsheet would read as a formula (``=``, ``+``, ``-``, ``@``) gets a
leading apostrophe. Memory the checks measured (``CheckResult.measurements``: the learner's
peak, the reference solution's, their breakdowns) is shown in MiB on the feedback page.
"""
from __future__ import annotations

import csv
import html
import json
from pathlib import Path

from .grade import Grade

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
PEAK_KEYS = ("peak_bytes", "peak_allocated_bytes")  # the learner's peak, as checks name it
MiB = 1024**2


def _cell(value) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_START) else text


def _int(v) -> int | None:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _mib(n: int | None) -> str:
    return "" if n is None else f"{n / MiB:.1f}"


def check_memory(c) -> dict:
    """What a check measured: ``{"peak", "reference", "source", "breakdown", "reference_breakdown"}`` (bytes)."""
    m = c.measurements or {}
    peak = next((_int(m[k]) for k in PEAK_KEYS if _int(m.get(k)) is not None), None)
    out = {"peak": peak, "reference": _int(m.get("reference_peak_bytes")), "source": str(m.get("memory_source", ""))}
    for key, name in (("breakdown_bytes", "breakdown"), ("reference_breakdown_bytes", "reference_breakdown")):
        d = m.get(key)
        out[name] = {str(k): _int(v) for k, v in d.items() if _int(v) is not None} if isinstance(d, dict) else {}
    return out


def submission_peak(g: Grade) -> int | None:
    """The highest peak any check measured for this submission (bytes), or None if none measured memory."""
    peaks = [check_memory(c)["peak"] for c in g.checks] + [g.peak_allocated_bytes]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def write_csv(grades: list[Grade], path: Path, check_names: list[str]) -> None:
    """One row per submission, ready for a spreadsheet or an LMS import.

    ``graded`` is ``true`` where a score was decided (``graded`` and ``tampering``), ``false`` for
    ``ungradable`` rows, whose score cells stay empty (an empty cell is "no grade", a 0 is a grade).
    ``lab`` is ``lab01`` (a bare ``01`` becomes the number 1 in a spreadsheet). Memory is in MiB
    (one decimal) and in bytes.
    """
    cols = (["student_id", "lab", "graded", "score", "max_score", "status", "reason"] + check_names
            + [f"{n}_status" for n in check_names]
            + ["peak_allocated_MiB", "max_rss_MiB", "peak_allocated_bytes", "max_rss_bytes", "wall_s", "notebook",
               "notes", "review_flags"])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for g in grades:
            by = {c.name: c for c in g.checks}
            graded = g.status != "ungradable"
            peak, rss = submission_peak(g), g.max_rss_bytes or None
            row = [g.student_id, f"lab{g.lab}", "true" if graded else "false",
                   f"{g.score:g}" if graded else "", f"{g.max_score:g}", g.status, g.reason[:300]]
            row += [f"{by[n].score:g}" if graded and n in by else "" for n in check_names]
            row += [by[n].status if n in by else "" for n in check_names]
            row += [_mib(peak), _mib(rss), "" if peak is None else peak, "" if rss is None else rss,
                    f"{g.wall_s:.2f}", g.notebook, " | ".join(g.notes)[:500], " | ".join(g.flags)[:300]]
            w.writerow([_cell(v) for v in row])


def gradescope_results(g: Grade) -> dict:
    """Gradescope's results.json schema (score, execution_time, output, tests[...])."""
    tests = []
    for i, c in enumerate(g.checks, 1):
        mem = check_memory(c)
        out = f"[{c.status}] {c.message}".strip()
        if mem["peak"] is not None:
            out += f"\nmeasured peak: {_mib(mem['peak'])} MiB" + (
                f" (reference solution: {_mib(mem['reference'])} MiB)" if mem["reference"] is not None else "")
        tests.append({"name": c.name, "number": str(i), "score": c.score, "max_score": c.max_score,
                      "status": "passed" if c.status == "passed" else "failed",
                      "output": out, "visibility": "visible",
                      "extra_data": {"memopt_status": c.status,
                                     "measurements": {k: v for k, v in c.measurements.items()
                                                      if isinstance(v, (int, float, str))}}})
    lines = [f"status: {g.status}" + (f" ({g.reason})" if g.reason else "")]
    lines += [f"note: {n}" for n in g.notes]
    peak = submission_peak(g)
    if peak is not None:
        lines.append(f"measured peak allocated: {_mib(peak)} MiB ({peak} bytes)")
    return {"score": g.score, "execution_time": round(g.wall_s, 2), "output": "\n".join(lines),
            "visibility": "visible", "stdout_visibility": "hidden", "tests": tests,
            "extra_data": {"student_id": g.student_id, "lab": g.lab, "status": g.status,
                           "max_rss_bytes": g.max_rss_bytes}}


def memory_html(g: Grade) -> str:
    """Per check that measured memory: the learner's peak against the reference solution's, and the breakdown."""
    e = html.escape
    rows = []
    for c in g.checks:
        mem = check_memory(c)
        if mem["peak"] is None:
            continue
        ref = mem["reference"]
        ratio = f"{mem['peak'] / ref:.2f} x" if ref else ""
        cats = list(dict.fromkeys(list(mem["breakdown"]) + list(mem["reference_breakdown"])))
        parts = "".join(f"<tr><td>{e(k)}</td><td>{_mib(mem['breakdown'].get(k))}</td>"
                        f"<td>{_mib(mem['reference_breakdown'].get(k))}</td></tr>" for k in cats)
        detail = (f"<table><tr><th>at the peak</th><th>yours (MiB)</th><th>reference (MiB)</th></tr>{parts}</table>"
                  if cats else "")
        rows.append(f"<tr><td>{e(c.name)}</td><td>{_mib(mem['peak'])}</td><td>{_mib(ref)}</td><td>{ratio}</td>"
                    f"<td>{e(mem['source'])}</td><td>{detail}</td></tr>")
    if not rows:
        return ""
    return ("<h2>Measured memory</h2><table><tr><th>check</th><th>your peak (MiB)</th>"
            "<th>reference solution (MiB)</th><th>ratio</th><th>measured by</th><th>breakdown</th></tr>"
            + "".join(rows) + "</table>")


def feedback_html(g: Grade, explanations: str = "") -> str:
    """The learner's page. ``explanations``: an escaped fragment from :func:`.explanations.answers_html`."""
    e = html.escape
    rows = "".join(f"<tr class='{e(c.status)}'><td>{e(c.name)}</td><td>{e(c.status)}</td>"
                   f"<td>{c.score:g} / {c.max_score:g}</td><td><pre>{e(c.message)}</pre></td></tr>"
                   for c in g.checks)
    notes = "".join(f"<li>{e(n)}</li>" for n in g.notes)
    reason = f"<p><b>{e(g.status)}</b>: {e(g.reason)}</p>" if g.reason else ""
    out = f"<h2>Output of your code (last lines)</h2><pre>{e(g.output_tail[-4000:])}</pre>" if g.output_tail else ""
    score = f"{g.score:g} / {g.max_score:g}" if g.status != "ungradable" else f"not graded ({e(g.status)})"
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>Lab {e(g.lab)} feedback: {e(g.student_id)}</title>"
        "<style>td,th{border:1px solid #ccc;padding:4px;vertical-align:top}.passed{background:#e8f5e9}"
        ".failed,.error,.timeout,.oom,.crashed{background:#ffebee}pre{white-space:pre-wrap;margin:0}</style>"
        f"</head><body><h1>Lab {e(g.lab)}: {score}</h1>{reason}"
        f"<p>notebook: {e(g.notebook)}</p>" + (f"<ul>{notes}</ul>" if notes else "")
        + f"<table><tr><th>check</th><th>status</th><th>points</th><th>message</th></tr>{rows}</table>"
        + memory_html(g) + explanations + out + "</body></html>\n")


def write_one(g: Grade, out: Path, explanations: str = "") -> None:
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "feedback").mkdir(parents=True, exist_ok=True)
    (out / "results" / f"{g.student_id}.json").write_text(json.dumps(gradescope_results(g), indent=1),
                                                         encoding="utf-8")
    (out / "feedback" / f"{g.student_id}.html").write_text(feedback_html(g, explanations), encoding="utf-8")
