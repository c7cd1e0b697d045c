"""GPU check of memopt's CUDA paths: run on a CUDA machine, prints a table and writes JSON.

    python .ci/gpu_check.py [--out DIR] [--skip-7b]

1. the profiler's tracker against torch.cuda.max_memory_allocated on GPT-2 (batch 8 x 512), fp32 and autocast;
2. the default QLoRA stack of the 7B (``recipe.QLORA_DEFAULT``: 4-bit NF4 + double quant,
   prepare_model_for_kbit_training, LoRA r=16 on q,k,v,o, non-reentrant checkpointing, train mode) at batch 4
   and 8 x 512, against the H200 anchors;
3. the goals of issue 11: ``QLoRA default`` vs ``memopt recipe`` at the goal shapes (peak, step time, loss),
   and GPT-2's memopt recipe against fp32 after 200 steps on the course corpus;
4. the graded checks of every lab on the GPU profile (real shapes, absolute budgets), one section per lab.

Every configuration is a :class:`memopt_lib.recipe.Recipe` composed by ``recipe.compose``: nothing is built here.
"""
from __future__ import annotations

import argparse
import gc
import json
import time
import traceback
from pathlib import Path

import torch

from memopt_lib import recipe as R
from memopt_lib.profiler import GiB, measure
from memopt_lib.quantization import weight_footprint_bytes
from memopt_lib.text import random_batch


def section(name, results, fn):
    t0 = time.time()
    try:
        results[name] = {"ok": True, **fn()}
    except Exception as err:  # keep going: one failing section must not hide the others
        results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
    results[name]["seconds"] = round(time.time() - t0, 1)
    print(f"== {name}: {json.dumps({k: v for k, v in results[name].items() if k != 'trace'})}", flush=True)
    gc.collect()
    torch.cuda.empty_cache()


def _measure(c, batch, *, warmup=2, timed_calls=2):
    losses = []
    r = measure(lambda: losses.append(c.step(batch)), device="cuda", model=c.model, optimizer=c.optimizer,
                warmup=warmup, timed_calls=timed_calls, timeline=False)
    return {"peak_GiB": r.peak_allocated_bytes / GiB, "tracker_GiB": r.tracker_peak_bytes / GiB,
            "rel_diff": (r.tracker_peak_bytes - r.peak_allocated_bytes) / r.peak_allocated_bytes,
            "reserved_GiB": r.peak_reserved_bytes / GiB, "device_used_GiB": (r.device_used_bytes or 0) / GiB,
            "step_time_s": r.step_time_s, "loss": losses[warmup],
            "breakdown_GiB": {k: round(v / GiB, 4) for k, v in r.breakdown_bytes.items()}}


def gpt2_accuracy():
    out = {}
    for mode, rc in (("fp32", R.FP32), ("amp-bf16", R.Recipe("autocast", precision="amp"))):
        torch.manual_seed(0)
        c = R.compose(rc.with_(lr=1e-5), "gpt2", "cuda")
        out[mode] = _measure(c, random_batch(c.model.config.vocab_size, 8, 512, "cuda"), timed_calls=5)
        del c
        gc.collect()
    return out


def qlora_7b():
    t0 = time.time()
    c = R.compose(R.QLORA_DEFAULT, "llama-7b", "cuda")
    out = {"build_s": time.time() - t0, "weights_GiB": weight_footprint_bytes(c.model) / GiB,
           "after_build_GiB": torch.cuda.memory_allocated() / GiB,
           "trainable": sum(p.numel() for p in c.model.parameters() if p.requires_grad)}
    for b in (4, 8):
        out[f"B{b}"] = _measure(c, random_batch(32000, b, 512, "cuda"))
    return out


def goals():
    """Issue 11's table: the default stack (fp32 for GPT-2) vs memopt's recipe, same shapes, same protocol.

    The runs and the default stack are the predictor's (``python -m memopt_lib.predict goals``), so the
    measured table and the predicted one line up row by row."""
    from memopt_lib.predict.goals import GOALS, default_recipe
    out = {}
    for label, model, b, s, _goal in GOALS:
        for rc in (default_recipe(model), R.memopt_recipe(model)):
            key = f"{label} | {rc.name}"
            try:
                c = R.compose(rc, model, "cuda")
                out[key] = {"recipe": rc.to_dict(), **_measure(c, random_batch(c.model.config.vocab_size, b, s, "cuda"))}
                del c
            except torch.OutOfMemoryError as err:
                out[key] = {"recipe": rc.to_dict(), "oom": str(err)[:200]}
            gc.collect()
            torch.cuda.empty_cache()
    return out


def gpt2_200_steps():
    """GPT-2 full fine-tuning, B8 x 1024, 200 steps on the course corpus: memopt's recipe vs fp32 (final loss)."""
    from memopt_lib.text import lm_batches, load_tokenizer
    tok = load_tokenizer("gpt2")
    out = {}
    for rc in (R.FP32, R.MEMOPT_GPT2):
        torch.manual_seed(0)
        c = R.compose(rc.with_(lr=1e-4), "gpt2", "cuda")
        data = lm_batches(tok, 8, 1024, device="cuda", seed=0)
        losses = [c.step(next(data)) for _ in range(200)]
        out[rc.name] = {"first": losses[0], "last10_mean": sum(losses[-10:]) / 10}
        del c
        gc.collect()
        torch.cuda.empty_cache()
    out["rel_diff_last10"] = out["memopt recipe"]["last10_mean"] / out["fp32 baseline"]["last10_mean"] - 1
    return out


def lab_check(lab: str):
    """The graded checks of one lab, on the solution, with the GPU profile."""
    from memopt_lib.checks import CheckContext, lab_topics, registry, run_checks
    from memopt_lib.notebook import namespace_from
    sol = Path("solutions") / f"{lab}_{lab_topics()[lab]}.ipynb"
    res = run_checks(registry(lab), namespace_from(sol, sol), CheckContext.here(seed=7))
    return {"checks": [(r.name, r.status, r.message[:300], r.measurements, round(r.duration_s, 1)) for r in res]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this script needs a CUDA GPU")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    from memopt_lib.checks import lab_topics
    sections = {"gpt2_accuracy": gpt2_accuracy, "qlora_7b": qlora_7b, "goals": goals,
                "gpt2_200_steps": gpt2_200_steps}
    sections.update({f"lab_{lab}": (lambda lab=lab: lab_check(lab)) for lab in sorted(lab_topics())})
    for name, fn in sections.items():
        if (args.only and not any(name.startswith(o) for o in args.only)) or (args.skip_7b and name in ("qlora_7b", "goals")):
            continue
        section(name, results, fn)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
