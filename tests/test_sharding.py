"""Sharding: the per-rank arithmetic (against the ZeRO paper and DeepSpeed's estimators), real ranks
(FSDP2 on 2 gloo processes: per-rank bytes and the one-process loss curve), the rank runner's errors,
and the wrong answers lab 10's checks must reject."""
import math
import os
import re
import time

import pytest
import torch

from memopt_lib import sharding
from memopt_lib.sharding import (deepspeed_gpu_bytes, fsdp2_local_numel, fsdp2_padded_numel, gpu_total, largest_layer_of, llama_shape,
                                 min_gpus, per_rank_bytes, reduction_factor)

P7 = 6_738_415_616


def test_zero_paper_figure_1():
    """7.5B parameters, 64 GPUs, mixed precision Adam (K=12): 120 / 31.4 / 16.6 / 1.9 GB per GPU."""
    got = {s: gpu_total(7.5e9, s, 64, recipe_name="bf16-mixed") / 1e9 for s in sharding.STRATEGIES}
    assert got["ddp"] == pytest.approx(120.0)
    assert got["zero1"] == pytest.approx(31.4, abs=0.05)
    assert got["zero2"] == pytest.approx(16.6, abs=0.05)
    assert got["zero3"] == pytest.approx(1.9, abs=0.05)


def test_fp32_split_and_reduction_factors():
    out = per_rank_bytes(1000, "zero2", 4)["gpu"]
    assert out == {"weights": 4000, "gradients": 1000, "optimizer": 2000, "gathered": 0}
    assert reduction_factor("zero3", 8) == pytest.approx(8)
    assert reduction_factor("ddp", 8) == 1
    # ZeRO-1 in fp32 shards only the moments: 16 / (8 + 8/N)
    assert reduction_factor("zero1", 4) == pytest.approx(16 / 10)
    # FSDP2's bf16 policy keeps fp32 shards: the same bytes at rest as fp32
    assert gpu_total(10**6, "zero3", 2, recipe_name="fsdp2-bf16") == gpu_total(10**6, "zero3", 2)


def test_offload_moves_states_to_the_host():
    out = per_rank_bytes(10**6, "zero3", 2, recipe_name="deepspeed-bf16", offload="params", largest_unit_params=100)
    assert out["gpu"] == {"weights": 0, "gradients": 0, "optimizer": 0, "gathered": 400}
    assert sum(out["cpu"].values()) == 18 * 10**6 / 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(strategy="fsdp"), "FSDP2 full sharding is 'zero3'"),
    (dict(offload="gpu"), "offload must be one of"),
    (dict(strategy="zero2", offload="params"), "only ZeRO-3"),
    (dict(world_size=0), "number of ranks"),
])
def test_bad_inputs_say_the_fix(kwargs, match):
    args = dict(n_params=10, strategy="zero3", world_size=2) | kwargs
    with pytest.raises(ValueError, match=match):
        per_rank_bytes(args.pop("n_params"), args.pop("strategy"), args.pop("world_size"), **args)
    with pytest.raises(ValueError, match="unknown recipe"):
        per_rank_bytes(10, "ddp", 1, recipe_name="fp8")


def test_fsdp2_padding():
    assert fsdp2_padded_numel((50257, 768), 2) == 25129 * 768
    assert fsdp2_padded_numel((768,), 8) == 96
    assert fsdp2_padded_numel((3,), 4) == 1  # 3 rows over 4 ranks: one row each, the last rank padding only
    assert fsdp2_padded_numel((), 2) == 1
    assert [fsdp2_local_numel((4097, 64), 2, r) for r in (0, 1)] == [2049 * 64, 2048 * 64]
    assert [fsdp2_local_numel((3,), 4, r) for r in range(4)] == [1, 1, 1, 0]


def test_min_gpus_is_the_smallest_that_fits():
    cap = 80e9
    assert min_gpus(P7, "ddp", cap) is None  # replicates 16 bytes per parameter: no N helps
    n = min_gpus(P7, "zero3", cap, largest_unit_params=10**8, reserve_bytes=2e9)
    kw = dict(recipe_name="bf16-mixed", largest_unit_params=10**8)
    assert gpu_total(P7, "zero3", n, **kw) + 2e9 <= cap < gpu_total(P7, "zero3", n - 1, **kw) + 2e9
    assert min_gpus(P7, "zero3", 16e9) > min_gpus(P7, "zero3", cap)


