"""memopt_lib.lora: peft wrapped right (Conv1D, meta device), exact counts, B = 0 is the base model, lab 03's checks."""
import copy
from pathlib import Path

import pytest
import torch

from memopt_lib.calculator import Shape, lora_params
from memopt_lib.checks import CheckContext, registry, run_checks
from memopt_lib.lora import (adapter_optimizer, apply_lora, linear_layers, lora_b_matrices, lora_config, matrix_shape,
                             non_adapter_trainable, optimizer_state_bytes, trainable_parameters)
from memopt_lib.models import load_model, meta_model, model_config
from memopt_lib.notebook import namespace_from
from memopt_lib.profiler import measure, train_step_fn
from memopt_lib.text import random_batch

ROOT = Path(__file__).resolve().parent.parent
NB = "03_lora.ipynb"
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL7 = QKVO + ["gate_proj", "up_proj", "down_proj"]


def test_matrix_shape_reads_linear_and_conv1d():
    from transformers.pytorch_utils import Conv1D
    assert matrix_shape(torch.nn.Linear(3, 5)) == (3, 5)
    assert matrix_shape(Conv1D(5, 3)) == (3, 5)  # Conv1D(nf=d_out, nx=d_in), weight stored (d_in, d_out)
    assert matrix_shape(torch.nn.LayerNorm(4)) is None
    layers = linear_layers(meta_model("gpt2"))
    assert layers["transformer.h.0.attn.c_attn"] == (768, 2304)
    assert layers["transformer.h.0.mlp.c_proj"] == (3072, 768)


def test_config_defaults_and_errors():
    g, l = meta_model("gpt2"), meta_model("llama-tiny")
    cg, cl = lora_config(g), lora_config(l)
    assert cg.fan_in_fan_out and set(cg.target_modules) == {"c_attn"} and cg.lora_alpha == 32
    assert not cl.fan_in_fan_out and set(cl.target_modules) == set(QKVO)
    with pytest.raises(ValueError, match="match no Linear/Conv1D.*c_attn"):
        lora_config(g, targets=["q_proj"])
    with pytest.raises(ValueError, match="positive int"):
        lora_config(g, r=0)
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        lora_config(g, targets=["c_attn", "lm_head"])


@pytest.mark.parametrize("name,targets,r,expected", [
    ("gpt2", ["c_attn"], 16, 589_824),
    ("llama-7b", QKVO, 16, 16_777_216),
    ("llama-7b", ["q_proj", "v_proj"], 16, 8_388_608),
    ("llama-7b", "all-linear", 16, 39_976_960),
])
def test_peft_counts_on_meta_match_the_formula(name, targets, r, expected):
    pm = apply_lora(meta_model(name), r=r, targets=targets, dropout=0.0)
    n = trainable_parameters(pm)
    kinds = tuple(ALL7 if targets == "all-linear" else targets)
    assert n == lora_params(Shape.from_config(model_config(name)), r, kinds) == expected
    assert not non_adapter_trainable(pm)
    assert all(p.device.type == "meta" for p in pm.parameters())  # no weights were materialised


@pytest.mark.parametrize("name,targets", [("gpt2-tiny", ["c_attn"]), ("llama-tiny", ["q_proj", "v_proj"])])
def test_b_zero_is_the_base_model_and_training_moves_it(name, targets):
    torch.manual_seed(0)
    base = load_model(name).eval()
    x = random_batch(base.config.vocab_size, 2, 16, seed=1)
    with torch.no_grad():
        want = base(input_ids=x["input_ids"]).logits
    pm = apply_lora(copy.deepcopy(base), r=8, targets=targets, dropout=0.0)
    with torch.no_grad():
        assert torch.equal(pm(input_ids=x["input_ids"]).logits, want)  # B = 0: exactly the base model
    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    opt = adapter_optimizer(pm, lr=1e-2)
    for _ in range(2):
        train_step_fn(pm, x, opt)()
    assert all(float(b.detach().abs().max()) > 0 for b in lora_b_matrices(pm).values())
    assert all(torch.equal(p, frozen[n]) for n, p in pm.named_parameters() if n in frozen)  # base untouched
    with torch.no_grad():
        assert not torch.allclose(pm(input_ids=x["input_ids"]).logits, want)


def test_adamw_state_is_exactly_the_adapters():
    torch.manual_seed(0)
    full = load_model("gpt2-tiny")
    pm = apply_lora(copy.deepcopy(full), r=16, dropout=0.0)
    batch = random_batch(full.config.vocab_size, 2, 32, seed=2)
    opt = adapter_optimizer(pm)
    rep = measure(train_step_fn(pm, batch, opt), model=pm, optimizer=opt, timeline=False)
    n, tensors = trainable_parameters(pm), sum(1 for p in pm.parameters() if p.requires_grad)
    assert n == 2 * 16 * (128 + 384) and tensors == 4
    assert optimizer_state_bytes(opt) == 8 * n + 4 * tensors
    assert rep.end_breakdown_bytes["optimizer"] == 8 * n + 4 * tensors
    fopt = torch.optim.AdamW(full.parameters())
    full_rep = measure(train_step_fn(full, batch, fopt), model=full, optimizer=fopt, timeline=False)
    assert rep.peak_allocated_bytes < full_rep.peak_allocated_bytes
    assert optimizer_state_bytes(opt) < 0.02 * optimizer_state_bytes(fopt)


def test_adapter_optimizer_needs_trainable_parameters():
    m = meta_model("gpt2-tiny").requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        adapter_optimizer(m)


@pytest.mark.gpu
def test_cuda_lora_step_has_lower_peak_than_full():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    full = load_model("gpt2-tiny").to(dev)
    pm = apply_lora(copy.deepcopy(full), r=16)
    batch = random_batch(full.config.vocab_size, 4, 128, device=dev)
    peaks = {}
    for k, (m, o) in {"full": (full, torch.optim.AdamW(full.parameters())), "lora": (pm, adapter_optimizer(pm))}.items():
        peaks[k] = measure(train_step_fn(m, batch, o), device=dev, model=m, optimizer=o, timeline=False).peak_allocated_bytes
    assert peaks["lora"] < peaks["full"]


def _ctx():
    return CheckContext.here(seed=11)


def test_lab03_checks_catch_linear_only_counting_and_wrong_fan_in_fan_out():
    ns = namespace_from(ROOT / "solutions" / NB, ROOT / "solutions" / NB)

    def linear_only(model, targets, r):  # forgets GPT-2's Conv1D
        return sum(r * (m.in_features + m.out_features) for n, m in model.named_modules()
                   if n.split(".")[-1] in targets and isinstance(m, torch.nn.Linear))

    def no_fan(model, r, targets):
        from peft import LoraConfig, get_peft_model
        return get_peft_model(model, LoraConfig(r=r, target_modules=list(targets), fan_in_fan_out=False))

    res = run_checks(registry("03"), {**ns, "count_lora_params": linear_only}, _ctx(), only=["lora_counts_gpt2"])
    assert res[0].status == "failed"
    res = run_checks(registry("03"), {**ns, "setup_lora": no_fan}, _ctx(), only=["only_adapters_trainable"])
    assert res[0].status == "failed", res[0].message
