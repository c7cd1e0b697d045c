"""Red team: grade honest and adversarial submissions of the fixture lab in one batch and check every verdict.

One ``memopt-grade`` run (``--workers 2``) grades everything in ``grading_fixtures/attacks.py`` plus an
honest correct, an honest wrong and an untouched submission; each test then asserts one verdict.
No attack may score above the honest failing submission (0 points).
"""
from __future__ import annotations

import csv
import json
import os
import pickle
import socket
import sys
import threading
from pathlib import Path

import nbformat
import pytest

FIXTURES = Path(__file__).parent / "grading_fixtures"
sys.path.insert(0, str(FIXTURES))

import attacks  # noqa: E402
import fixture_lab as fx  # noqa: E402

from memopt_lib.grading import cli  # noqa: E402
from memopt_lib.grading import sandbox  # noqa: E402
from memopt_lib.grading.sandbox import USED_UIDS, isolation  # noqa: E402

TIMEOUT_S = 40        # generous: an honest submission takes ~5-15 s on 2 busy cores
SHORT_TIMEOUT_S = 6   # for the attacks that can only end at the limit


class _Evil:
    """Unpickling this creates a file: proof that someone unpickled student data."""

    def __init__(self, mark: str):
        self.mark = mark

    def __reduce__(self):
        return (open, (self.mark, "w"))


