"""Checks of lab 05, gradient checkpointing.

Graded interface (the lab's graded cells):

* ``checkpoint_blocks(model, every=1) -> model`` -- wrap blocks 0, every, 2*every, ... in
  ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``, KV cache off;
* ``predict_kept_bytes(n_layers, every, block_input_bytes, block_bytes) -> int``;
* ``prepare_for_checkpointed_training(model) -> model`` -- a (PEFT) model as ``from_pretrained`` returns it
  (eval mode) made to train with Hugging Face checkpointing actually on.

Reference namespace: :mod:`memopt_lib.checkpointing` (``checkpoint_blocks``, ``predict_kept_bytes``,
``enable_checkpointing``). Every check is collect/judge (:mod:`.base`). Checkpointing is proven by
measurement (:func:`~memopt_lib.checkpointing.block_kept_bytes`: the bytes each block keeps after a forward),
never by reading a flag.

Where the thresholds come from:

* Models: GPT-2 architecture with 5 or 7 blocks (drawn; more blocks than the period, and a count the period
  does not divide, so the placement ``(i + 1) % every`` wraps other blocks than ``i % every``), ``use_cache``
  on in the config as ``from_pretrained`` leaves it, dropout off.
* Gradients: checkpointing recomputes the same float32 operations, so the loss and the gradients equal the
  reference's to ``GRAD_TOL`` (fingerprints; measured 0.0). Once with trainable embeddings, once frozen (as under
  LoRA): blocks run under ``no_grad`` lose gradients in both, reentrant checkpointing only with frozen inputs.
* ``prepare_for_checkpointed_training``: measured active (blocks keep at most ``BLOCK_RATIO`` x the reference's),
  LoRA gradients equal the unwrapped model's, and non-reentrant: ``use_reentrant=True`` passes the gradient part
  only because transformers then hooks the embedding output to require grad, so the variant is read from the
  checkpoint function HF installed. (``gradient_checkpointing_enable()`` without kwargs is non-reentrant from
  transformers 5 on, and right.)
* Memory, per block: a block counts as checkpointed when it keeps at most ``CKPT_SHARE`` of what the same block
  keeps unwrapped (measured on CPU, 64 wide, 2 x 64: 0.033 checkpointed, 0.93 unwrapped without the cache).
  The checkpointed set must equal the reference's, and every block may keep at most ``BLOCK_RATIO`` x the
  reference's bytes for that block (a KV cache left on: a checkpointed block keeps 3.0x -- k and v beside its
  input).
* GPU only: GPT-2 124M, fp32, batch 8 x 512, one fused-AdamW step, peaks under the H200 anchor
  "gpt2 B8 S512 fp32 ckpt adamw(fused)" x 1.15 (3.93 GiB x 1.15; 7.81 GiB without) and at most 1.1 x the
  reference measured the same way.
"""
from __future__ import annotations

from ..models import from_config  # names the causal-LM loss: no transformers warning

import torch

from .. import checkpointing as C
from ..profiler import fmt_bytes
from .base import Registry, fingerprint, fingerprint_error, within_anchor_budget
from .step_evidence import raised


def _reference_blocks(model, every=1):
    return C.checkpoint_blocks(model, every=every)


CHECKS = Registry(lab="05", reference=lambda: {"checkpoint_blocks": _reference_blocks,
                                               "predict_kept_bytes": C.predict_kept_bytes,
                                               "prepare_for_checkpointed_training": C.enable_checkpointing})
GRAD_TOL = 1e-5
CKPT_SHARE = 0.35
BLOCK_RATIO = 1.5
GPU_MARGIN = 1.15
GPU_RATIO = 1.1
ANCHOR_ROW = "gpt2 B8 S512 fp32 ckpt adamw(fused)"


