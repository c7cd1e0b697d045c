"""memopt_lib.mixed_precision: config validation, the no-op objects, autocast on vs off, lab 02's checks."""
import contextlib
from pathlib import Path

import pytest
import torch

import memopt_lib.mixed_precision as mp
from memopt_lib.checks import CheckContext, registry, run_checks
from memopt_lib.mixed_precision import (PrecisionConfig, apply_precision, autocast_ctx, default_dtype, grad_error,
                                        make_scaler, precision_step_fn, state_dtypes)
from memopt_lib.models import load_model
from memopt_lib.notebook import namespace_from
from memopt_lib.profiler import measure
from memopt_lib.text import random_batch

ROOT = Path(__file__).resolve().parent.parent
NB = "02_mixed_precision.ipynb"


def tiny(seed=0):
    torch.manual_seed(seed)
    return load_model("gpt2-tiny").eval()  # eval: no dropout, so two runs compute the same function


def grads(model, batch, cfg, device="cpu"):
    model.zero_grad(set_to_none=True)
    with autocast_ctx(cfg, device):
        loss = model(**batch).loss
    make_scaler(cfg, device).scale(loss).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs,words", [
    (dict(mode="fp16"), "mode must be one of"),
    (dict(mode="pure-bf16", dtype=torch.float16), "mode='amp', dtype=torch.float16"),
    (dict(mode="fp32", dtype=torch.bfloat16), "use mode='amp'"),
    (dict(mode="amp", dtype=torch.float32), "use mode='fp32'"),
    (dict(mode="amp", dtype=torch.int8), "dtype must be"),
])
def test_config_errors_say_the_fix(kwargs, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        PrecisionConfig(**kwargs)


def test_dtype_from_device_and_capability():
    assert PrecisionConfig("amp").resolved("cpu").dtype == torch.bfloat16
    assert PrecisionConfig("fp32").resolved("cpu").dtype == torch.float32
    assert default_dtype((7, 5)) == torch.float16 and default_dtype((7, 0)) == torch.float16
    assert default_dtype((8, 0)) == default_dtype((9, 0)) == default_dtype(None) == torch.bfloat16
    with pytest.raises(ValueError, match="on a CPU use bf16"):
        PrecisionConfig("amp", torch.float16).resolved("cpu")


def test_bf16_on_a_t4_is_refused(monkeypatch):
    monkeypatch.setattr(mp, "capability_of", lambda device: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ValueError, match="Tesla T4 .*no native bf16.*torch.float16"):
        PrecisionConfig("amp", torch.bfloat16).resolved("cuda")
    with pytest.raises(ValueError, match="no native bf16"):
        PrecisionConfig("pure-bf16").resolved("cuda")
    cfg = PrecisionConfig("amp").resolved("cuda")
    assert cfg.dtype == torch.float16 and cfg.needs_scaler


def test_scaler_only_for_fp16():
    assert PrecisionConfig("amp", torch.float16).needs_scaler
    assert not PrecisionConfig("amp", torch.bfloat16).needs_scaler
    assert not PrecisionConfig("pure-bf16").needs_scaler and not PrecisionConfig("fp32").needs_scaler
    for mode in ("fp32", "amp", "pure-bf16"):
        s = make_scaler(PrecisionConfig(mode), "cpu")
        assert isinstance(s, torch.amp.GradScaler) and not s.is_enabled()


def test_autocast_ctx_is_nullcontext_when_off():
    assert isinstance(autocast_ctx(PrecisionConfig("fp32"), "cpu"), contextlib.nullcontext)
    assert isinstance(autocast_ctx(PrecisionConfig("pure-bf16"), "cpu"), contextlib.nullcontext)
    a, w = torch.randn(4, 8), torch.randn(8, 8)
    with autocast_ctx(PrecisionConfig("amp"), "cpu"):
        assert (a @ w).dtype == torch.bfloat16
    with autocast_ctx(PrecisionConfig("fp32"), "cpu"):
        assert (a @ w).dtype == torch.float32


# ---------------------------------------------------------------- on vs off
def test_autocast_off_is_exactly_fp32_and_on_is_close():
    model = tiny()
    batch = random_batch(model.config.vocab_size, 2, 32, seed=1)
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    off = grads(model, batch, PrecisionConfig("fp32"))
    assert all(torch.equal(off[n], plain[n]) for n in plain)  # disabled feature = no-op, bit for bit
    on = grads(model, batch, PrecisionConfig("amp"))
    err = grad_error(model, plain)
    assert 0 < err["max_rel_err"] < 0.05 and err["min_cosine"] > 0.99
    assert any(not torch.equal(on[n], plain[n]) for n in plain)  # it really ran in bf16


def test_disabled_scaler_step_equals_plain_step():
    a, b = tiny(), tiny()
    batch = random_batch(a.config.vocab_size, 2, 32, seed=2)
    oa, ob = torch.optim.AdamW(a.parameters(), lr=1e-2), torch.optim.AdamW(b.parameters(), lr=1e-2)
    precision_step_fn(a, batch, oa, PrecisionConfig("fp32"), "cpu")()
    b(**batch).loss.backward()
    ob.step()
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))


