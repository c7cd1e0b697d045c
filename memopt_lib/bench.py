"""The benchmark ladder: every memory technique of the course, measured on this device, one table.

    python -m memopt_lib.bench                                   # the course shapes of this machine
    python -m memopt_lib.bench --device cpu --model gpt2 --batch 2 --seq 64 --json out.json
    python -m memopt_lib.bench --model llama-7b --batch 4 --seq 512 --plot ladder.png   # QLoRA rows (CUDA)

Each row is one :class:`Row`: a name and a :class:`memopt_lib.recipe.Recipe`,
composed in a fresh model by :func:`memopt_lib.recipe.compose` (the bench builds
nothing itself) and measured with :func:`memopt_lib.profiler.measure`: one
warm-up step (creates the optimizer state), one measured step (the peak and the
row's ``loss``), then ``--steps`` timed steps (median). Accumulation is
token-normalized, as everywhere in the package. The first row is always the fp32 baseline
and every ratio is relative to it. A row that cannot run here (a 7B in fp32, a
row whose predicted memory exceeds the device) is printed as skipped, with the
reason -- never dropped. This is the command to run on a GPU to check the
course's thresholds against the H200 anchors in ``memopt_lib/assets``.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .profiler import GiB, fmt_bytes, measure
from .recipe import FP32, MEMOPT_GPT2, MEMOPT_LLAMA, QLORA_DEFAULT, QLORA_LEAN, Recipe, compose, resolve_precision


@dataclass(frozen=True)
class Row:
    """One rung of the ladder: a stable name and the recipe it measures (a predictor builds the same step)."""

    name: str
    recipe: Recipe


def _row(name: str, base: Recipe | None = None, **changes) -> Row:
    return Row(name, (base or Recipe()).with_(name=name, **changes))


BASELINE = Row(FP32.name, FP32)
LADDER = [
    BASELINE,
    _row("autocast", precision="amp"),
    _row("pure bf16", precision="pure-bf16"),
    _row("checkpointing", checkpointing=True),
    _row("accumulation 4x", micro_batches=4),
    _row("LoRA r16", lora_rank=16),
    _row("8-bit AdamW", optimizer="adamw_8bit"),
    _row("chunked cross-entropy", chunked_loss=True),
    _row("optimizer in backward", optimizer_in_backward=True),
    _row("activation offloading", offload_activations=True),
    _row("autocast + ckpt", precision="amp", checkpointing=True),
    _row("autocast + 8-bit AdamW", precision="amp", optimizer="adamw_8bit"),
    _row("pure bf16 + ckpt + 8-bit AdamW", precision="pure-bf16", checkpointing=True, optimizer="adamw_8bit"),
    _row("LoRA + autocast + ckpt", lora_rank=16, precision="amp", checkpointing=True),
]
GPT2_ROWS = [Row(MEMOPT_GPT2.name, MEMOPT_GPT2)]
# the 4-bit rows before "QLoRA default" keep their names and their stack (prepare_model_for_kbit_training)
QLORA = [
    _row("QLoRA nf4+dq + ckpt", QLORA_DEFAULT),
    _row("QLoRA nf4+dq no ckpt", QLORA_DEFAULT, checkpointing=False),
    _row("QLoRA nf4 (no dq) + ckpt", QLORA_DEFAULT, quantization="nf4"),
    _row("QLoRA nf4+dq + ckpt + paged 8-bit AdamW", QLORA_DEFAULT, optimizer="paged_adamw_8bit"),
    Row(QLORA_DEFAULT.name, QLORA_DEFAULT),
    Row(QLORA_LEAN.name, QLORA_LEAN),
    _row("QLoRA lean + vocab placement", QLORA_LEAN, embedding="host", lm_head="8bit"),
    Row(MEMOPT_LLAMA.name, MEMOPT_LLAMA),
]


def rows_for(model_name: str) -> list[Row]:
    """GPT-2: the ladder and memopt's full fine-tuning recipe. Llama: the ladder and the 4-bit recipes."""
    from .models import spec
    return LADDER + (QLORA if spec(model_name).family == "llama" else GPT2_ROWS)


def row_recipe(name: str, model_name: str) -> Recipe:
    """The recipe of bench row ``name`` for ``model_name`` (case-insensitive), e.g. for a predictor."""
    for r in rows_for(model_name):
        if r.name.lower() == name.lower():
            return r.recipe
    raise KeyError(f"no bench row {name!r} for {model_name}; rows: {[r.name for r in rows_for(model_name)]}")


