"""CPU offloading: on-vs-off equivalence, device residency by measurement, bytes moved, and the wrong answers
lab 08's checks must reject."""
import contextlib
import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch

from memopt_lib import offload
from memopt_lib.checkpointing import checkpoint_blocks
from memopt_lib.models import load_model
from memopt_lib.offload import OffloadStats, TradeRow, device_peaks, host_memory, model_roots, to_host, verdict
from memopt_lib.offload_activations import (OffloadActivations, offload_activations, pack_to_host, save_on_cpu,
                                            saved_tensor_bytes, unpack_to_device)
from memopt_lib.offload_optimizer import (HostOffloadOptimizer, deepspeed_available, host_offload_optimizer,
                                          predict_offload_bytes, zero_offload_config)
from memopt_lib.offload_paged import PAGED_MIN_NUMEL, predict_paged_bytes, paged_state_plan, paged_tensors
from memopt_lib.offload_params import frozen_weights_saved, offload_frozen_base, plan_device_map, remove_offload
from memopt_lib.text import random_batch

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    return load_model("gpt2-tiny", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


@pytest.fixture(scope="module")
def batch(tiny):
    return random_batch(tiny.config.vocab_size, 2, 64, seed=3)


def _grads(model, batch, ctx=contextlib.nullcontext):
    model.zero_grad(set_to_none=True)
    with ctx():
        loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _resident(model, batch, ctx=contextlib.nullcontext):
    box = {}

    def fwd():
        with ctx():
            box["loss"] = model(**batch).loss

    end = device_peaks(fwd, CPU, model_roots(model))["end_bytes"]
    box["loss"].backward()
    model.zero_grad(set_to_none=True)
    return end - sum(p.numel() * p.element_size() for p in model.parameters())


# ---------------------------------------------------------------- host memory accounting

def test_host_copies_are_not_device_memory_on_cpu():
    x = torch.randn(1000)
    def make():
        make.keep = to_host(x)

    assert device_peaks(make, CPU)["end_bytes"] == 0  # made in host_memory: not counted
    assert make.keep.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()  # a real copy
    torch.testing.assert_close(make.keep, x)

    def device_copy():
        device_copy.keep = x.clone()

    assert device_peaks(device_copy, CPU)["end_bytes"] == 4000
    assert x.cpu() is x  # why save_on_cpu moves nothing on a CPU


def test_offload_stats_and_verdict():
    st = OffloadStats()
    st.add_host(10)
    st.add_host(5)
    st.host_live_bytes -= 10
    st.to_host_bytes, st.to_device_bytes = 7, 3
    assert st.host_peak_bytes == 15 and st.moved_bytes == 10
    st.reset_counters()
    assert st.moved_bytes == 0 and st.host_peak_bytes == 5
    a = TradeRow("a", "cpu", 100, 50, 90, 10, 1.0, 0, 0, 1.0)
    b = TradeRow("b", "cpu", 60, 20, 60, 10, 1.5, 80, 40, 1.0)
    v = verdict(a, b)
    assert v["peak_saving"] == pytest.approx(0.4) and v["slowdown"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="baseline"):
        verdict(TradeRow("z", "cpu", 0, 0, 0, 0, 0.0, 0, 0, 0.0), b)


def test_gpu_results_absent_or_malformed(tmp_path):
    assert offload.gpu_results(tmp_path / "none.json") is None
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"device": "x"}))
    with pytest.raises(ValueError, match="rows"):
        offload.gpu_results(bad)


# ---------------------------------------------------------------- activations

@pytest.mark.parametrize("make", ["hooks", "library", "save_on_cpu"])
def test_activation_offloading_keeps_gradients_identical(tiny, batch, make):
    model = copy.deepcopy(tiny)
    ctx = {"hooks": lambda: torch.autograd.graph.saved_tensors_hooks(pack_to_host, unpack_to_device),
           "library": lambda: OffloadActivations(model=model),
           "save_on_cpu": save_on_cpu}[make]
    l0, g0 = _grads(model, batch)
    l1, g1 = _grads(model, batch, ctx)
    assert l0 == l1
    for n in g0:
        assert torch.equal(g0[n], g1[n]), n