def test_autocast_keeps_fp32_state_pure_bf16_casts_it():
    batch = random_batch(512, 2, 16, seed=3)
    for mode, want in (("amp", ["float32"]), ("pure-bf16", ["bfloat16"])):
        model = apply_precision(tiny(), PrecisionConfig(mode), "cpu")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        precision_step_fn(model, batch, opt, PrecisionConfig(mode), "cpu")()
        d = state_dtypes(model, opt)
        assert d["weights"] == d["gradients"] == d["optimizer"] == want, (mode, d)


def test_apply_precision_refuses_half_weights_for_amp():
    model = tiny().to(torch.bfloat16)
    with pytest.raises(ValueError, match="expects fp32 weights"):
        apply_precision(model, PrecisionConfig("amp"), "cpu")


def test_pure_bf16_halves_weights_and_optimizer_in_the_breakdown():
    batch = random_batch(512, 2, 16, seed=4)
    out = {}
    for mode in ("fp32", "pure-bf16"):
        model = apply_precision(tiny(), PrecisionConfig(mode), "cpu")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        out[mode] = measure(precision_step_fn(model, batch, opt, PrecisionConfig(mode), "cpu"), model=model,
                            optimizer=opt, timeline=False).breakdown_bytes
    assert out["pure-bf16"]["weights"] * 2 == out["fp32"]["weights"]
    n_tensors = len(list(tiny().parameters()))  # AdamW's fp32 'step' scalar per tensor does not halve
    assert out["pure-bf16"]["optimizer"] * 2 - 4 * n_tensors == out["fp32"]["optimizer"]


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cuda_autocast_lowers_the_peak_and_fp16_gets_a_scaler():
    dev = torch.device("cuda")
    cfg = PrecisionConfig("amp").resolved(dev)
    assert make_scaler(cfg, dev).is_enabled() == (cfg.dtype == torch.float16)
    batch = random_batch(8192, 8, 256, device=dev, seed=5)
    peaks = {}
    for mode in ("fp32", "amp"):
        model = tiny().to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        peaks[mode] = measure(precision_step_fn(model, batch, opt, PrecisionConfig(mode), dev), device=dev,
                              model=model, optimizer=opt, timeline=False).peak_allocated_bytes
    assert peaks["amp"] < peaks["fp32"]


# ---------------------------------------------------------------- lab 02
def _ctx():
    return CheckContext.here(seed=7)


def test_lab02_checks_catch_a_step_without_autocast_or_scaler():
    ns = namespace_from(ROOT / "solutions" / NB, ROOT / "solutions" / NB)

    def fp32_step(model, batch, optimizer, scaler, dtype):
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        return loss.item()

    results = run_checks(registry("02"), {**ns, "mixed_precision_step": fp32_step}, _ctx(),
                         only=["step_gradients_match_fp32", "step_uses_scaler_for_fp16"])
    assert [r.status for r in results] == ["failed", "failed"], [(r.name, r.message) for r in results]
    bad_choice = {**ns, "choose_amp_dtype": lambda cap: (torch.bfloat16, True)}
    assert run_checks(registry("02"), bad_choice, _ctx(), only=["amp_dtype_choice"])[0].status == "failed"


def test_emulated_bf16_keeps_two_byte_tensors_and_costs_time():
    from memopt_lib.mixed_precision import bf16_cost
    got = bf16_cost(emulated=True)  # the lab's size
    assert got["cpu_capability"] == "AVX2"  # the CPU's bf16 instructions were switched off
    assert got["bf16"]["bytes_per_value"] == 2 and got["fp32"]["bytes_per_value"] == 4
    assert got["bf16"]["activation_bytes"] * 2 == got["fp32"]["activation_bytes"]  # the memory saving stays
    assert got["bf16"]["step_time_s"] > got["fp32"]["step_time_s"]  # emulation: slower than fp32
