"""Held-out wrong answers of lab 03 (LoRA): cells lora-count, lora-setup-fn."""
from cases import Case

_LOOP = '''
total = 0
for name, module in model.named_modules():
    if name.split(".")[-1] not in targets:
        continue
    if isinstance(module, torch.nn.Linear):
        d_in, d_out = module.in_features, module.out_features
    elif isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
    else:
        continue
'''

CASES = [
    # count_lora_params(model, targets, r)
    Case("count-with-bias", "lora-count", _LOOP + '''
    total += r * (d_in + d_out) + d_out  # "the adapter has a bias too"
return int(total)
''', "counts a bias per adapter"),
    Case("count-a-only", "lora-count", _LOOP + '''
    total += r * d_in  # A is the adapter; B is just the output
return int(total)
''', "counts only the A matrices"),
    Case("count-one-layer", "lora-count", '''
total = 0
for t in targets:
    for name, module in model.named_modules():
        if name.split(".")[-1] == t and isinstance(module, (torch.nn.Linear, Conv1D)):
            d_in, d_out = ((module.in_features, module.out_features) if isinstance(module, torch.nn.Linear)
                           else module.weight.shape)
            total += r * (d_in + d_out)
            break  # found the target
return int(total)
''', "counts each target once, not once per layer"),
    Case("count-r-squared", "lora-count", _LOOP + '''
    total += r * (d_in + d_out) + r * r  # "A, B and the r x r product"
return int(total)
''', "adds an r x r term"),
    # setup_lora(model, r, targets)
    Case("setup-peft-defaults", "lora-setup-fn", '''
from peft import LoraConfig, get_peft_model
adapted = [m for n, m in model.named_modules() if n.split(".")[-1] in targets]
conv1d = any(isinstance(m, Conv1D) for m in adapted)
config = LoraConfig(r=r, target_modules=list(targets), fan_in_fan_out=conv1d, task_type="CAUSAL_LM")
return get_peft_model(model, config)
''', "peft's default lora_alpha (8) and dropout (0)"),
    Case("setup-rslora", "lora-setup-fn", '''
from peft import LoraConfig, get_peft_model
adapted = [m for n, m in model.named_modules() if n.split(".")[-1] in targets]
conv1d = any(isinstance(m, Conv1D) for m in adapted)
config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=list(targets), use_rslora=True,
                    fan_in_fan_out=conv1d, bias="none", task_type="CAUSAL_LM")
return get_peft_model(model, config)
''', "use_rslora=True: scales by alpha / sqrt(r)"),
    Case("setup-fan-in-always", "lora-setup-fn", '''
from peft import LoraConfig, get_peft_model
config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=list(targets),
                    fan_in_fan_out=True, bias="none", task_type="CAUSAL_LM")  # "GPT-2 needs it"
return get_peft_model(model, config)
''', "fan_in_fan_out=True on every model"),
    Case("setup-lm-head-saved", "lora-setup-fn", '''
from peft import LoraConfig, get_peft_model
adapted = [m for n, m in model.named_modules() if n.split(".")[-1] in targets]
conv1d = any(isinstance(m, Conv1D) for m in adapted)
config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=list(targets),
                    modules_to_save=["lm_head"], fan_in_fan_out=conv1d, bias="none", task_type="CAUSAL_LM")
return get_peft_model(model, config)
''', "modules_to_save=['lm_head']: a trainable copy of the head"),
    Case("setup-lora-bias", "lora-setup-fn", '''
from peft import LoraConfig, get_peft_model
adapted = [m for n, m in model.named_modules() if n.split(".")[-1] in targets]
conv1d = any(isinstance(m, Conv1D) for m in adapted)
config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=list(targets),
                    fan_in_fan_out=conv1d, bias="lora_only", task_type="CAUSAL_LM")
return get_peft_model(model, config)
''', "bias='lora_only': the adapted layers' biases train"),
]