def _model(ctx, n_layer, width=64, salt=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(ctx.seed * 7 + salt)
    cfg = GPT2Config(n_layer=n_layer, n_embd=width, n_head=4, vocab_size=512, n_positions=256, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, use_cache=True)
    return from_config(cfg).to(ctx.device).train()


def _batch(ctx, rows=2, seq=64, vocab=512):
    from ..text import random_batch
    return random_batch(vocab, rows, seq, device=ctx.device, seed=ctx.seed)


def _apply(ns, model, every):
    out = ns["checkpoint_blocks"](model, every=every)
    return out if out is not None else model


def _grads(model, batch, seed):
    model.zero_grad(set_to_none=True)
    try:
        loss = model(**batch).loss
        loss.backward()
    except Exception as err:  # noqa: BLE001 - e.g. "element 0 of tensors does not require grad"
        return {"raised": raised(err)}
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return {"loss": float(loss), "missing": sorted(n for n, g in grads.items() if g is None)[:3],
            "grads": fingerprint({n: g for n, g in grads.items() if g is not None}, seed)}


@CHECKS.check(points=2, needs=["checkpoint_blocks"])
def same_gradients(ns, ctx):
    """checkpoint_blocks leaves loss and gradients unchanged, with trainable and with frozen embeddings."""
    n_layer, every = ctx.rng.choice([5, 7]), ctx.rng.choice([1, 2, 3])
    out = {"n_layer": n_layer, "every": every, "trials": []}
    for frozen in (False, True):
        model = _model(ctx, n_layer, salt=1)
        if frozen:  # as under LoRA: reentrant checkpointing loses the blocks' gradients here
            model.transformer.wte.weight.requires_grad_(False)
            model.transformer.wpe.weight.requires_grad_(False)
        model = _apply(ns, model, every)
        out["trials"].append({"frozen": frozen, **_grads(model, _batch(ctx), ctx.seed)})
    return out


@same_gradients.judge
def _(got, ref, ctx):
    d = got.data
    for g, r in zip(d["trials"], ref.data["trials"]):
        what = (f"checkpoint_blocks(every={d['every']}) on {d['n_layer']} blocks, embeddings "
                f"{'frozen' if g['frozen'] else 'trainable'}")
        if "raised" in g or g["missing"]:
            gone = g.get("raised") or f"no gradient for {g['missing']}"
            if g["frozen"] and "raised" not in d["trials"][0] and not d["trials"][0]["missing"]:
                raise AssertionError(
                    f"{what}: {gone}. With trainable embeddings the gradients were right, so the wrapped blocks "
                    "only backpropagate when an input requires grad: that is reentrant checkpointing -- pass "
                    "use_reentrant=False")
            raise AssertionError(f"{what}: {gone}. Even with trainable embeddings the checkpointed blocks pass no "
                                 "gradient back: do not run them under torch.no_grad() or detach their output; "
                                 "call torch.utils.checkpoint.checkpoint(block_forward, *args, use_reentrant=False)")
        assert abs(g["loss"] - r["loss"]) <= GRAD_TOL * abs(r["loss"]), (
            f"{what}: the loss changed under checkpointing ({g['loss']:.6f} vs {r['loss']:.6f})")
        err = fingerprint_error(g["grads"], r["grads"])
        assert err <= GRAD_TOL, (f"{what}: the gradients differ from the unwrapped model's by {err:.2e}: checkpointing "
                                 "must recompute exactly the block's forward (same arguments, same kwargs)")
    return {}


def _ckpt_set(kept, plain):
    return [i for i, (k, p) in enumerate(zip(kept, plain)) if k <= CKPT_SHARE * p]


@CHECKS.check(points=3, needs=["checkpoint_blocks"])
def saves_activations(ns, ctx):
    """checkpoint_blocks is active by measurement, on the right blocks (0, every, 2*every, ...), cache off."""
    n_layer = ctx.rng.choice([5, 7])
    out = {"n_layer": n_layer, "cases": []}
    plain = C.block_kept_bytes(_model(ctx, n_layer, salt=2).eval().requires_grad_(True), _batch(ctx))
    for every in (1, ctx.rng.choice([2, 3])):
        model = _apply(ns, _model(ctx, n_layer, salt=2), every)
        out["cases"].append({"every": every, "kept": C.block_kept_bytes(model, _batch(ctx)),
                             "use_cache": bool(getattr(model.config, "use_cache", False))})
    out["plain"] = plain
    return out


@saves_activations.judge
def _(got, ref, ctx):
    plain = ref.data["plain"]
    for g, r in zip(got.data["cases"], ref.data["cases"]):
        what = f"checkpoint_blocks(every={g['every']}) on {got.data['n_layer']} blocks"
        mine, want = _ckpt_set(g["kept"], plain), _ckpt_set(r["kept"], plain)
        assert mine == want, (
            f"{what}: blocks {mine or 'none'} keep only their input, expected blocks {want} "
            f"(0, every, 2*every, ...: i % every == 0). Measured bytes kept per block: "
            f"{[fmt_bytes(b) for b in g['kept']]}")
        worst = max(range(len(plain)), key=lambda i: g["kept"][i] / max(r["kept"][i], 1))
        ratio = g["kept"][worst] / max(r["kept"][worst], 1)
        assert ratio <= BLOCK_RATIO, (
            f"{what}: block {worst} keeps {fmt_bytes(g['kept'][worst])} after the forward, the reference "
            f"{fmt_bytes(r['kept'][worst])}"
            + (": the KV cache is on (model.config.use_cache) -- set it to False: a cache is useless in training "
               "and a recomputed block would write it again" if g["use_cache"] else ""))
    return {"kept_bytes_every_1": got.data["cases"][0]["kept"]}


@CHECKS.check(points=1, needs=["predict_kept_bytes"])
def prediction(ns, ctx):
    """predict_kept_bytes: checkpointed blocks keep their input only, the others everything."""
    cases = [(ctx.rng.randint(1, 48), ctx.rng.randint(1, 8), ctx.rng.randint(1, 10**6), ctx.rng.randint(10**6, 10**8))
             for _ in range(8)]
    cases += [(6, 3, 1000, 10**6), (7, 7, 1000, 10**6), (5, 8, 1000, 10**6)]  # divisible, every == n, every > n
    out = []
    for n, every, inp, blk in cases:
        v = ns["predict_kept_bytes"](n, every, inp, blk)
        out.append([n, every, inp, blk, int(v) if isinstance(v, (int, float)) else repr(v)])
    return {"cases": out}


@prediction.judge
def _(got, ref, ctx):
    for (n, every, inp, blk, mine), (*_, want) in zip(got.data["cases"], ref.data["cases"]):
        assert mine == want, (f"n_layers={n}, every={every}, block_input_bytes={inp}, block_bytes={blk}: expected "
                              f"{want}, got {mine}. Blocks 0, every, 2*every, ... are checkpointed: "
                              f"ceil(n_layers / every) = {len(range(0, n, every))} of them keep their input only.")
    return {}


def _peft_model(ctx):
    import peft
    model = _model(ctx, ctx.rng.choice([3, 4]), salt=3)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True)
    model = peft.get_peft_model(model, cfg)
    for n, p in model.named_parameters():  # LoRA B starts at 0: make it non-zero so A gets a gradient too
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    model.eval()  # as from_pretrained returns it
    return model


