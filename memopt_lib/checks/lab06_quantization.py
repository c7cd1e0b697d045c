"""Checks of lab 06 (quantization).

Where the thresholds come from:

* ``bits_per_weight`` and ``adamw8bit_state_bytes`` are exact arithmetic: compared
  with the reference to 1e-9 on inputs the checker draws.
* ``quantized_footprint_bytes`` must match the reference arithmetic to 0.1 %, and
  the bytes bitsandbytes actually allocates when loading (measured here, on this
  device) to 2 %: the per-tensor code tables and the 7B's rotary buffers are the
  only things the arithmetic leaves out (0.3 % for the small Llama).
  For the 7B, dq=True, the prediction must be within 2 % of the H200 anchor
  ``loaded_GiB`` (3.61 GiB; the reference arithmetic lands 0.3 % below it).
* The 8-bit AdamW prediction must equal the optimizer state measured after one
  step to 0.5 %, and the measured state must be under 30 % of torch AdamW's
  (the block scales make it 25.4 %, not 25 %).
"""
from __future__ import annotations

import math

import torch

from .. import anchors
from .base import Registry

CHECKS = Registry(lab="06")


def _ref_bits(block_size=64, absmax_bits=32, double_quant=False, dq_block=256, dq_bits=8, weight_bits=4):
    from ..quantization import bits_per_weight
    return bits_per_weight(block_size, absmax_bits, double_quant, dq_block, dq_bits, weight_bits)


@CHECKS.check(points=2, needs=["bits_per_weight"])
def bits_per_weight_exact(ns, ctx):
    """bits_per_weight gives the storage cost of blockwise quantization, with and without double quantization."""
    f = ns["bits_per_weight"]
    cases = [dict(block_size=64, absmax_bits=32, double_quant=False, dq_block=256, dq_bits=8),
             dict(block_size=64, absmax_bits=32, double_quant=True, dq_block=256, dq_bits=8)]
    for _ in range(4):
        cases.append(dict(block_size=ctx.rng.choice([32, 64, 128, 256]), absmax_bits=ctx.rng.choice([16, 32]),
                          double_quant=ctx.rng.random() < 0.5, dq_block=ctx.rng.choice([128, 256, 512]),
                          dq_bits=ctx.rng.choice([4, 8])))
    for c in cases:
        got, want = f(**c), _ref_bits(**c)
        assert math.isclose(got, want, rel_tol=1e-9), (
            f"bits_per_weight({c}) = {got}, expected {want}: 4 bits per weight plus the block's scale spread "
            "over its weights; with double quantization the scale costs dq_bits, plus one absmax_bits scale per "
            "dq_block scales")
    return {"nf4_dq_bits": f(**cases[1])}


@CHECKS.check(points=2, needs=["make_4bit_config"])
def config_fields(ns, ctx):
    """make_4bit_config returns a BitsAndBytesConfig with the asked fields, and loading with it gives that format."""
    from transformers import BitsAndBytesConfig
    make = ns["make_4bit_config"]
    for qt, dq, dt in [("nf4", True, torch.bfloat16), ("fp4", False, torch.float32), ("nf4", False, torch.float16)]:
        cfg = make(quant_type=qt, double_quant=dq, compute_dtype=dt)
        assert isinstance(cfg, BitsAndBytesConfig), f"return a transformers.BitsAndBytesConfig, not {type(cfg)}"
        assert cfg.load_in_4bit and not cfg.load_in_8bit, "set load_in_4bit=True (and not load_in_8bit)"
        assert cfg.bnb_4bit_quant_type == qt, f"bnb_4bit_quant_type should be {qt!r}, got {cfg.bnb_4bit_quant_type!r}"
        assert cfg.bnb_4bit_use_double_quant == dq, f"bnb_4bit_use_double_quant should be {dq}"
        assert cfg.bnb_4bit_compute_dtype == dt, f"bnb_4bit_compute_dtype should be {dt}"
    import bitsandbytes as bnb

    from ..models import load_model
    model = load_model("gpt2-tiny", quantization_config=make(quant_type="nf4", double_quant=True,
                       compute_dtype=torch.float32), device_map={"": str(ctx.device)}, train=False)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers, "loading with your config produced no 4-bit layers"
    qs = layers[0].weight.quant_state
    assert qs.quant_type == "nf4" and qs.nested, "the loaded weights are not NF4 with double quantization"
    return {"linear4bit_layers": len(layers)}


