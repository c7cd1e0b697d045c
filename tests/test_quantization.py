"""Quantization: arithmetic, loading through bitsandbytes (CPU kernels), measurement, and lab 06's checks."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memopt_lib import quantization as Q
from memopt_lib.models import count_parameters, load_model, model_config

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = ROOT / "solutions" / "06_quantization.ipynb"
LAB = ROOT / "labs" / "06_quantization.ipynb"
CPU = torch.device("cpu")


def test_bits_per_weight_known_values():
    assert Q.bits_per_weight() == 4.5  # NF4: 4 bits + fp32 absmax / 64
    assert Q.bits_per_weight(double_quant=True) == 4 + 8 / 64 + 32 / (64 * 256)
    assert round(Q.bits_per_weight(double_quant=True), 3) == 4.127
    assert Q.bits_per_weight(block_size=128, absmax_bits=16) == 4.125
    with pytest.raises(ValueError):
        Q.bits_per_weight(block_size=0)


def test_bnb_config_fields_and_errors():
    c = Q.bnb_config(4, "fp4", False, torch.float32)
    assert c.load_in_4bit and c.bnb_4bit_quant_type == "fp4" and not c.bnb_4bit_use_double_quant
    assert c.bnb_4bit_compute_dtype == torch.float32
    assert Q.bnb_config(8).load_in_8bit
    with pytest.raises(ValueError, match="bits"):
        Q.bnb_config(3)
    with pytest.raises(ValueError, match="quant_type"):
        Q.bnb_config(4, "int4")


def test_quantized_layers_are_the_block_linears():
    cfg = model_config("gpt2-tiny")
    shapes = Q.quantized_linear_shapes(cfg)
    assert len(shapes) == 4 * cfg.n_layer  # c_attn, attn.c_proj, c_fc, mlp.c_proj (Conv1D) per block
    assert not any("lm_head" in n for n, _, _ in shapes)
    assert ("transformer.h.0.attn.c_attn", 3 * cfg.n_embd, cfg.n_embd) in shapes  # (d_out, d_in), not Conv1D's order
    llama = Q.quantized_linear_shapes(model_config("llama-7b"))
    assert len(llama) == 7 * 32
    # the 7B arithmetic lands within 0.5 % of the H200's loaded bytes (dq=True anchor 3.6103 GiB)
    assert abs(Q.predict_weight_bytes("llama-7b", 4, True)["total"] / 1024**3 / 3.6103 - 1) < 0.005


@pytest.mark.parametrize("name,bits,dq", [("llama-tiny", 4, True), ("llama-tiny", 8, False), ("gpt2-tiny", 4, False)])
def test_predicted_bytes_match_loaded_bytes(name, bits, dq):
    model, loaded = Q.measure_loaded_bytes(lambda: Q.load_quantized(name, bits, "nf4", dq, device=CPU), CPU)
    pred = Q.predict_weight_bytes(name, bits, dq)["total"]
    assert abs(loaded / pred - 1) < 0.01
    assert Q.weight_footprint_bytes(model) == pytest.approx(loaded, rel=1e-3)  # the walk agrees with the tracker
    kinds = Q.quantized_modules(model)
    assert len(kinds["4bit" if bits == 4 else "8bit"]) == len(Q.quantized_linear_shapes(model_config(name)))
    # 4-bit tensors pack two values per byte: count_parameters reads the logical shape
    assert count_parameters(model) == count_parameters(load_model(name, train=False))


def test_quantized_forward_tracks_the_unquantized_model():
    """On vs off: the 4-bit model computes what its dequantized weights compute, close to the original."""
    import bitsandbytes as bnb
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    ref = load_model("llama-tiny", train=False)  # fp32
    errs = {}
    for qt in ("nf4", "fp4"):
        m = Q.load_quantized("llama-tiny", 4, qt, True, compute_dtype=torch.float32, dtype=torch.float32, device=CPU)
        lin = m.model.layers[0].self_attn.q_proj
        x = torch.randn(3, lin.in_features)
        w = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
        lin.train()  # training path: dequantize to the compute dtype (fp32), then an ordinary matmul
        exact = lin(x)
        torch.testing.assert_close(exact, x @ w.t(), rtol=1e-4, atol=1e-5)
        lin.eval()  # inference without grad: AVX512-BF16 CPUs switch to bnb's packed bf16 kernel
        with torch.no_grad():
            fast = lin(x)
        assert float((fast - exact).norm() / exact.norm()) < (2e-2 if Q.cpu_4bit_kernel_is_bf16() else 1e-5)
        errs[qt] = Q.logits_error(Q.eval_logits(ref, ids)[0], Q.eval_logits(m, ids)[0])
    assert errs["nf4"]["rel_l2"] < 0.5
    assert errs["nf4"]["rel_l2"] < errs["fp4"]["rel_l2"]  # NF4's levels fit normal weights better


def test_adamw8bit_state_matches_arithmetic():
    import bitsandbytes as bnb

    from memopt_lib.text import random_batch
    model = load_model("gpt2-tiny")
    batch = random_batch(model.config.vocab_size, 2, 16)
    numels = [p.numel() for p in model.parameters()]
    states = {cls: Q.state_after_one_step(model, batch, cls, lr=1e-4) for cls in (torch.optim.AdamW, bnb.optim.AdamW8bit)}
    assert states[torch.optim.AdamW] == Q.adamw_state_bytes(numels)
    assert states[bnb.optim.AdamW8bit] == Q.adamw8bit_state_bytes(numels)
    assert 0.25 < states[bnb.optim.AdamW8bit] / states[torch.optim.AdamW] < 0.27
    assert Q.adamw8bit_state_bytes([100]) == 800  # under min_8bit_size: fp32 state, no quantization maps


def test_logits_error_and_windows():
    a = torch.randn(2, 5, 7)
    assert Q.logits_error(a, a) == {"rel_l2": 0.0, "max_abs": 0.0, "top1_agree": 1.0}
    from memopt_lib.text import load_tokenizer
    w = Q.heldout_windows(load_tokenizer("llama-tiny"), 2, 64)
    assert w.shape == (2, 64)
    with pytest.raises(ValueError, match="held-out"):
        Q.heldout_windows(load_tokenizer("llama-tiny"), 1000, 1024)


# ---------------------------------------------------------------------- lab 06 checks
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_predicted_bytes_match_cuda_allocator():
    dev = torch.device("cuda")
    for bits, dq in ((4, True), (4, False), (8, False)):
        model, loaded = Q.measure_loaded_bytes(lambda: Q.load_quantized("llama-tiny", bits, "nf4", dq, device=dev), dev)
        assert abs(loaded / Q.predict_weight_bytes("llama-tiny", bits, dq)["total"] - 1) < 0.02
        del model


def test_paged_threshold_is_bitsandbytes_own():
    """PAGED_MIN_NUMEL is the size test in bitsandbytes' get_state_buffer (read from its source)."""
    import inspect
    import re

    from bitsandbytes.optim.optimizer import Optimizer8bit
    src = inspect.getsource(Optimizer8bit.get_state_buffer)
    m = re.search(r"not self\.is_paged or p\.numel\(\) < ([0-9e.]+)", src)
    assert m, "bitsandbytes changed how it decides what to page; update quantization.PAGED_MIN_NUMEL"
    assert int(float(m.group(1))) == Q.PAGED_MIN_NUMEL


def test_paged_split_pages_nothing_of_a_rank16_lora_of_the_7b():
    cfg = Q.model_config("llama-7b")
    r, d = 16, cfg.hidden_size
    lora = [r * d, d * r] * 4 * cfg.num_hidden_layers      # A and B of q, k, v, o per layer
    split = Q.paged_split(lora)
    assert split["paged_tensors"] == 0 and split["unpaged_values"] == sum(lora)
    full = Q.paged_split([d * d, d, 100_000, 99_999])
    assert full == {"paged_tensors": 2, "paged_values": d * d + 100_000, "unpaged_tensors": 2,
                    "unpaged_values": d + 99_999}


def test_double_quant_absmax_error_is_small_but_not_zero():
    err = Q.double_quant_absmax_error(torch.randn(256, 512, generator=torch.Generator().manual_seed(0)))
    assert err["n_absmax"] == 256 * 512 // 64
    assert 0 < err["mean_rel"] < err["max_rel"] < 0.02
