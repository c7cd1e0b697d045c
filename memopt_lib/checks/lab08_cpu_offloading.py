"""Checks of lab 08, CPU offloading.

Graded interface (the lab's graded cells):

* ``pack_to_host(t)`` / ``unpack_to_device(packed)`` -- saved-tensor hooks that keep what autograd saves for
  backward in host memory (``memopt_lib.offload.to_host``) and bring it back in backward;
* ``predict_offload_bytes(n_params, offload, offload_gradients)`` -- fp32 AdamW model states on the device
  and on the host, and the bytes moved per step;
* ``HostAdamW(params, lr=1e-3, weight_decay=0.01)`` -- an optimizer with ``step()`` / ``zero_grad()`` that
  keeps fp32 master weights and AdamW's state in host memory, steps there and copies the weights back;
* ``predict_paged_bytes(shapes, optim_bits)`` -- what a paged bitsandbytes AdamW puts in paged memory.

Every collect runs the student's code on the tiny GPT-2 (dropout off) with a batch shape and learning rate
drawn per seed, and returns plain data: fingerprints of gradients or weights, losses, and device bytes
measured by :func:`memopt_lib.offload.device_peaks` (on a CPU: the tracker's live bytes outside
``host_memory``, i.e. device residency; on CUDA the allocator's peak). Each judge compares with the same
collect run on the library's implementation (the reference namespace), same inputs.

What a CPU cannot tell: there the host is simulated (``host_memory`` hides allocations from the tracker), so an
optimizer that keeps its state on the device but builds it inside ``host_memory`` would pass the memory part of
``host_optimizer`` on a CPU; on CUDA the allocator's counters see it. The graded functions are small enough
for a reader to spot that.

Where the thresholds come from:

* Gradients and weights: offloading copies values, it does not change them; the reference is the library's
  (bit-identical to no offloading on CPU). Tolerance ``1e-5`` relative (fingerprints, float64 projections).
* Memory, as ratios to the same collect's no-offload baseline: the tiny GPT-2's forward keeps, measured on
  CPU, under 0.01 of its no-offload residency under the reference hooks (what stays is the loss and tensors
  under 1 KiB). A student's hooks must do at most reference + 0.1; hooks that keep everything give 1.0.
* What the hooks move: ``moves_activations`` watches the learner's hooks in one offloaded forward and backward
  (integers only: nothing kept alive). The bytes pack copies out may be at most ``MOVED_MARGIN`` x the
  reference's + 64 KiB (offloading the nn.Parameters autograd saves adds every weight, every step: the residency
  and peak ratios do not show it, since the weights are on the device anyway and come back one at a time), and
  unpack must never hand back the host copy itself (on a CPU that runs, the host *is* the device's RAM; on a GPU
  backward would mix devices).
* The host optimizer: after its first step (where AdamW creates its state) the device may hold, beyond
  weights and gradients, the reference's bytes + 2 bytes per parameter; AdamW's state on the device is 8 bytes
  per parameter (12 MB for the tiny GPT-2's 1.5 M). Its peak: at most the reference's x 1.1 + 256 KiB.
"""
from __future__ import annotations

import copy
from functools import lru_cache

import torch

from .. import offload, offload_activations, offload_optimizer, offload_paged
from .base import Registry, fingerprint, fingerprint_error

RTOL = 1e-5
RESIDENCY_SLACK = 0.10
OPT_MARGIN, OPT_SLACK_BYTES = 1.10, 256 * 1024
STATE_SLACK_PER_PARAM = 2  # bytes per parameter; AdamW's state on the device is 8
MOVED_MARGIN = 1.05  # bytes pack_to_host copies out, relative to the reference's (same forward)


def _reference():
    def host_adamw(params, lr=1e-3, weight_decay=0.01):
        return offload_optimizer.HostOffloadOptimizer(params, torch.optim.AdamW, lr=lr, weight_decay=weight_decay)
    return {"pack_to_host": offload_activations.pack_to_host,
            "unpack_to_device": offload_activations.unpack_to_device,
            "predict_offload_bytes": offload_optimizer.predict_offload_bytes,
            "HostAdamW": host_adamw,
            "predict_paged_bytes": offload_paged.predict_paged_bytes}


CHECKS = Registry(lab="08", reference=_reference)


