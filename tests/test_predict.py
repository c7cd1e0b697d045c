"""The GPU-peak predictor: allocator rules, CUDA's kernel choices on meta tensors, and the H200 anchors."""
import json

import pytest
import torch
import torch.nn.functional as F

from memopt_lib.predict import CachingAllocator, gpu, predict_ladder, predict_step
from memopt_lib.predict.allocator import LARGE_BUFFER, SMALL_BUFFER, round_size, segment_size
from memopt_lib.predict.cuda_semantics import CudaSemantics, cuda_autocast

MiB = 1 << 20


# ------------------------------------------------------------------ allocator
def test_rounding_and_segment_sizes():
    assert round_size(1) == 512 and round_size(512) == 512 and round_size(513) == 1024
    assert segment_size(MiB) == SMALL_BUFFER            # small pool: 2 MiB segments
    assert segment_size(MiB + 512) == LARGE_BUFFER      # 1-10 MiB: a 20 MiB segment, split
    assert segment_size(11 * MiB) == 12 * MiB           # >= 10 MiB: rounded up to 2 MiB


def test_split_merge_and_reuse():
    a = CachingAllocator()
    hs = [a.malloc(3 * MiB) for _ in range(6)]           # six 3 MiB blocks share one 20 MiB segment
    assert a.reserved_bytes == LARGE_BUFFER and a.allocated_bytes == 18 * MiB
    for h in hs[::2]:
        a.free(h)
    big = a.malloc(6 * MiB)                              # no free 6 MiB hole: a second segment
    assert a.reserved_bytes == 2 * LARGE_BUFFER and a.block_size(big) == 6 * MiB
    for h in hs[1::2] + [big]:
        a.free(h)
    assert a.allocated_bytes == 0 and a.peak_allocated_bytes == 18 * MiB
    assert [s for s, _, _ in a._free[False]] == [LARGE_BUFFER, LARGE_BUFFER]  # neighbours merged back
    a.empty_cache()
    assert a.reserved_bytes == 0


def test_unsplit_remainder_counts_as_allocated():
    a = CachingAllocator()
    h = a.malloc(19 * MiB + 512 * 1024)                  # < 10 MiB? no: rounded segment of 20 MiB exactly
    a.free(h)
    h2 = a.malloc(19 * MiB)                              # 1 MiB left: not > 1 MiB, the whole block is used
    assert a.block_size(h2) == 20 * MiB and a.allocated_bytes == 20 * MiB


# ------------------------------------------------------------------ GPUs
def test_gpus():
    assert not gpu("t4").native_bf16 and gpu("a100").native_bf16
    assert gpu("h200").cublas_workspace_bytes == 32 * MiB
    assert gpu("T4").cublas_workspace_bytes == 8 * MiB + 128 * 1024
    with pytest.raises(KeyError, match="choose one of"):
        gpu("rtx9090")


# ------------------------------------------------------------------ CUDA semantics on meta
def _attn_inputs(dtype):
    q = torch.empty(2, 4, 128, 64, device="meta", dtype=dtype, requires_grad=True)
    return q, q * 1, q * 1


@pytest.mark.parametrize("name,dtype,backend", [("h200", torch.bfloat16, "flash"), ("h200", torch.float32, "efficient"),
                                                ("t4", torch.float16, "efficient"), ("t4", torch.bfloat16, "math")])
def test_sdpa_backend_keeps_no_attention_matrix(name, dtype, backend):
    saved = []
    sem = CudaSemantics(gpu(name))
    q, k, v = _attn_inputs(dtype)
    with sem, torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True)
    assert sem.sdpa_backends == {backend: 1}
    biggest = max(t.numel() for t in saved)
    if backend == "math":  # no bf16 kernel before sm80: the math path keeps the probabilities
        assert biggest == 2 * 4 * 128 * 128
    else:
        assert biggest < 128 * 128 * 8, "no B x H x S x S tensor may be saved"


