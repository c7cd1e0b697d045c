"""Held-out wrong answers of lab 06 (quantization): cells q-bits, q-config, q-footprint, q-ppl, q-opt8."""
from cases import Case

_FOOT_HEAD = '''
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(config)
head = model.get_output_embeddings()
total = quant_weights = 0
quant_bytes = 0.0
seen = set()
for p in model.parameters():
    if id(p) not in seen:
        seen.add(id(p))
        total += p.numel()
for mod in model.modules():
    if mod is head or not isinstance(mod, (torch.nn.Linear, Conv1D)):
        continue
    n = mod.weight.numel()
    d_out = mod.out_features if isinstance(mod, torch.nn.Linear) else mod.weight.shape[1]
'''

CASES = [
    # bits_per_weight(block_size, absmax_bits, double_quant, dq_block, dq_bits, weight_bits)
    Case("bits-dq-outer-per-dq-block", "q-bits", '''
if not double_quant:
    return weight_bits + absmax_bits / block_size
return weight_bits + dq_bits / block_size + absmax_bits / dq_block  # one fp32 per 256 ... weights?
''', "double quant's outer fp32 scale counted per dq_block weights, not per dq_block blocks"),
    Case("bits-in-bytes", "q-bits", '''
if not double_quant:
    return (weight_bits + absmax_bits / block_size) / 8
return (weight_bits + dq_bits / block_size + absmax_bits / (block_size * dq_block)) / 8
''', "returns bytes per weight, not bits"),
    Case("bits-dq-bits-fixed", "q-bits", '''
if not double_quant:
    return weight_bits + absmax_bits / block_size
return weight_bits + 8 / block_size + 32 / (block_size * dq_block)
''', "dq_bits and absmax_bits hard-coded under double quant"),
    # make_4bit_config(quant_type, double_quant, compute_dtype)
    Case("config-bf16-always", "q-config", '''
import torch
return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                          bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.bfloat16)
''', "compute dtype hard-coded bf16"),
    Case("config-dq-never", "q-config", '''
return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=compute_dtype)
''', "double quantization never turned on"),
    Case("config-8bit", "q-config", '''
return BitsAndBytesConfig(load_in_8bit=True, bnb_4bit_quant_type=quant_type,
                          bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)
''', "load_in_8bit=True (the 4-bit fields then do nothing)"),
    # quantized_footprint_bytes(config, bits, double_quant, other_bytes)
    Case("foot-8bit-blockwise", "q-footprint", _FOOT_HEAD + '''
    quant_weights += n
    if bits == 4:
        scale_bits = 8 / 64 + 32 / (64 * 256) if double_quant else 32 / 64
        quant_bytes += n * (4 + scale_bits) / 8
    else:
        quant_bytes += n + 4 * n / 64  # "8-bit is blockwise too"
return quant_bytes + (total - quant_weights) * other_bytes
''', "8-bit counted with a scale per block of 64, not per row"),
    Case("foot-dq-ignored", "q-footprint", _FOOT_HEAD + '''
    quant_weights += n
    if bits == 4:
        quant_bytes += n * (4 + 32 / 64) / 8
    else:
        quant_bytes += n + 4 * d_out
return quant_bytes + (total - quant_weights) * other_bytes
''', "double_quant ignored (fp32 scales always)"),
    Case("foot-bias-quantized", "q-footprint", _FOOT_HEAD + '''
    n = sum(p.numel() for p in mod.parameters())  # weight and bias
    quant_weights += n
    if bits == 4:
        scale_bits = 8 / 64 + 32 / (64 * 256) if double_quant else 32 / 64
        quant_bytes += n * (4 + scale_bits) / 8
    else:
        quant_bytes += n + 4 * d_out
return quant_bytes + (total - quant_weights) * other_bytes
''', "the quantized layers' biases counted as quantized"),
    Case("foot-other-bytes-fixed", "q-footprint", _FOOT_HEAD + '''
    quant_weights += n
    if bits == 4:
        scale_bits = 8 / 64 + 32 / (64 * 256) if double_quant else 32 / 64
        quant_bytes += n * (4 + scale_bits) / 8
    else:
        quant_bytes += n + 4 * d_out
return quant_bytes + (total - quant_weights) * 2
''', "other_bytes hard-coded 2"),
    # perplexity_from_logits(logits, input_ids)
    Case("ppl-base-2", "q-ppl", '''
v = logits.shape[-1]
nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v).float(), input_ids[:, 1:].reshape(-1))
return 2 ** nll.item()
''', "2 ** cross-entropy (nats read as bits)"),
    Case("ppl-mean-of-rows", "q-ppl", '''
v = logits.shape[-1]
per_row = []
for i in range(logits.shape[0]):
    nll = torch.nn.functional.cross_entropy(logits[i, :-1].float(), input_ids[i, 1:])
    per_row.append(torch.exp(nll).item())
return sum(per_row) / len(per_row)
''', "mean of per-sequence perplexities"),
    Case("ppl-shift-wrong-way", "q-ppl", '''
v = logits.shape[-1]
nll = torch.nn.functional.cross_entropy(logits[:, 1:].reshape(-1, v).float(), input_ids[:, :-1].reshape(-1))
return torch.exp(nll).item()
''', "shifted the wrong way (position t+1 predicts token t)"),
    # adamw8bit_state_bytes(numels, block_size, min_8bit_size)
    Case("adam8-small-one-state", "q-opt8", '''
import math
total, any8 = 0, False
for n in numels:
    if n >= min_8bit_size:
        total += 2 * n + 2 * 4 * math.ceil(n / block_size)
        any8 = True
    else:
        total += 4 * n
return total + (2 * 256 * 4 if any8 else 0)
''', "small tensors counted with one fp32 state"),
    Case("adam8-absmax-fp16", "q-opt8", '''
import math
total, any8 = 0, False
for n in numels:
    if n >= min_8bit_size:
        total += 2 * n + 2 * 2 * math.ceil(n / block_size)
        any8 = True
    else:
        total += 2 * 4 * n
return total + (2 * 256 * 4 if any8 else 0)
''', "absmax per block in fp16, not fp32"),
    Case("adam8-maps-per-tensor", "q-opt8", '''
import math
total = 0
for n in numels:
    if n >= min_8bit_size:
        total += 2 * n + 2 * 4 * math.ceil(n / block_size) + 2 * 256 * 4  # each tensor its own code tables
    else:
        total += 2 * 4 * n
return total
''', "the two 256-entry quantization maps counted per tensor"),
]
