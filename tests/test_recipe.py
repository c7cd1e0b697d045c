"""The recipe composes the technique modules: validated configs, the same step as the plain path, the T4 choice."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from memopt_lib import mixed_precision, recipe as R
from memopt_lib.accumulation import count_target_tokens, full_batch_gradients, gradient_error
from memopt_lib.checkpointing import checkpointing_enabled
from memopt_lib.optimizer_in_backward import OptimizerInBackward
from memopt_lib.placement import HostEmbedding, Int8Head
from memopt_lib.text import padded_batch, random_batch

LENGTHS = [21, 6, 16, 30, 9, 12]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Capture(torch.optim.Optimizer):
    """Records the gradients it is asked to apply; applies nothing."""

    def __init__(self, params):
        super().__init__(list(params), {})
        self.grads, self.steps = {}, 0

    def step(self, closure=None):
        self.steps += 1
        self.grads = {id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                      if p.grad is not None}


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


@pytest.mark.parametrize("bad, fix", [
    (dict(precision="fp16"), "precision must be one of"),
    (dict(quantization="nf4-dq"), "set lora_rank"),
    (dict(quantization="nf4", lora_rank=8, precision="pure-bf16"), "use precision='amp'"),
    (dict(prepare="peft"), "set quantization"),
    (dict(micro_batches=0), "micro_batches must be"),
    (dict(optimizer="sgd"), "optimizer must be one of"),
    (dict(optimizer_in_backward=True, micro_batches=4), "use micro_batches=1"),
    (dict(embedding="8bit"), "set lora_rank > 0"),
    (dict(lm_head="host", lora_rank=4), "lm_head must be one of"),
    (dict(loss_chunk_tokens=0), "loss_chunk_tokens"),
    (dict(lr=0.0), "lr must be"),
    (dict(offload_activations="yes"), "offload_activations must be True or False"),
])
def test_invalid_recipes_say_the_fix(bad, fix):
    with pytest.raises(ValueError, match=fix):
        R.Recipe(**bad)


def test_named_recipes_are_plain_data():
    for rc in (R.FP32, R.QLORA_DEFAULT, R.QLORA_LEAN, R.MEMOPT_LLAMA, R.MEMOPT_GPT2):
        d = json.loads(json.dumps(rc.to_dict()))
        assert R.Recipe(**{**d, "lora_targets": tuple(d["lora_targets"]) if d["lora_targets"] else None}) == rc
    assert R.memopt_recipe("llama-7b") is R.MEMOPT_LLAMA and R.memopt_recipe("gpt2") is R.MEMOPT_GPT2
    assert R.QLORA_DEFAULT.prepare == "peft" and R.QLORA_DEFAULT.optimizer == "adamw"


def test_fp32_recipe_step_is_the_plain_step():
    """Same loss and same parameters after one step as the hand-written zero_grad/forward/backward/step."""
    c = R.compose(R.FP32.with_(lr=1e-3), "gpt2-tiny")
    _no_dropout(c.model)
    ref = copy.deepcopy(c.model)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    batch = random_batch(ref.config.vocab_size, 2, 16)
    loss = c.step(batch)
    opt.zero_grad()
    ref_loss = ref(**batch).loss
    ref_loss.backward()
    opt.step()
    assert loss == pytest.approx(ref_loss.item(), rel=1e-6)
    for a, b in zip(c.model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("changes", [dict(micro_batches=3), dict(micro_batches=6, chunked_loss=True,
                                                                  loss_chunk_tokens=13),
                                     dict(checkpointing=True, micro_batches=2),
                                     dict(offload_activations=True, checkpointing=True, micro_batches=2)])
def test_accumulated_step_gives_the_full_batch_gradient(changes):
    """Token-normalized: uneven padded micro-batches add up to the full batch's gradient and loss."""
    c = R.compose(R.FP32.with_(**changes), "gpt2-tiny")
    _no_dropout(c.model)
    batch = padded_batch(LENGTHS, c.model.config.vocab_size, seed=2)
    ref = full_batch_gradients(c.model, batch)
    full_loss = c.model(**batch).loss.item()
    names = {id(p): n for n, p in c.model.named_parameters()}
    c.optimizer = Capture(c.model.parameters())
    loss = c.step(batch)
    assert c.optimizer.steps == 1
    assert loss == pytest.approx(full_loss, rel=1e-5)
    assert gradient_error({names[i]: g for i, g in c.optimizer.grads.items()}, ref) < 1e-5
    assert c.last.n_target_tokens == count_target_tokens(batch["labels"])
    assert checkpointing_enabled(c.model) == changes.get("checkpointing", False)
    if changes.get("offload_activations"):  # the step's context offloaded the checkpointed blocks' inputs
        assert c.offload.stats.tensors_offloaded > 0 and c.offload.stats.to_device_bytes > 0
    else:
        assert c.offload is None


