"""Optimizer-state offloading: AdamW's master weights and moments on the host, the update on the CPU.

For full fine-tuning in fp32 the optimizer is the largest tenant of the device: AdamW keeps ``exp_avg`` and
``exp_avg_sq`` (8 bytes per parameter) beside 4 bytes of weights and 4 of gradients -- half of the 16 bytes
per parameter of the model states. Moving the moments (and, with mixed precision, the fp32 master weights)
to the host removes them from the device; the update then runs on the CPU and the new weights are copied
back every step. Two ways, both here:

* **DeepSpeed ZeRO-Offload** (what the course text names): ZeRO stage 2 with
  ``"offload_optimizer": {"device": "cpu"}`` and DeepSpeed's vectorised ``DeepSpeedCPUAdam`` (a C++ op built
  with the compiler on first use). It needs ``torch.distributed`` (one process is enough: a ``gloo``
  rendezvous on localhost) and owns the step: ``engine.backward(loss); engine.step()``.
  :func:`zero2_estimate` wraps ``estimate_zero2_model_states_mem_needs`` -- DeepSpeed's own arithmetic for
  the model states with and without offload, to put beside the measurement.
* **A lighter path without a launcher**: :func:`host_offload_optimizer` returns torchao's
  ``CPUOffloadOptimizer`` where it applies (torchao installed, parameters on CUDA), else
  :class:`HostOffloadOptimizer`: fp32 master copies with their gradients on the host, any torch optimizer
  stepping them there, the parameters copied back. Gradients can go to the host as each is produced
  (``offload_gradients=True``), so the device holds no gradient either at the end of backward.

What it costs: per step the gradients go down and the weights come back (``2 x 4`` bytes per parameter in
fp32) and the CPU does the update (DeepSpeed's vectorised CPU Adam exists because that update is the
bottleneck). It is the last resort for *full* fine-tuning; with LoRA the optimizer state is megabytes.

Paged optimizers (bitsandbytes) are a different mechanism: :mod:`.offload_paged`.
"""
from __future__ import annotations

import contextlib
import io
import os
from typing import Iterable

import torch

from .offload import OffloadStats, host_memory, pinned_available