# ---------------------------------------------------------------------- one row
def _predicted_bytes(rc: Recipe, cfg, batch: int, seq: int) -> float:
    """The calculator's estimate (it knows precision, 4-bit, LoRA, 8-bit states, checkpointing, micro-batches)."""
    from .calculator import Shape, estimate
    from .lora import DEFAULT_TARGETS
    shape = Shape.from_config(cfg)
    weights = "nf4" if rc.quantization else ("bf16" if rc.precision == "pure-bf16" else "fp32")
    acts = "fp32" if rc.precision == "fp32" else "bf16"
    est = estimate(shape, batch=max(1, batch // rc.micro_batches), seq=seq, weights=weights, activations=acts,
                   optimizer="adamw8bit" if "8bit" in rc.optimizer else "adamw", lora_rank=rc.lora_rank,
                   lora_targets=rc.lora_targets or DEFAULT_TARGETS["gpt2" if cfg.model_type == "gpt2" else "llama"],
                   checkpointing=rc.checkpointing)
    return sum(est.values())


def cpu_has_fast_bf16() -> bool:
    """Does this CPU multiply bf16 in hardware (AVX512-BF16 / AMX, or an arm64 Mac/Graviton)?

    Without it oneDNN emulates bf16: still 2 bytes a value, but slower than fp32 (``mixed_precision.bf16_cost(emulated=True)``
    measures both on the machine at hand; labs 00 and 02 show it).
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
    rc = row.recipe
    if rc.micro_batches > 1 and args.batch < 2:
        return "accumulation needs --batch >= 2 (the batch is split into micro-batches)"
    if rc.optimizer == "paged_adamw_8bit" and args.device.type != "cuda":
        return "paged optimizers page between GPU and host memory: CUDA only"
    if (args.device.type == "cpu" and resolve_precision(rc, args.device).mode != "fp32" and not args.cpu_bf16
            and not cpu_has_fast_bf16()):
        return ("bf16 matmuls are emulated on this CPU (no AVX512-BF16/AMX): slower than fp32, see mixed_precision.bf16_cost; "
                "pass --cpu-bf16 to run it anyway (small models), or run on a GPU")
    total = hardware_info(args.device).total_memory_bytes
    need = _predicted_bytes(rc, cfg, args.batch, args.seq)
    if total and need > 0.95 * total:
        return (f"predicted {fmt_bytes(need)} (calculator) exceeds this device's {fmt_bytes(total)}; "
                "run it on a bigger one")
    return None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def run_row(row: Row, args) -> dict:
    """Compose, measure and free one row; returns plain data (``status`` ok / skipped / oom / error)."""
    from .models import model_config
    from .text import random_batch
    cfg = model_config(args.model)
    out = {"name": row.name, "device": str(args.device), "model": args.model, "batch": args.batch, "seq": args.seq,
           "status": "ok", "reason": "", "peak_allocated_bytes": None, "peak_reserved_bytes": None,
           "device_used_bytes": None, "step_time_s": None, "ratio": None, "time_ratio": None,
           "breakdown_bytes": None, "trainable_params": None, "predicted_bytes": None, "loss": None,
           "flags": row.recipe.to_dict()}
    out["predicted_bytes"] = _predicted_bytes(row.recipe, cfg, args.batch, args.seq)
    reason = _skip_reason(row, args, cfg)
    if reason:
        out.update(status="skipped", reason=reason)
        return out
    composed = None
    try:
        composed = compose(row.recipe, args.model, args.device)
        batch = random_batch(cfg.vocab_size, args.batch, args.seq, device=args.device)
        losses: list[float] = []
        rep = measure(lambda: losses.append(composed.step(batch)), device=args.device, model=composed.model,
                      optimizer=composed.optimizer, warmup=1, timed_calls=args.steps, label=row.name, timeline=False)
        out.update(peak_allocated_bytes=rep.peak_allocated_bytes, peak_reserved_bytes=rep.peak_reserved_bytes,
                   device_used_bytes=rep.device_used_bytes, step_time_s=rep.step_time_s,
                   breakdown_bytes=rep.breakdown_bytes, loss=losses[1],  # the measured (second) step's loss
                   trainable_params=sum(p.numel() for p in composed.model.parameters() if p.requires_grad))
        k = min(row.recipe.micro_batches, args.batch)
        if k != row.recipe.micro_batches:
            out["reason"] = f"batch {args.batch} split {k} ways"
    except torch.OutOfMemoryError as err:
        out.update(status="oom", reason=str(err).splitlines()[0][:200])
    except Exception as err:  # one broken row must not hide the others
        out.update(status="error", reason=f"{type(err).__name__}: {str(err)[:200]}")
    finally:
        del composed
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
    head = (f"{'row':<{w}}  {'peak alloc':>11}  {'reserved':>10}  {'dev used':>10}  {'step':>9}  {'x mem':>6}  "
            f"{'x time':>6}  {'loss':>7}")
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
                     f"{t:>9}  {ratio:>6}  {tr:>6}  {'-' if r.get('loss') is None else format(r['loss'], '7.4f'):>7}"
                     + (f"  ({r['reason']})" if r.get("reason") else ""))
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
    from .predict.gpus import GPUS
    p.add_argument("--predict", choices=sorted(GPUS), default=None, metavar="GPU",
                   help="predict the ladder on this GPU instead of measuring it (meta tensors, from any machine; "
                        f"{', '.join(sorted(GPUS))}); --batch/--seq default to the course's GPU shape (8 x 512)")
    args = p.parse_args(argv)
    for name in ("batch", "seq"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.steps < 0:
        p.error("--steps must be >= 0")
    if args.predict:  # nothing runs: the course's GPU shapes unless given
        args.model = args.model or "gpt2"
        args.batch, args.seq = args.batch or 8, args.seq or 512
        args.only = [s.strip() for s in args.rows.split(",") if s.strip()]
        return args
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
    if args.predict:
        from .predict.ladder import main as predict_main
        return predict_main(["--gpu", args.predict, "--model", args.model, "--batch", str(args.batch),
                             "--seq", str(args.seq), "--rows", ",".join(args.only)]
                            + (["--json", args.json] if args.json else []) + (["--plot", args.plot] if args.plot else []))
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
