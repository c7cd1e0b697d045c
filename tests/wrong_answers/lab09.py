"""Wrong answers of lab 09 (QLoRA capstone)."""
import math

import torch

from . import Wrong

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


# ------------------------------------------------------------------ predict_4bit_weight_bytes
def _predict(config, *, double_quant=True, other_bytes=2, blocksize=64, gqa=True, scales=True, tie=True,
             use_other=True):
    h, inter, n_layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head
    kv = (config.num_key_value_heads if gqa else config.num_attention_heads) * head
    linear = n_layers * (h * q + 2 * h * kv + q * h + 3 * h * inter)
    blocks = linear / blocksize
    s = (blocks + blocks / 256 * 4 if double_quant else blocks * 4) if scales else 0
    tied = config.tie_word_embeddings if tie else False
    rest = config.vocab_size * h * (1 if tied else 2) + (2 * n_layers + 1) * h
    return int(linear / 2 + s + rest * (other_bytes if use_other else 2))


def no_gqa(config, *, double_quant=True, other_bytes=2, blocksize=64):
    return _predict(config, double_quant=double_quant, other_bytes=other_bytes, gqa=False)


def no_scales(config, *, double_quant=True, other_bytes=2, blocksize=64):
    return _predict(config, double_quant=double_quant, other_bytes=other_bytes, scales=False)


def dq_ignored(config, *, double_quant=True, other_bytes=2, blocksize=64):
    return _predict(config, double_quant=False, other_bytes=other_bytes)


def always_untied(config, *, double_quant=True, other_bytes=2, blocksize=64):
    return _predict(config, double_quant=double_quant, other_bytes=other_bytes, tie=False)


def other_bytes_ignored(config, *, double_quant=True, other_bytes=2, blocksize=64):
    return _predict(config, double_quant=double_quant, other_bytes=other_bytes, use_other=False)


