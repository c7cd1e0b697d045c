"""Wrong answers of lab 03 (LoRA)."""
import torch
from transformers.pytorch_utils import Conv1D

from . import Wrong


def _shape(m):
    if isinstance(m, torch.nn.Linear):
        return m.in_features, m.out_features
    if isinstance(m, Conv1D):
        return tuple(m.weight.shape)
    return None


def linear_only(model, targets, r):  # forgets GPT-2's Conv1D
    return sum(r * (m.in_features + m.out_features) for n, m in model.named_modules()
               if n.split(".")[-1] in targets and isinstance(m, torch.nn.Linear))


def attn_c_proj_only(model, targets, r):  # mlp.c_proj forgotten
    total = 0
    for n, m in model.named_modules():
        s = _shape(m)
        if s and n.split(".")[-1] in targets and not (n.endswith("mlp.c_proj")):
            total += r * (s[0] + s[1])
    return total


def square_matrices(model, targets, r):  # every adapted matrix hidden x hidden
    h = model.config.hidden_size
    return sum(r * 2 * h for n, m in model.named_modules() if _shape(m) and n.split(".")[-1] in targets)


def product_not_sum(model, targets, r):
    return sum(r * s[0] * s[1] // max(s) for n, m in model.named_modules()
               if (s := _shape(m)) and n.split(".")[-1] in targets)


def rank16(model, targets, r):
    return sum(16 * (s[0] + s[1]) for n, m in model.named_modules() if (s := _shape(m)) and n.split(".")[-1] in targets)


def _setup(model, r, targets, **kw):
    from peft import LoraConfig, get_peft_model
    conv1d = any(isinstance(m, Conv1D) for n, m in model.named_modules() if n.split(".")[-1] in targets)
    opts = dict(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=list(targets), fan_in_fan_out=conv1d,
                bias="none", task_type="CAUSAL_LM")
    unfreeze = kw.pop("unfreeze", False)
    opts.update(kw)
    pm = get_peft_model(model, LoraConfig(**opts))
    if unfreeze:
        for p in pm.parameters():
            p.requires_grad_(True)
    return pm


def alpha_32(model, r, targets):
    return _setup(model, r, targets, lora_alpha=32)


def alpha_r(model, r, targets):
    return _setup(model, r, targets, lora_alpha=r)


def dropout_01(model, r, targets):
    return _setup(model, r, targets, lora_dropout=0.1)


def no_dropout(model, r, targets):
    return _setup(model, r, targets, lora_dropout=0.0)


def rank_16(model, r, targets):
    return _setup(model, 16, targets)


def all_linear(model, r, targets):
    return _setup(model, r, targets, target_modules="all-linear")


def always_c_attn(model, r, targets):
    return _setup(model, r, ["c_attn"] if hasattr(model, "transformer") else ["q_proj", "v_proj"])


def no_fan_in_fan_out(model, r, targets):
    return _setup(model, r, targets, fan_in_fan_out=False)


def unfrozen_base(model, r, targets):
    return _setup(model, r, targets, unfreeze=True)


def bias_all(model, r, targets):
    return _setup(model, r, targets, bias="all")


def random_b(model, r, targets):
    return _setup(model, r, targets, init_lora_weights=False)


def returns_config(model, r, targets):
    from peft import LoraConfig
    return LoraConfig(r=r, target_modules=list(targets))


G, LL, T, B, S = "lora_counts_gpt2", "lora_counts_llama7b", "only_adapters_trainable", "b_zero_gives_base_output", \
    "optimizer_state_bytes"
WRONG = [
    Wrong("count: nn.Linear only (Conv1D forgotten)", "count_lora_params", linear_only, (G,), r"Conv1D"),
    Wrong("count: mlp.c_proj forgotten", "count_lora_params", attn_c_proj_only, (G,), r"c_proj"),
    Wrong("count: square matrices", "count_lora_params", square_matrices, (G, LL), r"grouped-query|d_in \+ d_out"),
    Wrong("count: product, not sum", "count_lora_params", product_not_sum, (G, LL), r"d_in \+ d_out"),
    Wrong("count: rank 16 hard-coded", "count_lora_params", rank16, (G, LL), r"peft creates"),
    Wrong("setup: lora_alpha fixed 32", "setup_lora", alpha_32, (T, B), r"lora_alpha = 2 \* r"),
    Wrong("setup: lora_alpha = r", "setup_lora", alpha_r, (T, B), r"lora_alpha = 2 \* r"),
    Wrong("setup: dropout 0.1", "setup_lora", dropout_01, (T, B), r"lora_dropout"),
    Wrong("setup: no dropout", "setup_lora", no_dropout, (T, B), r"lora_dropout"),
    Wrong("setup: rank hard-coded 16", "setup_lora", rank_16, (T, B), r"rank"),
    Wrong("setup: all-linear", "setup_lora", all_linear, (T, B), r"should not be there"),
    Wrong("setup: targets ignored", "setup_lora", always_c_attn, (T, B), r"target_modules"),
    Wrong("setup: fan_in_fan_out=False on Conv1D", "setup_lora", no_fan_in_fan_out, (T,), r"fan_in_fan_out"),
    Wrong("setup: base unfrozen", "setup_lora", unfrozen_base, (T, S), r"require grad|freeze the base"),
    Wrong("setup: bias='all'", "setup_lora", bias_all, (T,), r"require grad"),
    Wrong("setup: B initialized randomly", "setup_lora", random_b, (B,), r"start at zero"),
    Wrong("setup: returns the LoraConfig", "setup_lora", returns_config, (T, B), r"get_peft_model"),
]