def test_offloading_with_checkpointing_gives_the_same_gradients_and_moves_only_block_inputs(tiny, batch):
    plain, ck = copy.deepcopy(tiny), checkpoint_blocks(copy.deepcopy(tiny))
    off = OffloadActivations(model=ck)
    l0, g0 = _grads(plain, batch)
    l1, g1 = _grads(ck, batch, lambda: off)
    assert l0 == l1 and all(torch.equal(g0[n], g1[n]) for n in g0)
    full = OffloadActivations(model=plain)
    _grads(plain, batch, lambda: full)
    assert off.stats.to_host_bytes < 0.8 * full.stats.to_host_bytes
    rows, seq = batch["input_ids"].shape
    block_input = rows * seq * tiny.config.n_embd * 4
    # each checkpointed block saves its input; the rest is saved outside the blocks (final norm, head, loss)
    assert off.stats.to_host_bytes >= tiny.config.n_layer * block_input
    assert off.stats.to_device_bytes == off.stats.to_host_bytes


def test_offloading_lowers_device_residency_and_save_on_cpu_does_not_on_cpu(tiny, batch):
    model = copy.deepcopy(tiny)
    base = _resident(model, batch)
    off = OffloadActivations(model=model)
    assert _resident(model, batch, lambda: off) < 0.05 * base
    assert _resident(model, batch, lambda: torch.autograd.graph.saved_tensors_hooks(pack_to_host,
                                                                                   unpack_to_device)) < 0.05 * base
    assert _resident(model, batch, save_on_cpu) == base  # t.cpu() is t on a CPU
    assert off.stats.to_host_bytes == off.stats.to_device_bytes > 0
    assert off.stats.host_live_bytes == 0  # the graph is gone: host copies freed
    assert off.stats.host_peak_bytes == off.stats.to_host_bytes


def test_offload_activations_skips_weights_and_small_tensors(tiny, batch):
    model = copy.deepcopy(tiny)
    everything = OffloadActivations(min_offload_bytes=0)
    _grads(model, batch, lambda: everything)
    lean = OffloadActivations(model=model, min_offload_bytes=1 << 20)
    _grads(model, batch, lambda: lean)
    assert lean.stats.tensors_offloaded < everything.stats.tensors_offloaded
    assert saved_tensor_bytes(lambda: model(**batch).loss)["saved_tensors"] == (
        everything.stats.tensors_offloaded + everything.stats.tensors_kept)


def test_offload_activations_validates_and_null_context():
    with pytest.raises(ValueError, match="max_fwd_stash"):
        OffloadActivations(max_fwd_stash=0)
    with pytest.raises(ValueError, match="min_offload_bytes"):
        OffloadActivations(min_offload_bytes=-1)
    assert isinstance(offload_activations(False), contextlib.nullcontext)
    assert isinstance(save_on_cpu(False), contextlib.nullcontext)


def test_retain_graph_backward_twice_works(tiny, batch):
    model = copy.deepcopy(tiny)
    with OffloadActivations(model=model):
        loss = model(**batch).loss
    loss.backward(retain_graph=True)
    g1 = {n: p.grad.clone() for n, p in model.named_parameters()}
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * g1[n])


# ---------------------------------------------------------------- optimizer state

@pytest.mark.parametrize("offload_gradients", [False, True])
def test_host_optimizer_matches_adamw(tiny, batch, offload_gradients):
    a, b = copy.deepcopy(tiny), copy.deepcopy(tiny)
    oa = torch.optim.AdamW(a.parameters(), lr=2e-3, weight_decay=0.01)
    ob = HostOffloadOptimizer(b.parameters(), torch.optim.AdamW, lr=2e-3, weight_decay=0.01,
                              offload_gradients=offload_gradients)
    for _ in range(3):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m(**batch).loss.backward()
            o.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    n = sum(p.numel() for p in b.parameters())
    assert ob.stats.to_host_bytes == ob.stats.to_device_bytes == 3 * 4 * n


