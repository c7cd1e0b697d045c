import pytest
import torch

from memopt_lib.checks.lab07_profiling_oom import oom_message  # noqa: F401 (kept for the message format)
from memopt_lib.oom import diagnose, live_bytes_per_step, max_batch_size, parse_oom_message, simulated_budget

GiB, MiB = 1024**3, 1024**2


def test_parse_a_cuda_style_message():
    info = parse_oom_message(oom_message(2 * GiB, 15 * GiB, 300 * MiB, 13 * GiB, 1 * GiB))
    assert info.tried_bytes == 2 * GiB and info.total_bytes == 15 * GiB and info.free_bytes == 300 * MiB
    assert info.allocated_bytes == 13 * GiB and info.reserved_unallocated_bytes == GiB
    assert info.non_pytorch_bytes == 0


def test_diagnose_fragmentation_before_working_set():
    frag = parse_oom_message(oom_message(512 * MiB, 15 * GiB, 50 * MiB, 12 * GiB, 2 * GiB))
    assert diagnose(frag)[0].startswith("fragmentation") and "expandable_segments" in diagnose(frag)[0]
    full = parse_oom_message(oom_message(2 * GiB, 15 * GiB, 50 * MiB, 14 * GiB, 100 * MiB))
    assert diagnose(full)[0].startswith("the working set")


def test_simulated_budget_raises_a_real_oom_error_with_a_parsable_message(live_bytes):
    x = torch.randn(1024, 1024)  # 4 MiB already live
    live = live_bytes()          # x, and whatever earlier tests left alive: a budget counts everything
    with pytest.raises(torch.OutOfMemoryError) as err:
        with simulated_budget(live + 2 * MiB):
            y = x * 2  # 4 more MiB: over the budget
    info = parse_oom_message(str(err.value))
    assert info.tried_bytes == 4 * MiB and abs(info.total_bytes - (live + 2 * MiB)) <= 0.01 * info.total_bytes
    with simulated_budget(live + 64 * MiB):
        y = x * 2
    assert y.shape == x.shape


def test_max_batch_size_is_exact_and_cheap():
    for answer in (1, 2, 7, 64, 1000):
        batch, calls = max_batch_size(lambda b: 100 + 10 * b, 100 + 10 * answer + 5)
        assert batch == answer and calls <= 2 * answer.bit_length() + 2
    assert max_batch_size(lambda b: 10**9, 10)[0] == 0


def test_leak_is_a_rising_line():
    kept = []
    w = torch.randn(64, 64, requires_grad=True)
    def leaky():
        kept.append((w @ w).tanh().sum())  # keeps each graph alive
    def clean():
        kept.append((w @ w).tanh().sum().item())
    leak = live_bytes_per_step(leaky, 4)
    kept.clear()
    flat = live_bytes_per_step(clean, 4)
    assert leak[-1] - leak[0] >= 3 * 64 * 64 * 4  # tanh saves its 64x64 output: one per step stays alive
    assert flat[-1] == flat[0]
