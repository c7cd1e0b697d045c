"""Run a notebook's code cells top to bottom in one namespace, without Jupyter.

For GPU machines that have torch but no Jupyter stack (``nbval`` is what ``make test`` uses). Plots go to
the Agg backend and are written next to ``--out`` as PNGs; IPython magics are not supported (the labs have none).

    python .ci/exec_notebook.py solutions/01_memory_anatomy.ipynb [--out DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
import traceback
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nbformat  # noqa: E402


def run(path: Path, out: Path | None) -> dict:
    nb = nbformat.read(str(path), as_version=4)
    ns: dict = {"__name__": "__main__"}
    cells, figs = [], 0
    t_start = time.time()
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        buf, t0 = io.StringIO(), time.time()
        status = "ok"
        try:
            with contextlib.redirect_stdout(buf):
                exec(compile(cell.source, f"<{path.name} cell {cell.id}>", "exec"), ns)  # noqa: S102
        except Exception:
            status = "error"
            buf.write(traceback.format_exc())
        for num in plt.get_fignums():
            if out:
                plt.figure(num).savefig(out / f"{path.stem}-{figs}.png", dpi=80)
            figs += 1
        plt.close("all")
        cells.append({"id": cell.id, "status": status, "seconds": round(time.time() - t0, 2),
                      "output": buf.getvalue()[-3000:]})
        print(f"--- {path.name} [{cell.id}] {status} {time.time() - t0:.1f}s\n{buf.getvalue()[-1500:]}", flush=True)
        if status == "error":
            break
    return {"notebook": path.name, "ok": all(c["status"] == "ok" for c in cells),
            "seconds": round(time.time() - t_start, 1), "cells": cells}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    results = [run(p, args.out) for p in args.notebooks]
    if args.out:
        (args.out / "notebooks.json").write_text(json.dumps(results, indent=1))
    for r in results:
        print(f"{r['notebook']}: {'ok' if r['ok'] else 'FAILED'} in {r['seconds']} s")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
