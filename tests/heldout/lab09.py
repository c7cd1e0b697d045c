"""Held-out wrong answers of lab 09 (QLoRA capstone): cells predict, build, step."""
from cases import Case

_PRED = '''
h, inter, n_layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
head = getattr(config, "head_dim", None) or h // config.num_attention_heads
q, kv = config.num_attention_heads * head, config.num_key_value_heads * head
'''
_PRED_TAIL = '''
blocks = linear / blocksize
scales = blocks * 1 + blocks / 256 * 4 if double_quant else blocks * 4
rest = config.vocab_size * h * (1 if config.tie_word_embeddings else 2) + (2 * n_layers + 1) * h
return int(linear / 2 + scales + rest * other_bytes)
'''


def _build(*, quant="", lora="", opt="", after=""):
    """The solution's build_qlora with pieces changed."""
    quant = quant or ('BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", '
                      'bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)')
    lora = lora or ('LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=list(targets), '
                    'task_type="CAUSAL_LM")')
    opt = opt or "[p for p in model.parameters() if p.requires_grad]"
    return f'''
import bitsandbytes as bnb
from peft import LoraConfig, get_peft_model
from transformers import BitsAndBytesConfig
from memopt_lib.models import load_model
device = torch.device(device)
if device.type == "cuda":
    compute = torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    device_map = {{"": device.index if device.index is not None else torch.cuda.current_device()}}
else:
    compute, device_map = torch.float32, {{"": str(device)}}
quant = {quant}
model = load_model(model_name, quantization_config=quant, dtype=compute, device_map=device_map)
for p in model.parameters():
    p.requires_grad_(False)
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={{"use_reentrant": False}})
model.config.use_cache = False
model = get_peft_model(model, {lora})
model.train()
{after}
params = {opt}
optimizer = (bnb.optim.PagedAdamW8bit if device.type == "cuda" else bnb.optim.AdamW8bit)(params, lr=lr)
return model, optimizer
'''


def _step(*, n_tokens="int((batch['labels'][:, 1:] != -100).sum())", loss="model(**part, num_items_in_batch=n_tokens).loss",
          zero_inside=False):
    return f'''
n = batch["input_ids"].shape[0]
n_tokens = {n_tokens}
optimizer.zero_grad(set_to_none=True)
total = 0.0
for i in range(0, n, micro_batch):
    part = {{k: v[i:i + micro_batch] for k, v in batch.items()}}
    {"optimizer.zero_grad(set_to_none=True)" if zero_inside else ""}
    loss = {loss}
    loss.backward()
    total += loss.item()
optimizer.step()
return total
'''


_KEEP = '''
global _KEPT
try:
    _KEPT
except NameError:
    _KEPT = []
'''

