"""Wrong answers of lab 06 (quantization)."""
import math

import torch

from . import Wrong


def dq_no_outer(block_size=64, absmax_bits=32, double_quant=False, dq_block=256, dq_bits=8, weight_bits=4):
    return weight_bits + (dq_bits if double_quant else absmax_bits) / block_size


def four_bits_always(block_size=64, absmax_bits=32, double_quant=False, dq_block=256, dq_bits=8, weight_bits=4):
    if not double_quant:
        return 4 + absmax_bits / block_size
    return 4 + dq_bits / block_size + absmax_bits / (block_size * dq_block)


def _cfg(**kw):
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(**kw)


def dtype_ignored(quant_type="nf4", double_quant=True, compute_dtype=None):
    return _cfg(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant)


def dq_always(quant_type="nf4", double_quant=True, compute_dtype=None):
    return _cfg(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute_dtype)


def nf4_always(quant_type="nf4", double_quant=True, compute_dtype=None):
    return _cfg(load_in_4bit=True, bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)


def _footprint(config, bits=4, double_quant=True, other_bytes=2, *, head=False, conv=True, scales8=True,
               tie_once=True):
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out_head = model.get_output_embeddings()
    total = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=tie_once))
    kinds = (torch.nn.Linear, Conv1D) if conv else (torch.nn.Linear,)
    qw, qb = 0, 0.0
    for mod in model.modules():
        if (mod is out_head and not head) or not isinstance(mod, kinds):
            continue
        n = mod.weight.numel()
        d_out = mod.out_features if isinstance(mod, torch.nn.Linear) else mod.weight.shape[1]
        qw += n
        if bits == 4:
            qb += n * (4 + (8 / 64 + 32 / (64 * 256) if double_quant else 32 / 64)) / 8
        else:
            qb += n + (4 * d_out if scales8 else 0)
    return qb + (total - qw) * other_bytes


def lm_head_quantized(config, bits=4, double_quant=True, other_bytes=2):
    return _footprint(config, bits, double_quant, other_bytes, head=True)


def conv1d_forgotten(config, bits=4, double_quant=True, other_bytes=2):
    return _footprint(config, bits, double_quant, other_bytes, conv=False)


def int8_no_scales(config, bits=4, double_quant=True, other_bytes=2):
    return _footprint(config, bits, double_quant, other_bytes, scales8=False)


def tied_twice(config, bits=4, double_quant=True, other_bytes=2):
    return _footprint(config, bits, double_quant, other_bytes, tie_once=False)


def _state(numels, block_size=256, min_8bit_size=4096, *, strict=False, floor=False, maps=True, maps_always=False):
    total, any8 = 0, False
    for n in numels:
        if (n > min_8bit_size) if strict else (n >= min_8bit_size):
            blocks = n // block_size if floor else math.ceil(n / block_size)
            total += 2 * n + 2 * 4 * blocks
            any8 = True
        else:
            total += 8 * n
    return total + (2 * 256 * 4 if maps and (any8 or maps_always) else 0)


def strict_threshold(numels, block_size=256, min_8bit_size=4096):
    return _state(numels, block_size, min_8bit_size, strict=True)


def floor_blocks(numels, block_size=256, min_8bit_size=4096):
    return _state(numels, block_size, min_8bit_size, floor=True)


def no_maps(numels, block_size=256, min_8bit_size=4096):
    return _state(numels, block_size, min_8bit_size, maps=False)


def maps_always(numels, block_size=256, min_8bit_size=4096):
    return _state(numels, block_size, min_8bit_size, maps_always=True)


def defaults_hard_coded(numels, block_size=256, min_8bit_size=4096):
    return _state(numels)


def no_shift(logits, input_ids):
    v = logits.shape[-1]
    return torch.exp(torch.nn.functional.cross_entropy(logits.reshape(-1, v).float(), input_ids.reshape(-1))).item()


def summed(logits, input_ids):
    v = logits.shape[-1]
    return torch.exp(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), input_ids[:, 1:].reshape(-1),
                                                       reduction="sum") / logits.shape[0]).item()


def loss_not_ppl(logits, input_ids):
    v = logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), input_ids[:, 1:].reshape(-1)).item()


B, C, F, A, P = "bits_per_weight_exact", "config_fields", "footprint_prediction", "adam8bit_state", "perplexity"
WRONG = [
    Wrong("bits: double quant without the outer scale", "bits_per_weight", dq_no_outer, (B,), r"dq_block"),
    Wrong("bits: weight_bits ignored", "bits_per_weight", four_bits_always, (B,), r"weight_bits"),
    Wrong("config: compute dtype ignored", "make_4bit_config", dtype_ignored, (C,), r"bnb_4bit_compute_dtype"),
    Wrong("config: double quant always on", "make_4bit_config", dq_always, (C,), r"bnb_4bit_use_double_quant"),
    Wrong("config: quant type ignored", "make_4bit_config", nf4_always, (C,), r"bnb_4bit_quant_type"),
    Wrong("footprint: lm_head quantized", "quantized_footprint_bytes", lm_head_quantized, (F,), r"not lm_head"),
    Wrong("footprint: Conv1D forgotten", "quantized_footprint_bytes", conv1d_forgotten, (F,), r"Conv1D"),
    Wrong("footprint: 8-bit without row scales", "quantized_footprint_bytes", int8_no_scales, (F,), r"8-bit adds"),
    Wrong("footprint: tied weight counted twice", "quantized_footprint_bytes", tied_twice, (F,), r"tied"),
    Wrong("adam8bit: > instead of >=", "adamw8bit_state_bytes", strict_threshold, (A,), r">="),
    Wrong("adam8bit: blocks rounded down", "adamw8bit_state_bytes", floor_blocks, (A,), r"rounded up"),
    Wrong("adam8bit: no quantization maps", "adamw8bit_state_bytes", no_maps, (A,), r"quantization maps"),
    Wrong("adam8bit: maps even without 8-bit tensors", "adamw8bit_state_bytes", maps_always, (A,), r"when any"),
    Wrong("adam8bit: block size / threshold hard-coded", "adamw8bit_state_bytes", defaults_hard_coded, (A,),
          r"min_8bit_size"),
    Wrong("ppl: no shift", "perplexity_from_logits", no_shift, (P,), r"t\+1"),
    Wrong("ppl: summed over tokens", "perplexity_from_logits", summed, (P,), r"average"),
    Wrong("ppl: returns the loss", "perplexity_from_logits", loss_not_ppl, (P,), r"then exp"),
]