@CHECKS.check(points=3, needs=["quantized_footprint_bytes"])
def footprint_prediction(ns, ctx):
    """quantized_footprint_bytes predicts the loaded bytes of 4-bit/8-bit models (arithmetic and measured)."""
    from ..models import model_config
    from ..quantization import load_quantized, measure_loaded_bytes, predict_weight_bytes
    f = ns["quantized_footprint_bytes"]
    for name in ("gpt2", "llama-7b", "llama-tiny"):
        for bits, dq in ((4, True), (4, False), (8, False)):
            cfg = model_config(name)
            got, want = float(f(cfg, bits=bits, double_quant=dq, other_bytes=2)), \
                predict_weight_bytes(cfg, bits, dq, 2)["total"]
            assert math.isclose(got, want, rel_tol=1e-3), (
                f"{name}, {bits}-bit, double_quant={dq}: predicted {got:,.0f} B, the arithmetic gives {want:,.0f} B. "
                "Quantized: the linear layers of the blocks (GPT-2's Conv1D too), not lm_head; the rest "
                "(embeddings, norms, biases) costs other_bytes per weight; 8-bit adds one fp32 scale per output row")
    anchor = next(r["loaded_GiB"] for r in anchors.load()["rows"] if r["name"].startswith("7b") and "dq=True" in r["name"])
    pred7b = f(model_config("llama-7b"), bits=4, double_quant=True, other_bytes=2) / 1024**3
    assert abs(pred7b / anchor - 1) < 0.02, f"7B NF4+dq: predicted {pred7b:.3f} GiB, the H200 loaded {anchor} GiB"
    out = {"pred_7b_GiB": pred7b, "anchor_7b_GiB": anchor}
    for bits, dq in ((4, True), (8, False)):
        model, loaded = measure_loaded_bytes(lambda: load_quantized("llama-tiny", bits, "nf4", dq, device=ctx.device,
                                                                    dtype=torch.bfloat16), ctx.device)
        del model
        pred = f(model_config("llama-tiny"), bits=bits, double_quant=dq, other_bytes=2)
        assert abs(pred / loaded - 1) < 0.02, (
            f"llama-tiny {bits}-bit dq={dq}: predicted {pred:,.0f} B but loading allocated {loaded:,} B")
        out[f"llama_tiny_{bits}bit_loaded_bytes"] = loaded
    return out


@CHECKS.check(points=2, needs=["adamw8bit_state_bytes"])
def adam8bit_state(ns, ctx):
    """adamw8bit_state_bytes predicts bitsandbytes' AdamW8bit state, measured after one step."""
    import bitsandbytes as bnb

    from ..models import load_model
    from ..quantization import adamw8bit_state_bytes as ref
    from ..quantization import state_after_one_step
    from ..text import random_batch
    f = ns["adamw8bit_state_bytes"]
    for _ in range(5):
        numels = [ctx.rng.choice([ctx.rng.randint(1, 4095), ctx.rng.randint(4096, 3_000_000)])
                  for _ in range(ctx.rng.randint(1, 8))]
        assert int(f(numels)) == ref(numels), (
            f"for tensors of {numels} values: {int(f(numels)):,} B, expected {ref(numels):,} B. Tensors of at "
            "least min_8bit_size values: 2 uint8 states + 2 fp32 absmax per block; smaller: 2 fp32 states; plus "
            "two shared 256-entry fp32 quantization maps")
    model = load_model("gpt2-tiny").to(ctx.device)
    batch = random_batch(model.config.vocab_size, 2, 16, device=ctx.device)
    measured = {cls.__name__: state_after_one_step(model, batch, cls, lr=1e-4)
                for cls in (torch.optim.AdamW, bnb.optim.AdamW8bit)}
    pred = f([p.numel() for p in model.parameters()])
    got = measured["AdamW8bit"]
    assert abs(pred / got - 1) < 0.005, f"predicted {pred:,} B of AdamW8bit state, measured {got:,} B"
    ratio = got / measured["AdamW"]
    assert ratio < 0.30, f"8-bit state is {ratio:.1%} of AdamW's: expected about 25 %"
    return {"adamw_state_bytes": measured["AdamW"], "adamw8bit_state_bytes": got, "ratio": ratio}


@CHECKS.check(points=1, needs=["perplexity_from_logits"])
def perplexity(ns, ctx):
    """perplexity_from_logits shifts by one token and exponentiates the mean cross-entropy."""
    f = ns["perplexity_from_logits"]
    g = torch.Generator().manual_seed(ctx.seed)
    for b, s, v in [(2, 16, 50), (3, 9, 128)]:
        logits = torch.randn(b, s, v, generator=g) * 3
        ids = torch.randint(0, v, (b, s), generator=g)
        want = math.exp(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1)))
        got = float(f(logits, ids))
        assert math.isclose(got, want, rel_tol=1e-4), (
            f"perplexity {got:.4f}, expected {want:.4f}: the logits at position t predict token t+1")
    return {}
