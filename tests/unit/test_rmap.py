"""Unit tests for kvmsplit/rmap.py (the pte_list_*() code in arch/x86/kvm/mmu/mmu.c)."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvmsplit.errors import KvmBugOn
from kvmsplit.mmu_page import KvmMmuPage
from kvmsplit.rmap import (
    PTE_LIST_EXT,
    KvmMmuMemoryCache,
    KvmRmapHead,
    PteListDesc,
    Sptep,
    pte_list_add,
    pte_list_count,
    pte_list_desc_shape_ok,
    pte_list_remove,
    rmap_first,
    rmap_iter,
)
from kvmsplit.role import KvmMmuPageRole
from kvmsplit.spte import PG_LEVEL_4K

_SP_A = KvmMmuPage(role=KvmMmuPageRole(level=PG_LEVEL_4K, direct=True), gfn=0, pfn=0x1000)
_SP_B = KvmMmuPage(role=KvmMmuPageRole(level=PG_LEVEL_4K, direct=True), gfn=0x200, pfn=0x1001)
# Two pages with overlapping indexes, so equality must tell pages apart.
POOL = [Sptep(_SP_A, i) for i in range(30)] + [Sptep(_SP_B, i) for i in range(30)]


def _nr_descs(rmap_head: KvmRmapHead) -> int:
    desc = rmap_head.val if isinstance(rmap_head.val, PteListDesc) else None
    n = 0
    while desc is not None:
        n += 1
        desc = desc.more
    return n


def _filled(n: int, cache: KvmMmuMemoryCache | None = None) -> KvmRmapHead:
    rmap_head = KvmRmapHead()
    for sptep in POOL[:n]:
        pte_list_add(sptep, rmap_head, cache)
    return rmap_head


class PteListMachine(RuleBasedStateMachine):
    """pte_list_add() and pte_list_remove() checked against a plain list."""

    def __init__(self) -> None:
        super().__init__()
        self.rmap_head = KvmRmapHead()
        self.cache = KvmMmuMemoryCache("pte_list_desc_cache", capacity=len(POOL), nobjs=len(POOL))
        self.expected: list[Sptep] = []

    @precondition(lambda self: len(self.expected) < len(POOL))
    @rule(data=st.data())
    def pte_list_add(self, data: st.DataObject) -> None:
        sptep = data.draw(st.sampled_from([s for s in POOL if s not in self.expected]))
        nobjs, descs = self.cache.nobjs, _nr_descs(self.rmap_head)
        assert pte_list_add(sptep, self.rmap_head, self.cache) == len(self.expected)
        self.expected.append(sptep)
        # A descriptor comes from the cache exactly when the chain grows one.
        assert nobjs - self.cache.nobjs == _nr_descs(self.rmap_head) - descs

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def pte_list_remove(self, data: st.DataObject) -> None:
        sptep = data.draw(st.sampled_from(self.expected))
        nobjs = self.cache.nobjs
        pte_list_remove(sptep, self.rmap_head)
        self.expected.remove(sptep)
        assert self.cache.nobjs == nobjs

    @invariant()
    def chain_keeps_full_tails_and_a_non_empty_head(self) -> None:
        assert pte_list_desc_shape_ok(self.rmap_head) is None

    @invariant()
    def pte_list_count_matches_the_entries(self) -> None:
        assert pte_list_count(self.rmap_head) == len(self.expected)

    @invariant()
    def rmap_iter_yields_each_entry_once(self) -> None:
        assert Counter(rmap_iter(self.rmap_head)) == Counter(self.expected)

    @invariant()
    def empty_rmap_head_holds_nothing(self) -> None:
        assert bool(self.rmap_head) == bool(self.expected)


TestPteListMachine = PteListMachine.TestCase
TestPteListMachine.settings = settings(max_examples=40, stateful_step_count=80, deadline=None)


def test_single_entry_rmap_holds_the_sptep_itself() -> None:
    """pte_list_add(): an empty head takes the SPTE pointer with bit 0 clear."""
    rmap_head = _filled(1)
    assert rmap_head.val is POOL[0]
    assert pte_list_count(rmap_head) == 1


def test_second_entry_moves_both_into_one_descriptor() -> None:
    rmap_head = _filled(2)
    desc = rmap_head.val
    assert isinstance(desc, PteListDesc)
    assert desc.sptes[:2] == [POOL[0], POOL[1]]
    assert (desc.spte_count, desc.tail_count, desc.more) == (2, 0, None)


def test_entry_after_a_full_head_goes_into_a_new_head_in_front() -> None:
    """pte_list_add(): tail descriptors are always full, so a full head gets a new head."""
    rmap_head = _filled(PTE_LIST_EXT)
    full = rmap_head.val
    assert isinstance(full, PteListDesc)
    assert full.spte_count == PTE_LIST_EXT
    assert pte_list_add(POOL[PTE_LIST_EXT], rmap_head) == PTE_LIST_EXT
    head = rmap_head.val
    assert isinstance(head, PteListDesc)
    assert head.more is full
    assert (head.spte_count, head.tail_count) == (1, PTE_LIST_EXT)


def test_removing_down_to_one_entry_keeps_a_descriptor() -> None:
    """pte_list_desc_remove_entry() frees a descriptor only when it empties."""
    rmap_head = _filled(2)
    pte_list_remove(POOL[0], rmap_head)
    assert isinstance(rmap_head.val, PteListDesc)
    assert list(rmap_iter(rmap_head)) == [POOL[1]]
    pte_list_remove(POOL[1], rmap_head)
    assert rmap_head.val is None


def test_removing_from_a_tail_refills_it_from_the_head() -> None:
    """pte_list_desc_remove_entry() moves the head's last entry into the hole."""
    rmap_head = _filled(PTE_LIST_EXT + 1)
    tail = rmap_head.val.more  # type: ignore[union-attr]
    pte_list_remove(POOL[3], rmap_head)
    assert rmap_head.val is tail
    assert tail is not None and tail.sptes[3] is POOL[PTE_LIST_EXT]
    assert pte_list_desc_shape_ok(rmap_head) is None