@pytest.mark.slow
def test_llama_shapes_and_largest_layer():
    from memopt_lib.models import count_parameters, meta_model
    shape7 = llama_shape("llama-7b")
    assert shape7.n_params == P7
    assert largest_layer_of(shape7) == sharding.largest_layer_params(meta_model("llama-7b")) == 32000 * 4096
    assert llama_shape("llama-70b").n_params == pytest.approx(69.0e9, rel=0.01)  # Llama-2-70B: 68.98B
    gpt2 = meta_model("gpt2")
    assert sharding.largest_layer_params(gpt2) == 50257 * 768 and count_parameters(gpt2) == 124_439_808


# ------------------------------------------------------------------ DeepSpeed's estimators

DS_CASES = [(P7, 32000 * 4096, n) for n in (1, 2, 8, 64)] + [(124_439_808, 50257 * 768, n) for n in (1, 2, 8)]


@pytest.mark.parametrize("n_params,largest,n_gpus", DS_CASES)
def test_kit_equals_deepspeed_estimators(n_params, largest, n_gpus):
    pytest.importorskip("deepspeed")
    ds = sharding.deepspeed_estimates(n_params, n_gpus, largest)
    for (stage, off), theirs in ds.items():
        ours = deepspeed_gpu_bytes(n_params, stage, n_gpus, offload=off, largest_layer=largest)
        assert abs(ours - theirs) <= 1, (stage, off, ours, theirs)  # DeepSpeed truncates to whole bytes