def test_host_optimizer_gradient_accumulation_sums_on_the_host(tiny, batch):
    a, b = copy.deepcopy(tiny), copy.deepcopy(tiny)
    oa = torch.optim.AdamW(a.parameters(), lr=1e-3)
    ob = HostOffloadOptimizer(b.parameters(), torch.optim.AdamW, lr=1e-3, offload_gradients=True)
    for m, o in ((a, oa), (b, ob)):
        o.zero_grad()
        for _ in range(2):
            m(**batch).loss.backward()
        o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_host_optimizer_keeps_no_state_and_no_gradients_on_the_device(tiny, batch):
    n = sum(p.numel() for p in tiny.parameters())
    ends = {}
    for label, make in (("device", lambda ps: torch.optim.AdamW(ps, lr=1e-3)),
                        ("host", lambda ps: HostOffloadOptimizer(ps, torch.optim.AdamW, lr=1e-3,
                                                                 offload_gradients=True))):
        model = copy.deepcopy(tiny)

        def first_step():
            first_step.opt = make(list(model.parameters()))
            model(**batch).loss.backward()
            first_step.opt.step()

        ends[label] = device_peaks(first_step, CPU, model_roots(model))["end_bytes"]
    weights = 4 * n
    # gradients went to the host, the state was made there (a few scalars of the step may remain)
    assert weights <= ends["host"] <= weights + 16 * 1024
    assert ends["device"] >= weights + 4 * n + 8 * n  # weights, gradients, exp_avg, exp_avg_sq


def test_host_optimizer_errors_and_torchao_fallback(tiny):
    with pytest.raises(ValueError, match="no trainable"):
        HostOffloadOptimizer([torch.nn.Parameter(torch.ones(2), requires_grad=False)])
    with pytest.raises(TypeError, match="optimizer_class"):
        HostOffloadOptimizer(copy.deepcopy(tiny).parameters(), "adamw")
    opt, name = host_offload_optimizer(copy.deepcopy(tiny).parameters(), torch.optim.AdamW, lr=1e-3)
    assert isinstance(opt, HostOffloadOptimizer) and name.startswith("memopt")  # torchao: CUDA & XPU only


def test_predict_offload_bytes():
    assert predict_offload_bytes(10, offload=False) == {"device_bytes": 160, "host_bytes": 0, "moved_bytes": 0}
    assert predict_offload_bytes(10, offload=True) == {"device_bytes": 80, "host_bytes": 160, "moved_bytes": 80}
    assert predict_offload_bytes(10, offload=True, offload_gradients=True)["device_bytes"] == 40
    with pytest.raises(ValueError):
        predict_offload_bytes(-1, offload=True)


def test_zero_offload_config():
    cfg = zero_offload_config(micro_batch=4, lr=3e-4)
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["optimizer"]["type"] == "AdamW" and cfg["train_micro_batch_size_per_gpu"] == 4
    with pytest.raises(ValueError, match="micro_batch"):
        zero_offload_config(micro_batch=0)


@pytest.mark.slow
@pytest.mark.skipif(deepspeed_available() is not None, reason="deepspeed not installed")
def test_deepspeed_zero_offload_trains_like_adamw():
    """DeepSpeed's engine, ZeRO-2, optimizer on the CPU (DeepSpeedCPUAdam), one process: AdamW's trajectory.

    The first run on a machine compiles the CPU Adam op (about 1.5 minutes on 2 cores)."""
    out = subprocess.run([sys.executable, "-m", "memopt_lib.offload_optimizer", "--steps", "3"],
                         capture_output=True, text=True, timeout=900)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert lines, out.stderr[-2000:]
    res = json.loads(lines[-1])
    assert "DeepSpeedCPUAdam" in res["optimizer"] and "ZeroOptimizer" in res["optimizer"]
    assert res["deepspeed_losses"][0] == pytest.approx(res["adamw_losses"][0], rel=1e-6)
    for d, a in zip(res["deepspeed_losses"], res["adamw_losses"]):
        assert d == pytest.approx(a, rel=1e-3)
    assert res["update_rel_diff"] < 0.05
    assert res["estimate"]["offload_device_bytes"] == 2 * res["estimate"]["params"]


