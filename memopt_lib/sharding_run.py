"""Real ranks on one machine: start N processes in one process group, shard with FSDP2, measure each.

:func:`run_ranks` starts ``N`` processes with ``torch.multiprocessing`` and joins them in one
``torch.distributed`` process group through the same kind of rendezvous ``torchrun`` uses (a
shared store every rank meets at; here a file, which needs no free port and works without a
network). The backend is ``gloo`` on CPUs and ``nccl`` when each rank has its own GPU: the same
FSDP2 code path, only the collectives differ. Each rank's function returns plain data (JSON);
a rank that raises, dies or outlives ``timeout_s`` stops all of them with a clear error, never
a hang (the process group's own timeout bounds every collective too).

:func:`apply_fsdp2` is the model transform: ``fully_shard`` on every transformer block (one
unit gathered at a time), then on the root (embeddings, final norm, the tied LM head).
:func:`train_on_ranks` trains a small GPT-2 under one strategy with the kit's tracker running
in every rank and reports each rank's model-state bytes and its loss curve.

``start_method="fork"`` (the default on CPUs) lets a rank call functions defined in a notebook;
``"spawn"`` is needed once CUDA is initialized, and then ``fn`` must be importable.
"""
from __future__ import annotations

from .models import from_config  # names the causal-LM loss: no transformers warning

import json
import os
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

STRATEGIES = ("single", "ddp", "fsdp2", "fsdp2-bf16")


class RankError(RuntimeError):
    """A rank raised, died or timed out; the message names the rank and says what happened."""


def pick_backend(world_size: int) -> str:
    """``nccl`` when there is one CUDA GPU per rank, else ``gloo`` (CPU tensors)."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size and torch.distributed.is_nccl_available():
        return "nccl"
    return "gloo"


def rank_device(backend: str, rank: int) -> torch.device:
    return torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")


def _where(tb) -> str:
    frames = [f for f in traceback.extract_tb(tb) if f.filename.startswith("<")]
    return f" (at line {frames[-1].lineno} of {frames[-1].name}())" if frames else ""


def _rank_main(fn, rank, world_size, init_file, out_dir, backend, timeout_s, threads, args):
    import torch.distributed as dist
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    if backend == "gloo" and torch.cuda.is_available():
        # a CPU rank on a GPU machine: FSDP2's default mesh follows torch's accelerator, which would
        # be CUDA (unusable in a process forked after the parent touched it); this rank computes on the CPU
        torch._C._get_accelerator = lambda: torch.device("cpu")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        result = {"ok": fn(rank, world_size, *args)}
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises
        result = {"error": type(err).__name__, "message": str(err) + _where(err.__traceback__),
                  "traceback": traceback.format_exc()[-3000:]}
    try:
        text = json.dumps(result)
    except TypeError as err:
        text = json.dumps({"error": "TypeError", "message": f"rank {rank} returned data that is not JSON: {err}",
                           "traceback": ""})
    # the result lands before the group is torn down: a rank's own error arrives before the
    # "connection closed" its exit causes in the others
    tmp = Path(out_dir) / f".rank{rank}.json"
    tmp.write_text(text)
    tmp.rename(Path(out_dir) / f"rank{rank}.json")  # atomic: the parent never reads half a result
    if dist.is_initialized():
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int = 2, *, args: Sequence = (), timeout_s: float = 180,
              backend: str | None = None, start_method: str | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes joined in one process group.

    Returns each rank's return value (JSON data), in rank order. A rank that raises re-raises here
    (``NotImplementedError`` and ``AssertionError`` keep their type, anything else is a
    :class:`RankError` naming the rank, with its traceback); all ranks are stopped after
    ``timeout_s`` seconds.
    """
    import torch.multiprocessing as mp
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    backend = backend or pick_backend(world_size)
    if backend == "nccl" and (not torch.cuda.is_available() or torch.cuda.device_count() < world_size):
        raise ValueError(f"backend 'nccl' needs one CUDA GPU per rank ({world_size}); use 'gloo' on CPUs")
    start_method = start_method or ("spawn" if backend == "nccl" else "fork")
    ctx = mp.get_context(start_method)
    # a forked rank computes on one thread: GNU OpenMP's pool does not survive fork() (a child that
    # enters a parallel region the parent had used hangs); spawned ranks share the cores
    threads = 1 if start_method == "fork" else max(1, (os.cpu_count() or 1) // world_size)
    with tempfile.TemporaryDirectory(prefix="memopt-ranks-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_rank_main, daemon=True,
                             args=(fn, r, world_size, init_file, tmp, backend, timeout_s, threads, tuple(args)))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        results: dict[int, dict] = {}
        ok = False
        try:
            while len(results) < world_size:
                for r in range(world_size):
                    path = Path(tmp) / f"rank{r}.json"
                    if r not in results and path.exists():
                        results[r] = json.loads(path.read_text())
                        if "error" in results[r]:
                            _raise(r, results[r])
                    elif r not in results and procs[r].exitcode is not None and not path.exists():
                        time.sleep(0.2)  # the result file may land just after the exit
                        if not path.exists():
                            raise RankError(f"rank {r} of {world_size} died (exit code {procs[r].exitcode}) "
                                            "without a result: killed for memory, or a crash in native code")
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(results))
                    raise RankError(f"rank(s) {missing} of {world_size} did not finish within {timeout_s:.0f} s "
                                    "(a collective waiting on a rank that never calls it? every rank must run the "
                                    "same sharded forward/backward/step)")
                time.sleep(0.05)
            ok = True
        finally:
            for p in procs:  # after an error the others may wait in a collective: stop them at once
                p.join(timeout=10 if ok else 0)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
    return [results[r]["ok"] for r in range(world_size)]


