import pytest

from offload.cache import Budget, DeviceCache, parse_budget, plan_pin
from offload.errors import OffloadError
from offload.units import parse_size

SIZES = {f"l{i}.{p}": s for i in range(8) for p, s in (("q", 100), ("mlp", 300))} | {"lm_head": 1000}
TOTAL = sum(SIZES.values())


@pytest.mark.parametrize("text,expected", [("65536B", 65536), ("500MiB", 500 * 2**20), ("12GiB", 12 * 2**30),
                                           ("12GB", 12 * 10**9), ("1.5KB", 1500), ("7", 7)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["12XB", "GiB", "-5MiB", "", "1e3"])
def test_parse_size_rejects(bad):
    with pytest.raises(OffloadError, match="cannot parse"):
        parse_size(bad)


def test_parse_budget_forms():
    assert parse_budget("full", SIZES) == Budget(TOTAL, "bytes", "full")
    assert parse_budget("auto", SIZES) == Budget(TOTAL, "bytes", "auto")
    assert parse_budget("auto", SIZES, auto_bytes=900).limit == 900
    assert parse_budget(128, SIZES) == Budget(128, "entries", "128")
    assert parse_budget("25%", SIZES).limit == TOTAL // 4
    assert parse_budget("2KiB", SIZES).limit == 2048
    for bad in ("0%", "150%", "x%"):
        with pytest.raises(OffloadError):
            parse_budget(bad, SIZES)


@pytest.mark.parametrize("limit", [1300, 2000, 3000, 4100])
def test_pin_plan_respects_budget_and_maximizes_resident_bytes(limit):
    order = list(SIZES)
    pinned, ring, slot = plan_pin(order, SIZES, Budget(limit, "bytes", "x"))
    streamed = [k for k in order if k not in pinned]
    assert sum(SIZES[k] for k in pinned) + ring * slot <= limit
    assert all(SIZES[k] <= slot for k in streamed) and ring >= 1
    # nothing streamed would still fit next to the plan
    spare = limit - sum(SIZES[k] for k in pinned) - ring * slot
    assert all(SIZES[k] > spare for k in streamed)
    assert "lm_head" in pinned  # streaming it would need a 1000-byte slot


def test_pin_plan_for_an_entry_budget_pins_the_largest():
    pinned, ring, slot = plan_pin(list(SIZES), SIZES, Budget(8, "entries", "8"))
    assert len(pinned) + ring <= 8 and ring >= 1
    assert "lm_head" in pinned and all(k.endswith("mlp") or k == "lm_head" for k in pinned)


def test_pin_plan_spreads_streamed_entries():
    sizes = {f"e{i}": 10 for i in range(16)}
    pinned, ring, _ = plan_pin(list(sizes), sizes, Budget(120, "bytes", "x"))
    streamed = sorted(int(k[1:]) for k in sizes if k not in pinned)
    gaps = [b - a for a, b in zip(streamed, streamed[1:])]
    assert max(gaps) <= 3  # not one contiguous run


def test_full_budget_pins_everything():
    pinned, ring, _ = plan_pin(list(SIZES), SIZES, Budget(TOTAL, "bytes", "full"))
    assert pinned == set(SIZES) and ring == 0


def test_lru_evicts_least_recently_used_and_respects_protection():
    sizes = {k: v for k, v in SIZES.items() if k != "lm_head"}
    cache = DeviceCache(sizes, Budget(700, "bytes", "x"), "lru")
    for k in ("l0.mlp", "l1.mlp"):
        assert cache.victims(k, set()) == []
        cache.admit(k)
        cache.touch(k, SIZES[k])
    cache.touch("l0.mlp", 0)  # l1.mlp is now the least recently used
    assert cache.victims("l2.mlp", set()) == ["l1.mlp"]
    assert cache.victims("l2.mlp", {"l1.mlp"}) == ["l0.mlp"]
    assert cache.victims("l2.mlp", {"l0.mlp", "l1.mlp"}) is None
    assert (cache.hits, cache.misses, cache.h2d_bytes) == (1, 2, 600)


def test_bad_budgets_and_policies():
    with pytest.raises(OffloadError, match="smaller than one entry"):
        DeviceCache(SIZES, Budget(999, "bytes", "999B"), "pin")
    with pytest.raises(OffloadError, match="smaller than one entry"):
        DeviceCache(SIZES, Budget(0, "entries", "0"), "lru")
    with pytest.raises(OffloadError, match="unknown cache policy"):
        DeviceCache(SIZES, Budget(TOTAL, "bytes", "full"), "fifo")


def test_pin_ring_evicts_the_least_recently_used_streamed_entry_not_in_use():
    cache = DeviceCache(SIZES, Budget(3600, "bytes", "x"), "pin")
    streamed = [k for k in cache.order if k not in cache.pinned]  # scan order
    ring = cache.ring
    assert ring == 3 and len(streamed) == ring + 2
    pinned = next(k for k in cache.order if k in cache.pinned)
    assert cache.victims(pinned, set()) == []  # a pinned entry's room is reserved: it evicts nothing
    cache.admit(pinned)
    cache.touch(pinned, SIZES[pinned])
    for k in streamed[:ring]:  # free ring slots: nothing to evict
        assert cache.victims(k, set()) == []
        cache.admit(k)
        cache.touch(k, SIZES[k])
    nxt = streamed[ring]
    # the ring is full: the oldest streamed entry goes, never the (older) pinned one
    assert cache.victims(nxt, set()) == [streamed[0]]
    # entries the compute still uses are skipped; with every slot in use the prefetcher has to wait
    assert cache.victims(nxt, {streamed[0]}) == [streamed[1]]
    assert cache.victims(nxt, set(streamed[:ring])) is None
    # a streamed entry used again (a hit) becomes the most recent
    cache.touch(streamed[0], 0)
    assert cache.victims(nxt, set()) == [streamed[1]]
    cache.evict(streamed[1])
    cache.admit(nxt)
    cache.touch(nxt, SIZES[nxt])
    assert list(k for k in cache.resident if k not in cache.pinned) == [streamed[2], streamed[0], nxt]
    assert cache.victims(streamed[ring + 1], set()) == [streamed[2]]
    with pytest.raises(AssertionError, match="ring overflow"):  # admitting past the ring is refused
        cache.admit(streamed[ring + 1])
    assert (cache.hits, cache.misses) == (1, ring + 2)
    assert cache.h2d_bytes == SIZES[pinned] + sum(SIZES[k] for k in streamed[:ring + 1])
