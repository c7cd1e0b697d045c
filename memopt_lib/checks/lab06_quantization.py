"""Checks of lab 06 (quantization).

Graded interface: ``bits_per_weight(...)``, ``make_4bit_config(quant_type, double_quant, compute_dtype)``,
``quantized_footprint_bytes(config, bits, double_quant, other_bytes)``, ``perplexity_from_logits(logits,
input_ids)``, ``adamw8bit_state_bytes(numels, block_size, min_8bit_size)``. Reference namespace:
:mod:`memopt_lib.quantization` (``bits_per_weight``, ``bnb_config``, ``predict_weight_bytes``,
``perplexity_from_logits``, ``adamw8bit_state_bytes``). Every check is collect/judge (:mod:`.base`).

Where the thresholds come from:

* ``bits_per_weight`` and ``adamw8bit_state_bytes`` are exact arithmetic on inputs drawn per run: block sizes,
  scale widths and double quantization; tensor sizes that include the 8-bit threshold itself (``min_8bit_size``
  and one below: ``>`` instead of ``>=`` is off there), one value over a block boundary, and a threshold and
  block size drawn (not only bitsandbytes' 4096 / 256). The reference arithmetic equals the state bitsandbytes
  allocates after one step (``tests/test_quantization.py``).
* ``make_4bit_config``: the fields transformers reads (``load_in_4bit``/``8bit``, quant type, double
  quantization, compute dtype) equal the reference config's for three drawn combinations.
* ``quantized_footprint_bytes`` within 0.1 % of the reference arithmetic for GPT-2 (Conv1D), Llama-2-7B, a
  grouped-query Llama (Llama-3-8B shape) and a random GPT-2 shape, 4-bit with and without double quantization
  and 8-bit (whose per-row fp32 scale only the 8-bit path has). The reference lands 0.3 % below the H200's
  loaded bytes of the 7B (anchor ``loaded_GiB``, checked in the judge) and within 2 % of what bitsandbytes
  allocates for ``llama-tiny`` (``tests/test_quantization.py``).
* ``perplexity_from_logits`` to 1e-5 relative on drawn shapes, with logits scaled so that an unshifted or a
  summed loss is far off.
"""
from __future__ import annotations

import math

import torch

from .. import anchors
from .. import quantization as Q
from .base import Registry

CHECKS = Registry(lab="06", reference=lambda: {
    "bits_per_weight": Q.bits_per_weight,
    "make_4bit_config": lambda quant_type="nf4", double_quant=True, compute_dtype=None: Q.bnb_config(
        4, quant_type, double_quant, compute_dtype),
    "quantized_footprint_bytes": lambda config, bits=4, double_quant=True, other_bytes=2: Q.predict_weight_bytes(
        config, bits, double_quant, other_bytes)["total"],
    "perplexity_from_logits": Q.perplexity_from_logits,
    "adamw8bit_state_bytes": Q.adamw8bit_state_bytes})


def _num(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else repr(v)


@CHECKS.check(points=2, needs=["bits_per_weight"])
def bits_per_weight_exact(ns, ctx):
    """bits_per_weight gives the storage cost of blockwise quantization, with and without double quantization."""
    cases = [dict(block_size=64, absmax_bits=32, double_quant=False, dq_block=256, dq_bits=8),
             dict(block_size=64, absmax_bits=32, double_quant=True, dq_block=256, dq_bits=8)]
    for i in range(4):
        cases.append(dict(block_size=ctx.rng.choice([32, 64, 128, 256]), absmax_bits=ctx.rng.choice([16, 32]),
                          double_quant=i % 2 == 0, dq_block=ctx.rng.choice([128, 256, 512]),
                          dq_bits=ctx.rng.choice([4, 8]), weight_bits=ctx.rng.choice([4, 8])))
    return {"cases": [[c, _num(ns["bits_per_weight"](**c))] for c in cases]}


@bits_per_weight_exact.judge
def _(got, ref, ctx):
    for (c, mine), (_, want) in zip(got.data["cases"], ref.data["cases"]):
        assert isinstance(mine, float) and math.isclose(mine, want, rel_tol=1e-9), (
            f"bits_per_weight({c}) = {mine}, expected {want}: weight_bits per weight plus the block's scale spread "
            "over its weights; with double quantization the scale costs dq_bits, plus one absmax_bits scale per "
            "dq_block scales")
    return {"nf4_dq_bits": ref.data["cases"][1][1]}


_FIELDS = ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
           "bnb_4bit_compute_dtype")


