"""The CPU profile is a scale model of the GPU shape: every ratio the labs show points the way the H200's does.

The H200 side is `.ci/gpu_results/h200-bench-gpt2.json` (`python -m memopt_lib.bench` on an H200, GPT-2 8 x 512,
same row names). The old CPU profile (the real GPT-2 at 2 x 128) measured checkpointing 1.00x, accumulation 1.07x,
LoRA 0.41x, 8-bit AdamW 0.68x: the peak sat in weights + gradients + AdamW state, and each lesson reversed.
"""
import json
from pathlib import Path

import pytest

from memopt_lib import models
from memopt_lib.profiles import CPU_SCALE, cpu_profile, pick_profile

H200_LADDER = {r["name"]: r for r in json.loads(
    (Path(__file__).parents[1] / ".ci/gpu_results/h200-bench-gpt2.json").read_text())}
LESSON_ROWS = ["checkpointing", "accumulation 4x", "LoRA r16", "8-bit AdamW"]


def test_cpu_gpt2_is_gpt2_scaled_by_a_quarter():
    prof = cpu_profile()
    full, narrow = models.model_config("gpt2"), models.model_config(prof.gpt2)
    assert narrow.n_layer == full.n_layer and narrow.n_embd // narrow.n_head == full.n_embd // full.n_head
    assert full.n_embd == CPU_SCALE * narrow.n_embd and full.vocab_size // CPU_SCALE == narrow.vocab_size
    m, b, s = prof.gpt2_stands_for
    assert (m, b) == ("gpt2", prof.gpt2_batch) and s == CPU_SCALE * prof.gpt2_seq  # a quarter of the tokens
    n_full = models.count_parameters(models.meta_model("gpt2"))
    n_narrow = models.count_parameters(models.meta_model(prof.gpt2))
    # static bytes scale by 1/16 (position embeddings scale by 1/4 only: +2 %)
    assert abs(n_narrow * prof.gpt2_scale_bytes / n_full - 1) < 0.03
    assert prof.shape("gpt2") == (prof.gpt2, prof.gpt2_batch, prof.gpt2_seq)
    assert prof.shape("llama-7b") == (prof.llama, prof.llama_batch, prof.llama_seq)
    with pytest.raises(ValueError, match="gpt2 or llama"):
        prof.shape("bert")


def test_pick_profile_on_this_cpu_is_the_scale_model(monkeypatch):
    monkeypatch.setenv("MEMOPT_PROFILE", "cpu")
    prof = pick_profile()
    assert prof.gpt2 == "gpt2-narrow" and "scale model" in prof.describe()


@pytest.mark.slow
def test_cpu_ladder_points_like_the_h200(tmp_path):
    """The bench's CPU ladder at the profile's shape: each lesson's ratio within 0.05 of the H200's, and the peak
    x 16 within 3 % of the H200's fp32 peak (activations the largest part, as on the GPU).

    In a fresh process: the tracker counts every live tensor, so models other tests leave alive (or that a log
    record's traceback pins: bitsandbytes logs its ImportError *object* on a CPU without `kernels`, and pytest's
    log capture keeps it) would count in every row.
    """
    import os
    import subprocess
    import sys
    from memopt_lib import bench
    prof = cpu_profile()
    args = bench.parse_args(["--device", "cpu", "--steps", "0", "--quiet"])
    assert (args.model, args.batch, args.seq) == prof.shape("gpt2")  # the bench takes its CPU shapes from here
    out = tmp_path / "ladder.json"
    env = {**os.environ, "MEMOPT_PROFILE": "cpu", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "memopt_lib.bench", "--device", "cpu", "--steps", "0", "--quiet",
                           "--rows", ",".join(LESSON_ROWS), "--json", str(out)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = {r["name"]: r for r in json.loads(out.read_text())}
    base = got["fp32 baseline"]
    assert base["status"] == "ok" and (base["model"], base["batch"], base["seq"]) == prof.shape("gpt2")
    gpu_peak = H200_LADDER["fp32 baseline"]["peak_allocated_bytes"]
    assert abs(base["peak_allocated_bytes"] * prof.gpt2_scale_bytes / gpu_peak - 1) < 0.03
    bd = base["breakdown_bytes"]
    assert max(bd, key=bd.get) == "activations", bd
    for name in LESSON_ROWS:
        cpu, gpu = got[name]["ratio"], H200_LADDER[name]["ratio"]
        assert cpu is not None and cpu < 1, (name, got[name]["status"], got[name]["reason"])
        assert abs(cpu - gpu) < 0.05, f"{name}: CPU {cpu:.2f}x, H200 {gpu:.2f}x"
