"""MemoryCallback in the Hugging Face Trainer (and TRL's SFTTrainer): a few real steps, the peak logged."""
import pytest
import torch

pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402

from memopt_lib.models import load_model  # noqa: E402
from memopt_lib.profiler import CATEGORIES  # noqa: E402
from memopt_lib.profiler.report import MiB  # noqa: E402
from memopt_lib.text import corpus_text, load_tokenizer, random_batch  # noqa: E402
from memopt_lib.trainer_callback import MemoryCallback  # noqa: E402


def _dataset(vocab, n=8, seq=32):
    b = random_batch(vocab, n, seq, seed=1)
    return [{"input_ids": b["input_ids"][i], "labels": b["input_ids"][i]} for i in range(n)]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, logging_steps=1,
                report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, learning_rate=1e-3)
    return TrainingArguments(**{**base, **kw})


def _param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_trainer_logs_each_steps_peak_and_its_breakdown(tmp_path):
    torch.manual_seed(0)
    model = load_model("gpt2-tiny")
    weights = _param_bytes(model) + sum(b.numel() * b.element_size() for b in model.buffers())
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(model.config.vocab_size))
    memory = MemoryCallback.attach(trainer)
    trainer.train()

    assert [r.step for r in memory.history] == [1, 2, 3]
    for r in memory.history:
        assert set(r.breakdown_bytes) == set(CATEGORIES) and r.source == "tracker"
        assert sum(r.breakdown_bytes.values()) == r.peak_allocated_bytes  # the parts add up to the peak
        assert r.breakdown_bytes["weights"] == weights
        assert r.breakdown_bytes["activations"] > 0 or r.breakdown_bytes["temporaries"] > 0
    steady = memory.history[-1]
    # from step 2 AdamW's two moments exist (plus a few bytes of step counters), and gradients at the peak
    assert 2 * _param_bytes(model) <= steady.breakdown_bytes["optimizer"] <= 2.01 * _param_bytes(model)
    if steady.peak_phase == "optimizer":  # the peak holds every gradient, or (early in backward) logits' grads
        assert steady.breakdown_bytes["gradients"] == _param_bytes(model)
    else:
        assert steady.peak_phase == "backward" and steady.breakdown_bytes["activations"] > 0
    assert steady.peak_allocated_bytes > memory.history[0].breakdown_bytes["optimizer"] + weights

    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all("mem_peak_MiB" in h and "mem_optimizer_MiB" in h for h in logged)
    assert logged[-1]["mem_peak_MiB"] == round(steady.peak_allocated_bytes / MiB, 1)
    assert "peak" in memory.table() and "optimizer" in memory.table()


def test_one_record_per_optimizer_step_with_accumulation_and_every_n(tmp_path):
    model = load_model("gpt2-tiny")
    memory = MemoryCallback(every_n_steps=2)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=4, gradient_accumulation_steps=2),
                      train_dataset=_dataset(model.config.vocab_size, n=16), callbacks=[memory])
    trainer.train()
    assert [r.step for r in memory.history] == [1, 3]
    # passed through callbacks=[...] it still reaches the logs of the steps it tracked
    logged = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert "mem_peak_MiB" in logged[1] and "mem_peak_MiB" in logged[3] and "mem_peak_MiB" not in logged[2]


def test_bad_every_n_steps_is_an_error():
    with pytest.raises(ValueError, match="every_n_steps"):
        MemoryCallback(every_n_steps=0)


def test_sft_trainer_logs_the_peak(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tok = load_tokenizer("gpt2-tiny")
    lines = [line for line in corpus_text().splitlines() if len(line) > 20][:16]
    ds = datasets.Dataset.from_dict({"text": lines})
    cfg = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, logging_steps=1,
                        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, max_length=32,
                        dataset_num_proc=None)
    model = load_model("gpt2-tiny")
    trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    memory = MemoryCallback.attach(trainer)
    trainer.train()
    assert [r.step for r in memory.history] == [1, 2]
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(h["mem_peak_MiB"] > 0 for h in logged)
    assert memory.peak.breakdown_bytes["optimizer"] >= 2 * _param_bytes(model)


@pytest.mark.gpu
def test_on_cuda_the_peak_is_the_allocators_and_breakdown_is_optional(tmp_path):
    model = load_model("gpt2-tiny").to("cuda")
    ds = _dataset(model.config.vocab_size)
    memory = MemoryCallback()
    Trainer(model=model, args=_args(tmp_path, use_cpu=False), train_dataset=ds, callbacks=[memory]).train()
    r = memory.history[-1]
    assert r.source == "cuda" and r.device.startswith("cuda")
    assert sum(r.breakdown_bytes.values()) == r.peak_allocated_bytes  # "unattributed" closes the gap
    assert r.breakdown_bytes["optimizer"] >= 2 * _param_bytes(model) and r.breakdown_bytes["weights"] > 0
    fast = MemoryCallback(breakdown=False)
    Trainer(model=model, args=_args(tmp_path, use_cpu=False), train_dataset=ds, callbacks=[fast]).train()
    assert fast.history and fast.history[-1].breakdown_bytes == {} and fast.history[-1].peak_allocated_bytes > 0


def test_a_step_that_raises_leaves_no_tracker_running_after_close(tmp_path):
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    model = load_model("gpt2-tiny")
    memory = MemoryCallback()
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(model.config.vocab_size),
                      callbacks=[memory])

    def boom(*a, **k):
        raise torch.OutOfMemoryError("simulated")
    trainer.compute_loss = boom
    with pytest.raises(torch.OutOfMemoryError):
        trainer.train()
    assert any(type(m).__name__ == "MemoryTracker" for m in _get_current_dispatch_mode_stack())
    memory.close()
    assert not any(type(m).__name__ == "MemoryTracker" for m in _get_current_dispatch_mode_stack())


def test_attach_shows_the_peak_on_the_terminal_progress_bar(tmp_path, capfd):
    model = load_model("gpt2-tiny")
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=2, disable_tqdm=False),
                      train_dataset=_dataset(model.config.vocab_size))
    memory = MemoryCallback.attach(trainer)
    assert trainer.callback_handler.callbacks[0] is memory  # first: every reporter sees the numbers
    trainer.train()
    shown = capfd.readouterr()
    import re
    assert re.search(r"(it/s|s/it), peak [\d.]+ (KiB|MiB|GiB)\]", shown.err), shown.err[-300:]  # the bar's postfix
    assert "'mem_peak_MiB'" in shown.out  # the logs the bar prints (tqdm.write goes to stdout)
