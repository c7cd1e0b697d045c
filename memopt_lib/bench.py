"""The benchmark ladder: every memory technique of the course, measured on this device, one table.

    python -m memopt_lib.bench                                   # the course shapes of this machine
    python -m memopt_lib.bench --device cpu --model gpt2 --batch 2 --seq 64 --json out.json
    python -m memopt_lib.bench --model llama-7b --batch 4 --seq 512 --plot ladder.png   # QLoRA rows (CUDA)

Each row is one :class:`Row` (a name and technique flags), built in a fresh
model by :func:`run_row` and measured with :func:`memopt_lib.profiler.measure`:
one warm-up step (creates the optimizer state), one measured step (the peak),
then ``--steps`` timed steps (median). The first row is always the fp32 baseline
and every ratio is relative to it. A row that cannot run here (a 7B in fp32, a
row whose predicted memory exceeds the device) is printed as skipped, with the
reason -- never dropped. This is the command to run on a GPU to check the
course's thresholds against the H200 anchors in ``memopt_lib/assets``.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .profiler import GiB, fmt_bytes, measure

LORA_TARGETS = {"gpt2": ("c_attn",), "llama": ("q_proj", "k_proj", "v_proj", "o_proj")}


@dataclass(frozen=True)
class Row:
    """One rung of the ladder: which techniques are on."""

    name: str
    amp: bool = False          # torch.autocast to bf16 (fp16 + GradScaler on GPUs without native bf16)
    pure_bf16: bool = False    # weights, gradients and AdamW state in bf16
    ckpt: bool = False         # Hugging Face gradient checkpointing (non-reentrant)
    accum: int = 1             # micro-batches per optimizer step (batch split accum ways)
    lora: bool = False         # peft LoRA r=16 on the attention projections, base frozen
    opt8bit: bool = False      # bitsandbytes AdamW8bit instead of torch AdamW
    quant4: str = ""           # "nf4-dq" / "nf4": load the base in 4 bits (QLoRA; implies lora)
    paged: bool = False        # PagedAdamW8bit (CUDA unified memory for the optimizer state)


BASELINE = Row("fp32 baseline")
LADDER = [
    BASELINE,
    Row("autocast", amp=True),
    Row("pure bf16", pure_bf16=True),
    Row("checkpointing", ckpt=True),
    Row("accumulation 4x", accum=4),
    Row("LoRA r16", lora=True),
    Row("8-bit AdamW", opt8bit=True),
    Row("autocast + ckpt", amp=True, ckpt=True),
    Row("autocast + 8-bit AdamW", amp=True, opt8bit=True),
    Row("pure bf16 + ckpt + 8-bit AdamW", pure_bf16=True, ckpt=True, opt8bit=True),
    Row("LoRA + autocast + ckpt", lora=True, amp=True, ckpt=True),
]
QLORA = [
    Row("QLoRA nf4+dq + ckpt", quant4="nf4-dq", lora=True, amp=True, ckpt=True),
    Row("QLoRA nf4+dq no ckpt", quant4="nf4-dq", lora=True, amp=True),
    Row("QLoRA nf4 (no dq) + ckpt", quant4="nf4", lora=True, amp=True, ckpt=True),
    Row("QLoRA nf4+dq + ckpt + paged 8-bit AdamW", quant4="nf4-dq", lora=True, amp=True, ckpt=True,
        opt8bit=True, paged=True),
]


def rows_for(model_name: str) -> list[Row]:
    """GPT-2: the ladder. Llama models: the ladder and the QLoRA configurations of the capstone."""
    from .models import spec
    return LADDER + (QLORA if spec(model_name).family == "llama" else [])


# ---------------------------------------------------------------------- one row
def _predicted_bytes(row: Row, cfg, batch: int, seq: int) -> float:
    from .calculator import Shape, estimate
    shape = Shape.from_config(cfg)
    weights = "nf4" if row.quant4 else ("bf16" if row.pure_bf16 else "fp32")
    acts = "bf16" if (row.amp or row.pure_bf16 or row.quant4) else "fp32"
    est = estimate(shape, batch=max(1, batch // row.accum), seq=seq, weights=weights, activations=acts,
                   optimizer="adamw8bit" if row.opt8bit else "adamw", lora_rank=16 if row.lora else 0,
                   lora_targets=LORA_TARGETS[cfg.model_type if cfg.model_type == "gpt2" else "llama"],
                   checkpointing=row.ckpt)
    return sum(est.values())


def cpu_has_fast_bf16() -> bool:
    """Does this CPU multiply bf16 in hardware (AVX512-BF16 / AMX, or an arm64 Mac/Graviton)?

    Without it oneDNN emulates bf16 and a GPT-2 step runs 10-25x slower than in fp32.
    """
    import platform
    if platform.machine().lower() in ("arm64", "aarch64"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _skip_reason(row: Row, args, cfg) -> str | None:
    from .device import hardware_info
    if row.accum > 1 and args.batch < 2:
        return "accumulation needs --batch >= 2 (the batch is split into micro-batches)"
    if row.paged and args.device.type != "cuda":
        return "paged optimizers page between GPU and host memory: CUDA only"
    if (args.device.type == "cpu" and (row.amp or row.pure_bf16 or row.quant4) and not args.cpu_bf16
            and not cpu_has_fast_bf16()):
        return ("bf16 matmuls are emulated on this CPU (no AVX512-BF16/AMX): 10-25x slower than fp32; "
                "pass --cpu-bf16 to run it anyway (small models), or run on a GPU")
    total = hardware_info(args.device).total_memory_bytes
    need = _predicted_bytes(row, cfg, args.batch, args.seq)
    if total and need > 0.95 * total:
        return (f"predicted {fmt_bytes(need)} (calculator) exceeds this device's {fmt_bytes(total)}; "
                "run it on a bigger one")
    return None


def _build(row: Row, args):
    """A fresh model with the row's techniques applied, plus its optimizer, autocast factory and scaler."""
    from .device import amp_dtype
    from .models import load_model, spec
    family = spec(args.model).family
    dev = args.device
    kw = {}
    if row.quant4:
        from transformers import BitsAndBytesConfig
        kw = dict(quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=row.quant4 == "nf4-dq",
            bnb_4bit_compute_dtype=amp_dtype(dev)), dtype=torch.bfloat16, device_map={"": str(dev)})
    elif row.pure_bf16:
        kw = dict(dtype=torch.bfloat16)
    model = load_model(args.model, train=True, **kw)
    if not row.quant4:
        model.to(dev)
    model.config.use_cache = False  # a KV cache is for generation; in training it only costs memory
    if row.quant4:
        from peft import prepare_model_for_kbit_training
        # upcasts embeddings, lm_head and norms to fp32 (+0.49 GiB at 7B, see the H200 anchors)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=row.ckpt,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif row.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if row.lora or row.quant4:
        from peft import LoraConfig, get_peft_model
        lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=list(LORA_TARGETS[family]),
                          fan_in_fan_out=family == "gpt2", task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
    model.train()  # HF checkpointing is silently off in eval mode
    params = [p for p in model.parameters() if p.requires_grad]
    if row.opt8bit:
        import bitsandbytes as bnb
        opt = (bnb.optim.PagedAdamW8bit if row.paged else bnb.optim.AdamW8bit)(params, lr=1e-4)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4)
    adt = amp_dtype(dev)
    autocast = (lambda: torch.autocast(dev.type, dtype=adt)) if (row.amp or row.quant4) else contextlib.nullcontext
    scaler = torch.amp.GradScaler(dev.type, enabled=row.amp and adt == torch.float16 and dev.type == "cuda")
    return model, opt, autocast, scaler


