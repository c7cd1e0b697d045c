"""GPU record for lab 10: FSDP2 on one rank, with and without CPU offload, GPT-2 124M.

    python .ci/gpu_sharding.py [--out .ci/gpu_results/sharding-offload.json] [--steps 4]

One CUDA GPU, one rank (``nccl``, a process group of one): FSDP2 cannot shard across ranks here, but
``CPUOffloadPolicy`` moves the fp32 shards, gradients and the AdamW step to pinned host memory, so
the GPU keeps only the unit in flight. For each row: the kit's tracker in the rank (CUDA storages
only: what stays on the GPU after a step), the allocator's peak, the median step time, and the
kit's prediction of the GPU model states (``per_rank_bytes(P, "zero3", 1, offload=...)``).
Lab 10's last cell shows the file. Not run in CI (no GPU there).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from memopt_lib.sharding import per_rank_bytes
from memopt_lib.sharding_run import run_ranks, train_on_ranks

GPT2_124M = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "gpu_results" / "sharding-offload.json")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU: FSDP2's CPUOffloadPolicy pins host memory for a device")
    rows = []
    for label, strategy, offload in [("FSDP2 fp32, 1 rank", "fsdp2", False),
                                     ("FSDP2 fp32 + CPU offload", "fsdp2", True),
                                     ("FSDP2 bf16 compute + CPU offload", "fsdp2-bf16", True)]:
        cfg = {"strategy": strategy, "model": GPT2_124M, "rows": args.rows, "seq": args.seq, "steps": args.steps,
               "offload": offload, "timed_calls": 3, "device": "cuda"}
        r = run_ranks(train_on_ranks, 1, args=(cfg,), backend="nccl", start_method="spawn", timeout_s=900)[0]
        gpu = per_rank_bytes(r["n_params"], "zero3", 1, offload="params" if offload else "none")["gpu"]
        row = {"label": label, "offload": offload, **{k: r[k] for k in ("n_params", "model_state_bytes", "peak_bytes",
                                                                       "peak_breakdown_bytes", "losses", "step_time_s")},
               "predicted_gpu_model_state_bytes": gpu["weights"] + gpu["gradients"] + gpu["optimizer"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "batch": [args.rows, args.seq],
           "how": "memopt_lib.sharding_run.train_on_ranks on 1 rank (nccl); tracker on cuda after step 2; "
                  "allocator peak of step 2; median of 3 timed steps", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