@lru_cache(maxsize=1)
def _pristine():
    from ..models import load_model
    return load_model("gpt2-tiny", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _model(ctx):
    return copy.deepcopy(_pristine()).to(ctx.device).train()


def _batch(ctx, vocab):
    from ..text import random_batch
    rows, seq = ctx.rng.choice([2, 3]), ctx.rng.choice([32, 48, 64])
    return random_batch(vocab, rows, seq, device=ctx.device, seed=ctx.seed), rows, seq


def _hooks(ns):
    return torch.autograd.graph.saved_tensors_hooks(ns["pack_to_host"], ns["unpack_to_device"])


def _tensors_in(obj, depth=0):
    if torch.is_tensor(obj):
        yield obj
    elif depth < 4 and isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors_in(x, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors_in(x, depth + 1)


def _watched_hooks(ns, seen: dict):
    """The learner's hooks, watched: bytes pack copied out (its result does not hold the saved tensor's storage)
    and unpacks that returned a tensor of the packed structure other than the saved one (the host copy itself).
    Only integers are recorded: nothing here keeps a tensor alive or allocates one."""
    originals = {}

    def pack(t):
        packed = ns["pack_to_host"](t)
        ptr = t.untyped_storage().data_ptr()
        if all(x.untyped_storage().data_ptr() != ptr for x in _tensors_in(packed)):
            seen["moved_bytes"] += t.numel() * t.element_size()
            seen["moved_params"] += isinstance(t, torch.nn.Parameter)
        originals[id(packed)] = ptr
        return packed

    def unpack(packed):
        out = ns["unpack_to_device"](packed)
        ptr = originals.pop(id(packed), None)
        if torch.is_tensor(out):
            got = out.untyped_storage().data_ptr()
            if got != ptr and any(got == x.untyped_storage().data_ptr() for x in _tensors_in(packed)):
                seen["host_returns"] += 1
        return out

    return lambda: torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _forward_resident(model, batch, ctx, hooks):
    """Device bytes alive after forward (the graph, the loss), beyond the weights; and the step's peaks."""
    box = {}

    def fwd():
        with hooks():
            box["loss"] = model(**batch).loss

    fwd_peak = offload.device_peaks(fwd, ctx.device, offload.model_roots(model))
    loss = box.pop("loss")
    weights = sum(t.numel() * t.element_size() for t in model.parameters())

    def bwd():
        loss.backward()

    bwd_peak = offload.device_peaks(bwd, ctx.device, offload.model_roots(model))
    return fwd_peak["end_bytes"] - weights, bwd_peak["peak_bytes"]


@CHECKS.check(points=2, needs=["pack_to_host", "unpack_to_device"])
def same_gradients(ns, ctx):
    """Offloaded saved tensors come back unchanged: same loss and gradients, also with checkpointing."""
    from ..checkpointing import checkpoint_blocks
    out = {}
    for label in ("plain", "checkpointed"):
        model = _model(ctx)
        if label == "checkpointed":
            checkpoint_blocks(model)
        batch, rows, seq = _batch(ctx, model.config.vocab_size)
        with _hooks(ns):
            loss = model(**batch).loss
        loss.backward()  # the unpack hooks run here
        grads = {n: p.grad for n, p in model.named_parameters()}
        out[label] = {"loss": loss.item(), "grads": fingerprint(grads, ctx.seed), "shape": [rows, seq]}
    return out


@same_gradients.judge
def _(got, ref, ctx):
    for label in ("plain", "checkpointed"):
        g, r = got.data[label], ref.data[label]
        rows, seq = r["shape"]
        assert abs(g["loss"] - r["loss"]) <= RTOL * abs(r["loss"]), (
            f"{label}, batch {rows} x {seq}: loss {g['loss']:.6f}, expected {r['loss']:.6f}. The forward "
            "must not change: pack may copy a tensor, never modify it")
        err = fingerprint_error(g["grads"], r["grads"])
        assert err <= RTOL, (
            f"{label}, batch {rows} x {seq}: gradients differ from the no-offload gradients (relative error "
            f"{err:.2e}). unpack_to_device must return the same values with the same shape, dtype and "
            "strides (copy with tensor.to(device, copy=True)), and tensors you kept must come back as they were")
    return {"loss": got.data["plain"]["loss"]}


@CHECKS.check(points=3, needs=["pack_to_host", "unpack_to_device"])
def moves_activations(ns, ctx):
    """The hooks move saved tensors out of device residency (tracker on CPU, allocator on CUDA)."""
    from contextlib import nullcontext

    from ..checkpointing import checkpoint_blocks
    model = _model(ctx)
    batch, rows, seq = _batch(ctx, model.config.vocab_size)
    base_fwd, base_bwd = _forward_resident(model, batch, ctx, nullcontext)
    model.zero_grad(set_to_none=True)
    seen = {"moved_bytes": 0, "moved_params": 0, "host_returns": 0}
    off_fwd, off_bwd = _forward_resident(model, batch, ctx, _watched_hooks(ns, seen))
    ck = checkpoint_blocks(_model(ctx))
    ck_fwd, _ = _forward_resident(ck, batch, ctx, nullcontext)
    ck.zero_grad(set_to_none=True)
    ck_off_fwd, _ = _forward_resident(ck, batch, ctx, lambda: _hooks(ns))
    return {"shape": [rows, seq], "ratio": off_fwd / base_fwd, "ckpt_ratio": ck_off_fwd / ck_fwd,
            "backward_ratio": off_bwd / base_bwd, **seen,
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


@moves_activations.judge
def _(got, ref, ctx):
    g, r = got.data, ref.data
    rows, seq = r["shape"]
    assert g["ratio"] <= r["ratio"] + RESIDENCY_SLACK, (
        f"batch {rows} x {seq}: after forward the device still holds {g['ratio']:.2f} of what it holds without "
        f"your hooks (reference {r['ratio']:.2f}). pack_to_host must return a *host copy* made with "
        "memopt_lib.offload.to_host (on a machine without GPU, t.cpu() is t itself: nothing moves) and must "
        "not keep a reference to the device tensor")
    assert g["ckpt_ratio"] <= r["ckpt_ratio"] + RESIDENCY_SLACK, (
        f"batch {rows} x {seq}, checkpointed blocks: {g['ckpt_ratio']:.2f} of the checkpointed residency stays "
        f"(reference {r['ckpt_ratio']:.2f}): the block inputs checkpointing keeps should be offloaded too")
    assert g.get("host_returns", 0) <= r.get("host_returns", 0), (
        f"batch {rows} x {seq}: unpack_to_device returned the host copy itself {g['host_returns']} time(s): bring "
        "it back to the device it came from (t.to(device, copy=True)). On a machine without GPU the host and the "
        "device are the same RAM, so this runs; on a GPU backward would mix devices")
    assert g.get("moved_bytes", 0) <= r.get("moved_bytes", 0) * MOVED_MARGIN + 64 * 1024, (
        f"batch {rows} x {seq}: your pack_to_host copied {g['moved_bytes'] / 2**20:.2f} MiB to the host in one "
        f"forward, the reference {r['moved_bytes'] / 2**20:.2f} MiB"
        + (f" ({g['moved_params']} of the saved tensors were nn.Parameters: the weights, "
           f"{g['param_bytes'] / 2**20:.2f} MiB, are on the device anyway -- copying them out every step and a "
           "second copy back in backward saves nothing)" if g.get("moved_params") else "")
        + ". Keep weights (nn.Parameter) and tensors under MIN_OFFLOAD_BYTES where they are")
    assert g["backward_ratio"] <= r["backward_ratio"] * 1.2 + 0.05, (
        f"batch {rows} x {seq}: the backward peak is {g['backward_ratio']:.2f} of the no-offload one (reference "
        f"{r['backward_ratio']:.2f}). Keep small tensors and weights (nn.Parameter) where they are: restoring "
        "a copy of a weight that never left adds a second one")
    return {"residency_ratio": g["ratio"], "checkpointed_ratio": g["ckpt_ratio"]}


@CHECKS.check(points=1, needs=["predict_offload_bytes"])
def prediction(ns, ctx):
    """predict_offload_bytes: 16 n on the device without offload; 8 n (4 n) with; 16 n host; 8 n moved."""
    cases = []
    for _ in range(6):
        n = ctx.rng.randint(10**5, 10**10)
        for off, og in ((False, False), (True, False), (True, True)):
            got = ns["predict_offload_bytes"](n, offload=off, offload_gradients=og)
            cases.append({"n": n, "offload": off, "offload_gradients": og,
                          "got": {k: int(got[k]) for k in ("device_bytes", "host_bytes", "moved_bytes")}})
    return {"cases": cases}


@prediction.judge
def _(got, ref, ctx):
    for g, r in zip(got.data["cases"], ref.data["cases"]):
        assert g["got"] == r["got"], (
            f"n_params={r['n']}, offload={r['offload']}, offload_gradients={r['offload_gradients']}: expected "
            f"{r['got']}, got {g['got']}. fp32 AdamW: weights 4, gradients 4, two moments 8 bytes per parameter; "
            "offloaded, the host keeps master weights, gradients and moments and each step moves grads and weights")


@CHECKS.check(points=3, needs=["HostAdamW"])
def host_optimizer(ns, ctx):
    """HostAdamW steps like torch AdamW (two steps), with no optimizer state on the device."""
    model = _model(ctx)
    batch, rows, seq = _batch(ctx, model.config.vocab_size)
    # never AdamW's defaults (lr 1e-3, weight_decay 0.01): an optimizer that drops them must differ
    lr, wd = ctx.rng.choice([3e-4, 2e-3, 5e-3]), ctx.rng.choice([0.0, 0.05, 0.1])
    box = {}

    def first_step():  # the optimizer is built and takes its first step here: AdamW creates its state now
        box["opt"] = opt = ns["HostAdamW"](list(model.parameters()), lr=lr, weight_decay=wd)
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()

    first = offload.device_peaks(first_step, ctx.device, offload.model_roots(model))
    # what the device holds after the step beyond weights and gradients: optimizer state kept on the device
    kept = sum(t.numel() * t.element_size() for t in offload.model_roots(model)())
    opt = box["opt"]
    opt.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    weights = {n: p.detach() for n, p in model.named_parameters()}
    return {"shape": [rows, seq], "lr": lr, "weight_decay": wd, "peak_bytes": first["peak_bytes"],
            "state_bytes": first["end_bytes"] - kept, "weights": fingerprint(weights, ctx.seed),
            "second_loss": loss.item(), "params": sum(p.numel() for p in model.parameters())}


@host_optimizer.judge
def _(got, ref, ctx):
    g, r = got.data, ref.data
    rows, seq = r["shape"]
    err = fingerprint_error(g["weights"], r["weights"])
    assert abs(g["second_loss"] - r["second_loss"]) <= RTOL * abs(r["second_loss"]) and err <= 1e-4, (
        f"lr={r['lr']}, weight_decay={r['weight_decay']}, batch {rows} x {seq}: after two steps the weights differ "
        f"from torch AdamW's with them (relative "
        f"error {err:.2e}; second loss {g['second_loss']:.6f} vs {r['second_loss']:.6f}). Step "
        "torch.optim.AdamW(host copies, lr=lr, weight_decay=weight_decay) -- both passed on -- with the gradients copied to the host "
        "copies' .grad, then copy the host values into the device parameters (param.data.copy_)")
    state_budget = r["state_bytes"] + STATE_SLACK_PER_PARAM * r["params"]
    assert g["state_bytes"] <= state_budget, (
        f"lr={r['lr']}, batch {rows} x {seq}: after the first step the device holds {g['state_bytes'] / 2**20:.1f} "
        f"MiB beyond weights and gradients (reference {r['state_bytes'] / 2**20:.1f} MiB; AdamW state for "
        f"{r['params']:,} parameters is {8 * r['params'] / 2**20:.1f} MiB): the optimizer state is on the device. "
        "Make the host copies with memopt_lib.offload.to_host and step the inner optimizer inside "
        "memopt_lib.offload.host_memory(device)")
    budget = r["peak_bytes"] * OPT_MARGIN + OPT_SLACK_BYTES
    assert g["peak_bytes"] <= budget, (
        f"lr={r['lr']}, batch {rows} x {seq}: the first step peaked at {g['peak_bytes'] / 2**20:.1f} MiB of device "
        f"memory, the reference at {r['peak_bytes'] / 2**20:.1f} MiB: something else stays on the device")
    return {"first_step_peak_bytes": g["peak_bytes"], "device_state_bytes": g["state_bytes"]}


@CHECKS.check(points=1, needs=["predict_paged_bytes"])
def paged(ns, ctx):
    """predict_paged_bytes: only parameters with >= 100,000 elements get paged state."""
    cases = []
    for _ in range(5):
        shapes = [tuple(ctx.rng.choice([(16, 4096), (4096, 16), (8, 12499), (8, 12500), (250, 400), (768,),
                                        (3072, 768), (50257, 768), (99_999,), (100_000,), (4096, 4096)]))
                  for _ in range(ctx.rng.randint(1, 6))]
        for bits in (32, 8):
            cases.append({"shapes": [list(s) for s in shapes], "bits": bits,
                          "got": int(ns["predict_paged_bytes"](shapes, bits))})
    return {"cases": cases}


@paged.judge
def _(got, ref, ctx):
    for g, r in zip(got.data["cases"], ref.data["cases"]):
        assert g["got"] == r["got"], (
            f"shapes {r['shapes']}, {r['bits']}-bit: expected {r['got']} bytes paged, got {g['got']}. bitsandbytes "
            "pages a parameter's state only if numel >= 100,000 (2 state tensors; 4 bytes each in 32-bit, 1 in 8-bit)")