def _step_fn(model, opt, autocast, scaler, micro_batches):
    def step():
        # set_to_none frees last step's gradients before the forward instead of zero-filling them
        opt.zero_grad(set_to_none=True)
        for mb in micro_batches:  # one micro-batch unless accumulating; the gradients add up in .grad
            with autocast():
                loss = model(**mb).loss / len(micro_batches)
            scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.detach()
    return step


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def run_row(row: Row, args) -> dict:
    """Build, measure and free one row; returns plain data (``status`` ok / skipped / oom / error)."""
    from .models import model_config
    from .text import random_batch
    cfg = model_config(args.model)
    out = {"name": row.name, "device": str(args.device), "model": args.model, "batch": args.batch, "seq": args.seq,
           "status": "ok", "reason": "", "peak_allocated_bytes": None, "peak_reserved_bytes": None,
           "device_used_bytes": None, "step_time_s": None, "ratio": None, "time_ratio": None,
           "breakdown_bytes": None, "trainable_params": None, "predicted_bytes": None, "flags": asdict(row)}
    out["predicted_bytes"] = _predicted_bytes(row, cfg, args.batch, args.seq)
    reason = _skip_reason(row, args, cfg)
    if reason:
        out.update(status="skipped", reason=reason)
        return out
    model = opt = step = None
    try:
        model, opt, autocast, scaler = _build(row, args)
        k = min(row.accum, args.batch)
        batch = random_batch(cfg.vocab_size, args.batch, args.seq, device=args.device)
        micro = [{key: v[i::k] for key, v in batch.items()} for i in range(k)]
        step = _step_fn(model, opt, autocast, scaler, micro)
        rep = measure(step, device=args.device, model=model, optimizer=opt, warmup=1, timed_calls=args.steps,
                      label=row.name, timeline=False)
        out.update(peak_allocated_bytes=rep.peak_allocated_bytes, peak_reserved_bytes=rep.peak_reserved_bytes,
                   device_used_bytes=rep.device_used_bytes, step_time_s=rep.step_time_s,
                   breakdown_bytes=rep.breakdown_bytes,
                   trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad))
        if k != row.accum:
            out["reason"] = f"batch {args.batch} split {k} ways"
    except torch.OutOfMemoryError as err:
        out.update(status="oom", reason=str(err).splitlines()[0][:200])
    except Exception as err:  # one broken row must not hide the others
        out.update(status="error", reason=f"{type(err).__name__}: {str(err)[:200]}")
    finally:
        del model, opt, step
        _free(args.device)  # each row starts from an empty device: rows must not contaminate each other
    return out