class HostOffloadOptimizer:
    """Any torch optimizer stepping fp32 host copies of the parameters; the device keeps weights only.

    >>> opt = HostOffloadOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-4)
    >>> loss.backward(); opt.step(); opt.zero_grad()

    ``step()``: gradients to the host (if not already sent), the inner optimizer's step on the host, the
    updated values copied into the device parameters (cast to their dtype). ``stats`` counts the bytes.
    ``offload_gradients=True`` sends each gradient as soon as autograd has accumulated it and frees the
    device copy (gradients accumulate on the host, so gradient accumulation still works).
    Not a ``torch.optim.Optimizer`` subclass on purpose: its state lives on the host and must not be
    counted as device state; ``param_groups`` are the inner optimizer's (change ``lr`` there).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], optimizer_class=torch.optim.AdamW, *,
                 offload_gradients: bool = False, **kwargs):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("HostOffloadOptimizer got no trainable parameters (all requires_grad=False?)")
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise TypeError(f"optimizer_class must be a torch.optim.Optimizer class, got {optimizer_class!r}")
        self.stats = OffloadStats()
        self.device = self.params[0].device
        pin = pinned_available()
        self.host = []
        for p in self.params:  # fp32 master weights in host memory (pinned: fast, asynchronous copies)
            h = _host_tensor(p, torch.float32, pin)
            h.requires_grad_(True)
            self.host.append(h)
            self.stats.add_host(h.numel() * 4)
        with host_memory(self.device):
            self.optimizer = optimizer_class(self.host, **kwargs)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._hooks = []
        self.offload_gradients = offload_gradients
        if offload_gradients:
            for p, h in zip(self.params, self.host):
                self._hooks.append(p.register_post_accumulate_grad_hook(
                    lambda p, h=h: self._grad_to_host(p, h)))

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        """The inner optimizer's state (host tensors)."""
        return self.optimizer.state

    def _grad_to_host(self, p: torch.nn.Parameter, h: torch.Tensor) -> None:
        g = p.grad
        self.stats.to_host_bytes += g.numel() * g.element_size()
        with host_memory(self.device):
            if self._stream is not None:  # copy on a side stream; free the device gradient after it
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self._stream):
                    hg = g.to("cpu", torch.float32, non_blocking=True)
                g.record_stream(self._stream)
            else:
                hg = g.to("cpu", torch.float32, copy=True)
            if h.grad is None:
                h.grad = hg
            else:  # gradient accumulation: the host copy sums
                if self._stream is not None:
                    self._stream.synchronize()
                h.grad.add_(hg)
        p.grad = None  # the device gradient is gone before the next layer's is produced

    @torch.no_grad()
    def step(self) -> None:
        for p, h in zip(self.params, self.host):
            if p.grad is not None:  # not sent yet (offload_gradients=False)
                self._grad_to_host(p, h)
        if self._stream is not None:
            # every gradient has arrived on the host; the side stream waited for the main stream, so last
            # step's copies of the weights out of these host tensors are done too
            self._stream.synchronize()
        with host_memory(self.device):
            self.optimizer.step()  # on the CPU: the Adam moments never touch the device
        for p, h in zip(self.params, self.host):
            if h.grad is None:
                continue
            p.copy_(h.to(p.dtype) if p.dtype != torch.float32 else h, non_blocking=True)
            self.stats.to_device_bytes += p.numel() * p.element_size()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None if set_to_none else (p.grad.zero_() if p.grad is not None else None)
        with host_memory(self.device):
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        with host_memory(self.device):
            self.optimizer.load_state_dict(sd)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _host_tensor(p: torch.Tensor, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    with host_memory(p.device):
        h = torch.empty(p.shape, dtype=dtype, device="cpu", pin_memory=pin)
        h.copy_(p.detach())
    return h


def host_offload_optimizer(params, optimizer_class=torch.optim.AdamW, *, offload_gradients: bool = False,
                           prefer_torchao: bool = True, **kwargs):
    """torchao's ``CPUOffloadOptimizer`` when it applies (torchao importable, CUDA parameters), else ours.

    Returns ``(optimizer, name)`` so a table can say which one ran.
    """
    params = list(params)
    on_cuda = any(p.device.type == "cuda" for p in params)
    if prefer_torchao and on_cuda:
        try:
            from torchao.optim import CPUOffloadOptimizer
        except ImportError:
            CPUOffloadOptimizer = None
        if CPUOffloadOptimizer is not None:
            return CPUOffloadOptimizer(params, optimizer_class, offload_gradients=offload_gradients,
                                       **kwargs), "torchao CPUOffloadOptimizer"
    return HostOffloadOptimizer(params, optimizer_class, offload_gradients=offload_gradients,
                                **kwargs), "memopt HostOffloadOptimizer"


# ---------------------------------------------------------------- DeepSpeed ZeRO-Offload

def deepspeed_available() -> str | None:
    """``None`` if DeepSpeed imports, else why not (and how to get it)."""
    try:
        import deepspeed  # noqa: F401
    except Exception as err:  # ImportError, or a broken build
        return f"deepspeed does not import ({type(err).__name__}: {err}); pip install 'memopt[offload]'"
    return None


def zero_offload_config(*, micro_batch: int, lr: float = 1e-4, weight_decay: float = 0.01,
                        pin_memory: bool | None = None, bf16: bool = False) -> dict:
    """A ZeRO stage-2 config with the optimizer (state and step) offloaded to the CPU.

    ``AdamW`` with ``offload_optimizer.device = "cpu"`` makes DeepSpeed use ``DeepSpeedCPUAdam``.
    """
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    pin = pinned_available() if pin_memory is None else pin_memory
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": pin},
                              "contiguous_gradients": True, "overlap_comm": False},
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay,
                                                   "betas": [0.9, 0.999], "eps": 1e-8}},
        "bf16": {"enabled": bool(bf16)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def init_single_process(port: int = 29517, backend: str | None = None) -> None:
    """A one-process ``torch.distributed`` group, as DeepSpeed needs one: no launcher, a localhost rendezvous.

    ``backend``: ``nccl`` on CUDA, ``gloo`` otherwise (DeepSpeed's CPU accelerator also speaks gloo).
    """
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"),
                       ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    import deepspeed
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend or ("nccl" if torch.cuda.is_available() else "gloo"))


