"""The saved-tensor instrument: what a frozen layer, a LoRA model and a checkpointed block keep for backward."""
import copy

import pytest
import torch

from memopt_lib.checkpointing import checkpoint_blocks
from memopt_lib.models import load_model
from memopt_lib.profiler import saved_for_backward
from memopt_lib.text import random_batch


def _linear_saves(frozen: bool) -> int:
    lin = torch.nn.Linear(64, 32)
    lin.requires_grad_(not frozen)
    x = torch.randn(16, 64, requires_grad=True)
    return saved_for_backward(lin, lambda: lin(x)).total_bytes


def test_a_frozen_linear_saves_no_input_a_trainable_one_saves_it():
    assert _linear_saves(frozen=True) == 0              # only the weight, for dL/dx: alive anyway, not counted
    assert _linear_saves(frozen=False) == 16 * 64 * 4   # its input, for dL/dW


@pytest.fixture(scope="module")
def tiny():
    model = load_model("gpt2-tiny", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return model, random_batch(model.config.vocab_size, 2, 64)


def test_lora_saves_less_because_frozen_layers_keep_no_input(tiny):
    from memopt_lib.lora import apply_lora
    model, batch = tiny
    full = saved_for_backward(model, lambda: model(**batch).loss).by_kind()
    lora_model = apply_lora(copy.deepcopy(model), r=4, targets=["c_attn"], dropout=0.0)
    lora = saved_for_backward(lora_model, lambda: lora_model(**batch).loss).by_kind()
    assert full["transformer.h.mlp.c_fc"] > 0 and full["transformer.h.mlp.c_proj"] > 0
    assert lora.get("transformer.h.mlp.c_fc", 0) == 0 and lora.get("transformer.h.mlp.c_proj", 0) == 0
    assert 0 < sum(lora.values()) < sum(full.values())


def test_a_checkpointed_block_saves_only_its_input(tiny):
    model, batch = tiny
    ckpt = checkpoint_blocks(copy.deepcopy(model), every=1)
    plain = saved_for_backward(model, lambda: model(**batch).loss).by_module
    wrapped = saved_for_backward(ckpt, lambda: ckpt(**batch).loss).by_module
    rows, seq = batch["input_ids"].shape
    hidden_state = rows * seq * model.config.n_embd * 4
    blocks = [f"transformer.h.{i}" for i in range(model.config.n_layer)]
    assert [wrapped.get(b, 0) for b in blocks] == [hidden_state] * len(blocks)  # its input, nothing inside
    assert not any(k.startswith(b + ".") for k in wrapped for b in blocks)
    assert sum(v for k, v in plain.items() if k.startswith("transformer.h.")) > 10 * hidden_state * len(blocks)


def test_a_non_callable_is_refused(tiny):
    with pytest.raises(TypeError, match="callable"):
        saved_for_backward(tiny[0], tiny[1])


def test_an_output_saved_by_its_own_op_is_freed_with_the_result():
    import weakref
    x = torch.randn(64, requires_grad=True)
    probe = torch.nn.Identity()
    res = saved_for_backward(probe, lambda: torch.exp(probe(x)))  # exp saves its output for backward
    assert res.total_bytes == 64 * 4
    alive = weakref.ref(res.result)
    del res
    assert alive() is None  # no output -> grad_fn -> saved output cycle keeps it (or its graph) alive