# ---------------------------------------------------------------- parameters

def _lora(tiny):
    import peft
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_fc"],
                          fan_in_fan_out=True)
    return peft.get_peft_model(copy.deepcopy(tiny), cfg)


def test_offload_frozen_base_same_loss_counts_bytes_and_undoes(tiny, batch):
    plain = _lora(tiny)
    off = _lora(tiny)
    off.load_state_dict(plain.state_dict())
    offload_frozen_base(off, CPU, min_bytes=1)
    offloaded = off._memopt_offloaded
    assert offloaded and not any("lora_" in n for n in offloaded)
    assert not any("wte" in n for n in offloaded)  # tied to lm_head: stays
    l0, g0 = _grads(plain, batch)
    l1, g1 = _grads(off, batch)
    assert l0 == pytest.approx(l1, rel=1e-6)
    for n in g0:
        if "lora_" in n:
            torch.testing.assert_close(g0[n], g1[n], rtol=1e-5, atol=1e-7)
    st = off._memopt_offload_stats
    frozen = sum(p.numel() * p.element_size() for name in offloaded
                 for p in plain.get_submodule(name).parameters(recurse=False))
    assert st.to_device_bytes == st.host_peak_bytes == frozen  # each offloaded weight once per forward
    remove_offload(off)
    assert not hasattr(off, "_memopt_offloaded")
    assert _grads(off, batch)[0] == pytest.approx(l0, rel=1e-6)


def test_offload_frozen_base_needs_a_frozen_module(tiny):
    with pytest.raises(ValueError, match="freeze"):
        offload_frozen_base(copy.deepcopy(tiny), CPU)


def test_frozen_weights_are_saved_for_backward_under_lora(tiny, batch):
    model = _lora(tiny)
    saved = frozen_weights_saved(model, lambda: model(**batch).loss)
    assert 0 < saved["saved_frozen_bytes"] <= saved["frozen_bytes"]
    # frozen everything (no adapter): no input requires grad, no frozen weight is saved
    frozen = copy.deepcopy(tiny).requires_grad_(False)
    with torch.enable_grad():
        assert frozen_weights_saved(frozen, lambda: frozen(**batch).logits)["saved_frozen_bytes"] == 0


def test_plan_device_map_puts_what_does_not_fit_on_the_host():
    from memopt_lib.models import meta_model
    m = meta_model("gpt2")
    total = sum(p.numel() for p in m.parameters()) * 2
    plan = plan_device_map(m, {0: "100MiB", "cpu": "10GiB"})
    assert set(plan["device_map"].values()) == {"0", "cpu"}
    assert plan["bytes_per_device"]["0"] <= 100 * 2**20
    assert plan["moved_per_forward_bytes"] == plan["bytes_per_device"]["cpu"]
    assert sum(plan["bytes_per_device"].values()) == total  # every weight once (wte and lm_head are tied)
    roomy = plan_device_map(m, {0: "10GiB", "cpu": "10GiB"})
    assert roomy["moved_per_forward_bytes"] == 0
    with pytest.raises(ValueError, match="max_memory"):
        plan_device_map(m, {})


# ---------------------------------------------------------------- paged

def test_paged_threshold_and_the_7b_lora_matrix():
    assert PAGED_MIN_NUMEL == 100_000
    assert predict_paged_bytes([(16, 4096), (4096, 16)]) == 0  # 65,536 elements each
    assert predict_paged_bytes([(100_000,)], 32) == 800_000
    assert predict_paged_bytes([(99_999,), (100_000,)], 8) == 200_000
    with pytest.raises(ValueError):
        predict_paged_bytes([(1,)], 16)
    params = [torch.nn.Parameter(torch.zeros(16, 4096)), torch.nn.Parameter(torch.zeros(400, 250))]
    plan = paged_state_plan(params)
    assert plan["paged_tensors"] == 1 and plan["paged_bytes"] == 100_000 * 8