def test_dropout_saves_a_bool_mask_and_autocast_caches_trainable_weights():
    sem = CudaSemantics(gpu("h200"))
    w = torch.nn.Parameter(torch.empty(64, 64, device="meta"))
    frozen = torch.empty(64, 64, device="meta")
    x = torch.empty(8, 64, device="meta", requires_grad=True)
    saved = []
    with sem, torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        F.dropout(x, 0.1, True)
        assert saved[-1].dtype == torch.bool                           # CUDA's native_dropout mask
        with cuda_autocast(torch.bfloat16):
            y1, y2 = F.linear(x, w), F.linear(x, w)
            f1, f2 = F.linear(x, frozen), F.linear(x, frozen)
            assert y1.dtype == torch.bfloat16 and torch.pow(y1, 2).dtype == torch.float32
    w_copies = {t.untyped_storage()._cdata for t in saved if t.shape == (64, 64) and t.dtype == torch.bfloat16}
    assert len(w_copies) == 1 + 2, "one cached copy of the trainable weight, a fresh copy per use of the frozen one"


# ------------------------------------------------------------------ the step
def test_predict_step_small_and_errors():
    p = predict_step("h200", "gpt2-tiny", 2, 64, "autocast", steps=2)
    bd = p["breakdown_bytes"]
    assert p["predicted"] and p["peak_allocated_bytes"] >= sum(v for k, v in bd.items() if k != "workspaces")
    assert p["peak_reserved_bytes"] >= p["peak_allocated_bytes"]
    assert bd["workspaces"] == 2 * 32 * MiB            # forward thread + autograd's device thread
    assert p["sdpa_backends"] == {"flash": 4}           # 2 layers x 2 steps
    assert p["state_bytes"]["optimizer"] == 2 * p["state_bytes"]["weights"]
    with pytest.raises(KeyError, match="rows"):
        predict_step("h200", "gpt2-tiny", 2, 64, "no such row")
    with pytest.raises(ValueError, match="batch"):
        predict_step("h200", "gpt2-tiny", 0, 64)
    with pytest.raises(ValueError, match="positions"):
        predict_step("h200", "gpt2", 1, 4096)


