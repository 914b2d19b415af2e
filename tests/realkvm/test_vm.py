"""Unit tests for kvmsplit/realkvm/vm.py that need no /dev/kvm: stats parsing, the run timer, host memory."""

from __future__ import annotations

import os
import signal
import struct
from pathlib import Path

import pytest

from kvmsplit.realkvm import ioctls as k
from kvmsplit.realkvm.conform import bitmap_offsets, full_frames, offsets_bitmap
from kvmsplit.realkvm.vm import HPAGE_SIZE, HostMemory, StatsReader, run_timer, smaps_field


def _stats_blob(names_offsets: list[tuple[str, int]], values: dict[int, int]) -> bytes:
    name_size = 48
    desc_offset = 24 + 16
    num = len(names_offsets)
    data_offset = desc_offset + num * (16 + name_size)
    head = k.KVM_STATS_HEADER.pack(0, name_size, num, 24, desc_offset, data_offset)
    ident = b"kvm-1234".ljust(16, b"\0")
    descs = b"".join(
        k.KVM_STATS_DESC.pack(1, 0, 1, off, 0) + name.encode().ljust(name_size, b"\0") for name, off in names_offsets
    )
    size = max(off for _, off in names_offsets) + 8
    data = bytearray(size)
    for off, v in values.items():
        struct.pack_into("<Q", data, off, v)
    return head + ident + descs + bytes(data)


def test_stats_are_read_by_descriptor_offset_not_position(tmp_path: Path) -> None:
    # As on the PVM kernel: max_mmu_rmap_size (offset 112) is listed before offset 104.
    blob = _stats_blob([("max_mmu_rmap_size", 112), ("max_mmu_page_hash_collisions", 104)], {104: 7, 112: 9})
    path = tmp_path / "stats"
    path.write_bytes(blob)
    fd = os.open(path, os.O_RDONLY)
    reader = StatsReader(fd)
    try:
        reader._parse()
        assert reader.id == "kvm-1234"
        assert reader.read() == {"max_mmu_rmap_size": 9, "max_mmu_page_hash_collisions": 7}
    finally:
        reader.close()


def test_run_timer_restores_the_previous_handler_and_timer() -> None:
    def mine(signum: int, frame: object) -> None:
        pass

    old = signal.signal(signal.SIGALRM, mine)
    try:
        signal.setitimer(signal.ITIMER_REAL, 100.0)
        with run_timer(0.5):
            assert signal.getsignal(signal.SIGALRM) is not mine
        assert signal.getsignal(signal.SIGALRM) is mine
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 90.0 < remaining <= 100.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_host_memory_is_misaligned_as_asked_and_unmapped_on_close() -> None:
    with HostMemory(4 * HPAGE_SIZE, "4k", misalign=4096) as mem:
        assert mem.hva % HPAGE_SIZE == 4096
        mem.write(0, b"abc")
        assert mem.read(0, 3) == b"abc"
        hva = mem.hva
        assert smaps_field(hva, "Rss") == 4096
    assert smaps_field(hva, "Rss") == 0


def test_thp_host_memory_gets_huge_pages_when_the_host_allows() -> None:
    if not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists():
        pytest.skip("no THP on this host")
    with HostMemory(2 * HPAGE_SIZE, "thp") as mem:
        mem.populate()
        huge = mem.anon_huge_bytes()
        if huge == 0:
            pytest.skip("the host gave no THP (THP disabled or fragmented)")
        assert huge == 2 * HPAGE_SIZE


def test_bitmap_round_trip_ignores_bits_past_the_slot() -> None:
    bm = offsets_bitmap([0, 5, 63, 64, 99], 100)
    assert len(bm) == 16
    assert bitmap_offsets(bm, 100) == (0, 5, 63, 64, 99)
    assert bitmap_offsets(bm, 64) == (0, 5, 63)


def test_full_frames_counts_only_whole_aligned_frames() -> None:
    assert full_frames(0, 8 << 20) == 8 << 20
    assert full_frames(4096, 8 << 20) == 6 << 20
    assert full_frames((2 << 20) - (64 << 10), (4 << 20) + (128 << 10)) == 4 << 20
