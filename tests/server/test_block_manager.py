"""SlotManager: allocation, prompt-prefix reuse keyed by adapter version, eviction."""
import pytest

from server.block_manager import SlotManager, common_prefix_len

BASE = ()
ADAPTER_A = (1, "v1")
ADAPTER_A2 = (1, "v2")
ADAPTER_B = (2, "v1")


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3, 4], [1, 2, 3, 4], 10) == 4
    assert common_prefix_len([1, 2, 3, 4], [1, 2, 9, 4], 10) == 2
    assert common_prefix_len([1, 2, 3, 4], [1, 2, 3, 4, 5], 3) == 3
    assert common_prefix_len([5], [1], 10) == 0
    assert common_prefix_len([], [1], 10) == 0
    for cut in range(0, 50):
        a = list(range(50))
        b = a[:cut] + [-1] + a[cut + 1:]
        assert common_prefix_len(a, b, 100) == cut


def test_allocate_until_exhausted_then_release():
    m = SlotManager(3, capacity=64)
    grants = [m.allocate(BASE, [1, 2, 3], max_reuse=2) for _ in range(3)]
    assert sorted(g.slot for g in grants) == [0, 1, 2]
    assert all(g.fill_prefix and g.reused == 0 for g in grants)
    assert m.allocate(BASE, [1], max_reuse=0) is None
    assert not m.can_allocate()
    m.release(grants[1].slot)
    assert m.num_free == 1 and m.can_allocate()
    assert m.allocate(BASE, [9], max_reuse=0).slot == grants[1].slot


def test_double_release_is_a_bug():
    m = SlotManager(1, capacity=8)
    g = m.allocate(BASE, [1], 0)
    m.release(g.slot)
    with pytest.raises(AssertionError):
        m.release(g.slot)


def test_released_tokens_are_reused_by_the_same_key_only():
    m = SlotManager(4, capacity=64)
    g = m.allocate(ADAPTER_A, [1, 2, 3, 4, 5], max_reuse=4)
    m.release(g.slot, tokens=[1, 2, 3, 4, 5, 6])
    # another adapter, another version of the same adapter and the base never hit
    for key in (ADAPTER_B, ADAPTER_A2, BASE):
        other = m.allocate(key, [1, 2, 3, 4, 5, 6, 7], max_reuse=6)
        assert other.reused == 0 and other.slot != g.slot and other.fill_prefix
        m.release(other.slot)
    hit = m.allocate(ADAPTER_A, [1, 2, 3, 4, 5, 6, 7, 8], max_reuse=7)
    assert hit.slot == g.slot and hit.reused == 6 and not hit.fill_prefix
    assert m.num_hits == 1 and m.num_reused_tokens == 6


def test_reuse_is_capped_and_partial():
    m = SlotManager(2, capacity=64)
    g = m.allocate(BASE, [1, 2, 3], max_reuse=2)
    m.release(g.slot, tokens=[1, 2, 3, 4, 5])
    # the same prompt again: the last prompt token must be recomputed to get logits
    hit = m.allocate(BASE, [1, 2, 3, 4, 5], max_reuse=4)
    assert hit.slot == g.slot and hit.reused == 4
    m.release(hit.slot, tokens=[1, 2, 3, 4, 5])
    diverged = m.allocate(BASE, [1, 2, 7, 8], max_reuse=3)
    assert diverged.slot == g.slot and diverged.reused == 2
    assert m.slots[g.slot].tokens == [1, 2]  # what is no longer valid is forgotten


def test_empty_slots_before_cache_entries_then_lru():
    m = SlotManager(3, capacity=16)
    a = m.allocate(BASE, [1], 0)
    b = m.allocate(BASE, [2], 0)
    m.release(a.slot, tokens=[1, 1])
    m.release(b.slot, tokens=[2, 2])
    c = m.allocate(BASE, [3], 0)
    assert c.slot == 2  # the never-used slot goes first; cache entries survive
    m.release(c.slot, tokens=[3, 3])
    d = m.allocate(BASE, [4], 0)
    assert d.slot == a.slot  # least recently released cache entry is evicted
    assert m.slots[a.slot].tokens == []
    assert m.num_cached == 2


def test_allocate_empty_never_takes_a_cache_hit_and_clear_cache():
    m = SlotManager(2, capacity=16)
    g = m.allocate(ADAPTER_A, [1, 2], 1)
    m.release(g.slot, tokens=[1, 2])
    e = m.allocate_empty(ADAPTER_A)
    assert e.slot != g.slot and e.reused == 0 and not e.fill_prefix
    m.clear_cache(ADAPTER_A)
    assert m.num_cached == 0
    assert m.allocate(ADAPTER_A, [1, 2, 3], 2).reused == 0