def add_ratios(rows: list[dict]) -> list[dict]:
    """``ratio`` = peak / baseline peak and ``time_ratio`` = step time / baseline step time (first row)."""
    base = rows[0] if rows and rows[0]["status"] == "ok" else None
    for r in rows:
        if base and r["status"] == "ok":
            r["ratio"] = r["peak_allocated_bytes"] / base["peak_allocated_bytes"]
            if r["step_time_s"] and base["step_time_s"]:
                r["time_ratio"] = r["step_time_s"] / base["step_time_s"]
    return rows


def run_ladder(args, rows: list[Row] | None = None) -> list[dict]:
    from tqdm.auto import tqdm
    rows = rows or rows_for(args.model)
    results = []
    bar = tqdm(rows, desc="ladder", unit="row", file=sys.stderr, disable=args.quiet)
    for row in bar:
        bar.set_postfix_str(row.name)
        results.append(run_row(row, args))
    return add_ratios(results)


# ---------------------------------------------------------------------- output
def table(rows: list[dict]) -> str:
    w = max(len(r["name"]) for r in rows)
    head = f"{'row':<{w}}  {'peak alloc':>11}  {'reserved':>10}  {'dev used':>10}  {'step':>9}  {'x mem':>6}  {'x time':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['name']:<{w}}  {r['status'].upper()}: {r['reason']}")
            continue
        t = f"{r['step_time_s'] * 1e3:.0f} ms" if r["step_time_s"] else "-"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
        tr = f"{r['time_ratio']:.2f}" if r["time_ratio"] is not None else "-"
        lines.append(f"{r['name']:<{w}}  {fmt_bytes(r['peak_allocated_bytes']):>11}  "
                     f"{fmt_bytes(r['peak_reserved_bytes']) if r['peak_reserved_bytes'] else '-':>10}  "
                     f"{fmt_bytes(r['device_used_bytes']) if r['device_used_bytes'] else '-':>10}  "
                     f"{t:>9}  {ratio:>6}  {tr:>6}" + (f"  ({r['reason']})" if r.get("reason") else ""))
    return "\n".join(lines)


