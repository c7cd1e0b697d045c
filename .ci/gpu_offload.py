"""GPU measurements of lab 08 (CPU offloading): run on a CUDA machine, writes .ci/gpu_results/h200-offload.json.

    python .ci/gpu_offload.py [--out .ci/gpu_results/h200-offload.json] [--skip-7b] [--skip-deepspeed]

Not run yet: it was written on a machine without a GPU (lab 08 then says "not measured yet on a GPU").
Rows, each one steady step measured by ``memopt_lib.offload.measure_trade`` (allocator peak, tracker phase
peaks, median step time, bytes the offloader moved):

* GPT-2 124M fp32 at 8 x 512: AdamW (baseline), save_on_cpu, OffloadActivations (side stream), checkpointing,
  checkpointing + OffloadActivations, optimizer offload (torchao CPUOffloadOptimizer if installed, else memopt's
  HostOffloadOptimizer), checkpointing + activation + optimizer offload, LoRA with the frozen base on the device
  vs offloaded (accelerate cpu_offload); DeepSpeed ZeRO-2 + CPU offload vs AdamW (``python -m
  memopt_lib.offload_optimizer``, own process);
* 7B QLoRA (the capstone's default stack) at 8 x 512: baseline (checkpointing), + OffloadActivations,
  without checkpointing + OffloadActivations; the lean stack's paged 8-bit AdamW with its paged tensors counted.

Each row is kept (``ok: false`` with the error) when it fails, so one OOM does not hide the others.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memopt_lib import offload  # noqa: E402
from memopt_lib.checkpointing import checkpoint_blocks  # noqa: E402
from memopt_lib.models import load_model  # noqa: E402
from memopt_lib.offload_activations import OffloadActivations, save_on_cpu  # noqa: E402
from memopt_lib.offload_optimizer import host_offload_optimizer  # noqa: E402
from memopt_lib.offload_params import offload_frozen_base  # noqa: E402
from memopt_lib.text import random_batch  # noqa: E402


def _step(model, opt, batch, ctx=contextlib.nullcontext, autocast=None):
    def step():
        opt.zero_grad(set_to_none=True)
        with ctx(), (torch.autocast("cuda", dtype=autocast) if autocast else contextlib.nullcontext()):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def _row(rows, model_name, label, fn):
    t0 = time.time()
    try:
        r = fn()
        rows.append({"model": model_name, "ok": True, **r.to_dict(), "seconds": round(time.time() - t0, 1)})
    except Exception as err:  # keep going
        rows.append({"model": model_name, "technique": label, "ok": False, "error": f"{type(err).__name__}: {err}",
                     "trace": traceback.format_exc()[-1500:]})
    print(json.dumps({k: v for k, v in rows[-1].items() if k != "trace"}), flush=True)
    gc.collect()
    torch.cuda.empty_cache()


def gpt2_rows(rows, dev):
    name = "gpt2 B8 S512 fp32"
    base = load_model("gpt2", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).to(dev)
    batch = random_batch(base.config.vocab_size, 8, 512, device=dev)
    trade = lambda label, m, opt, ctx=contextlib.nullcontext, stats=lambda: None, dev_opt=True: offload.measure_trade(  # noqa: E731
        label, _step(m, opt, batch, ctx), device=dev, stats=stats, warmup=2, timed_calls=5,
        roots=offload.model_roots(m, opt if dev_opt else None))

    m = copy.deepcopy(base)
    adam = torch.optim.AdamW(m.parameters(), lr=1e-5, fused=True)
    _row(rows, name, "AdamW (baseline)", lambda: trade("AdamW (baseline)", m, adam))
    _row(rows, name, "save_on_cpu", lambda: trade("save_on_cpu", m, adam, save_on_cpu))
    act = OffloadActivations(model=m)
    _row(rows, name, "activation offload", lambda: trade("activation offload", m, adam, lambda: act,
                                                         lambda: act.stats))
    del m, adam
    ck = checkpoint_blocks(copy.deepcopy(base))
    ck_adam = torch.optim.AdamW(ck.parameters(), lr=1e-5, fused=True)
    _row(rows, name, "checkpointing", lambda: trade("checkpointing", ck, ck_adam))
    ck_act = OffloadActivations(model=ck)
    _row(rows, name, "checkpointing + activation offload",
         lambda: trade("checkpointing + activation offload", ck, ck_adam, lambda: ck_act, lambda: ck_act.stats))
    del ck, ck_adam
    hm = copy.deepcopy(base)
    hopt, hname = host_offload_optimizer(hm.parameters(), torch.optim.AdamW, offload_gradients=True, lr=1e-5)
    _row(rows, name, "optimizer offload", lambda: trade(f"optimizer offload ({hname})", hm, hopt,
                                                        stats=lambda: getattr(hopt, "stats", None), dev_opt=False))
    del hm, hopt
    am = checkpoint_blocks(copy.deepcopy(base))
    aopt, _ = host_offload_optimizer(am.parameters(), torch.optim.AdamW, offload_gradients=True, lr=1e-5)
    aact = OffloadActivations(model=am)
    _row(rows, name, "checkpointing + activation + optimizer offload",
         lambda: trade("checkpointing + activation + optimizer offload", am, aopt, lambda: aact,
                       lambda: aact.stats, dev_opt=False))
    del am, aopt
    import peft
    for label, off in (("LoRA r16, frozen base on the device", False), ("LoRA r16, frozen base offloaded", True)):
        def lora_row(label=label, off=off):
            cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
                                  fan_in_fan_out=True)
            lm = peft.get_peft_model(copy.deepcopy(base), cfg)
            if off:
                offload_frozen_base(lm, dev)
            opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-4)
            st = getattr(lm, "_memopt_offload_stats", None)
            return offload.measure_trade(label, _step(lm, opt, batch), device=dev, stats=lambda: st, warmup=2,
                                         timed_calls=5, roots=offload.model_roots(lm, opt))
        _row(rows, name, label, lora_row)


def deepspeed_row(out: dict):
    cmd = [sys.executable, "-m", "memopt_lib.offload_optimizer", "--model", "gpt2", "--batch", "8", "--seq", "512",
           "--steps", "5"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    out["deepspeed_gpt2"] = json.loads(lines[-1]) if lines else {"error": run.stderr[-3000:]}
    print(json.dumps({k: v for k, v in out["deepspeed_gpt2"].items() if k != "estimate_text"}), flush=True)


def llama_rows(rows, dev):
    from memopt_lib import qlora
    from memopt_lib.offload_paged import paged_tensors
    name = "7b qlora-r16(qkvo) B8 S512"
    model, opt = qlora.build_default("llama-7b", device=dev)
    batch = random_batch(model.config.vocab_size, 8, 512, device=dev)
    trade = lambda label, ctx=contextlib.nullcontext, stats=lambda: None: offload.measure_trade(  # noqa: E731
        label, _step(model, opt, batch, ctx, autocast=torch.bfloat16), device=dev, stats=stats, warmup=2,
        timed_calls=3, roots=offload.model_roots(model, opt))
    _row(rows, name, "default stack (checkpointing)", lambda: trade("default stack (checkpointing)"))
    act = OffloadActivations(model=model)
    _row(rows, name, "default stack + activation offload",
         lambda: trade("default stack + activation offload", lambda: act, lambda: act.stats))

    def no_ckpt():
        from memopt_lib.checkpointing import checkpointing_disabled
        act2 = OffloadActivations(model=model)
        with checkpointing_disabled(model):
            return trade("no checkpointing + activation offload", lambda: act2, lambda: act2.stats)
    _row(rows, name, "no checkpointing + activation offload", no_ckpt)
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()

    def paged():
        lm, popt = qlora.build_lean("llama-7b", device=dev)
        r = offload.measure_trade("lean stack, paged AdamW 8-bit", _step(lm, popt, batch, autocast=torch.bfloat16),
                                  device=dev, warmup=2, timed_calls=3, roots=offload.model_roots(lm, popt))
        rows_extra = paged_tensors(popt)
        r.technique = f"lean stack, paged AdamW 8-bit ({rows_extra['paged_tensors']} of "
        r.technique += f"{rows_extra['state_tensors']} state tensors paged)"
        return r
    _row(rows, name, "lean stack, paged AdamW 8-bit", paged)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(offload.GPU_RESULTS))
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--skip-deepspeed", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU: this script records the GPU numbers lab 08 cites")
    dev = torch.device("cuda")
    out = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "rows": []}
    gpt2_rows(out["rows"], dev)
    if not args.skip_deepspeed:
        deepspeed_row(out)
    if not args.skip_7b:
        llama_rows(out["rows"], dev)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
