"""Unit tests of memopt_lib.accumulation and the checks of lab 04."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from memopt_lib.accumulation import (accumulate, accumulation_step, count_target_tokens, full_batch_gradients,
                                     gradient_error, gradients, micro_batch_loss, split_batch, token_loss_sum)
from memopt_lib.models import load_model
from memopt_lib.profiler import measure
from memopt_lib.text import padded_batch, random_batch

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = [37, 5, 22, 12, 30, 8, 16, 41]


@pytest.fixture(scope="module")
def tiny64():
    return load_model("gpt2-tiny", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).double()


def test_count_target_tokens_follows_the_shift():
    labels = torch.tensor([[1, 2, 3, -100], [-100, -100, 4, 5], [7, -100, -100, -100]])
    # row 0: targets at positions 1, 2; row 1: 2, 3; row 2: none (its only label is the first)
    assert count_target_tokens(labels) == 4
    with pytest.raises(ValueError):
        count_target_tokens(torch.tensor([1, 2, 3]))


def test_token_loss_sum_matches_model_loss(tiny64):
    batch = padded_batch(LENGTHS, tiny64.config.vocab_size)
    out = tiny64(**batch)
    n = count_target_tokens(batch["labels"])
    torch.testing.assert_close(token_loss_sum(out.logits, batch["labels"]) / n, out.loss)
    torch.testing.assert_close(micro_batch_loss(tiny64, batch, n), out.loss)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_accumulation_equals_full_batch(tiny64, k):
    """On-vs-off equivalence: k padded micro-batches give the full batch's gradient and loss."""
    batch = padded_batch(LENGTHS, tiny64.config.vocab_size, seed=k)
    ref = full_batch_gradients(tiny64, batch)
    full_loss = tiny64(**batch).loss.item()
    tiny64.zero_grad(set_to_none=True)
    res = accumulate(tiny64, split_batch(batch, k))
    got = gradients(tiny64)
    tiny64.zero_grad(set_to_none=True)
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-12)
    assert res.loss == pytest.approx(full_loss, rel=1e-6)  # the HF loss itself runs in fp32 (logits.float())
    assert res.n_target_tokens == count_target_tokens(batch["labels"])


def test_given_token_counts_weight_like_counted_ones(tiny64):
    """A caller that knows the counts (unpadded rows: r x (T - 1); the GPU predictor's meta tensors) passes them."""
    batch = random_batch(tiny64.config.vocab_size, 6, 16)
    micro = split_batch(batch, 3)
    res = accumulate(tiny64, micro)
    counted = gradients(tiny64)
    tiny64.zero_grad(set_to_none=True)
    given = accumulate(tiny64, micro, target_tokens=[2 * 15] * 3)
    assert given.tokens_per_micro_batch == res.tokens_per_micro_batch and given.loss == pytest.approx(res.loss)
    assert gradient_error(gradients(tiny64), counted) < 1e-12
    tiny64.zero_grad(set_to_none=True)
    wrong = accumulate(tiny64, micro, target_tokens=[30, 30, 60])  # a wrong count weights its micro-batch wrong
    assert wrong.loss != pytest.approx(res.loss)
    tiny64.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="one count"):
        accumulate(tiny64, micro, target_tokens=[30, 30])


def test_seed_loss_over_k_is_wrong_with_padding_and_right_without(tiny64):
    padded = padded_batch(LENGTHS, tiny64.config.vocab_size)
    ref = full_batch_gradients(tiny64, padded)
    accumulate(tiny64, split_batch(padded, 4), normalization="per_micro_batch")
    assert gradient_error(gradients(tiny64), ref) > 1e-2
    tiny64.zero_grad(set_to_none=True)
    # equal lengths: every micro-batch has the same token count, so mean of means is exact
    equal = random_batch(tiny64.config.vocab_size, 8, 16)
    ref = full_batch_gradients(tiny64, equal)
    accumulate(tiny64, split_batch(equal, 4), normalization="per_micro_batch")
    assert gradient_error(gradients(tiny64), ref) < 1e-10
    tiny64.zero_grad(set_to_none=True)


def test_errors_say_the_fix(tiny64):
    batch = padded_batch([4, 4], tiny64.config.vocab_size)
    with pytest.raises(ValueError, match="1 <= k <= 2"):
        split_batch(batch, 3)
    empty = dict(batch, labels=torch.full_like(batch["labels"], -100))
    with pytest.raises(ValueError, match="no target tokens"):
        accumulate(tiny64, [empty])
    with pytest.raises(ValueError, match="normalization"):
        accumulate(tiny64, [batch], normalization="mean")


def test_accumulation_step_matches_full_batch_step():
    model = load_model("gpt2-tiny", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).double()
    other = copy.deepcopy(model)
    batch = padded_batch(LENGTHS, model.config.vocab_size)
    o1 = torch.optim.SGD(model.parameters(), lr=0.1)
    o2 = torch.optim.SGD(other.parameters(), lr=0.1)
    accumulation_step(model, split_batch(batch, 4), o1)
    o2.zero_grad()
    other(**batch).loss.backward()
    o2.step()
    for p, q in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_peak_is_one_micro_batch_not_full_batch():
    model = load_model("gpt2-tiny")
    batch = random_batch(model.config.vocab_size, 8, 128)

    def peak(mbs):
        def step():
            model.zero_grad(set_to_none=True)
            accumulate(model, mbs)
        return measure(step, model=model, timeline=False).peak_allocated_bytes

    full, k4, one = peak([batch]), peak(split_batch(batch, 4)), peak(split_batch(batch, 4)[:1])
    assert k4 < 0.6 * full
    assert k4 < 1.25 * one


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_budget_gpt2_accumulation():
    from memopt_lib.checks import CheckContext, registry, run_check
    from memopt_lib.profiles import pick_profile
    check = next(c for c in registry("04") if c.name == "gpu_budget_gpt2")
    ns = {"accumulate_gradients": lambda m, mbs: accumulate(m, mbs).loss}
    prof = pick_profile()
    res = run_check(check, ns, CheckContext(prof.device, prof))
    assert res.status == "passed", res.message


def _run04(ns, name):
    from memopt_lib.checks import registry, run_checks
    return run_checks(registry("04"), ns, only=[name])[0]


def test_lab04_checks_reject_the_seed_loop_and_a_graph_keeping_loop():
    seed = {"accumulate_gradients": lambda m, mbs: accumulate(m, mbs, normalization="per_micro_batch").loss}
    assert _run04(seed, "gradient_equals_full_batch").status == "failed"

    def keeps_graphs(model, mbs):  # exact gradient, but every micro-batch's graph lives until one backward
        total = sum(count_target_tokens(mb["labels"]) for mb in mbs)
        loss = sum(micro_batch_loss(model, mb, total) for mb in mbs)
        loss.backward()
        return loss.item()

    ns = {"accumulate_gradients": keeps_graphs}
    assert _run04(ns, "gradient_equals_full_batch").status == "passed"
    res = _run04(ns, "peak_is_one_micro_batch")
    assert res.status == "failed" and "graphs" in res.message
