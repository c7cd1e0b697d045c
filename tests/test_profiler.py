"""The profiler against arithmetic (CPU), against itself (repeatability) and against CUDA (GPU)."""
import gc

import pytest
import torch

from memopt_lib.models import count_parameters, load_model
from memopt_lib.profiler import CATEGORIES, MemoryTracker, measure, train_step_fn
from memopt_lib.text import random_batch


def adamw_bytes(model):
    params = list(model.parameters())
    return 8 * sum(p.numel() for p in params) + 4 * len(params)


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    return load_model("gpt2")


def test_gpt2_state_equals_arithmetic_to_the_byte(gpt2):
    n = count_parameters(gpt2)
    assert n == 124_439_808
    batch = random_batch(gpt2.config.vocab_size, 1, 32)
    opt = torch.optim.AdamW(gpt2.parameters(), lr=1e-5)
    report = measure(train_step_fn(gpt2, batch, opt), model=gpt2, optimizer=opt, timeline=False)
    end = report.end_breakdown_bytes
    assert end["weights"] == 4 * n
    assert end["gradients"] == 4 * n
    assert end["optimizer"] == adamw_bytes(gpt2)
    assert sum(report.breakdown_bytes.values()) == report.peak_allocated_bytes
    assert report.peak_allocated_bytes >= 16 * n  # weights + grads + AdamW states all alive at once


def tiny_step(seed=0, opt_cls=torch.optim.AdamW):
    torch.manual_seed(seed)
    model = load_model("gpt2-tiny")
    opt = opt_cls(model.parameters(), lr=1e-3)
    batch = random_batch(model.config.vocab_size, 2, 32, seed=seed)
    return model, opt, batch


def test_repeatable_run_to_run():
    peaks = []
    for _ in range(3):
        model, opt, batch = tiny_step()
        r = measure(train_step_fn(model, batch, opt), model=model, optimizer=opt)
        peaks.append((r.peak_allocated_bytes, r.start_allocated_bytes, tuple(r.breakdown_bytes.values())))
        del model, opt
        gc.collect()
    assert peaks[0] == peaks[1] == peaks[2]


def test_categories_add_up_and_phases_are_found():
    model, opt, batch = tiny_step()
    r = measure(train_step_fn(model, batch, opt), model=model, optimizer=opt)
    assert set(CATEGORIES) <= set(r.breakdown_bytes)
    assert sum(r.breakdown_bytes.values()) == r.peak_allocated_bytes
    assert all(r.phase_peak_bytes[p] > 0 for p in ("forward", "backward", "optimizer"))
    assert {p.phase for p in r.timeline} == {"forward", "backward", "optimizer"}
    assert r.end_allocated_bytes == r.start_allocated_bytes  # steady state: nothing leaks between steps


def test_activations_are_what_autograd_saves():
    """Peak at the end of forward of a long chain: everything saved for backward is an activation."""
    x = torch.randn(256, 256, requires_grad=True)
    with MemoryTracker("cpu") as tr:
        y = x
        for _ in range(10):
            y = torch.tanh(y)  # tanh saves its output: 10 x 256 KiB
        del y
    r = tr.result()
    assert r.peak_breakdown_bytes["activations"] == 10 * 256 * 256 * 4
    assert r.end_bytes == r.start_bytes  # the graph died with y: the tracker's hook creates no reference cycle


def test_no_double_count_for_views_and_inplace():
    with MemoryTracker("cpu") as tr:
        a = torch.zeros(1000)
        v = a.view(10, 100)[2:5]
        a.add_(1)
        v.mul_(2)
    assert tr.result().peak_bytes - tr.result().start_bytes == 4000


def test_meta_device_counts_without_memory():
    from memopt_lib.models import meta_model
    m = meta_model("gpt2")
    with MemoryTracker("meta", model=m) as tr:
        x = torch.randint(0, 100, (2, 64), device="meta")
        m(input_ids=x, labels=x).loss.backward()
    r = tr.result()
    assert r.peak_breakdown_bytes["weights"] == 4 * count_parameters(m)
    assert r.peak_bytes > r.start_bytes


def test_other_devices_are_ignored():
    with MemoryTracker("meta") as tr:
        torch.ones(10_000)  # a CPU tensor
    assert tr.result().peak_bytes == tr.result().start_bytes


@pytest.mark.gpu
def test_tracker_agrees_with_cuda_allocator_within_3_percent():
    torch.manual_seed(0)
    model = load_model("gpt2").cuda()
    batch = random_batch(model.config.vocab_size, 8, 512, "cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    r = measure(train_step_fn(model, batch, opt), device="cuda", model=model, optimizer=opt, warmup=2)
    rel = abs(r.tracker_peak_bytes - r.peak_allocated_bytes) / r.peak_allocated_bytes
    print(f"allocator {r.peak_allocated_bytes:,} tracker {r.tracker_peak_bytes:,} rel {rel:.4f}")
    assert rel < 0.03


def test_long_calls_show_a_progress_bar_only_where_someone_watches(monkeypatch, capsys):
    import importlib
    import sys
    import types

    measure_mod = importlib.import_module("memopt_lib.profiler.measure")  # the module, not the function
    monkeypatch.delenv("MEMOPT_PROGRESS", raising=False)
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert measure_mod.progress(3, "x").disable  # pytest's stderr is no terminal, no kernel: no bar
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))  # as inside Jupyter
    assert not measure_mod.progress(3, "x").disable
    monkeypatch.setenv("MEMOPT_PROGRESS", "0")
    assert measure_mod.progress(3, "x").disable
    monkeypatch.delenv("MEMOPT_PROGRESS")
    monkeypatch.setattr(measure_mod, "PROGRESS_DELAY_S", 0.0)
    x = torch.ones(1000)
    measure_mod.measure(lambda: (x * 2).sum(), device="cpu", warmup=1, timed_calls=2, label="demo")
    err = capsys.readouterr().err
    assert "measuring demo" in err and "/4 " in err  # the bar counts warmup + measured + timed calls