@CHECKS.check(points=3, needs=["prepare_for_checkpointed_training"])
def active_after_from_pretrained(ns, ctx):
    """A PEFT model straight from from_pretrained (eval mode): checkpointing measured active, LoRA gets gradients."""
    model = _peft_model(ctx)
    out = ns["prepare_for_checkpointed_training"](model)
    model = out if out is not None else model
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    kw = getattr(getattr(flagged[0], "_gradient_checkpointing_func", None), "keywords", {}) if flagged else {}
    data = {"kept": C.block_kept_bytes(model, _batch(ctx)), "flagged": len(flagged),
            "blocks_training": sum(b.training for b in C.transformer_blocks(model)),
            "reentrant": None if "use_reentrant" not in (kw or {}) else bool(kw["use_reentrant"])}
    g = _grads(model, _batch(ctx), ctx.seed)
    data["grads"] = {k: v for k, v in g.items() if k != "grads"}
    data["grads"]["lora"] = {n: v for n, v in (g.get("grads") or {}).items() if "lora_" in n}
    return data


@active_after_from_pretrained.judge
def _(got, ref, ctx):
    g, r = got.data, ref.data
    kept, want = sum(g["kept"]), sum(r["kept"])
    if kept > BLOCK_RATIO * want:
        if not g["flagged"]:
            why = ("checkpointing is not enabled: call model.gradient_checkpointing_enable("
                   "gradient_checkpointing_kwargs={'use_reentrant': False})")
        elif not g["blocks_training"]:
            why = ("the blocks are in eval mode (from_pretrained returns eval mode), where Hugging Face blocks do "
                   "not checkpoint: call model.train() after enabling checkpointing")
        else:
            why = "the flag is set and the blocks are in train mode, yet they keep everything"
        raise AssertionError(f"after a forward the blocks keep {fmt_bytes(kept)}, with checkpointing active "
                             f"{fmt_bytes(want)}: {why}")
    gr = g["grads"]
    if "raised" in gr or gr["missing"] or set(gr["lora"]) != set(r["grads"]["lora"]):
        raise AssertionError(
            f"LoRA parameters without gradient ({gr.get('raised') or gr['missing'] or 'some'}). With frozen "
            "embeddings, reentrant checkpointing builds no graph through the blocks: use "
            "gradient_checkpointing_kwargs={'use_reentrant': False}")
    err = fingerprint_error(gr["lora"], r["grads"]["lora"])
    assert err <= GRAD_TOL, f"the LoRA gradients differ from the unwrapped model's by {err:.2e}"
    # Reentrant checkpointing trains here only because transformers' gradient_checkpointing_enable() makes the
    # embedding output require grad behind your back (enable_input_require_grads); the gradients alone cannot
    # tell it from the non-reentrant variant, so the choice is read from the checkpoint function HF installed.
    assert g["reentrant"] is False, (
        "checkpointing is active and LoRA gets gradients, but through reentrant checkpointing "
        f"(use_reentrant={g['reentrant']}). It works only because transformers makes the embedding output require "
        "grad; with frozen inputs and no such hook it drops every gradient inside the blocks. Pass "
        "gradient_checkpointing_kwargs={'use_reentrant': False} (transformers >= 5 defaults to it)")
    return {"kept_bytes": kept, "reference_kept_bytes": want}


@CHECKS.check(points=2, needs=["checkpoint_blocks"], gpu_only=True, measures_memory=True)
def gpu_budget_gpt2(ns, ctx):
    """GPU: GPT-2 124M, 8 x 512, checkpoint_blocks + fused AdamW step under the H200 anchor x 1.15."""
    from ..models import load_model
    from ..text import random_batch
    torch.manual_seed(ctx.seed)
    model = _apply(ns, load_model("gpt2").to(ctx.device), 1)
    batch = random_batch(model.config.vocab_size, 8, 512, device=ctx.device, seed=ctx.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()
    del model, opt, batch
    return {}


@gpu_budget_gpt2.judge
def _(got, ref, ctx):
    ratio = got.memory.delta_bytes / max(ref.memory.delta_bytes, 1)
    assert ratio <= GPU_RATIO, (f"your checkpointed step peaks {fmt_bytes(got.memory.delta_bytes)}, the reference "
                                f"{fmt_bytes(ref.memory.delta_bytes)} (ratio {ratio:.2f} > {GPU_RATIO})")
    return {**within_anchor_budget(got.memory.peak_bytes, ANCHOR_ROW, GPU_MARGIN), "ratio_to_reference": ratio}
