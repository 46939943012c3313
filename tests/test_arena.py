"""The preallocated cache arena (policy pin), run on cpu by forcing it: exact size, fixed slot
addresses, the same tokens as the reference, a re-plan that keeps or rebuilds the regions."""
import pytest
import torch

import offload
from offload import arena as arena_mod
from offload import engine as engine_mod
from offload.arena import Arena
from offload.cache import DeviceCache, parse_budget
from offload.errors import OffloadError
from offload.host import ALIGN
from offload.prefetch import Prefetcher

import tiny
from test_engine import greedy, prompt_ids


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return tiny.make("qwen2", tmp_path_factory.mktemp("arena"))


def test_engine_with_arena_matches_reference_with_fixed_addresses(qwen2, monkeypatch):
    monkeypatch.setattr(engine_mod, "Prefetcher", lambda *a, **k: Prefetcher(*a, **k, arena=True))
    model_dir, weights_dir = qwen2
    ids = prompt_ids("cpu")
    expected = greedy(tiny.reference_model(model_dir), ids)
    with offload.load(model_dir, weights_dir, cache="50%", policy="pin", device="cpu", dtype=torch.float32,
                      progress=False, emulate_copies=True) as engine:
        pf = engine.prefetcher
        assert pf.arena is not None and engine.cache.ring > 0
        addresses = {}
        real_acquire = pf.acquire

        def acquire(key):
            slot = real_acquire(key)
            addresses.setdefault(key, set()).add(slot.data[0].data_ptr())
            return slot
        monkeypatch.setattr(pf, "acquire", acquire)
        assert torch.equal(greedy(engine.model, ids), expected)
        arena = pf.arena
        start = arena.buffer.data_ptr()
        cache = engine.cache
        # exact: the plan's bytes, plus alignment only
        planned = cache.pinned_bytes + cache.ring * max(cache.sizes[k] for k in cache.sizes if k not in cache.pinned)
        assert planned <= arena.nbytes <= planned + ALIGN * (len(cache.pinned) + cache.ring)
        assert arena.nbytes <= cache.budget_bytes + ALIGN * (len(cache.pinned) + cache.ring)
        for key, seen in addresses.items():
            if key in cache.pinned:
                assert seen == {start + arena.offsets[key]}  # one address for the whole run
            else:
                ring = {start + arena.ring_offset + i * arena.slot_nbytes for i in range(arena.ring)}
                assert seen <= ring
        assert engine.stats["cache_misses"] > 0  # it streamed
        engine.replan("full", "pin")  # a new plan gets a new arena; the old one is released
        assert engine.prefetcher is pf and pf.arena is not None and pf.arena is not arena
        assert torch.equal(greedy(engine.model, ids), expected)


def test_arena_regions_and_ring_slots():
    a = Arena({"a": 1000, "b": 300}, ring=2, slot_nbytes=700, device=torch.device("cpu"))
    assert a.nbytes == 1024 + 512 + 2 * 768
    ra, rb = a.take("a", 1000), a.take("b", 300)
    assert ra.data_ptr() == a.buffer.data_ptr() + a.offsets["a"] and rb.numel() == 300
    s1, s2 = a.take("x", 700), a.take("y", 10)
    assert {s1.data_ptr() - a.buffer.data_ptr(), s2.data_ptr() - a.buffer.data_ptr()} == {1536, 1536 + 768}
    with pytest.raises(OffloadError, match="no ring slot"):
        a.take("z", 5)
    a.give("x")
    assert a.take("z", 5).data_ptr() == s1.data_ptr()  # the slot x left
    with pytest.raises(OffloadError, match="no ring slot"):
        a.take("w", 701)


def test_arena_out_of_memory_is_one_line(monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(arena_mod.torch, "empty", oom)
    with pytest.raises(OffloadError, match=r"out of device memory allocating the cache \(.*\): use a smaller --cache"):
        Arena({"a": 100}, 0, 0, torch.device("cpu"))


def test_arena_fits_a_replan_only_with_the_same_regions():
    sizes = {f"k{i}": s for i, s in enumerate([4096, 1024, 4096, 1024, 2048, 4096, 1024, 2048])}
    cache = DeviceCache(sizes, parse_budget("60%", sizes), "pin")
    a = Arena.for_cache(cache, torch.device("cpu"))
    assert a.fits(cache)
    cache.set_order(list(sizes))  # the same order: the same plan
    assert a.fits(cache)
    cache.set_order(list(reversed(sizes)))
    same = {k: sizes[k] for k in cache.pinned} == a.pinned
    assert a.fits(cache) == same


def test_a_recorded_order_that_changes_the_regions_rebuilds_the_arena(qwen2, monkeypatch):
    def prefetcher(cache, *rest, **kwargs):
        cache.set_order(list(reversed(list(cache.sizes))))  # a load-time plan the recorded order will change
        return Prefetcher(cache, *rest, **kwargs, arena=True)
    monkeypatch.setattr(engine_mod, "Prefetcher", prefetcher)
    model_dir, weights_dir = qwen2
    ids = prompt_ids("cpu")
    expected = greedy(tiny.reference_model(model_dir), ids)
    with offload.load(model_dir, weights_dir, cache="50%", policy="pin", device="cpu", dtype=torch.float32,
                      progress=False, emulate_copies=True, fuse=False) as engine:  # unfused: regions that differ
        first = engine.prefetcher.arena
        assert torch.equal(greedy(engine.model, ids), expected)
        assert engine.prefetcher.arena.fits(engine.cache)
        assert (engine.prefetcher.arena is first) == ({k: engine.cache.sizes[k] for k in engine.cache.pinned}
                                                      == first.pinned)
        assert engine.prefetcher.arena is not first, "the reversed plan should have had other regions"
