"""Placement of the embedding and lm_head: 8-bit, bf16 and host copies give (nearly) the same model."""
from __future__ import annotations

import pytest
import torch

from memopt_lib.chunked_loss import chunked_loss_sum, plain_loss_sum
from memopt_lib.models import load_model
from memopt_lib.placement import HostEmbedding, Int8Embedding, Int8Head, place_vocab_matrices, vocab_matrix_bytes
from memopt_lib.text import random_batch


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _frozen(name="llama-tiny"):
    model = load_model(name)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def test_8bit_embedding_and_head_keep_the_logits_and_halve_bf16():
    model = _frozen()
    batch = random_batch(model.config.vocab_size, 2, 16)
    ref = model(**batch).logits
    fp32_bytes = vocab_matrix_bytes(model, "cpu")
    place_vocab_matrices(model, embedding="8bit", lm_head="8bit")
    assert isinstance(model.get_input_embeddings(), Int8Embedding)
    assert isinstance(model.get_output_embeddings(), Int8Head)
    got = model(**batch).logits
    assert float((got - ref).norm() / ref.norm()) < 0.02  # row-wise absmax int8: half a code step per weight
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95
    h = model.config.hidden_size
    # int8 codes + one fp32 scale per row, vs 4 bytes per weight (and so 1/2 of bf16)
    assert vocab_matrix_bytes(model, "cpu") == pytest.approx(fp32_bytes * (1 + 4 / h) / 4, rel=1e-3)


@torch.no_grad()
def test_host_embedding_is_exact_and_bf16_casts():
    model = _frozen()
    batch = random_batch(model.config.vocab_size, 2, 16)
    ref = model(**batch).logits
    place_vocab_matrices(model, embedding="host", device="cpu")
    assert isinstance(model.get_input_embeddings(), HostEmbedding)
    assert model.get_input_embeddings().weight.device.type == "cpu"
    torch.testing.assert_close(model(**batch).logits, ref)  # the same table, looked up on the host
    place_vocab_matrices(model, lm_head="bf16")
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16


def test_chunked_loss_reads_the_8bit_head():
    model = _frozen()
    place_vocab_matrices(model, lm_head="8bit")
    batch = random_batch(model.config.vocab_size, 2, 16)
    with torch.no_grad():
        torch.testing.assert_close(chunked_loss_sum(model, batch, chunk_tokens=8, backend="torch"),
                                   plain_loss_sum(model, batch), rtol=1e-5, atol=0.0)


def test_errors_name_the_fix():
    gpt2 = _frozen("gpt2-tiny")
    with pytest.raises(ValueError, match="ties"):
        place_vocab_matrices(gpt2, embedding="8bit", lm_head="8bit")
    assert place_vocab_matrices(gpt2, embedding="bf16", lm_head="bf16").lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="largest matmul"):
        place_vocab_matrices(_frozen(), lm_head="host")
    trainable = load_model("llama-tiny")
    with pytest.raises(ValueError, match="frozen"):
        place_vocab_matrices(trainable, embedding="8bit")
    with pytest.raises(ValueError, match="embedding placement"):
        place_vocab_matrices(trainable, embedding="disk")


def test_8bit_head_dequantizes_like_bitsandbytes_without_fp32_copies():
    """The same values as bnb's int8_vectorwise_dequant; at 7B's 32000 x 4096 no fp32 copy of the matrix."""
    import bitsandbytes.functional as bnbf

    from memopt_lib.predict import gpu
    from memopt_lib.predict.replay import AllocatorReplay
    head = Int8Head(torch.nn.Linear(64, 5000, bias=False).to(torch.bfloat16))
    assert torch.equal(head.dequantized_weight(rows_per_block=1000),
                       bnbf.int8_vectorwise_dequant(head.codes, head.scales).to(torch.bfloat16))
    replay = AllocatorReplay(gpu("h200"))
    with replay:
        big = Int8Head(torch.nn.Linear(4096, 32000, bias=False, device="meta", dtype=torch.bfloat16))
        before = replay.alloc.allocated_bytes
        replay.alloc.reset_peak()
        w = big.dequantized_weight()
        transient = replay.alloc.peak_allocated_bytes - before
    assert w.dtype == torch.bfloat16
    assert transient <= 32000 * 4096 * 2 + 2 * 2048 * 4096 * 4 + (1 << 20)  # the result + one fp32 block's two