@CHECKS.check(points=2, needs=["make_4bit_config"])
def config_fields(ns, ctx):
    """make_4bit_config returns a BitsAndBytesConfig with the asked fields."""
    from transformers import BitsAndBytesConfig
    dts = [torch.bfloat16, torch.float16, torch.float32]
    ctx.rng.shuffle(dts)
    qts = ["nf4", "fp4"]
    ctx.rng.shuffle(qts)
    combos = [(qts[0], True, dts[0]), (qts[1], False, dts[1]), (ctx.rng.choice(qts), ctx.rng.random() < 0.5, dts[2])]
    out = []
    for qt, dq, dt in combos:  # both quant types, both double_quant values, three compute dtypes
        cfg = ns["make_4bit_config"](quant_type=qt, double_quant=dq, compute_dtype=dt)
        fields = ({k: str(getattr(cfg, k, None)) for k in _FIELDS} if isinstance(cfg, BitsAndBytesConfig)
                  else {"type": type(cfg).__name__})
        out.append([[qt, dq, str(dt)], fields])
    return {"cases": out}


@config_fields.judge
def _(got, ref, ctx):
    for (args, mine), (_, want) in zip(got.data["cases"], ref.data["cases"]):
        call = f"make_4bit_config(quant_type={args[0]!r}, double_quant={args[1]}, compute_dtype={args[2]})"
        assert "type" not in mine, f"{call} returned a {mine['type']}: return a transformers.BitsAndBytesConfig"
        for k in _FIELDS:
            assert mine[k] == want[k], f"{call}: {k} is {mine[k]}, should be {want[k]}: pass the arguments through"
    return {"cases": len(got.data["cases"])}


def _footprint_configs(ctx):
    from transformers import GPT2Config, LlamaConfig

    from ..models import model_config
    gqa = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    heads = ctx.rng.choice([4, 8])
    rand = GPT2Config(n_layer=ctx.rng.randint(2, 8), n_embd=heads * ctx.rng.choice([32, 64]), n_head=heads,
                      vocab_size=ctx.rng.randint(1000, 20000), n_positions=ctx.rng.choice([256, 1024]))
    return [("gpt2", model_config("gpt2")), ("llama-7b", model_config("llama-7b")), ("llama-3-8b (GQA)", gqa),
            ("random GPT-2", rand)]


@CHECKS.check(points=3, needs=["quantized_footprint_bytes"])
def footprint_prediction(ns, ctx):
    """quantized_footprint_bytes predicts the loaded bytes of 4-bit/8-bit models (GPT-2, Llama, GQA)."""
    out = []
    for name, cfg in _footprint_configs(ctx):
        for bits, dq in ((4, True), (4, False), (8, False)):
            other = ctx.rng.choice([2, 4])
            out.append([name, bits, dq, other, _num(ns["quantized_footprint_bytes"](cfg, bits=bits, double_quant=dq,
                                                                                     other_bytes=other))])
    from ..models import model_config
    out.append(["llama-7b anchor", 4, True, 2, _num(ns["quantized_footprint_bytes"](
        model_config("llama-7b"), bits=4, double_quant=True, other_bytes=2))])
    return {"cases": out}


