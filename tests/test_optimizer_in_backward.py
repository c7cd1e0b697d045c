"""Optimizer step in backward: the same parameters as a plain step, and gradients freed during backward."""
from __future__ import annotations

import copy

import pytest
import torch

from memopt_lib.models import load_model
from memopt_lib.optimizer_in_backward import OptimizerInBackward, apply_optimizer_in_backward
from memopt_lib.profiler import measure
from memopt_lib.quantization import optimizer_state_bytes
from memopt_lib.text import random_batch


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny():
    torch.manual_seed(0)
    return load_model("gpt2-tiny", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _train(model, opt, batches):
    losses = []
    for b in batches:
        opt.zero_grad(set_to_none=True)
        loss = model(**b).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("make", [lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1),
                                  lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)])
def test_same_parameters_as_a_plain_step(make):
    """On-vs-off equivalence over 3 steps (AdamW and SGD with momentum); GPT-2's tied wte/lm_head stepped once."""
    plain = _tiny()
    inbwd = copy.deepcopy(plain)
    batches = [random_batch(plain.config.vocab_size, 2, 16, seed=s) for s in range(3)]
    l_plain = _train(plain, make(list(plain.parameters())), batches)
    opt = apply_optimizer_in_backward(inbwd, make)
    l_inbwd = _train(inbwd, opt, batches)
    assert l_inbwd == pytest.approx(l_plain, rel=1e-6)
    for (n, a), (_, b) in zip(plain.named_parameters(), inbwd.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=n)
    n_params = len(list(inbwd.parameters()))
    assert opt.steps_in_backward == 3 * n_params  # each parameter once per backward (tied weights once)
    assert all(p.grad is None for p in inbwd.parameters())  # freed during backward


def test_state_is_visible_and_the_peak_has_no_gradients():
    model = _tiny()
    batch = random_batch(model.config.vocab_size, 2, 16)
    opt = apply_optimizer_in_backward(model, lambda ps: torch.optim.AdamW(ps, lr=1e-4))

    def step():
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()

    rep = measure(step, model=model, optimizer=opt, warmup=1, timeline=False)
    n = sum(p.numel() for p in model.parameters())
    assert optimizer_state_bytes(opt) >= 8 * n  # both AdamW moments of every parameter, through .state
    ref_model = _tiny()
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-4)

    def ref_step():
        ref_opt.zero_grad(set_to_none=True)
        ref_model(**batch).loss.backward()
        ref_opt.step()

    ref = measure(ref_step, model=ref_model, optimizer=ref_opt, warmup=1, timeline=False)
    assert ref.breakdown_bytes["gradients"] >= 4 * n * 0.9  # plain: all gradients alive at the peak
    assert rep.breakdown_bytes["gradients"] < 0.5 * ref.breakdown_bytes["gradients"]
    assert rep.peak_allocated_bytes < ref.peak_allocated_bytes


def test_remove_restores_plain_backward():
    model = _tiny()
    opt = apply_optimizer_in_backward(model, lambda ps: torch.optim.SGD(ps, lr=0.1))
    opt.remove()
    model(**random_batch(model.config.vocab_size, 1, 8)).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert opt.steps_in_backward == 0


def test_needs_trainable_parameters():
    lin = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        OptimizerInBackward(lin.parameters(), lambda ps: torch.optim.SGD(ps, lr=0.1))


def test_deleting_model_and_optimizer_frees_the_parameters():
    """The hooks hold the wrapper weakly: no uncollectable cycle keeps weights and states alive (bench rows)."""
    import gc
    import weakref
    model = _tiny()
    opt = apply_optimizer_in_backward(model, lambda ps: torch.optim.AdamW(ps, lr=1e-4))
    model(**random_batch(model.config.vocab_size, 1, 8)).loss.backward()
    ref = weakref.ref(model.transformer.wte.weight)
    del model, opt
    gc.collect()
    assert ref() is None