# ------------------------------------------------------------------ build_qlora
def _build(model_name, *, rank=16, device="cpu", lr=2e-4, targets=QKVO, prepare=False, fixed_rank=None,
           all_linear=False, ignore_lr=False, use_cache=False, eval_inner=False, fp32_adam=False, alpha=None,
           dropout=0.05, reentrant=False, double_quant=True, no_ckpt=False):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from memopt_lib.models import load_model
    device = torch.device(device)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                               bnb_4bit_compute_dtype=torch.float32)
    model = load_model(model_name, quantization_config=quant, dtype=torch.float32, device_map={"": str(device)},
                       train=not eval_inner)
    if prepare:
        model = prepare_model_for_kbit_training(model)  # the tutorials' line: upcast + reentrant checkpointing
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if not no_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if not use_cache:
        model.config.use_cache = False
    else:  # loaded the course text's way (from_pretrained keeps the KV cache on; memopt's load_model turns it off)
        model.config.use_cache = True
    r = fixed_rank or rank
    lora = LoraConfig(r=r, lora_alpha=alpha or 2 * r, lora_dropout=dropout,
                      target_modules="all-linear" if all_linear else list(targets), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if not eval_inner:
        model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    lr = 2e-4 if ignore_lr else lr
    opt = torch.optim.AdamW(params, lr=lr) if fp32_adam else bnb.optim.AdamW8bit(params, lr=lr)
    return model, opt


def _variant(**flags):
    def build_qlora(model_name, *, rank=16, device="cpu", lr=2e-4, targets=QKVO):
        return _build(model_name, rank=rank, device=device, lr=lr, targets=targets, **flags)
    return build_qlora


# ------------------------------------------------------------------ qlora_train_step
def _step(model, optimizer, batch, *, micro_batch=2, share="tokens", zero=True, once=False, step_each=False,
          ignore_micro=False, ret="total"):
    """The solution's token-normalized step, or one slip: ``share`` "rows" / "count" weights each micro-batch's
    mean loss by its rows / 1 over the number of micro-batches."""
    n = batch["input_ids"].shape[0]
    mb = n if ignore_micro else micro_batch
    k = math.ceil(n / mb)
    n_tokens = int((batch["labels"][:, 1:] != -100).sum())
    if zero:
        optimizer.zero_grad(set_to_none=True)
    total, summed, last = 0.0, 0, 0.0
    for i in range(0, n, mb):
        part = {key: v[i:i + mb] for key, v in batch.items()}
        part_tokens = max(int((part["labels"][:, 1:] != -100).sum()), 1)
        if share == "tokens":
            loss, w = model(**part, num_items_in_batch=n_tokens).loss, part_tokens / n_tokens
        else:
            w = part["input_ids"].shape[0] / n if share == "rows" else 1 / k
            loss = model(**part).loss * w
        if once:
            summed = summed + loss
        else:
            loss.backward()
            if step_each:
                optimizer.step()
        total += loss.item()
        last = loss.item() / w
    if once:
        summed.backward()
    if not step_each:
        optimizer.step()
    return total if ret == "total" else last


def _svariant(**flags):
    def qlora_train_step(model, optimizer, batch, *, micro_batch=2):
        return _step(model, optimizer, batch, micro_batch=micro_batch, **flags)
    return qlora_train_step


P, W, L, C = "predict_weights", "weights_quantized", "lora_and_optimizer", "checkpointing_active"
A, M = "accumulation_exact", "peak_vs_default_stack"
WRONG = [
    Wrong("weights: GQA ignored", "predict_4bit_weight_bytes", no_gqa, (P,), r"grouped-query"),
    Wrong("weights: no absmax scales", "predict_4bit_weight_bytes", no_scales, (P,), r"scales"),
    Wrong("weights: double_quant ignored", "predict_4bit_weight_bytes", dq_ignored, (P,), r"double_quant"),
    Wrong("weights: lm_head always untied", "predict_4bit_weight_bytes", always_untied, (P,), r"tie_word_embeddings"),
    Wrong("weights: other_bytes ignored", "predict_4bit_weight_bytes", other_bytes_ignored, (P,), r"other_bytes"),
    Wrong("build: prepare_model_for_kbit_training", "build_qlora", _variant(prepare=True), (C,), r"reentrant"),
    Wrong("build: rank hard-coded 16", "build_qlora", _variant(fixed_rank=16), (L,), r"rank"),
    Wrong("build: all-linear", "build_qlora", _variant(all_linear=True), (L,), r"all-linear"),
    Wrong("build: lr ignored", "build_qlora", _variant(ignore_lr=True), (L,), r"learning rate"),
    Wrong("build: use_cache left on", "build_qlora", _variant(use_cache=True), (C,), r"use_cache"),
    Wrong("build: inner layers in eval mode", "build_qlora", _variant(eval_inner=True), (C,), r"eval mode"),
    Wrong("build: no checkpointing", "build_qlora", _variant(no_ckpt=True), (C,), r"not enabled"),
    Wrong("build: reentrant checkpointing", "build_qlora", _variant(reentrant=True), (C,), r"use_reentrant"),
    Wrong("build: fp32 AdamW", "build_qlora", _variant(fp32_adam=True), (L,), r"8bit"),
    Wrong("build: lora_alpha fixed 32", "build_qlora", _variant(alpha=32), (L,), r"lora_alpha"),
    Wrong("build: dropout 0.1", "build_qlora", _variant(dropout=0.1), (L,), r"dropout"),
    Wrong("build: no double quantization", "build_qlora", _variant(double_quant=False), (W,), r"double quant"),
    Wrong("step: loss / number of micro-batches", "qlora_train_step", _svariant(share="count"), (A,),
          r"number of micro-batches"),
    Wrong("step: micro-batches weighted by rows", "qlora_train_step", _svariant(share="rows"), (A,),
          r"Token-normalize.*rows / all rows"),
    Wrong("step: no zero_grad", "qlora_train_step", _svariant(zero=False), (A,), r"zero_grad"),
    Wrong("step: optimizer.step per micro-batch", "qlora_train_step", _svariant(step_each=True), (A,),
          r"stepped \d+ time"),
    Wrong("step: returns the last micro-batch's loss", "qlora_train_step", _svariant(ret="last"), (A,),
          r"batch's mean token loss"),
    Wrong("step: sums the losses, one backward", "qlora_train_step", _svariant(once=True), (M,), r"backward once"),
    Wrong("step: micro_batch ignored", "qlora_train_step", _svariant(ignore_micro=True), (M,), r"one micro-batch"),
]
