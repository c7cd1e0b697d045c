"""Fragmentation: the allocator model under a capacity, the three settings, and the GPU experiment."""
import pytest
import torch

from memopt_lib import fragmentation as F
from memopt_lib.oom import diagnose, parse_oom_message
from memopt_lib.predict.allocator import CachingAllocator

GiB = 1024 ** 3


def test_default_allocator_fails_with_reserved_memory_to_spare_and_empty_cache_does_not_help():
    default = F.simulate("default", 8 * GiB)
    cleared = F.simulate("default+empty_cache", 8 * GiB)
    for out in (default, cleared):
        assert not out.succeeded and out.simulated
        # the fragmentation signature: more cached-but-unallocated memory than the request, yet it fails
        assert out.reserved_unallocated_bytes > out.request_bytes
        info = parse_oom_message(out.oom_message)
        assert info.tried_bytes == pytest.approx(out.request_bytes, rel=0.01)
        assert diagnose(info)[0].startswith("fragmentation")
    # empty_cache released nothing: every 20 MiB segment still holds a live block
    assert cleared.reserved_after_bytes == default.reserved_after_bytes == default.reserved_before_request_bytes


def test_expandable_segments_serve_the_same_request_within_the_card():
    out = F.simulate("expandable_segments", 8 * GiB)
    assert out.succeeded and out.reserved_after_bytes <= out.capacity_bytes
    # pages are mapped exactly: no 20 MiB segment tails
    assert out.reserved_before_request_bytes == (out.allocated_before_request_bytes * 2)


def test_the_request_would_fit_if_the_free_memory_were_one_piece():
    out = F.simulate("default", 8 * GiB)
    assert out.allocated_before_request_bytes + out.request_bytes <= out.capacity_bytes


def test_bounded_allocator_is_the_caching_allocator_until_the_capacity():
    """Under its capacity the bounded model counts exactly what the predictor's allocator counts."""
    sizes = [300, 5 << 20, 12 << 20, 700_000, 3 << 20, 25 << 20]
    a, b = CachingAllocator(), F.BoundedAllocator(1 << 40)
    ha = [a.malloc(n) for n in sizes]
    hb = [b.malloc(n) for n in sizes]
    for i in (1, 3, 4):
        a.free(ha[i])
        b.free(hb[i])
    a.malloc(9 << 20)
    b.malloc(9 << 20)
    assert (a.allocated_bytes, a.reserved_bytes) == (b.allocated_bytes, b.reserved_bytes)


def test_expandable_allocator_maps_pages_and_unmaps_free_ones_only_when_it_must():
    m = F.ExpandableAllocator(10 * F.PAGE)
    hs = [m.malloc(2 * F.PAGE) for _ in range(4)]          # 8 pages mapped
    m.free(hs[0])
    m.free(hs[2])
    assert m.reserved_bytes == 8 * F.PAGE and m.allocated_bytes == 4 * F.PAGE
    big = m.malloc(5 * F.PAGE)     # no hole fits; 8 + 5 > 10 -> unmap the 4 free pages, then map 5 at the end
    assert m.reserved_bytes == 9 * F.PAGE and m.allocated_bytes == 9 * F.PAGE
    with pytest.raises(F.SimulatedOutOfMemory):
        m.malloc(2 * F.PAGE)       # a 2-page hole fits it, but 9 mapped + 2 > 10 pages and nothing free is mapped
    m.free(big)
    assert m.allocated_bytes == 4 * F.PAGE


def test_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="setting must be one of"):
        F.simulate("max_split_size_mb:128")


def test_cli_writes_the_simulated_rows(tmp_path):
    out = tmp_path / "frag.json"
    assert F.main(["--simulate", "--capacity-gib", "4", "--json", str(out)]) == 0
    import json
    rows = json.loads(out.read_text())["rows"]
    assert [r["setting"] for r in rows] == list(F.SETTINGS)
    assert [r["succeeded"] for r in rows] == [False, False, True] and all(r["simulated"] for r in rows)


@pytest.mark.gpu
def test_real_allocator_reproduces_the_simulation():
    rows = {s: F.run_on_gpu(s, 4 * GiB) for s in F.SETTINGS}
    assert not rows["default"]["succeeded"] and not rows["default+empty_cache"]["succeeded"]
    assert rows["expandable_segments"]["succeeded"]
    assert rows["expandable_segments"]["reserved_after_bytes"] <= 4 * GiB