def test_chunked_loss_and_optimizer_in_backward_compose_to_the_plain_update():
    """Two new techniques on, one off: the parameters after two steps are the plain recipe's."""
    plain = R.compose(R.FP32.with_(lr=1e-3), "gpt2-tiny")
    lean = R.compose(R.FP32.with_(lr=1e-3, chunked_loss=True, optimizer_in_backward=True, loss_chunk_tokens=8),
                     "gpt2-tiny")
    _no_dropout(plain.model)
    lean.model.load_state_dict(_no_dropout(lean.model).state_dict() | plain.model.state_dict())
    assert isinstance(lean.optimizer, OptimizerInBackward)
    start = {n: p.detach().clone() for n, p in plain.model.named_parameters()}
    for s in range(2):
        batch = random_batch(plain.model.config.vocab_size, 2, 16, seed=s)
        assert lean.step(batch) == pytest.approx(plain.step(batch), rel=1e-5)
    # AdamW divides by sqrt(v): where a gradient is ~0, fp32 summation noise changes the update's sign, so
    # compare the updates as vectors: the same direction and size, up to that noise
    for (n, a), (_, b) in zip(plain.model.named_parameters(), lean.model.named_parameters()):
        da, db = a.detach() - start[n], b.detach() - start[n]
        assert float((da - db).norm() / da.norm()) < 2e-2, n


def test_memopt_llama_recipe_composes_every_piece_and_trains():
    c = R.compose(R.MEMOPT_LLAMA, "llama-tiny", "cpu")
    hf = c.model.get_base_model()
    assert isinstance(hf.get_input_embeddings(), HostEmbedding) and isinstance(hf.get_output_embeddings(), Int8Head)
    assert isinstance(c.optimizer, OptimizerInBackward) and checkpointing_enabled(c.model)
    assert {type(o).__name__ for o in c.optimizer.optimizers.values()} == {"AdamW8bit"}
    assert all("lora_" in n for n, p in c.model.named_parameters() if p.requires_grad)
    assert c.precision.mode == "fp32"  # "auto" on a CPU
    batch = random_batch(c.model.config.vocab_size, 2, 32)
    before = {n: p.detach().clone() for n, p in c.model.named_parameters() if "lora_B" in n}
    loss = c.step(batch)
    assert 0 < loss < 20
    moved = [n for n, p in c.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert len(moved) == len(before)  # every adapter was updated inside backward


def _simulate_t4(monkeypatch):
    """Compute capability 7.5 everywhere the package asks (mixed_precision's one seam, and torch.cuda)."""
    monkeypatch.setattr(mixed_precision, "capability_of", lambda device: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4 (simulated)")


def test_t4_capstone_recipe_uses_fp16_autocast_and_an_enabled_grad_scaler(monkeypatch):
    """The capstone's lean recipe on a (simulated) T4: fp16 compute, fp16 autocast, GradScaler enabled.

    Runs on the CPU: torch's CPU autocast supports fp16 and GradScaler('cpu') unscales, so the same code path
    as on a T4 runs here (bitsandbytes' CPU kernels dequantize to fp16).
    """
    _simulate_t4(monkeypatch)
    prec = R.resolve_precision(R.QLORA_LEAN, "cpu")
    assert (prec.mode, prec.dtype, prec.needs_scaler) == ("amp", torch.float16, True)
    with pytest.raises(ValueError, match="no native bf16"):
        R.resolve_precision(R.QLORA_LEAN.with_(precision="pure-bf16", quantization="", lora_rank=0), "cpu")
    c = R.compose(R.QLORA_LEAN.with_(micro_batches=2), "llama-tiny", "cpu")
    assert c.scaler.is_enabled()
    import bitsandbytes as bnb
    assert {m.compute_dtype for m in c.model.modules() if isinstance(m, bnb.nn.Linear4bit)} == {torch.float16}
    seen = []
    q = next(m for n, m in c.model.named_modules() if n.endswith("q_proj.base_layer"))
    q.register_forward_hook(lambda m, i, o: seen.append((torch.is_autocast_enabled("cpu"), o.dtype)))
    loss = c.step(random_batch(c.model.config.vocab_size, 4, 32))
    assert seen and set(seen) == {(True, torch.float16)}
    assert 0 < loss < 20 and c.scaler.get_scale() > 1.0  # the scaler scaled the loss and stepped
    with pytest.raises(ValueError, match="optimizer_in_backward=False"):
        R.compose(R.MEMOPT_LLAMA, "llama-tiny", "cpu")


def test_compose_rejects_what_is_not_a_recipe():
    with pytest.raises(TypeError, match="Recipe"):
        R.compose({"precision": "amp"}, "gpt2-tiny")
    with pytest.raises(ValueError, match="micro_batch"):
        R.micro_batches_for(8, 0)
    assert R.micro_batches_for(5, 2) == 3 and R.micro_batches_for(8, None) == 1