def plot(rows: list[dict], path: str | Path, title: str = ""):
    """Horizontal bars of peak allocated memory per row (skipped rows labelled) written to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    names = [r["name"] for r in rows][::-1]
    vals = [(r["peak_allocated_bytes"] or 0) / GiB for r in rows][::-1]
    ax.barh(names, vals, color=["#4C72B0" if v else "#cccccc" for v in vals])
    for i, r in enumerate(rows[::-1]):
        label = f"{r['ratio']:.2f}x" if r["ratio"] is not None else r["status"]
        ax.text(vals[i], i, f" {label}", va="center", fontsize=8)
    ax.set_xlabel("peak allocated (GiB)")
    ax.set_title(title or "memory ladder")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def parse_args(argv=None):
    from .models import SPECS
    from .profiles import pick_profile
    p = argparse.ArgumentParser(prog="python -m memopt_lib.bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(SPECS), default=None, help="course model (default: the profile's GPT-2)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the profile's)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the profile's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda -> mps -> cpu)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per row after the measured one (0: no timing)")
    p.add_argument("--rows", default="", help="comma-separated row names (case-insensitive): run only these "
                   "(the fp32 baseline always runs first)")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--plot", default=None, help="write a bar chart (PNG) to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--cpu-bf16", action="store_true",
                   help="run bf16 rows on a CPU without native bf16 (slow; fine for tiny models)")
    args = p.parse_args(argv)
    for name in ("batch", "seq"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.steps < 0:
        p.error("--steps must be >= 0")
    try:
        args.device = torch.device(args.device) if args.device else None
    except RuntimeError as err:
        p.error(f"--device: {err}")
    if args.device is not None and args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA GPU is visible (use --device cpu)")
    args.only = [s.strip().lower() for s in args.rows.split(",") if s.strip()]
    known = {r.name.lower() for r in rows_for(args.model or "llama-tiny")}
    unknown = [s for s in args.only if s not in known]
    if unknown:
        p.error(f"--rows: unknown row(s) {unknown} for this model; rows: "
                + "; ".join(r.name for r in rows_for(args.model or "llama-tiny")))
    prof = pick_profile(args.device)
    args.device = args.device or prof.device
    args.model = args.model or prof.gpt2
    is_llama = args.model.startswith("llama")
    args.batch = args.batch or (prof.llama_batch if is_llama else prof.gpt2_batch)
    args.seq = args.seq or (prof.llama_seq if is_llama else prof.gpt2_seq)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = rows_for(args.model)
    if args.only:
        rows = [BASELINE] + [r for r in rows[1:] if r.name.lower() in args.only]
    print(f"memopt ladder: {args.model} batch {args.batch} x {args.seq} on {args.device}, "
          f"{len(rows)} rows", flush=True)
    results = run_ladder(args, rows)
    print(table(results))
    if args.device.type == "cpu":
        print("CPU: peaks come from the live-storage tracker (CPU kernels keep other temporaries than CUDA's: "
              "compare ratios, not bytes, with the H200 anchors).")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot, f"{args.model} B{args.batch} S{args.seq} on {args.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
