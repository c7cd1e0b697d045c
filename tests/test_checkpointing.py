"""Unit tests of memopt_lib.checkpointing and the checks of lab 05."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

from memopt_lib.checkpointing import (block_activation_bytes, checkpoint_blocks, checkpointing_active,
                                      checkpointing_disabled, enable_checkpointing, transformer_blocks,
                                      uncheckpoint_blocks)
from memopt_lib.models import load_model
from memopt_lib.text import random_batch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    return load_model("gpt2-tiny", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


@pytest.fixture(scope="module")
def batch(tiny):
    return random_batch(tiny.config.vocab_size, 4, 96)


def grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), out


@pytest.mark.parametrize("every", [1, 2])
def test_checkpoint_blocks_same_gradients(tiny, batch, every):
    """On-vs-off equivalence: same loss and gradients with and without checkpointing."""
    ref_loss, ref = grads(tiny, batch)
    model = checkpoint_blocks(copy.deepcopy(tiny), every=every)
    loss, got = grads(model, batch)
    torch.testing.assert_close(loss, ref_loss)
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6)


def test_hf_checkpointing_same_gradients(tiny, batch):
    ref_loss, ref = grads(tiny, batch)
    model = enable_checkpointing(copy.deepcopy(tiny))
    loss, got = grads(model, batch)
    torch.testing.assert_close(loss, ref_loss)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6)


def test_active_by_measurement(tiny, batch):
    model = checkpoint_blocks(copy.deepcopy(tiny), every=1)
    proof = checkpointing_active(model, batch)
    assert proof and proof.ratio < 0.35
    base = copy.deepcopy(tiny)
    base.config.use_cache = False  # checkpoint_blocks turns the KV cache off; the baseline must too
    assert checkpointing_active(model, batch, baseline=base).ratio == pytest.approx(proof.ratio, rel=0.05)
    half = checkpointing_active(checkpoint_blocks(copy.deepcopy(tiny), every=2), batch)
    assert 0.35 < half.ratio < 0.8
    assert not checkpointing_active(tiny, batch)
    uncheckpoint_blocks(model)
    assert not checkpointing_active(model, batch)


def test_checkpointing_disabled_restores(tiny, batch):
    model = checkpoint_blocks(copy.deepcopy(tiny))
    before = block_activation_bytes(model, batch)
    with checkpointing_disabled(model):
        assert block_activation_bytes(model, batch) > 5 * before
    assert block_activation_bytes(model, batch) == before


def test_hf_checkpointing_is_off_in_eval_mode(batch):
    model = load_model("gpt2-tiny", train=False)
    assert not model.training
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not checkpointing_active(model, batch)  # the flag is set, the saving is not there
    model.train()
    assert checkpointing_active(model, batch)
    assert enable_checkpointing(load_model("gpt2-tiny", train=False)).training


def _lora_tiny():
    import peft
    m = load_model("gpt2-tiny")
    return peft.get_peft_model(m, peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))


def test_reentrant_with_frozen_embeddings_loses_lora_gradients(batch):
    model = checkpoint_blocks(_lora_tiny(), use_reentrant=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = model(**batch).loss
    assert not loss.requires_grad  # nothing trainable is connected: no gradient can reach LoRA
    assert any("requires_grad" in str(w.message) for w in caught)
    # the two fixes
    fixed = checkpoint_blocks(_lora_tiny(), use_reentrant=False)
    fixed(**batch).loss.backward()
    assert all(p.grad is not None for n, p in fixed.named_parameters() if "lora_" in n)
    m = _lora_tiny()
    m.enable_input_require_grads()
    m = checkpoint_blocks(m, use_reentrant=True)
    m(**batch).loss.backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if "lora_" in n)


def test_errors_say_the_fix(tiny):
    with pytest.raises(ValueError, match="every must be >= 1"):
        checkpoint_blocks(copy.deepcopy(tiny), every=0)
    with pytest.raises(ValueError, match="ModuleList"):
        transformer_blocks(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="checkpoint_blocks"):
        enable_checkpointing(torch.nn.Linear(2, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_budget_gpt2_checkpointing():
    from memopt_lib.checks import CheckContext, registry, run_check
    from memopt_lib.profiles import pick_profile
    check = next(c for c in registry("05") if c.name == "gpu_budget_gpt2")
    prof = pick_profile()
    res = run_check(check, {"checkpoint_blocks": checkpoint_blocks}, CheckContext(prof.device, prof))
    assert res.status == "passed", res.message


def _run05(ns, name):
    from memopt_lib.checks import registry, run_checks
    return run_checks(registry("05"), ns, only=[name])[0]


def test_lab05_checks_reject_the_traps():
    reentrant = {"checkpoint_blocks": lambda m, every=1: checkpoint_blocks(m, every=every, use_reentrant=True)}
    assert _run05(reentrant, "same_gradients").status == "failed"
    every_block = {"checkpoint_blocks": lambda m, every=1: checkpoint_blocks(m, every=1)}  # ignores `every`
    assert _run05(every_block, "saves_activations").status == "failed"

    def flag_only(model):  # the seed's one-liner: the flag is set, the model stays in eval mode
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    res = _run05({"prepare_for_checkpointed_training": flag_only}, "active_after_from_pretrained")
    assert res.status == "failed" and "eval mode" in res.message