def _raise(rank: int, res: dict):
    msg = f"rank {rank}: {res['error']}: {res['message']}"
    if "Unable to find interface" in res["message"]:  # gloo binds to an interface: no loopback, no gloo
        msg += (" -- gloo needs a network interface that is up, at least loopback: a sandbox with its own network "
                "namespace must run `ip link set lo up` in it")
    if res["error"] == "NotImplementedError":
        raise NotImplementedError(msg)
    if res["error"] == "AssertionError":
        raise AssertionError(msg)
    raise RankError(f"{msg}\n--- traceback in rank {rank} ---\n{res['traceback']}")


# ------------------------------------------------------------------ the model transform

def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face GPT-2 (``transformer.h``) or Llama (``model.layers``)."""
    for path in ("transformer.h", "model.layers"):
        mod = model
        try:
            for part in path.split("."):
                mod = getattr(mod, part)
        except AttributeError:
            continue
        return list(mod)
    raise ValueError(f"{type(model).__name__}: no transformer.h or model.layers to shard block by block")


def apply_fsdp2(model: torch.nn.Module, *, mixed_precision: bool = False, offload: bool = False,
                reshard_after_forward: bool = True) -> torch.nn.Module:
    """Shard ``model`` with FSDP2 in place (ZeRO-3): each block one unit, then the root.

    ``mixed_precision``: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: the shards
    (the master weights), their gradients and AdamW's moments stay fp32; only the gathered copy
    is bf16. ``offload``: ``CPUOffloadPolicy``: shards, gradients and the optimizer step live on the
    host (needs a GPU: FSDP2 pins the host copies). Call inside an initialized process group.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    kw: dict = {"reshard_after_forward": reshard_after_forward}
    if mixed_precision:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if offload:
        if not torch.cuda.is_available():
            raise ValueError("CPU offload moves shards off a GPU: FSDP2's CPUOffloadPolicy needs CUDA")
        kw["offload_policy"] = CPUOffloadPolicy()
    for block in transformer_blocks(model):
        fully_shard(block, **kw)  # one unit: gathered for its forward/backward, freed after
    fully_shard(model, **kw)  # the root: embeddings, final norm and the tied LM head
    return model


