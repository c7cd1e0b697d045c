"""Lab 09 (QLoRA capstone): the recipe's pieces and what the checks catch (pass/fail on solution/lab: test_lab_checks.py)."""
import warnings
from pathlib import Path

import pytest
import torch

from memopt_lib import qlora, recipe
from memopt_lib.accumulation import accumulation_step, split_batch
from memopt_lib.checkpointing import checkpointing_enabled
from memopt_lib.checks.lab09_qlora_capstone import reference_4bit_bytes
from memopt_lib.lora import apply_lora
from memopt_lib.quantization import make_optimizer, optimizer_state_bytes, paged_state_bytes, weight_footprint_bytes
from memopt_lib.models import model_config
from memopt_lib.text import random_batch

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = ROOT / "solutions" / "09_qlora_capstone.ipynb"
LAB = ROOT / "labs" / "09_qlora_capstone.ipynb"
TINY = "llama-tiny"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """llama-tiny's ops are too small for threads; on a busy 2-core machine two threads are far slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lean():
    model, opt = qlora.build_lean(TINY, rank=16, device="cpu")
    return model, opt


def test_4bit_load_is_nf4_double_quant_and_byte_exact():
    for dq in (True, False):
        model = qlora.load_4bit(TINY, double_quant=dq, compute_dtype=torch.float32)
        assert qlora.count_4bit_linears(model) == 7 * model_config(TINY).num_hidden_layers
        assert model.training  # load_model puts it in train mode
        rotary = sum(b.untyped_storage().nbytes() for b in model.buffers())  # inv_freq tables, not weights
        held = weight_footprint_bytes(model) - rotary
        assert held == reference_4bit_bytes(model_config(TINY), double_quant=dq, other_bytes=4)


def test_reference_bytes_match_7b_anchors():
    rows = {r["name"]: r for r in qlora.load_anchors()["rows"]}
    for dq in (True, False):
        anchor = rows[f"7b qlora-r16(qkvo) ckpt adamw dq={dq} B4 S512"]["loaded_GiB"] * 1024**3
        got = reference_4bit_bytes(model_config("llama-7b"), double_quant=dq)
        assert abs(got - anchor) < 0.03 * anchor


def test_prepare_model_for_kbit_training_upcasts_and_lean_does_not():
    from peft import prepare_model_for_kbit_training
    model = qlora.load_4bit(TINY, compute_dtype=torch.bfloat16)
    before, predicted = weight_footprint_bytes(model), qlora.upcast_bytes(model)
    assert predicted > 0
    prepared = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    assert weight_footprint_bytes(prepared) - before == predicted
    lean = qlora.prepare_lean(qlora.load_4bit(TINY, compute_dtype=torch.bfloat16))
    assert weight_footprint_bytes(lean) == before
    assert checkpointing_enabled(lean)
    assert not any(p.requires_grad for p in lean.parameters())


def test_eval_mode_silently_disables_checkpointing(lean):
    model, _ = lean
    assert checkpointing_enabled(model)
    model.eval()
    try:
        assert not checkpointing_enabled(model)
    finally:
        model.train()


def test_lean_recipe_trains_only_lora_with_8bit_state(lean, capsys):
    model, opt = lean
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert type(opt).__name__ == "AdamW8bit"  # CPU: not paged
    loss = accumulation_step(model, [random_batch(model.config.vocab_size, 2, 32)], opt).loss
    assert 0 < loss < 20
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert optimizer_state_bytes(opt) <= 4 * n
    assert paged_state_bytes(opt) == 0


def test_make_optimizer_paged_falls_back_on_cpu_with_notice(lean, capsys):
    model, _ = lean
    opt = make_optimizer(model, device="cpu", kind="paged_adamw_8bit")
    assert type(opt).__name__ == "AdamW8bit"
    assert "paged optimizers need CUDA" in capsys.readouterr().out
    with pytest.raises(ValueError, match="optimizer kind"):
        make_optimizer(model, device="cpu", kind="sgd")


def _grads_after(model, step_fn, batch):
    captured = {}

    class Capture(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    captured[id(p)] = p.grad.detach().clone()

    params = [p for p in model.parameters() if p.requires_grad]
    k = recipe.micro_batches_for(batch["input_ids"].shape[0], step_fn.get("micro_batch"))
    loss = accumulation_step(model, split_batch(batch, k), Capture(params)).loss
    return loss, [captured[id(p)] for p in params]


def test_accumulation_on_vs_off_same_gradient():
    model, _ = qlora.build_lean(TINY, rank=8, dropout=0.0)
    with torch.no_grad():  # B != 0 so that A gets gradients too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    batch = random_batch(model.config.vocab_size, 4, 32, seed=3)
    l_full, g_full = _grads_after(model, {}, batch)
    l_micro, g_micro = _grads_after(model, {"micro_batch": 1}, batch)
    assert l_micro == pytest.approx(l_full, rel=1e-4)
    for a, b in zip(g_micro, g_full):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_checkpointing_on_vs_off_same_gradient():
    model, _ = qlora.build_lean(TINY, rank=8, dropout=0.0)
    batch = random_batch(model.config.vocab_size, 2, 32, seed=4)
    _, g_on = _grads_after(model, {}, batch)
    model.get_base_model().gradient_checkpointing_disable()
    assert not checkpointing_enabled(model)
    _, g_off = _grads_after(model, {}, batch)
    for a, b in zip(g_on, g_off):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("reentrant", [True, False])
def test_reentrant_checkpointing_needs_input_grads(reentrant):
    """Without an input that requires grad, reentrant checkpointing gives the adapters no gradient; non-reentrant does.

    (transformers' gradient_checkpointing_enable installs enable_input_require_grads itself; we remove it.)
    """
    model = qlora.load_4bit(TINY)
    for p in model.parameters():
        p.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.disable_input_require_grads()
    model = apply_lora(model, r=4, dropout=0.0)
    batch = random_batch(model.config.vocab_size, 1, 16)
    if reentrant:
        with warnings.catch_warnings(), pytest.raises(RuntimeError, match="does not require grad"):
            warnings.simplefilter("ignore")  # torch: "None of the inputs have requires_grad=True"
            model(**batch).loss.backward()  # nothing inside the checkpoints is connected to the loss
        model.get_base_model().enable_input_require_grads()
    model(**batch).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


def test_qlora_step_report_cpu_lean_beats_default_with_micro_batches(live_bytes):
    base = live_bytes()  # tensors earlier tests left alive count in both peaks: compare what the runs add
    lean = qlora.qlora_step_report(TINY, batch=4, seq=128, device="cpu", recipe="lean", micro_batch=1)
    default = qlora.qlora_step_report(TINY, batch=4, seq=128, device="cpu", recipe="default")
    assert lean.extra["checkpointing_active"] and default.extra["checkpointing_active"]
    assert lean.extra["optimizer"] == "AdamW8bit" and default.extra["optimizer"] == "AdamW"
    assert lean.peak_allocated_bytes - base < 0.75 * (default.peak_allocated_bytes - base)
    with pytest.raises(ValueError, match="recipe"):
        qlora.qlora_step_report(TINY, device="cpu", recipe="fast")


def test_cli_prints_one_json_line_per_batch(capsys):
    import json
    qlora.main(["--model", TINY, "--device", "cpu", "--batch", "1", "2", "--seq", "32", "--micro-batch", "1"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [x["batch"] for x in lines] == [1, 2]
    assert all(x["peak_allocated_bytes"] > x["weight_bytes"] and x["checkpointing_active"] for x in lines)
    assert all(0 < x["loss"] < 20 and x["recipe_config"]["micro_batches"] == x["batch"] for x in lines)


def test_no_technique_is_written_twice_here():
    """The capstone module builds from the technique modules; its old copies are gone."""
    for name in ("bnb_4bit_config", "enable_checkpointing", "apply_lora", "checkpointing_active", "make_optimizer",
                 "device_map", "weight_tensors"):
        assert not hasattr(qlora, name), name
    # the transitional aliases are gone too: the byte counts live in quantization, the step in accumulation
    for name in ("weight_bytes", "optimizer_state_bytes", "paged_state_bytes", "make_train_step"):
        assert not hasattr(qlora, name), name


def test_default_stack_extrapolation_from_anchors():
    rows = {r["name"]: r for r in qlora.load_anchors()["rows"]}
    b1 = rows["7b qlora-r16(qkvo) ckpt adamw dq=True B1 S512"]["peak_steady_GiB"]
    b4 = rows["7b qlora-r16(qkvo) ckpt adamw dq=True B4 S512"]["peak_steady_GiB"]
    assert qlora.default_stack_b8_bytes(batch=1) == pytest.approx(b1 * 1024**3)
    assert qlora.default_stack_b8_bytes() / 1024**3 == pytest.approx(b4 + 4 * (b4 - b1) / 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_7b_lean_recipe_fits_12gb_and_beats_default_gpu():
    rep = qlora.qlora_step_report("llama-7b", batch=8, seq=512, device="cuda", recipe="lean", micro_batch=2)
    assert rep.peak_reserved_bytes + rep.extra["paged_state_bytes"] + 2**29 <= 12 * 1024**3
    assert rep.peak_allocated_bytes <= 0.8 * qlora.default_stack_b8_bytes()