@pytest.mark.parametrize("n", [0, 1, 2, PTE_LIST_EXT + 3])
def test_removing_a_missing_entry_is_a_bug(n: int) -> None:
    """pte_list_remove() calls KVM_BUG_ON_DATA_CORRUPTION when the SPTE is not there."""
    rmap_head = _filled(n)
    with pytest.raises(KvmBugOn) as excinfo:
        pte_list_remove(POOL[-1], rmap_head)
    assert excinfo.value.site == "pte_list_remove"


def test_removing_the_same_index_of_another_page_is_a_bug() -> None:
    """An rmap entry is a pointer: index 0 of one page is not index 0 of another."""
    rmap_head = _filled(1)
    with pytest.raises(KvmBugOn):
        pte_list_remove(Sptep(_SP_B, 0), rmap_head)
    assert rmap_head.val is POOL[0]


def test_cache_alloc_takes_one_object() -> None:
    cache = KvmMmuMemoryCache("pte_list_desc_cache", capacity=4, nobjs=2)
    cache.alloc("pte_list_add")
    assert cache.nobjs == 1


def test_cache_alloc_from_an_empty_cache_is_a_bug() -> None:
    """kvm_mmu_memory_cache_alloc() WARNs when a missing top-up left the cache empty."""
    cache = KvmMmuMemoryCache("pte_list_desc_cache", capacity=4, nobjs=0)
    with pytest.raises(KvmBugOn) as excinfo:
        cache.alloc("pte_list_add")
    assert excinfo.value.site == "pte_list_add"
    assert cache.nobjs == 0


@pytest.mark.parametrize("n", range(0, 2 * PTE_LIST_EXT + 4))
def test_pte_list_add_takes_a_descriptor_exactly_when_it_creates_one(n: int) -> None:
    cache = KvmMmuMemoryCache("pte_list_desc_cache", capacity=len(POOL), nobjs=len(POOL))
    rmap_head = _filled(n, cache)
    nobjs, descs = cache.nobjs, _nr_descs(rmap_head)
    pte_list_add(POOL[n], rmap_head, cache)
    # One pointer becomes a descriptor at the second entry; a full head gets a new one.
    expect_new = n == 1 or (n > 0 and n % PTE_LIST_EXT == 0)
    assert nobjs - cache.nobjs == _nr_descs(rmap_head) - descs == int(expect_new)


def test_first_entry_never_touches_an_empty_cache() -> None:
    cache = KvmMmuMemoryCache("pte_list_desc_cache", capacity=1, nobjs=0)
    rmap_head = KvmRmapHead()
    pte_list_add(POOL[0], rmap_head, cache)
    with pytest.raises(KvmBugOn):
        pte_list_add(POOL[1], rmap_head, cache)


def test_rmap_first_is_the_newest_head_entry_or_none() -> None:
    """rmap_get_first() starts at the head descriptor."""
    assert rmap_first(KvmRmapHead()) is None
    rmap_head = _filled(PTE_LIST_EXT + 2)
    assert rmap_first(rmap_head) is POOL[PTE_LIST_EXT]
