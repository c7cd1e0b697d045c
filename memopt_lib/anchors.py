"""The H200 measurements the labs cite and the GPU checks budget from.

``assets/h200_anchors.json`` was measured on one NVIDIA H200 with ``torch.cuda.max_memory_allocated()``
(its ``how`` field says exactly how): GPT-2 124M at batch 8 x 512 under each technique, and a
Llama-2-7B-shaped QLoRA run. They are one GPU's numbers: other GPUs differ a little (cuBLAS workspaces,
kernel choice), so budgets add a margin, and a lab shows them *as anchors*, beside what it measures.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def load() -> dict:
    """The whole file: ``{"device", "how", "rows"}``."""
    return json.loads(resources.files("memopt_lib").joinpath("assets/h200_anchors.json").read_text())


def rows() -> dict[str, dict]:
    """The anchor rows by name."""
    return {r["name"]: r for r in load()["rows"]}


def row(name: str) -> dict:
    """One anchor row; a clear error lists the names when ``name`` is not one of them."""
    table = rows()
    if name not in table:
        raise KeyError(f"no anchor row {name!r}; rows: {sorted(table)}")
    return table[name]