def _special(kind: str, subs: Path, sid: str, sol: Path, mark: Path) -> None:
    folder = subs / sid
    if kind == "tags":
        def edit(nb):
            for cell in nb.cells:
                if cell.cell_type == "code":
                    cell.metadata["tags"] = ["raises-exception", "skip", "skip-execution", "solution", "parameters"]
                    cell.metadata["nbgrader"] = {"grade": True, "points": 100, "solution": True}
                    cell.source = "# NBVAL_SKIP\n# NBVAL_IGNORE_OUTPUT\n" + cell.source
                    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="PASS all checks: 5/5\n")]
        fx.write_submission(subs, sid, fx.student_notebook(attacks.attack(), edit=edit))
    elif kind == "newcell":
        def edit(nb):
            cheat = nbformat.v4.new_code_cell("import torch\ndef sum_of_squares(x):\n    return float((x * x).sum())\n"
                                              "def row_norms(x):\n    return torch.linalg.vector_norm(x, dim=1)")
            cheat.id = "fx-cheat"
            nb.cells.append(cheat)
        fx.write_submission(subs, sid, fx.student_notebook(edit=edit))
    elif kind == "pickle":
        folder.mkdir(parents=True)
        (folder / "answers.pkl").write_bytes(pickle.dumps(_Evil(str(mark))))
        body = "    import pickle\n    return pickle.load(open('answers.pkl', 'rb'))(x)"
        fx.write_submission(subs, sid, fx.student_notebook(attacks.attack(sumsq=body)))
    elif kind == "symlink":
        folder.mkdir(parents=True)
        (folder / fx.NAME).symlink_to(sol)
    elif kind == "malformed":
        fx.write_submission(subs, sid, text='{"cells": [ {"cell_type": "code", "source": "oops"')
    elif kind == "truncated":
        text = json.dumps(nbformat.from_dict(fx.student_notebook(fx.SOLUTION_BODIES)))
        fx.write_submission(subs, sid, text=text[: len(text) // 2])
    elif kind == "nbformat3":
        fx.write_submission(subs, sid, text=json.dumps({"nbformat": 3, "nbformat_minor": 0, "metadata": {},
                                                        "worksheets": [{"cells": []}]}))
    elif kind == "empty":
        folder.mkdir(parents=True)
    elif kind == "two":
        fx.write_submission(subs, sid, fx.student_notebook(fx.SOLUTION_BODIES), name="90_fixture (1).ipynb")
        fx.write_submission(subs, sid, fx.student_notebook(fx.SOLUTION_BODIES), name="90_fixture (2).ipynb")
    elif kind == "noids":
        nb = json.loads(json.dumps(nbformat.from_dict(fx.student_notebook(fx.SOLUTION_BODIES))))
        nb["nbformat_minor"] = 4
        for cell in nb["cells"]:
            cell.pop("id", None)
        fx.write_submission(subs, sid, text=json.dumps(nb))
    else:
        raise ValueError(kind)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("redteam")
    sol_dir, subs, out = root / "solutions", root / "submissions", root / "out"
    subs_short, out_short = root / "submissions-short", root / "out-short"
    sol = fx.write_solution(sol_dir)
    mark = Path("/var/tmp") / f"memopt-redteam-{os.getpid()}-pwned"  # a host path the sandbox must not create
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.5)
    received = []

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                received.append(conn.recv(100))
                conn.close()
            except OSError:
                pass
    stop = threading.Event()
    threading.Thread(target=serve, daemon=True).start()

    import memopt_fixture_lab90_ref as ref
    subst = {"@SOL@": str(sol_dir), "@OUT@": str(out), "@SUBS@": str(subs), "@REF@": ref.__file__,
             "@PORT@": str(server.getsockname()[1]), "@MARK@": str(mark)}
    fx.write_submission(subs, "honest", fx.student_notebook(fx.SOLUTION_BODIES))
    fx.write_submission(subs, "wrong", fx.student_notebook(fx.WRONG_BODIES))
    fx.write_submission(subs, "untouched", fx.student_notebook())
    for sid, spec in attacks.ALL.items():
        what = spec[0]
        where = subs_short if sid in attacks.SHORT_TIMEOUT else subs
        if isinstance(what, str):
            _special(what, where, sid, sol, mark)
        else:
            bodies = {}
            for cid, body in what.items():
                for k, v in subst.items():
                    body = body.replace(k, v)
                bodies[cid] = body
            fx.write_submission(where, sid, fx.student_notebook(bodies))
    os.environ["MEMOPT_REDTEAM_SECRET"] = "hunter2"
    old_cache = os.environ.get("MEMOPT_CACHE")
    os.environ["MEMOPT_CACHE"] = str(root / "no-cache")  # the fixture lab loads no model: nothing to copy
    # uids of their own: a grader of an older version (without the uid locks) may run beside the tests
    old_base, sandbox.UID_BASE = sandbox.UID_BASE, 64200
    common = ["--lab", "90", "--solutions", str(sol_dir), "--checks-module", "memopt_fixture_lab90",
              "--workers", "2", "--memory-mb", "3000", "--quiet"]
    try:
        rc = cli.main(common + ["--submissions", str(subs), "--out", str(out), "--timeout", str(TIMEOUT_S)])
        rc |= cli.main(common + ["--submissions", str(subs_short), "--out", str(out_short),
                                 "--timeout", str(SHORT_TIMEOUT_S)])
    finally:
        os.environ.pop("MEMOPT_REDTEAM_SECRET", None)
        sandbox.UID_BASE = old_base
        if old_cache is None:
            os.environ.pop("MEMOPT_CACHE", None)
        else:
            os.environ["MEMOPT_CACHE"] = old_cache
        stop.set()
    rows = {}
    for folder in (out, out_short):
        with open(folder / "grades.csv", newline="", encoding="utf-8") as f:
            rows.update({r["student_id"]: r for r in csv.DictReader(f)})
        for sub in ("results", "feedback"):  # one place for the tests below to look
            for p in (folder / sub).iterdir():
                if folder is out_short:
                    p.rename(out / sub / p.name)
    yield {"rc": rc, "rows": rows, "out": out, "sol": sol, "mark": mark, "received": received, "subs": subs}
    server.close()


def test_batch_ran(batch):
    assert batch["rc"] == 0
    assert len(batch["rows"]) == len(attacks.ALL) + 3 - 0  # every folder has a row, even the empty one


def test_honest_correct_gets_full_marks(batch):
    row = batch["rows"]["honest"]
    assert (row["status"], row["score"], row["max_score"]) == ("graded", "5", "5"), row
    assert row["sum_of_squares_values_status"] == row["row_norms_lean_status"] == "passed"
    assert int(row["peak_allocated_bytes"]) > 64 * 2**20  # the grader measured the 64 MiB input + output
    assert int(row["max_rss_bytes"]) > 64 * 2**20


def test_honest_wrong_and_untouched_get_zero(batch):
    for sid in ("wrong", "untouched"):
        row = batch["rows"][sid]
        assert (row["status"], row["score"]) == ("graded", "0"), row
        assert row["sum_of_squares_values_status"] == row["row_norms_lean_status"] == "failed", row
    res = json.loads((batch["out"] / "results" / "untouched.json").read_text())
    assert "not implemented" in res["tests"][0]["output"]


@pytest.mark.parametrize("sid", sorted(attacks.ALL))
def test_attack(batch, sid):
    spec = attacks.ALL[sid]
    status, checks = spec[1], (spec[2] if len(spec) > 2 else {})
    row = batch["rows"][sid]
    # an ungradable row has no score (empty, graded=false); every other row scores 0
    assert row["score"] == ("" if status == "ungradable" else "0"), f"{sid} scored {row['score']}: {row}"
    assert row["graded"] == ("false" if status == "ungradable" else "true"), row
    assert row["status"] == status, row
    if status == "tampering":
        assert row["sum_of_squares_values_status"] == row["row_norms_lean_status"] == "failed"
        assert "tampering" in row["reason"]
    for name, want in checks.items():
        assert row[f"{name}_status"] == want, row
    res = json.loads((batch["out"] / "results" / f"{sid}.json").read_text())
    assert res["score"] == 0 and all(t["score"] == 0 for t in res["tests"])


def test_no_escape_left_traces(batch):
    assert not batch["mark"].exists(), "the sandbox wrote to the host (or the grader unpickled student data)"
    assert sorted(p.name for p in batch["sol"].parent.iterdir()) == [fx.NAME]
    assert not (batch["out"] / "pwned.txt").exists()
    assert batch["received"] == [], "a submission reached the network"
    assert sorted(p.name for p in batch["out"].iterdir()) == ["feedback", "grades.csv", "results"]
    assert len(list((batch["out"] / "results").iterdir())) == len(attacks.ALL) + 3
    assert not Path("/pwned").exists()
    if isolation().root:  # nothing of the sandbox users survives its submission
        assert USED_UIDS
        left = [p for p in os.listdir("/proc") if p.isdigit() and _uid(p) in USED_UIDS]
        assert left == []


def _uid(pid: str) -> int:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return -1


def test_feedback_is_escaped(batch):
    page = (batch["out"] / "feedback" / "d16_hostile_exception_text.html").read_text()
    assert "&lt;script&gt;" in page and "<script" not in page and "<img" not in page
    for f in (batch["out"] / "feedback").iterdir():
        assert "<script" not in f.read_text().lower()


def test_outputs_are_bounded(batch):
    res = json.loads((batch["out"] / "results" / "d09_huge_output.json").read_text())
    assert len(json.dumps(res)) < 100_000


def test_isolation_is_real_here():
    """On this CI machine (root, unshare available) every protection is on; elsewhere we warn."""
    iso = isolation()
    if not iso.root:
        pytest.skip("not root: the grader warns that it cannot isolate")
    assert iso.namespaces, iso.warnings
