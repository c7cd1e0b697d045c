"""Which predictor configuration each H200 measurement in the repository is, and the comparison.

Sources: ``memopt_lib/assets/h200_anchors.json`` (= ``/work/shared/anchors/h200-measured.json``; its
``how``: fused or foreach torch AdamW, ``peak_step1`` = step 1, ``peak_steady`` = step 3, autocast bf16
or fp16 + GradScaler, HF non-reentrant checkpointing, peft LoRA r16, bnb AdamW8bit, the 7B QLoRA
default stack with ``prepare_model_for_kbit_training``, ``model.train()``), the bench's own H200 run
``.ci/gpu_results/h200-bench-gpt2.json`` (the bench's rows, foreach AdamW, the step after one warm-up)
and the 7B QLoRA default stack of ``.ci/gpu_results/h200-foundation.json`` (batch 4 and 8).

Left out, because the file does not say which configuration produced them: the lab checks' peaks in
``h200-labs.json`` and ``gpt2_accuracy`` in ``h200-foundation.json`` (issue 9 traces their +2-4 % to
the checks' own batch/loader set-up, not to the step the bench runs).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..bench import Row
from ..recipe import Recipe

GiB = float(1 << 30)
LORA_AMP = Row("LoRA r16 + autocast", Recipe("LoRA r16 + autocast", lora_rank=16, precision="amp"))

# anchor name -> (model, batch, seq, row name or Row, options)
ANCHOR_CONFIGS: dict[str, tuple] = {
    "gpt2 B8 S512 fp32 adamw(foreach)": ("gpt2", 8, 512, "fp32 baseline", {}),
    "gpt2 B8 S512 fp32 adamw(fused)": ("gpt2", 8, 512, "fp32 baseline", {"optimizer": "fused"}),
    "gpt2 B8 S512 fp32 eager-attn adamw(fused)": ("gpt2", 8, 512, "fp32 baseline",
                                                  {"optimizer": "fused", "attn": "eager"}),
    "gpt2 B8 S512 amp-bf16 adamw(fused)": ("gpt2", 8, 512, "autocast", {"optimizer": "fused"}),
    "gpt2 B8 S512 amp-fp16+scaler adamw(fused)": ("gpt2", 8, 512, "autocast",
                                                  {"optimizer": "fused", "amp_dtype": "float16"}),
    "gpt2 B8 S512 pure-bf16 adamw(fused)": ("gpt2", 8, 512, "pure bf16", {"optimizer": "fused"}),
    "gpt2 B8 S512 fp32 ckpt adamw(fused)": ("gpt2", 8, 512, "checkpointing", {"optimizer": "fused"}),
    "gpt2 B8 S512 amp-bf16 ckpt adamw(fused)": ("gpt2", 8, 512, "autocast + ckpt", {"optimizer": "fused"}),
    "gpt2 B8 S512 fp32 accum4x(B/4) adamw(fused)": ("gpt2", 8, 512, "accumulation 4x", {"optimizer": "fused"}),
    "gpt2 B8 S512 lora-r16(c_attn) amp-bf16": ("gpt2", 8, 512, LORA_AMP, {}),
    "gpt2 B8 S512 amp-bf16 adamw8bit(bnb)": ("gpt2", 8, 512, "autocast + 8-bit AdamW", {}),
    "gpt2 B8 S512 pure-bf16 ckpt adamw8bit": ("gpt2", 8, 512, "pure bf16 + ckpt + 8-bit AdamW", {}),
    "7b qlora-r16(qkvo) ckpt adamw dq=True B4 S512": ("llama-7b", 4, 512, "QLoRA nf4+dq + ckpt", {}),
    "7b qlora-r16(qkvo) ckpt adamw dq=True B1 S512": ("llama-7b", 1, 512, "QLoRA nf4+dq + ckpt", {}),
    "7b qlora-r16(qkvo) no-ckpt adamw dq=True B4 S512": ("llama-7b", 4, 512, "QLoRA nf4+dq no ckpt", {}),
    "7b qlora-r16(qkvo) ckpt adamw dq=False B4 S512": ("llama-7b", 4, 512, "QLoRA nf4 (no dq) + ckpt", {}),
}


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def measurements() -> list[dict]:
    """Every H200 peak the repository holds that has a known configuration, as comparison cases.

    Each case: ``name``, ``source``, ``config`` (model, batch, seq, row, options) and ``measured``
    ``{"steady": bytes, "step1": bytes or None}``.
    """
    from ..anchors import rows as anchor_rows
    cases = []
    for name, r in anchor_rows().items():
        if name not in ANCHOR_CONFIGS:
            raise KeyError(f"anchor {name!r} has no predictor configuration in ANCHOR_CONFIGS")
        cases.append({"name": name, "source": "assets/h200_anchors.json", "config": ANCHOR_CONFIGS[name],
                      "measured": {"steady": r["peak_steady_GiB"] * GiB, "step1": r["peak_step1_GiB"] * GiB}})
    ci = repo_root() / ".ci" / "gpu_results"
    bench = ci / "h200-bench-gpt2.json"
    if bench.exists():
        for r in json.loads(bench.read_text()):
            if r["status"] == "ok":
                cases.append({"name": f"bench {r['name']}", "source": ".ci/gpu_results/h200-bench-gpt2.json",
                              "config": (r["model"], r["batch"], r["seq"], r["name"], {}),
                              "measured": {"steady": float(r["peak_allocated_bytes"]), "step1": None,
                                           "reserved": float(r["peak_reserved_bytes"])}})
    found = ci / "h200-foundation.json"
    if found.exists():
        q = json.loads(found.read_text()).get("qlora_7b", {})
        for key, batch in (("B4", 4), ("B8", 8)):
            if key in q:
                cases.append({"name": f"foundation qlora_7b {key}", "source": ".ci/gpu_results/h200-foundation.json",
                              "config": ("llama-7b", batch, 512, "QLoRA nf4+dq + ckpt", {}),
                              "measured": {"steady": q[key]["peak_GiB"] * GiB, "step1": None}})
    return cases


def compare(cases: list[dict] | None = None, *, progress=None) -> list[dict]:
    """Predict every case; returns rows with predicted / measured bytes and the relative error."""
    from .step import predict_step
    out, memo = [], {}
    for c in cases if cases is not None else measurements():
        model, batch, seq, row, opts = c["config"]
        key = (model, batch, seq, row if isinstance(row, str) else row.name, tuple(sorted(opts.items())))
        if key not in memo:
            memo[key] = predict_step("h200", model, batch, seq, row, count_flops=False, **opts)  # memory only
        p = memo[key]
        res = {"name": c["name"], "source": c["source"]}
        for what, pred in (("steady", p["peak_allocated_bytes"]), ("step1", p["peak_step1_bytes"]),
                           ("reserved", p["peak_reserved_bytes"])):
            m = c["measured"].get(what)
            if m:
                res[what] = {"predicted_bytes": pred, "measured_bytes": m, "rel_error": pred / m - 1}
        out.append(res)
        if progress:
            progress(res)
    return out