def test_bnb_paged_optimizer_source_threshold_and_cpu_fallback():
    import inspect

    import bitsandbytes as bnb
    src = inspect.getsource(bnb.optim.optimizer.Optimizer8bit.get_state_buffer)
    assert "p.numel() < 1e5" in src  # the threshold memopt's PAGED_MIN_NUMEL mirrors
    p = torch.nn.Parameter(torch.randn(400, 300))
    opt = bnb.optim.PagedAdamW([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert paged_tensors(opt)["paged_tensors"] == 0  # measured: nothing paged on a CPU
    assert any("not supported on CPU" in str(w.message) for w in caught)


# ---------------------------------------------------------------- the checks reject wrong answers

def _ns(**over):
    from memopt_lib.checks import registry
    ns = registry("08").reference_namespace()
    ns.update(over)
    return ns


def _run(ns, only):
    from memopt_lib.checks import CheckContext, registry, run_checks
    return run_checks(registry("08"), ns, CheckContext.here(seed=7), only=[only])[0]


@pytest.mark.slow
def test_check_rejects_hooks_that_move_nothing():
    res = _run(_ns(pack_to_host=lambda t: (t.device, t.cpu())), "moves_activations")
    assert res.status == "failed" and "to_host" in res.message


@pytest.mark.slow
def test_check_rejects_hooks_that_change_values():
    def scaled(packed):  # a restore that is off by 0.1 %
        device, t = packed
        t = t if device is None else t.to(device, copy=True)
        return t * 1.001 if t.is_floating_point() and not isinstance(t, torch.nn.Parameter) else t
    res = _run(_ns(unpack_to_device=scaled), "same_gradients")
    assert res.status == "failed" and "gradients differ" in res.message


@pytest.mark.slow
def test_check_rejects_adamw_on_the_device_and_a_wrong_update():
    res = _run(_ns(HostAdamW=lambda params, lr=1e-3, weight_decay=0.01: torch.optim.AdamW(
        params, lr=lr, weight_decay=weight_decay)), "host_optimizer")
    assert res.status == "failed" and "on the device" in res.message

    def no_decay(params, lr=1e-3, weight_decay=0.01):
        return HostOffloadOptimizer(params, torch.optim.AdamW, lr=lr, weight_decay=0.0)
    res = _run(_ns(HostAdamW=no_decay), "host_optimizer")
    assert res.status == "failed" and "differ" in res.message


def test_check_rejects_wrong_arithmetic():
    res = _run(_ns(predict_paged_bytes=lambda shapes, bits=32: 2 * sum(torch.Size(s).numel() for s in shapes)
                   * (4 if bits == 32 else 1)), "paged")
    assert res.status == "failed" and "100,000" in res.message
    res = _run(_ns(predict_offload_bytes=lambda n, offload, offload_gradients=False: {
        "device_bytes": 8 * n if offload else 16 * n, "host_bytes": 8 * n if offload else 0,
        "moved_bytes": 8 * n if offload else 0}), "prediction")
    assert res.status == "failed" and "expected" in res.message


@pytest.mark.skipif(deepspeed_available() is not None, reason="deepspeed not installed")
def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    import os
    import time

    import torch.utils.cpp_extension as ext

    from memopt_lib.offload_optimizer import clear_stale_build_lock
    monkeypatch.setattr(ext, "_get_build_directory", lambda name, verbose=False: str(tmp_path))
    lock = tmp_path / "lock"
    lock.write_text("")
    assert clear_stale_build_lock() is False and lock.exists()  # a build may be running now
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert clear_stale_build_lock() is True and not lock.exists()
    assert clear_stale_build_lock() is False  # nothing left to remove
