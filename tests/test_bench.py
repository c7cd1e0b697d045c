"""The benchmark ladder CLI: runs, writes a well-formed JSON and a PNG, never drops a row, rejects bad arguments."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memopt_lib import bench, recipe

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "memopt_lib.bench", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    js, png = out / "rows.json", out / "ladder.png"
    proc = _cli("--device", "cpu", "--model", "gpt2-tiny", "--batch", "4", "--seq", "16", "--steps", "1",
                "--rows", "pure bf16,checkpointing,8-bit AdamW,accumulation 4x,chunked cross-entropy,optimizer in backward,"
                "activation offloading,memopt recipe", "--cpu-bf16", "--json", str(js), "--plot", str(png))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(js.read_text()), png


def test_cli_prints_a_table(ladder):
    proc, rows, _ = ladder
    assert "fp32 baseline" in proc.stdout and "peak alloc" in proc.stdout
    for r in rows:
        assert r["name"] in proc.stdout


def test_json_schema_and_baseline_first(ladder):
    _, rows, _ = ladder
    assert isinstance(rows, list) and len(rows) == 9
    assert rows[0]["name"] == bench.BASELINE.name and rows[0]["ratio"] == 1.0
    for r in rows:
        assert {"name", "peak_allocated_bytes", "step_time_s", "device", "status", "reason", "ratio"} <= set(r)
        assert r["device"] == "cpu" and r["status"] == "ok", r
        assert isinstance(r["peak_allocated_bytes"], int) and r["peak_allocated_bytes"] > 0
        assert r["step_time_s"] > 0
        assert sum(r["breakdown_bytes"].values()) == r["peak_allocated_bytes"]
        assert isinstance(r["loss"], float) and 0 < r["loss"] < 20  # the measured step's loss, every row
        assert r["flags"] == bench.row_recipe(r["name"], "gpt2-tiny").to_dict()


def test_ratios_are_consistent_with_bytes(ladder):
    _, rows, _ = ladder
    base = rows[0]["peak_allocated_bytes"]
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        assert r["ratio"] == pytest.approx(r["peak_allocated_bytes"] / base)
    # the techniques do what they claim, measured: bf16 halves the persistent state, 8-bit shrinks the optimizer
    assert by_name["pure bf16"]["ratio"] < 0.7
    assert by_name["8-bit AdamW"]["breakdown_bytes"]["optimizer"] < 0.3 * rows[0]["breakdown_bytes"]["optimizer"]
    assert by_name["optimizer in backward"]["breakdown_bytes"]["gradients"] < 0.5 * rows[0]["breakdown_bytes"]["gradients"]
    assert by_name["memopt recipe"]["ratio"] < by_name["checkpointing"]["ratio"]
    # offloaded activations wait in host memory, which the CPU tracker does not count as device memory
    off = by_name["activation offloading"]
    assert off["breakdown_bytes"]["activations"] < 0.5 * rows[0]["breakdown_bytes"]["activations"], off


def test_rows_are_recipes_and_nothing_is_built_here():
    assert bench.row_recipe("memopt recipe", "gpt2") is recipe.MEMOPT_GPT2
    assert bench.row_recipe("MEMOPT RECIPE", "llama-7b") is recipe.MEMOPT_LLAMA
    assert bench.row_recipe("QLoRA default", "llama-7b") is recipe.QLORA_DEFAULT
    names = [r.name for r in bench.rows_for("llama-7b")]
    assert len(names) == len(set(names)) and names[0] == "fp32 baseline"
    with pytest.raises(KeyError, match="rows"):
        bench.row_recipe("QLoRA default", "gpt2")
    for gone in ("_build", "_step_fn", "LORA_TARGETS"):
        assert not hasattr(bench, gone), gone


def test_plot_is_a_png(ladder):
    _, _, png = ladder
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args", [["--batch", "0"], ["--model", "gpt5"], ["--steps", "-1"], ["--seq", "x"],
                                  ["--model", "gpt2", "--rows", "QLoRA nf4+dq + ckpt"]])
def test_bad_arguments_exit_2(args):
    proc = _cli("--device", "cpu", *args, timeout=120)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr and "error:" in proc.stderr


def test_rows_that_cannot_run_are_reported_not_dropped(tmp_path):
    js = tmp_path / "rows.json"
    assert bench.main(["--device", "cpu", "--model", "llama-tiny", "--batch", "1", "--seq", "8", "--steps", "0",
                       "--rows", "accumulation 4x,QLoRA nf4+dq + ckpt + paged 8-bit AdamW", "--json", str(js), "--quiet"]) == 0
    rows = json.loads(js.read_text())
    assert [r["name"] for r in rows] == ["fp32 baseline", "accumulation 4x", "QLoRA nf4+dq + ckpt + paged 8-bit AdamW"]
    assert rows[1]["status"] == "skipped" and "--batch" in rows[1]["reason"]
    assert rows[2]["status"] == "skipped" and "CUDA" in rows[2]["reason"]
    assert rows[1]["peak_allocated_bytes"] is None and rows[1]["ratio"] is None


def test_a_7b_row_that_does_not_fit_is_skipped_with_the_prediction():
    class Args:
        model, batch, seq, steps, cpu_bf16 = "llama-7b", 8, 512, 0, False
        device = torch.device("cpu")
    out = bench.run_row(bench.BASELINE, Args())  # fp32 7B full fine-tuning: > 100 GiB predicted
    assert out["status"] == "skipped" and "predicted" in out["reason"]
    assert out["predicted_bytes"] > 100 * 1024**3


def test_qlora_row_runs_on_cpu(tmp_path):
    """bitsandbytes' CPU kernels: a 4-bit base + LoRA + checkpointing trains on CPU (llama-tiny)."""
    js = tmp_path / "q.json"
    assert bench.main(["--device", "cpu", "--model", "llama-tiny", "--batch", "2", "--seq", "32", "--steps", "0",
                       "--rows", "qlora nf4+dq no ckpt,QLoRA default,memopt recipe,QLoRA lean + vocab placement",
                       "--json", str(js), "--quiet"]) == 0
    rows = json.loads(js.read_text())  # in the ladder's order
    placed = next(r for r in rows if r["name"] == "QLoRA lean + vocab placement")
    assert placed["status"] == "skipped" and "CUDA" in placed["reason"]  # the lean stack's paged AdamW
    for q in (r for r in rows[1:] if r is not placed):
        assert q["status"] == "ok", q["reason"]
        assert q["trainable_params"] < 0.2 * rows[0]["trainable_params"]
        assert q["ratio"] < 1.0 and 0 < q["loss"] < 20
    by_name = {r["name"]: r for r in rows}
    assert by_name["QLoRA default"]["flags"]["prepare"] == "peft"
    # memopt's recipe beats the default stack on the same shapes (CPU: fp32 compute, tracker peaks)
    assert by_name["memopt recipe"]["peak_allocated_bytes"] < by_name["QLoRA default"]["peak_allocated_bytes"]


def test_predict_flag_prints_the_same_ladder_marked_predicted(tmp_path, capsys):
    """`python -m memopt_lib.bench --predict GPU` runs nothing: the bench's rows, predicted for that GPU."""
    import json

    from memopt_lib import bench
    out = tmp_path / "pred.json"
    assert bench.main(["--predict", "t4", "--rows", "checkpointing", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {(r["model"], r["batch"], r["seq"]) for r in rows} == {("gpt2", 8, 512)}  # the course's GPU shape
    assert [r["name"] for r in rows] == [bench.BASELINE.name, "checkpointing"]
    assert all(r["predicted"] and r["device"] == "predicted:t4" for r in rows)
    assert rows[1]["peak_allocated_bytes"] < 0.6 * rows[0]["peak_allocated_bytes"]  # at 8 x 512 it halves the peak
    assert "PREDICTED" in capsys.readouterr().out