@footprint_prediction.judge
def _(got, ref, ctx):
    for (name, bits, dq, other, mine), (*_, want) in zip(got.data["cases"], ref.data["cases"]):
        assert isinstance(mine, float) and math.isclose(mine, want, rel_tol=1e-3), (
            f"{name}, {bits}-bit, double_quant={dq}, other_bytes={other}: predicted {mine} B, the arithmetic gives "
            f"{want:,.0f} B. Quantized: the linear layers of the blocks (GPT-2's Conv1D too, k/v narrower under "
            "grouped-query attention), not lm_head; the rest (embeddings, norms, biases) costs other_bytes per "
            "weight, a tied parameter once; 8-bit adds one fp32 scale per output row")
    anchor = next(r["loaded_GiB"] for r in anchors.load()["rows"] if r["name"].startswith("7b") and "dq=True" in r["name"])
    pred = ref.data["cases"][-1][-1] / 1024**3
    assert abs(pred / anchor - 1) < 0.02, f"checker error: the reference predicts {pred:.3f} GiB, the H200 {anchor}"
    return {"pred_7b_GiB": got.data["cases"][-1][-1] / 1024**3, "anchor_7b_GiB": anchor}


@CHECKS.check(points=2, needs=["adamw8bit_state_bytes"])
def adam8bit_state(ns, ctx):
    """adamw8bit_state_bytes predicts bitsandbytes' AdamW8bit state, at and around the 8-bit threshold."""
    cases = []
    for _ in range(3):
        cases.append(([ctx.rng.choice([ctx.rng.randint(1, 4095), ctx.rng.randint(4096, 3_000_000)])
                       for _ in range(ctx.rng.randint(1, 8))], {}))
    cases.append(([4096, 4095, 256 * ctx.rng.randint(20, 90) + 1], {}))  # the threshold itself, one below, a block + 1
    cases.append(([ctx.rng.randint(1, 4095) for _ in range(3)], {}))  # all small: fp32 states, no maps
    thr, block = ctx.rng.choice([1024, 2048, 8192]), ctx.rng.choice([128, 512])
    cases.append(([thr, thr - 1, thr * 3 + 1], {"min_8bit_size": thr, "block_size": block}))
    out = []
    for numels, kw in cases:
        out.append([numels, kw, _num(ns["adamw8bit_state_bytes"](list(numels), **kw))])
    return {"cases": out}


@adam8bit_state.judge
def _(got, ref, ctx):
    for (numels, kw, mine), (*_, want) in zip(got.data["cases"], ref.data["cases"]):
        thr = kw.get("min_8bit_size", 4096)
        assert mine == want, (
            f"adamw8bit_state_bytes({numels}{', ' + str(kw) if kw else ''}) = {mine}, expected {want:,.0f} B. "
            f"Tensors of at least min_8bit_size ({thr}) values -- a tensor of exactly {thr} included (>=) -- keep 2 "
            "uint8 states + 2 fp32 absmax per block of block_size (rounded up); smaller ones 2 fp32 states; plus two "
            "shared 256-entry fp32 quantization maps when any tensor is 8-bit")
    return {"cases": len(got.data["cases"])}


@CHECKS.check(points=1, needs=["perplexity_from_logits"])
def perplexity(ns, ctx):
    """perplexity_from_logits shifts by one token and exponentiates the mean cross-entropy."""
    g = ctx.torch_generator(6)
    out = []
    for _ in range(3):
        b, s, v = ctx.rng.randint(1, 4), ctx.rng.randint(5, 20), ctx.rng.choice([37, 50, 128])
        logits = torch.randn(b, s, v, generator=g) * 2
        ids = torch.randint(0, v, (b, s), generator=g)
        out.append([[b, s, v], _num(ns["perplexity_from_logits"](logits, ids))])
    return {"cases": out}


@perplexity.judge
def _(got, ref, ctx):
    for (shape, mine), (_, want) in zip(got.data["cases"], ref.data["cases"]):
        assert isinstance(mine, float) and math.isclose(mine, want, rel_tol=1e-5), (
            f"logits of shape {shape}: perplexity {mine}, expected {want:.4f}: the logits at position t predict token "
            "t+1 (drop the last logit and the first token), average the cross-entropy over tokens, then exp")
    return {}