def model_state_bytes(report) -> dict[str, int]:
    """Weights, gradients and optimizer state alive after a measured step (this rank's shards)."""
    return {k: int(report.end_breakdown_bytes.get(k, 0)) for k in ("weights", "gradients", "optimizer")}


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    """One step on this rank's rows: the same code sharded or not (FSDP2 hooks do the collectives).

    Returns this rank's loss. Under FSDP2 the backward reduce-scatters the gradients (averaged
    over ranks), so every rank's optimizer updates its shard with the global gradient.
    """
    optimizer.zero_grad(set_to_none=True)  # frees last step's gradient shards before the forward
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (``DTensor.full_tensor()`` all-gathers a shard: call on every rank)."""
    from torch.distributed.tensor import DTensor
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu() for n, p in model.named_parameters()}


# ------------------------------------------------------------------ training a small GPT-2 on every rank

def tiny_gpt2(n_layer: int = 2, n_embd: int = 128, n_head: int = 4, vocab_size: int = 8192, n_positions: int = 256,
              seed: int = 0) -> torch.nn.Module:
    """A GPT-2 of this shape, random init from ``seed`` (identical on every rank), dropout off."""
    from transformers import AutoModelForCausalLM, GPT2Config
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size, n_positions=n_positions,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = from_config(cfg)
    model.train()
    return model


def rank_rows(batch: dict, rank: int, world_size: int) -> dict:
    """This rank's rows of a global batch (data parallelism: equal rows, so the mean of the ranks'
    mean losses is the global mean loss)."""
    rows = next(iter(batch.values())).shape[0]
    if rows % world_size:
        raise ValueError(f"a batch of {rows} rows does not split evenly over {world_size} ranks")
    k = rows // world_size
    return {key: t[rank * k:(rank + 1) * k] for key, t in batch.items()}


def global_batches(vocab_size: int, rows: int, seq: int, steps: int, seed: int = 0) -> list[dict]:
    from .text import random_batch
    return [random_batch(vocab_size, rows, seq, seed=seed * 1000 + i) for i in range(steps)]


def _mean_over_ranks(x: float, device) -> float:
    import torch.distributed as dist
    if not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)  # SUM: gloo has no AVG
    return float(t) / dist.get_world_size()


def train_on_ranks(rank: int, world_size: int, cfg: dict) -> dict:
    """One rank's run: a GPT-2 of ``cfg["model"]`` under ``cfg["strategy"]``, ``cfg["steps"]`` AdamW steps.

    ``cfg["shard_fn"]`` / ``cfg["step_fn"]`` replace :func:`apply_fsdp2` / :func:`train_step` (a
    lab's own functions; they reach the ranks because the ranks are forked).

    Step 2 runs under the kit's tracker (step 1 created the optimizer state). Returns this rank's
    model-state bytes after that step, its peak, and the loss curve (mean over ranks).
    """
    import torch.distributed as dist

    from .profiler import measure
    strategy = cfg["strategy"]
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    device = torch.device(cfg.get("device") or ("cuda" if dist.is_initialized() and
                                                 dist.get_backend() == "nccl" else "cpu"))
    model = tiny_gpt2(**cfg["model"]).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        # gradient_as_bucket_view: the gradients are views of DDP's all-reduce buckets (no second copy)
        train_model, model = DistributedDataParallel(model, gradient_as_bucket_view=True), model
    elif strategy.startswith("fsdp2"):
        shard = cfg.get("shard_fn") or (lambda m, mixed_precision=False: apply_fsdp2(
            m, mixed_precision=mixed_precision, offload=bool(cfg.get("offload"))))
        model = shard(model, **({"mixed_precision": True} if strategy == "fsdp2-bf16" else {}))
        train_model = model
    else:
        train_model = model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.get("lr", 1e-3))
    batches = global_batches(model.config.vocab_size, cfg["rows"], cfg["seq"], cfg["steps"], cfg.get("seed", 0))
    losses: list[float] = []

    step_fn = cfg.get("step_fn") or train_step

    def step():
        b = rank_rows(batches[len(losses) % len(batches)], rank, world_size)
        losses.append(_mean_over_ranks(float(step_fn(train_model, opt, {k: v.to(device) for k, v in b.items()})),
                                       device))

    # on a GPU the tracker counts GPU storage only: with offload the host shards are not counted
    report = measure(step, device=device, model=model, optimizer=opt, warmup=1, timeline=False,
                     timed_calls=int(cfg.get("timed_calls", 0)))
    while len(losses) < cfg["steps"]:
        step()
    return {"rank": rank, "world_size": world_size, "strategy": strategy, "n_params": n_params,
            "model_state_bytes": model_state_bytes(report), "peak_bytes": int(report.peak_allocated_bytes),
            "peak_breakdown_bytes": {k: int(v) for k, v in report.breakdown_bytes.items()}, "losses": losses,
            "step_time_s": report.step_time_s}


def warm_imports() -> None:
    """Import what every rank needs once, before forking (a forked rank inherits it; transformers'
    lazy modules otherwise cost each rank seconds)."""
    import torch.distributed.fsdp  # noqa: F401
    import torch.nn.parallel  # noqa: F401
    tiny_gpt2(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16)


def run_strategy(strategy: str, world_size: int, *, model: dict | None = None, rows: int = 4, seq: int = 64,
                 steps: int = 6, seed: int = 0, timeout_s: float = 240, **extra) -> list[dict]:
    """:func:`train_on_ranks` on ``world_size`` ranks (``"single"``: one process, no group).

    The kit's own strategies run on :func:`pick_backend`'s choice (``nccl`` with a GPU per rank);
    with a notebook's ``shard_fn`` / ``step_fn`` the ranks are forked CPU ranks on ``gloo``, because
    a function defined in a notebook cannot be sent to a spawned process.
    """
    cfg = {"strategy": strategy, "model": model or {}, "rows": rows, "seq": seq, "steps": steps, "seed": seed,
           **extra}
    if strategy == "single":
        return [train_on_ranks(0, 1, cfg)]
    warm_imports()
    own = "shard_fn" in cfg or "step_fn" in cfg
    return run_ranks(train_on_ranks, world_size, args=(cfg,), timeout_s=timeout_s,
                     backend="gloo" if own else None, start_method="fork" if own else None)


def fsdp2_predicted_state_bytes(model: torch.nn.Module, world_size: int, rank: int) -> dict[str, int]:
    """One FSDP2 rank's fp32 model states from the parameter shapes, to the byte, with AdamW.

    Weights and gradients: padded shard storage (every rank the same); the two moments: the rows
    this rank really holds; plus AdamW's 4-byte ``step`` counter per tensor on every rank.
    """
    from .sharding import fsdp2_local_numel, fsdp2_padded_numel
    params = list(model.parameters())
    padded = sum(fsdp2_padded_numel(p.shape, world_size) for p in params)
    local = sum(fsdp2_local_numel(p.shape, world_size, rank) for p in params)
    return {"weights": 4 * padded, "gradients": 4 * padded, "optimizer": 8 * local + 4 * len(params)}


__all__ = ["RankError", "STRATEGIES", "apply_fsdp2", "fsdp2_predicted_state_bytes", "global_batches",
           "model_state_bytes", "pick_backend", "rank_rows", "run_ranks", "run_strategy", "tiny_gpt2", "warm_imports",
           "train_on_ranks", "train_step", "full_parameters", "transformer_blocks"]
