"""GPU check of memopt's CUDA paths: run on a CUDA machine, prints a table and writes JSON.

    python .ci/gpu_check.py [--out DIR] [--skip-7b]

1. the profiler's tracker against torch.cuda.max_memory_allocated on GPT-2 (batch 8 x 512), fp32 and autocast;
2. a Llama-2-7B-shaped QLoRA step (4-bit NF4 + double quant, LoRA r=16 on q,k,v,o, non-reentrant
   checkpointing, train mode) at batch 4 and 8 x 512, against the H200 anchors;
3. the graded checks of every lab on the GPU profile (real shapes, absolute budgets), one section per lab.
"""
from __future__ import annotations

import argparse
import gc
import json
import time
import traceback
from pathlib import Path

import torch

from memopt_lib.models import load_model
from memopt_lib.profiler import GiB, measure, train_step_fn
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


def gpt2_accuracy():
    out = {}
    for mode in ("fp32", "amp-bf16"):
        torch.manual_seed(0)
        model = load_model("gpt2").cuda()
        batch = random_batch(model.config.vocab_size, 8, 512, "cuda")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        ac = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if mode != "fp32" else None
        r = measure(train_step_fn(model, batch, opt, autocast=ac), device="cuda", model=model, optimizer=opt,
                    warmup=2, timed_calls=5, label=mode)
        out[mode] = {"allocator_peak_GiB": r.peak_allocated_bytes / GiB, "tracker_peak_GiB": r.tracker_peak_bytes / GiB,
                     "rel_diff": (r.tracker_peak_bytes - r.peak_allocated_bytes) / r.peak_allocated_bytes,
                     "reserved_GiB": r.peak_reserved_bytes / GiB, "device_used_GiB": r.device_used_bytes / GiB,
                     "context_GiB": r.cuda_context_bytes / GiB, "step_time_s": r.step_time_s,
                     "breakdown_GiB": {k: v / GiB for k, v in r.breakdown_bytes.items()}}
        del model, opt
        gc.collect()
    return out


def lab_check(lab: str):
    """The graded checks of one lab, on the solution, with the GPU profile."""
    from memopt_lib.checks import CheckContext, lab_topics, registry, run_checks
    from memopt_lib.notebook import namespace_from
    sol = Path("solutions") / f"{lab}_{lab_topics()[lab]}.ipynb"
    res = run_checks(registry(lab), namespace_from(sol, sol), CheckContext.here(seed=7))
    return {"checks": [(r.name, r.status, r.message[:300], r.measurements, round(r.duration_s, 1)) for r in res]}


def qlora_7b():
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    t0 = time.time()
    model = load_model("llama-7b", quantization_config=q, device_map={"": 0}, dtype=torch.bfloat16)
    loaded = torch.cuda.memory_allocated() / GiB
    out = {"load_s": time.time() - t0, "loaded_GiB": loaded}
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    out["after_prepare_GiB"] = torch.cuda.memory_allocated() / GiB
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    out["trainable"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=2e-4)
    for b in (4, 8):
        batch = random_batch(32000, b, 512, "cuda")
        r = measure(train_step_fn(model, batch, opt, autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16)),
                    device="cuda", model=model, optimizer=opt, warmup=2, timed_calls=2, timeline=False)
        out[f"B{b}"] = {"peak_GiB": r.peak_allocated_bytes / GiB, "tracker_GiB": r.tracker_peak_bytes / GiB,
                        "reserved_GiB": r.peak_reserved_bytes / GiB, "step_time_s": r.step_time_s,
                        "breakdown_GiB": {k: round(v / GiB, 4) for k, v in r.breakdown_bytes.items()}}
    return out


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
    sections = {"gpt2_accuracy": gpt2_accuracy, "qlora_7b": qlora_7b}
    sections.update({f"lab_{lab}": (lambda lab=lab: lab_check(lab)) for lab in sorted(lab_topics())})
    for name, fn in sections.items():
        if (args.only and not any(name.startswith(o) for o in args.only)) or (args.skip_7b and name == "qlora_7b"):
            continue
        section(name, results, fn)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
