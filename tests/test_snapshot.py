"""Memory snapshots on a CPU (torch.profiler) in memory_viz's format, and the peak read from them."""
import pickle
import random

import torch

from memopt_lib.models import load_model
from memopt_lib.profiler import train_step_fn
from memopt_lib.profiler.snapshot import largest_at_peak, record_snapshot, synthetic_snapshot, write_snapshot
from memopt_lib.text import random_batch


def _make_big():
    return torch.ones(10_000_000)           # 40 MB: the largest block, made in this function


def _work():
    a = torch.ones(1_000_000)               # 4 MB
    b = _make_big()
    c = a + 1
    del b
    return c


def test_cpu_snapshot_finds_the_largest_block_and_its_frame(tmp_path):
    snap = record_snapshot(_work, "cpu")
    ans = largest_at_peak(snap)
    assert ans["size"] == 40_000_000 and "_make_big" in ans["frame"]
    # a and b at least (the profiler's timeline may not tie every op output to a tensor: c can be missing)
    assert 44_000_000 <= ans["peak_bytes"] <= 49_000_000 and ans["alive"] >= 2
    paths = write_snapshot(snap, tmp_path / "work.pickle")
    with open(paths["pickle"], "rb") as f:
        assert pickle.load(f)["device_traces"]
    assert "Active Memory Timeline" in (tmp_path / "work.html").read_text()


def test_cpu_snapshot_of_a_training_step_names_its_largest_allocation():
    model = load_model("gpt2-tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = train_step_fn(model, random_batch(model.config.vocab_size, 2, 32, seed=0), opt)
    step()
    ans = largest_at_peak(record_snapshot(step, "cpu"))
    # gpt2-tiny's largest tensor is its 8192 x 128 token embedding: its gradient (or AdamW state) in fp32
    assert ans["size"] == 8192 * 128 * 4 and ans["frame"]


def test_largest_at_peak_on_a_hand_made_trace():
    def ev(action, addr, size, name):
        return {"action": action, "addr": addr, "size": size, "stream": 0, "frames": [{"name": name}]}
    trace = [ev("alloc", 1, 100, "a"), ev("alloc", 2, 300, "b"), ev("free_requested", 2, 300, "b"),
             ev("alloc", 3, 50, "c"),                      # 450 live: b is only *requested* free
             ev("free_completed", 2, 300, "b"), ev("alloc", 2, 200, "d"), ev("alloc", 4, 90, "e")]
    assert largest_at_peak({"device_traces": [trace]}) == {"peak_bytes": 450, "size": 300, "frame": "b", "alive": 3}


def test_synthetic_snapshots_are_well_formed_and_vary():
    a = synthetic_snapshot(random.Random(1))
    b = synthetic_snapshot(random.Random(2))
    assert a != b
    for snap in (a, b):
        live = set()
        for e in snap["device_traces"][0]:
            if e["action"] == "alloc":
                assert e["addr"] not in live
                live.add(e["addr"])
            elif e["action"] == "free_completed":
                live.remove(e["addr"])
        assert largest_at_peak(snap)["peak_bytes"] > 0