def deepspeed_zero_offload(model: torch.nn.Module, *, micro_batch: int, lr: float = 1e-4, **config_kwargs):
    """``deepspeed.initialize`` with :func:`zero_offload_config`; returns the engine (``engine.optimizer``
    wraps a ``DeepSpeedCPUAdam``). The first call builds the CPU Adam op (about a minute on 2 cores)."""
    why = deepspeed_available()
    if why:
        raise RuntimeError(why)
    import deepspeed
    clear_stale_build_lock()
    init_single_process()
    cfg = zero_offload_config(micro_batch=micro_batch, lr=lr, **config_kwargs)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                           if p.requires_grad], config=cfg)
    return engine


def zero2_estimate(model: torch.nn.Module, num_gpus: int = 1) -> dict:
    """DeepSpeed's estimate of the model states (``estimate_zero2_model_states_mem_needs``), plain data.

    Returns per-device and host bytes with and without ``offload_optimizer``, plus the text that
    ``estimate_zero2_model_states_mem_needs_all_live`` prints for this model. Needs deepspeed.
    """
    from deepspeed.runtime.zero.stage_1_and_2 import (estimate_zero2_model_states_mem_needs,
                                                      estimate_zero2_model_states_mem_needs_all_live)
    n = sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())
    off_cpu, off_gpu = estimate_zero2_model_states_mem_needs(n, num_gpus, 1, cpu_offload=True)
    on_cpu, on_gpu = estimate_zero2_model_states_mem_needs(n, num_gpus, 1, cpu_offload=False)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        estimate_zero2_model_states_mem_needs_all_live(model, num_gpus_per_node=num_gpus, num_nodes=1)
    return {"params": n, "offload_device_bytes": off_gpu, "offload_host_bytes": off_cpu,
            "no_offload_device_bytes": on_gpu, "no_offload_host_bytes": on_cpu, "text": buf.getvalue().strip()}


def cpu_adam_built() -> bool:
    """Whether DeepSpeed's CPU Adam op is already compiled on this machine (else the first use builds it)."""
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder
        from torch.utils.cpp_extension import _get_build_directory
        name = CPUAdamBuilder().name
        path = _get_build_directory(name, verbose=False)
        return any(f.endswith(".so") for f in os.listdir(path))
    except Exception:  # not installed, or no build directory yet
        return False


STALE_LOCK_SECONDS = 900  # a CPU Adam build takes ~1.5 min on 2 cores; a lock this old was left by a killed build


def clear_stale_build_lock(max_age_s: float = STALE_LOCK_SECONDS) -> bool:
    """Remove the CPU Adam build's ``lock`` file if a killed build left it behind; True if one was removed.

    torch's extension loader (``cpp_extension.load`` -> ``FileBaton``) takes a build directory by creating
    ``lock`` and waits, forever and without a message, while that file exists. A build interrupted (Ctrl-C, a
    killed test run) leaves it, and every later DeepSpeed run on the machine hangs. A lock older than any build
    is stale: it is removed with a notice.
    """
    import time
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder
        from torch.utils.cpp_extension import _get_build_directory
        lock = os.path.join(_get_build_directory(CPUAdamBuilder().name, verbose=False), "lock")
        age = time.time() - os.path.getmtime(lock)
    except Exception:  # not installed, no build directory, or no lock
        return False
    if age < max_age_s:
        return False
    os.remove(lock)
    print(f"removed a stale build lock ({age / 60:.0f} min old, left by an interrupted build): {lock}")
    return True


# ---------------------------------------------------------------- the arithmetic

def predict_offload_bytes(n_params: int, *, offload: bool, offload_gradients: bool = False) -> dict:
    """Model-state bytes of fp32 AdamW training, on the device and on the host, and bytes moved per step.

    Without offload the device holds weights, gradients and both moments: ``16 n``. Offloaded
    (:class:`HostOffloadOptimizer`): the device keeps weights and gradients (``8 n``; ``4 n`` when gradients
    go to the host as they are produced), the host keeps fp32 master weights, their gradients and the
    moments (``16 n``), and each step moves the gradients down and the weights back (``8 n``).
    """
    if n_params < 0:
        raise ValueError(f"n_params must be >= 0, got {n_params}")
    n = int(n_params)
    if not offload:
        return {"device_bytes": 16 * n, "host_bytes": 0, "moved_bytes": 0}
    return {"device_bytes": (4 if offload_gradients else 8) * n, "host_bytes": 16 * n, "moved_bytes": 8 * n}