def test_deepspeed_all_cold_and_all_live_print_the_same(capsys):
    """The printed estimators (what users call) show the kit's numbers, for counts and for a live model."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import (estimate_zero3_model_states_mem_needs_all_cold,
                                               estimate_zero3_model_states_mem_needs_all_live, model_to_params)
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    def gpu_column(out, options):
        line = next(ln for ln in out.splitlines() if ln.rstrip().endswith(options))
        return float(re.findall(r"([\d.]+)GB", line)[1])

    estimate_zero2_model_states_mem_needs_all_cold(total_params=P7, num_gpus_per_node=8, num_nodes=1)
    out = capsys.readouterr().out
    assert gpu_column(out, "offload_optimizer=none") == round(deepspeed_gpu_bytes(P7, 2, 8) / 2**30, 2)
    estimate_zero3_model_states_mem_needs_all_cold(total_params=P7, largest_layer_params=32000 * 4096,
                                                   num_gpus_per_node=8, num_nodes=1)
    out = capsys.readouterr().out
    assert gpu_column(out, "offload_param=none, offload_optimizer=none, zero_init=1") == round(
        deepspeed_gpu_bytes(P7, 3, 8, largest_layer=32000 * 4096) / 2**30, 2)
    from memopt_lib.sharding_run import tiny_gpt2
    model = tiny_gpt2(vocab_size=5001)
    total, largest = model_to_params(model)
    assert (total, largest) == (sharding.count_unique_params(model), sharding.largest_layer_params(model))
    estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=2, num_nodes=1)
    assert "SW: Model with 1M total params" in capsys.readouterr().out


# ------------------------------------------------------------------ real ranks

@pytest.mark.slow
def test_fsdp2_ranks_hold_their_shard_and_train_like_one_process():
    from memopt_lib.sharding_run import fsdp2_predicted_state_bytes, run_strategy, tiny_gpt2
    shape = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=4097)  # odd vocab: FSDP2 pads the embedding
    run = dict(model=shape, rows=4, seq=32, steps=4, seed=3)
    one = run_strategy("single", 1, **run)[0]
    fsdp = run_strategy("fsdp2", 2, **run)
    ddp = run_strategy("ddp", 2, **run)
    model = tiny_gpt2(**shape)
    for r in fsdp:
        states = r["model_state_bytes"]
        assert states == fsdp2_predicted_state_bytes(model, 2, r["rank"])  # to the byte, padding included
        assert abs(sum(states.values()) / gpu_total(one["n_params"], "zero3", 2) - 1) < 0.05
        assert r["peak_bytes"] < ddp[r["rank"]]["peak_bytes"]
        torch.testing.assert_close(r["losses"], one["losses"], rtol=1e-5, atol=0)
    solo = run_strategy("fsdp2", 1, timed_calls=1, **run)[0]  # a group of one: nothing to divide by
    assert solo["model_state_bytes"] == fsdp2_predicted_state_bytes(model, 1, 0) and solo["step_time_s"] > 0
    for r in ddp:
        assert sum(r["model_state_bytes"].values()) == sum(one["model_state_bytes"].values())
        torch.testing.assert_close(r["losses"], one["losses"], rtol=1e-5, atol=0)


def _raises(rank, world, kind):
    if rank == 1:
        if kind == "value":
            raise ValueError("bad shape")
        if kind == "todo":
            raise NotImplementedError()
        if kind == "die":
            os._exit(3)
        if kind == "hang":
            time.sleep(60)
    return {"rank": rank}


@pytest.mark.slow
def test_run_ranks_reports_errors_and_never_hangs():
    from memopt_lib.sharding_run import RankError, run_ranks
    assert run_ranks(_raises, 2, args=("none",)) == [{"rank": 0}, {"rank": 1}]
    with pytest.raises(RankError, match=r"rank 1: ValueError: bad shape"):
        run_ranks(_raises, 2, args=("value",))
    with pytest.raises(NotImplementedError, match="rank 1"):
        run_ranks(_raises, 2, args=("todo",))
    with pytest.raises(RankError, match=r"rank 1 of 2 died \(exit code 3\)"):
        run_ranks(_raises, 2, args=("die",))
    t0 = time.monotonic()
    with pytest.raises(RankError, match=r"rank\(s\) \[1\] of 2 did not finish within 3 s"):
        run_ranks(_raises, 2, args=("hang",), timeout_s=3)
    assert time.monotonic() - t0 < 20
    if not torch.cuda.is_available():
        from memopt_lib.sharding_run import apply_fsdp2, tiny_gpt2
        with pytest.raises(ValueError, match="nccl"):
            run_ranks(_raises, 2, args=("none",), backend="nccl")
        with pytest.raises(ValueError, match="CUDA"):
            apply_fsdp2(tiny_gpt2(), offload=True)


# ------------------------------------------------------------------ the wrong answers lab 10's checks reject

def _no_shard(model, mixed_precision=False):
    return model


def _blocks_only(model, mixed_precision=False):
    from torch.distributed.fsdp import fully_shard
    for block in model.transformer.h:
        fully_shard(block)
    return model


def _ignores_mixed(model, mixed_precision=False):
    from memopt_lib.sharding_run import apply_fsdp2
    return apply_fsdp2(model)


def _bf16_shards(model, mixed_precision=False):
    from memopt_lib.sharding_run import apply_fsdp2
    return apply_fsdp2(model.to(torch.bfloat16) if mixed_precision else model)


def _keeps_a_copy(model, mixed_precision=False):
    from memopt_lib.sharding_run import apply_fsdp2
    full = [p.detach().clone() for p in model.parameters()]  # an unsharded replica kept beside the shards
    apply_fsdp2(model, mixed_precision=mixed_precision)
    for i, t in enumerate(full):
        model.register_buffer(f"full_{i}", t, persistent=False)
    return model


def _no_optimizer_step(model, optimizer, batch):
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.item()


def _mean_loss_of_other_rank(model, optimizer, batch):
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss.item() * 1.01


WRONG = [
    ("predict_per_rank_bytes", lambda n, s, w, mixed_precision=False: {"weights": 4 * n / w, "gradients": 4 * n / w,
                                                                       "optimizer": 8 * n / w},
     "per_rank_prediction", "Which states does"),
    ("shard_model", _no_shard, "sharded_step_cuts_model_states", "fully_shard every transformer block"),
    ("shard_model", _blocks_only, "sharded_step_cuts_model_states", "fully_shard every transformer block"),
    ("shard_model", _keeps_a_copy, "sharded_step_cuts_model_states", "keep no unsharded copy"),
    ("sharded_train_step", _no_optimizer_step, "sharded_step_cuts_model_states", "optimizer.step()"),
    ("sharded_train_step", _mean_loss_of_other_rank, "sharded_step_cuts_model_states", "return this rank's loss"),
    ("shard_model", _ignores_mixed, "mixed_precision_keeps_fp32_shards", "MixedPrecisionPolicy"),
    ("shard_model", _bf16_shards, "mixed_precision_keeps_fp32_shards", "16 P / N"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,wrong,check,hint", WRONG, ids=[f"{w[2]}-{i}" for i, w in enumerate(WRONG)])
def test_lab10_checks_reject_wrong_answers(name, wrong, check, hint):
    from memopt_lib.checks import CheckContext, registry, run_checks
    reg = registry("10")
    ns = {**reg.reference_namespace(), name: wrong}
    res = run_checks(reg, ns, CheckContext.here(seed=77), only=[check])[0]
    assert res.status == "failed" and res.score == 0, (res.status, res.message)
    assert hint in res.message, res.message
    assert not math.isnan(res.max_score)


def test_gpu_record_script_says_it_needs_a_gpu():
    import importlib.util
    from pathlib import Path
    if torch.cuda.is_available():
        pytest.skip("on a GPU the script runs for real: python .ci/gpu_sharding.py")
    path = Path(__file__).resolve().parent.parent / ".ci" / "gpu_sharding.py"
    spec = importlib.util.spec_from_file_location("gpu_sharding", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import sys
    argv, sys.argv = sys.argv, ["gpu_sharding.py"]
    try:
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            mod.main()
    finally:
        sys.argv = argv