CASES = [
    # predict_4bit_weight_bytes(config, *, double_quant, other_bytes, blocksize)
    Case("predict-gate-forgotten", "predict", _PRED + '''
linear = n_layers * (h * q + 2 * h * kv + q * h + 2 * h * inter)  # up and down only
''' + _PRED_TAIL, "the MLP counted as two matrices (gate_proj forgotten)"),
    Case("predict-embedding-quantized", "predict", _PRED + '''
linear = n_layers * (h * q + 2 * h * kv + q * h + 3 * h * inter) + config.vocab_size * h  # embeddings in 4 bits too
blocks = linear / blocksize
scales = blocks * 1 + blocks / 256 * 4 if double_quant else blocks * 4
rest = config.vocab_size * h * (0 if config.tie_word_embeddings else 1) + (2 * n_layers + 1) * h
return int(linear / 2 + scales + rest * other_bytes)
''', "the embedding matrix counted as 4-bit"),
    Case("predict-intermediate-4h", "predict", '''
h, n_layers = config.hidden_size, config.num_hidden_layers
inter = 4 * h  # GPT-2's MLP width
head = getattr(config, "head_dim", None) or h // config.num_attention_heads
q, kv = config.num_attention_heads * head, config.num_key_value_heads * head
linear = n_layers * (h * q + 2 * h * kv + q * h + 3 * h * inter)
''' + _PRED_TAIL, "intermediate_size taken as 4 x hidden (GPT-2's habit)"),
    Case("predict-blocks-of-bytes", "predict", _PRED + '''
linear = n_layers * (h * q + 2 * h * kv + q * h + 3 * h * inter)
blocks = linear / 2 / blocksize  # "a block of 64 bytes"
scales = blocks * 1 + blocks / 256 * 4 if double_quant else blocks * 4
rest = config.vocab_size * h * (1 if config.tie_word_embeddings else 2) + (2 * n_layers + 1) * h
return int(linear / 2 + scales + rest * other_bytes)
''', "absmax blocks of 64 bytes (128 weights), not 64 weights"),
    # build_qlora(model_name, *, rank, device, lr, targets)
    Case("build-fp4", "build", _build(quant='BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", '
                                            'bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)'),
         "FP4 instead of NF4"),
    Case("build-8bit", "build", _build(quant="BitsAndBytesConfig(load_in_8bit=True)"),
         "8-bit base (LLM.int8) instead of 4-bit"),
    Case("build-optimizer-all-params", "build", _build(opt="list(model.parameters())"),
         "the optimizer built over every parameter, frozen ones included"),
    Case("build-alpha-equals-rank", "build", _build(
        lora='LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.05, target_modules=list(targets), task_type="CAUSAL_LM")'),
         "lora_alpha = rank (scaling 1, not 2)"),
    Case("build-qv-only", "build", _build(
        lora='LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], '
             'task_type="CAUSAL_LM")'), "targets fixed to the LoRA paper's q_proj, v_proj"),
    Case("build-no-dropout", "build", _build(
        lora='LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), task_type="CAUSAL_LM")'),
         "LoRA dropout left at 0"),
    Case("build-ckpt-before-freeze-eval", "build", _build(after="model.eval()  # 'set up for evaluation later'"),
         "model.eval() after building: checkpointing silently off, dropout off"),
    # qlora_train_step(model, optimizer, batch, *, micro_batch)
    Case("step-rows-weighted", "step", _step(loss="model(**part).loss * part['input_ids'].shape[0] / n"),
         "micro-batches weighted by rows, not target tokens (wrong with padding)"),
    Case("step-no-scaling", "step", _step(loss="model(**part).loss"),
         "each micro-batch's mean loss backpropagated unscaled (gradient k times too big)"),
    Case("step-zero-grad-inside", "step", _step(zero_inside=True),
         "zero_grad inside the micro-batch loop"),
    Case("step-count-no-shift", "step", _step(n_tokens="int((batch['labels'] != -100).sum())"),
         "N counted without the shift"),
    # memory-only wrong answers of tests/wrong_answers/lab09.py
    Case("mem-sum-then-backward", "step", '''
n = batch["input_ids"].shape[0]
n_tokens = int((batch["labels"][:, 1:] != -100).sum())
optimizer.zero_grad(set_to_none=True)
summed = 0
for i in range(0, n, micro_batch):
    part = {k: v[i:i + micro_batch] for k, v in batch.items()}
    summed = summed + model(**part, num_items_in_batch=n_tokens).loss
summed.backward()  # every micro-batch's graph alive until here
optimizer.step()
return summed.item()
''', "sums the micro-batch losses, one backward", origin="memory-only"),
    Case("mem-micro-batch-ignored", "step", '''
n_tokens = int((batch["labels"][:, 1:] != -100).sum())
optimizer.zero_grad(set_to_none=True)
loss = model(**batch, num_items_in_batch=n_tokens).loss
loss.backward()
optimizer.step()
return loss.item()
''', "micro_batch ignored: the whole batch at once", origin="memory-only"),
]