# ---------------------------------------------------------------- one DeepSpeed run, in its own process

def deepspeed_vs_adamw(model_name: str = "gpt2-tiny", *, batch: int = 2, seq: int = 64, steps: int = 3,
                       lr: float = 1e-3, seed: int = 0) -> dict:
    """Train ``steps`` steps with DeepSpeed ZeRO-2 + CPU offload and with ``torch.optim.AdamW`` from the same
    weights on the same batch; plain data: losses, largest weight difference, step times, device peaks,
    DeepSpeed's estimate. Run it in a fresh process (``python -m memopt_lib.offload_optimizer``): it
    creates a ``torch.distributed`` group and sets the rendezvous environment variables.
    """
    import copy
    import time

    from .models import load_model
    from .text import random_batch
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = load_model(model_name, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).to(device).train()
    ref = copy.deepcopy(base)
    start = [p.detach().clone() for p in base.parameters()]
    data = random_batch(base.config.vocab_size, batch, seq, device=device, seed=seed)
    estimate = zero2_estimate(base)
    built_before = cpu_adam_built()
    t0 = time.perf_counter()
    engine = deepspeed_zero_offload(base, micro_batch=batch, lr=lr)
    init_s = time.perf_counter() - t0

    def run(step_fn):
        losses, times, peaks = [], [], []
        for _ in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            losses.append(float(step_fn()))
            if device.type == "cuda":
                torch.cuda.synchronize()
                peaks.append(int(torch.cuda.max_memory_allocated()))
            times.append(time.perf_counter() - t)
        return losses, times, peaks

    def ds_step():
        loss = engine(**data).loss
        engine.backward(loss)
        engine.step()
        return loss.detach()

    ds_losses, ds_times, ds_peaks = run(ds_step)
    opt = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)

    def ref_step():
        opt.zero_grad(set_to_none=True)
        loss = ref(**data).loss
        loss.backward()
        opt.step()
        return loss.detach()

    ref_losses, ref_times, ref_peaks = run(ref_step)
    diff = max(float((a.detach().float() - b.detach().float()).abs().max())
               for a, b in zip(engine.module.parameters(), ref.parameters()))
    # Adam divides by sqrt(v) + eps: where a gradient is ~eps, float rounding differences between two
    # implementations change that element's step a lot, so compare the whole update, relative to its size
    d_ds = torch.cat([(a.detach().float() - s).reshape(-1) for a, s in zip(engine.module.parameters(), start)])
    d_ref = torch.cat([(b.detach().float() - s).reshape(-1) for b, s in zip(ref.parameters(), start)])
    update_rel = float((d_ds - d_ref).norm() / d_ref.norm().clamp_min(1e-30))
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return {"model": model_name, "device": str(device), "batch": batch, "seq": seq, "steps": steps,
            "optimizer": f"{type(engine.optimizer).__name__} wrapping {type(inner).__name__}",
            "cpu_adam_was_built": built_before, "init_s": init_s,
            "deepspeed_losses": ds_losses, "adamw_losses": ref_losses, "max_weight_diff": diff,
            "update_rel_diff": update_rel,
            "deepspeed_step_s": ds_times, "adamw_step_s": ref_times,
            "deepspeed_peak_bytes": ds_peaks, "adamw_peak_bytes": ref_peaks,
            "estimate": {k: v for k, v in estimate.items() if k != "text"}, "estimate_text": estimate["text"]}


def _main(argv=None) -> None:
    import argparse
    import json
    ap = argparse.ArgumentParser(description="DeepSpeed ZeRO-Offload vs torch AdamW, one process, no launcher")
    ap.add_argument("--model", default="gpt2-tiny")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", default="-", help="output file ('-': stdout, as the last line)")
    args = ap.parse_args(argv)
    why = deepspeed_available()
    out = ({"error": why} if why else
           deepspeed_vs_adamw(args.model, batch=args.batch, seq=args.seq, steps=args.steps))
    text = json.dumps(out)
    if args.json == "-":
        print(text)
    else:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    _main()
