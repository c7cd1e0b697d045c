"""Chunked cross-entropy: the same loss and gradients as the full-logits path, without holding the logits."""
from __future__ import annotations

import pytest
import torch

from memopt_lib.accumulation import (accumulate, count_target_tokens, full_batch_gradients, gradient_error, gradients,
                                     split_batch)
from memopt_lib.chunked_loss import (ChunkedLinearCrossEntropy, chunked_loss_fn, chunked_loss_sum,
                                     linear_cross_entropy_sum, plain_loss_sum, shift_labels)
from memopt_lib.models import load_model
from memopt_lib.profiler import MemoryTracker
from memopt_lib.text import padded_batch

LENGTHS = [29, 7, 18, 32, 11, 3]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops: threads only contend on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(name):
    kw = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) if name.startswith("gpt2") else {}
    return load_model(name, **kw)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize("chunk", [17, 4096])
def test_same_loss_and_gradients_as_the_full_logits(name, chunk):
    """On-vs-off equivalence, padded rows, chunks that do not divide the tokens; GPT-2's tied lm_head trains."""
    model = _model(name)
    batch = padded_batch(LENGTHS, model.config.vocab_size, seed=chunk)
    ref_loss = plain_loss_sum(model, batch)
    ref_loss.backward()
    ref = gradients(model)
    model.zero_grad(set_to_none=True)
    loss = chunked_loss_sum(model, batch, chunk_tokens=chunk, backend="torch")
    loss.backward()
    got = gradients(model)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0.0)  # fp32: only the summation order differs
    assert set(got) == set(ref)
    assert gradient_error(got, ref) < 1e-5  # fp32 summation order only
    n = count_target_tokens(batch["labels"])
    torch.testing.assert_close(loss / n, model(**batch).loss, rtol=1e-5, atol=0.0)  # its own mean loss


def test_shift_labels_marks_each_rows_last_position_ignored():
    y = torch.tensor([[1, 2, 3], [4, -100, 6]])
    assert shift_labels(y).tolist() == [[2, 3, -100], [-100, 6, -100]]


def test_frozen_head_gets_no_gradient_and_hidden_does():
    h = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 8, dtype=torch.float64)  # frozen: no grad_w is computed
    y = torch.randint(0, 50, (10,))
    y[3] = -100
    out = ChunkedLinearCrossEntropy.apply(h, w, y, 3, -100, torch.float64)
    out.backward()
    ref_h = h.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(ref_h @ w.t(), y, ignore_index=-100, reduction="sum").backward()
    torch.testing.assert_close(h.grad, ref_h.grad)
    assert w.grad is None


def _loss_peak(fn, h, w, y):
    with MemoryTracker("cpu") as tr:
        loss = fn(h, w, y)
        loss.backward()
        del loss
    r = tr.result()
    return r.peak_bytes - r.start_bytes


def test_peak_holds_one_chunk_of_logits_not_all():
    """Tokens x vocab logits (fp32 copy, softmax, gradient) vs one chunk's: measured by the tracker."""
    torch.manual_seed(0)
    n, hdim, vocab = 1024, 64, 8192  # full fp32 logits: 32 MiB
    h = torch.randn(n, hdim, requires_grad=True)
    w = torch.randn(vocab, hdim, requires_grad=True)
    y = torch.randint(0, vocab, (1, n))

    def plain(h, w, y):
        from memopt_lib.accumulation import token_loss_sum
        return token_loss_sum((h @ w.t()).unsqueeze(0), y)

    def chunked(h, w, y):
        return linear_cross_entropy_sum(h.unsqueeze(0), w, y, chunk_tokens=64, backend="torch")

    full, small = _loss_peak(plain, h, w, y), _loss_peak(chunked, h, w, y)
    logits_bytes = n * vocab * 4
    assert full > 2 * logits_bytes  # logits, their log-softmax and the gradient are alive together
    assert small < 0.25 * full, (small, full)


def test_loss_fn_accumulates_token_normalized_like_the_full_batch():
    model = _model("gpt2-tiny")
    batch = padded_batch(LENGTHS, model.config.vocab_size, seed=3)
    ref = full_batch_gradients(model, batch)
    res = accumulate(model, split_batch(batch, 3), loss_fn=chunked_loss_fn(chunk_tokens=16, backend="torch"))
    assert gradient_error(gradients(model), ref) < 1e-5
    assert res.loss == pytest.approx(model(**batch).loss.item(), rel=1e-5)


def test_autocast_computes_the_head_in_bf16_like_the_plain_path():
    model = load_model("gpt2-tiny", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    batch = padded_batch(LENGTHS, model.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = chunked_loss_sum(model, batch, chunk_tokens=16, backend="torch")
        b = plain_loss_sum(model, batch)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=2e-3, atol=0.0)


def test_bad_arguments_say_what_to_do():
    h, w, y = torch.randn(2, 4, 8), torch.randn(16, 8), torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="chunk_tokens"):
        linear_cross_entropy_sum(h, w, y, chunk_tokens=0)
    with pytest.raises(ValueError, match="backend"):
        chunked_loss_fn(backend="cuda")
    with pytest.raises(ValueError, match="needs CUDA"):
        linear_cross_entropy_sum(h, w, y, backend="liger")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        chunked_loss_fn()(_model("gpt2-tiny"), {"input_ids": y, "labels": y}, 0)
    with pytest.raises(ValueError, match="causal LM"):
        chunked_loss_sum(torch.nn.Linear(2, 2), {"input_ids": y, "labels": y})