def test_qlora_4bit_storage_and_lora():
    """NF4 storage: n/2 bytes per weight + absmax per 64 (fp32, or uint8 + fp32 per 256 with double quant)."""
    from memopt_lib.models import meta_model
    base = meta_model("llama-tiny")
    lin = [m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    n = sum(m.weight.numel() for m in lin)
    dq = predict_step("h200", "llama-tiny", 2, 64, "QLoRA nf4+dq + ckpt", steps=2)
    plain = predict_step("h200", "llama-tiny", 2, 64, "QLoRA nf4 (no dq) + ckpt", steps=2)
    # prepare_model_for_kbit_training upcasts everything that is not 4-bit to fp32; LoRA r16 on q,k,v,o (fp32)
    others = sum(p.numel() for name, p in base.named_parameters() if not any(
        name.startswith(f"model.layers.{i}.{k}") for i in range(4) for k in ("self_attn", "mlp")))
    lora = dq["trainable_params"]
    assert lora == 4 * 4 * 16 * (256 + 256)
    buffers = sum(b.numel() * 4 for b in base.buffers())  # rotary inv_freq (fp32)
    assert dq["state_bytes"]["weights"] == n // 2 + 4 * others + 4 * lora + buffers  # absmax is no parameter
    assert dq["state_bytes"]["optimizer"] == 2 * 4 * lora
    extra = plain["peak_allocated_bytes"] - dq["peak_allocated_bytes"]
    assert extra > 0 and abs(extra - n // 64 * 3) < 0.02 * n / 64 * 3 + 64 * 512  # fp32 vs uint8 absmax


def test_adamw8bit_standin_state_and_paging():
    """bnb: uint8 states + fp32 absmax per 256 for tensors >= 4096 values; paged only from 1e5 values."""
    from memopt_lib.predict.bnb4bit import AdamW8bitStandIn
    from memopt_lib.predict.replay import AllocatorReplay
    big, lora, bias = (torch.nn.Parameter(torch.empty(*s, device="meta")) for s in ((512, 512), (16, 4096), (100,)))
    for p in (big, lora, bias):
        p.grad = torch.empty_like(p)
    grown = {}
    for paged in (False, True):
        replay = AllocatorReplay(gpu("h200"))
        with replay:
            before = replay.alloc.allocated_bytes
            opt = AdamW8bitStandIn([big, lora, bias], paged=paged, replay=replay)
            opt.step()
            grown[paged] = replay.alloc.allocated_bytes - before
        assert opt.state[big]["state1"].dtype == torch.uint8 and opt.state[bias]["state1"].dtype == torch.float32
        assert opt.state[big]["absmax1"].numel() == 512 * 512 // 256
    # absmax (2 x 1024 + 2 x 256 floats), qmaps (2 x 256 floats), bias states (2 x 100 floats): 512-byte blocks
    small = 2 * 4096 + 2 * 1024 + 2 * 1024 + 2 * 512
    assert grown[False] == 2 * 512 * 512 + 2 * 16 * 4096 + small
    assert grown[True] == 2 * 16 * 4096 + small  # the 512 x 512 tensor's states are paged: not allocator memory


def test_ladder_rows_match_the_bench():
    from memopt_lib.bench import LADDER
    rows = predict_ladder("t4", "gpt2-tiny", 4, 256, ["checkpointing"])
    assert [r["name"] for r in rows] == [LADDER[0].name, "checkpointing"]
    assert all(r["predicted"] and r["device"] == "predicted:t4" and r["status"] == "ok" for r in rows)
    assert rows[0]["ratio"] == 1.0 and rows[1]["ratio"] <= 1.0  # tiny: the two cuBLAS workspaces dominate
    assert rows[1]["breakdown_bytes"]["activations"] < 0.7 * rows[0]["breakdown_bytes"]["activations"]


def test_cli_json(tmp_path, capsys):
    from memopt_lib.predict.ladder import main
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    assert main(["--gpu", "a100", "--model", "gpt2-tiny", "--batch", "2", "--seq", "32", "--rows", "LoRA r16",
                 "--json", str(out), "--plot", str(png)]) == 0
    assert png.stat().st_size > 1000
    assert "(predicted)" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert {"name", "peak_allocated_bytes", "peak_reserved_bytes", "breakdown_bytes", "flags"} <= set(rows[0])
    assert rows[1]["trainable_params"] < rows[0]["trainable_params"]
    with pytest.raises(SystemExit):
        main(["--gpu", "a100", "--model", "gpt2-tiny", "--rows", "no such row"])


# ------------------------------------------------------------------ the H200 anchors
@pytest.mark.slow
def test_every_h200_measurement_within_5_percent_never_2_under():
    from memopt_lib.predict.anchors import compare
    bad = []
    results = compare()
    assert len(results) >= 29  # 16 anchors, 11 bench rows, 2 foundation QLoRA runs
    for r in results:
        for what, lo, hi in (("steady", -0.02, 0.05), ("step1", -0.02, 0.05), ("reserved", -0.10, 0.10)):
            if what in r:
                e = r[what]["rel_error"]
                if not (lo <= e <= hi):
                    bad.append(f"{r['name']} [{what}]: predicted {r[what]['predicted_bytes'] / 2**30:.3f} GiB, "
                               f"measured {r[what]['measured_bytes'] / 2**30:.3f} GiB ({e:+.1%})")
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------ techniques the recipe adds, against analytic bytes
def _p(model, batch, seq, rc, **kw):
    from memopt_lib.bench import Row
    return predict_step("h200", model, batch, seq, Row(rc.name, rc), steps=2, **kw)


@pytest.fixture(scope="module")
def gpt2_b4():
    """gpt2-tiny (vocab 8192) at 4 x 256, fp32: the logits (32 MiB a copy) dominate the peak."""
    from memopt_lib.recipe import FP32
    return {"base": _p("gpt2-tiny", 4, 256, FP32),
            "chunked": _p("gpt2-tiny", 4, 256, FP32.with_(name="c", chunked_loss=True, loss_chunk_tokens=256)),
            "offload": _p("gpt2-tiny", 4, 256, FP32.with_(name="o", offload_activations=True))}


def test_chunked_loss_removes_the_full_logits(gpt2_b4):
    """The plain loss holds log_softmax's output, its gradient and the logits' gradient (3 copies of N x V fp32)
    at its peak; the chunked one holds at most those of one chunk (256 of the 1024 tokens: 0.75 of a copy)."""
    logits = 4 * 256 * 8192 * 4
    removed = gpt2_b4["base"]["peak_allocated_bytes"] - gpt2_b4["chunked"]["peak_allocated_bytes"]
    assert 2.0 * logits <= removed <= 3.0 * logits, removed / logits
    # the price: the lm_head matmul again in backward (2 N H V FLOPs), nothing else
    extra = gpt2_b4["chunked"]["flops"] - gpt2_b4["base"]["flops"]
    assert extra == pytest.approx(2 * 4 * 256 * 128 * 8192, rel=0.02)
    assert gpt2_b4["base"]["flops_by_dtype"] == {"float32": gpt2_b4["base"]["flops"]}  # fp32 recipe: fp32 kernels


def test_activation_offloading_moves_what_a_cpu_run_moves(gpt2_b4):
    """The predictor's offloaded bytes = what OffloadActivations moves in a real CPU step of the same recipe."""
    from memopt_lib.recipe import FP32, compose
    from memopt_lib.text import random_batch
    rc = FP32.with_(name="o", offload_activations=True)
    c = compose(rc, "gpt2-tiny", "cpu")
    c.step(random_batch(c.model.config.vocab_size, 2, 64))
    cpu = c.offload.stats.to_host_bytes
    pred = _p("gpt2-tiny", 2, 64, rc)["host_transfer_breakdown"]
    assert cpu > 0 and pred["activations_to_host"] == pytest.approx(cpu, rel=0.01)
    assert 0 < pred["activations_to_device"] < pred["activations_to_host"]  # the stash's tensors come back free
    off, base = gpt2_b4["offload"], gpt2_b4["base"]
    assert off["breakdown_bytes"]["activations"] < 0.7 * base["breakdown_bytes"]["activations"]
    assert off["peak_allocated_bytes"] < base["peak_allocated_bytes"] and base["host_transfer_bytes"] == 0


def test_optimizer_in_backward_keeps_one_gradient():
    """GPT-2 at 1 x 32 (the peak is the optimizer step): a plain step holds every gradient there; stepping in
    backward frees each one as it is applied: at most two are alive -- the tied embedding's (its two contributions
    are summed before its hook runs) and the one being stepped."""
    from memopt_lib.models import meta_model
    from memopt_lib.recipe import FP32
    sizes = [round_size(p.numel() * 4) for p in meta_model("gpt2").parameters()]
    base, oib = _p("gpt2", 1, 32, FP32), _p("gpt2", 1, 32, FP32.with_(name="o", optimizer_in_backward=True))
    assert base["breakdown_bytes"]["gradients"] >= sum(sizes)
    two = sorted(sizes)[-1] + sorted(sizes)[-2]
    assert oib["breakdown_bytes"]["gradients"] <= two
    assert base["peak_allocated_bytes"] - oib["peak_allocated_bytes"] >= sum(sizes) - two


def test_vocab_placement_and_lean_preparation_bytes():
    """llama-tiny (vocab 8192 x hidden 256, untied): each placement changes the device weights by its bytes."""
    from memopt_lib.models import meta_model
    from memopt_lib.recipe import QLORA_DEFAULT, QLORA_LEAN
    V, H, B, S = 8192, 256, 2, 64
    base = meta_model("llama-tiny")
    not_4bit = sum(p.numel() for n, p in base.named_parameters() if ".self_attn." not in n and ".mlp." not in n)
    w = {k: _p("llama-tiny", B, S, rc)["state_bytes"]["weights"] for k, rc in {
        "default": QLORA_DEFAULT, "lean": QLORA_LEAN, "bf16": QLORA_DEFAULT.with_(embedding="bf16", lm_head="bf16"),
        "8bit": QLORA_LEAN.with_(lm_head="8bit")}.items()}
    host = _p("llama-tiny", B, S, QLORA_LEAN.with_(embedding="host"))
    assert w["default"] - w["bf16"] == 2 * V * H * 2               # fp32 (peft's upcast) -> bf16, both matrices
    assert w["default"] - w["lean"] == 2 * not_4bit                # lean keeps bf16: no upcast of anything
    assert w["lean"] - w["8bit"] == V * H * 2 - (V * H + 4 * V)    # int8 codes + one fp32 scale per row
    assert w["lean"] - host["state_bytes"]["weights"] == V * H * 2  # host tensors are not GPU memory
    lean_peak = _p("llama-tiny", B, S, QLORA_LEAN)["peak_allocated_bytes"]
    assert lean_peak - host["peak_allocated_bytes"] == pytest.approx(V * H * 2, rel=0.01)
    assert host["host_transfer_breakdown"]["embedding"] == B * S * 8 + B * S * H * 2  # ids down, rows up


def test_a_recipe_the_gpu_cannot_run_is_listed_with_the_reason():
    """A T4 has no bf16: memopt's GPT-2 recipe would need fp16 + a GradScaler, which stepping in backward cannot use."""
    rows = predict_ladder("t4", "gpt2-tiny", 2, 32, ["memopt recipe"])
    assert rows[1]["status"] == "skipped" and "optimizer_in_backward=False" in rows[1]["reason"]


def test_goals_table_predicted_and_committed(tmp_path, monkeypatch):
    """The goals command: every run predicted twice (default, memopt), verdicts from the numbers, marked predicted."""
    from memopt_lib.predict import goals
    committed = json.loads((goals.Path(__file__).resolve().parents[1] / ".ci/predictions/goals-h200.json").read_text())
    assert committed["predicted"] and committed["command"].startswith("python -m memopt_lib.predict goals")
    assert [(r["run"], r["model"], r["batch"], r["seq"], r["goal_GiB"]) for r in committed["rows"]] == \
        [tuple(g) for g in goals.GOALS]
    b1 = committed["rows"][0]
    assert b1["measured_default_GiB"] == pytest.approx(5.043, abs=0.01)  # the H200 anchor of the default at B1
    monkeypatch.setattr(goals, "GOALS", [("tiny", "llama-tiny", 2, 64, 0.05)])
    out = tmp_path / "g.json"
    assert goals.main(["--gpu", "a100", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    r = doc["rows"][0]
    assert doc["predicted"] and "--gpu a100" in doc["command"] and r["default"]["recipe"] == "QLoRA default"
    assert r["memopt"]["peak_allocated_GiB"] < r["default"]["peak_allocated_GiB"]
    assert r["meets_memory_goal"] == (r["memopt"]["peak_allocated_GiB"] <= 0.05)
    assert r["flop_time_ratio"] == pytest.approx(r["memopt"]["flops"] / r["default"]["flops"]) and r["flop_time_ratio"] > 1
    assert r["memopt"]["host_transfer_bytes"] > 0  # memopt's recipe keeps the embedding on the host


def test_flops_count_forward_backward_and_recompute():
    """gpt2-tiny (L=2, H=128, V=8192) at 2 x 64: per token and layer 24 H^2 multiply-adds x 2 in the linears,
    4 B S^2 H in attention; backward = 2 x forward for matmuls, 10 B S^2 H for attention; the tied lm_head
    2 N H V; checkpointing adds one more forward of the blocks."""
    B, S, H, L, V = 2, 64, 128, 2, 8192
    N = B * S
    base, ckpt = (predict_step("h200", "gpt2-tiny", B, S, r, steps=2) for r in ("fp32 baseline", "checkpointing"))
    assert base["flops"] == 3 * (L * 24 * N * H * H + 2 * N * H * V) + L * (4 + 10) * B * S * S * H
    assert ckpt["flops"] - base["flops"] == L * (24 * N * H * H + 4 * B * S * S * H)
