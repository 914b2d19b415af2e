"""Benchmark: 4 KiB write faults over a huge-page-mapped slot under dirty logging.

For each MMU ("tdp": the TDP MMU; "tdp-legacy": tdp_mmu=N, the shadow
MMU's direct map), with eager_page_split=N so huge pages are split lazily
by the faults themselves:

1. create a THP-backed slot (1 GiB unless --size-mib) and read one address
   per 2 MiB, so the MMU maps it with 2 MiB SPTEs;
2. enable dirty logging (KVM_MEM_LOG_DIRTY_PAGES), which write-protects the
   slot and forces every later fault in it down to 4K;
3. timed: write every 4 KiB page of the slot once, in address order.

Reported per MMU: wall time of step 3, 4K SPTEs created (the change in
kvm->stat.pages[PG_LEVEL_4K], the 4K leaf SPTEs installed as counted at
kvm_update_page_stats(), and a census of present 4K leaf SPTEs afterwards),
SPTEs and accesses per second, page faults taken, and memory: the peak RSS
of the case's own process (ru_maxrss) and, in a separate traced run, the
Python heap peak during step 3 (tracemalloc).

Run:  .venv/bin/python benchmarks/bench_dirty_log.py [--size-mib 1024] [--repeat N] [--no-tracemalloc]
"""

from __future__ import annotations

import argparse
from typing import Any

from _common import (
    MIB,
    Phase,
    check_same_source,
    describe_run,
    emit_result,
    expect,
    fmt_mib,
    fmt_rate,
    fmt_s,
    format_table,
    run_best_of,
    run_child,
    start_info,
)

from kvmsplit import mmu, tdp_mmu, x86
from kvmsplit.kvm import Kvm
from kvmsplit.memslot import KVM_MEM_LOG_DIRTY_PAGES
from kvmsplit.mmu_page import kvm_mmu_page_get_gfn
from kvmsplit.spte import PAGE_SHIFT, PG_LEVEL_4K, SPTE_ENT_PER_PAGE, is_shadow_present_pte

CONFIGS = ("tdp", "tdp-legacy")
SLOT_ID = 0
# 4 GiB gpa and a 1 TiB hva: both 1 GiB aligned, so gfn and hva are congruent
# at every huge page level and lpage_info allows 2M mappings everywhere.
SLOT_GPA = 1 << 32
SLOT_HVA = 1 << 40
HPAGE_2M = 1 << 21
PAGE_SIZE = 1 << PAGE_SHIFT


class CountingKvm(Kvm):
    """Model: a Kvm that also counts 4K leaf SPTEs installed and removed.

    Both MMUs report every leaf SPTE that becomes or stops being present
    through kvm_update_page_stats() (the TDP MMU once per 512 for a split),
    so the count costs one extra call per stats update.
    """

    model_installed_4k: int = 0
    model_removed_4k: int = 0

    def kvm_update_page_stats(self, level: int, count: int) -> None:
        if level == PG_LEVEL_4K:
            if count > 0:
                self.model_installed_4k += count
            else:
                self.model_removed_4k -= count
        super().kvm_update_page_stats(level, count)


def census_present_4k(kvm: Kvm, start: int, end: int) -> int:
    """Model: present 4K leaf SPTEs mapping gfns in [start, end), both MMUs."""
    n = 0
    for root in tdp_mmu.tdp_mmu_roots(kvm, only_valid=True):
        for it in tdp_mmu.for_each_tdp_pte_min_level(kvm, root, PG_LEVEL_4K, start, end):
            if it.level == PG_LEVEL_4K and is_shadow_present_pte(it.old_spte):
                n += 1
    for sp in kvm.active_mmu_pages:
        if sp.role.level != PG_LEVEL_4K or sp.role.invalid:
            continue
        for index in range(SPTE_ENT_PER_PAGE):
            if is_shadow_present_pte(sp.spt[index]) and start <= kvm_mmu_page_get_gfn(sp, index) < end:
                n += 1
    return n


def run_case(config: str, size_mib: int, traced: bool) -> dict[str, Any]:
    size = size_mib * MIB
    kvm = CountingKvm.create(config)
    assert isinstance(kvm, CountingKvm)
    # Lazy splitting: dirty logging leaves the 2M SPTEs in place.
    x86.set_eager_page_split(kvm, False)
    vcpu = kvm.vcpu(0)

    x86.kvm_set_user_memory_region(kvm, SLOT_ID, 0, SLOT_GPA, size, SLOT_HVA, backing="thp")
    for gpa in range(SLOT_GPA, SLOT_GPA + size, HPAGE_2M):
        mmu.kvm_vcpu_access(kvm, 0, gpa)
    expect(kvm.stat.pages_2m == size // HPAGE_2M, f"pages_2m={kvm.stat.pages_2m}, want {size // HPAGE_2M}")
    expect(kvm.stat.pages_4k == 0, f"pages_4k={kvm.stat.pages_4k} after mapping with 2M pages, want 0")

    x86.kvm_set_user_memory_region(kvm, SLOT_ID, KVM_MEM_LOG_DIRTY_PAGES, SLOT_GPA, size, SLOT_HVA)
    expect(
        kvm.stat.pages_2m == size // HPAGE_2M, "enabling dirty logging changed the 2M SPTEs with eager splitting off"
    )

    pages_4k_before = kvm.stat.pages_4k
    installed_before = kvm.model_installed_4k
    pf_taken_before = vcpu.stat.pf_taken
    pf_fast_before = vcpu.stat.pf_fast
    flushes_before = kvm.stat.remote_tlb_flush
    writes = size // PAGE_SIZE
    access = mmu.kvm_vcpu_access
    with Phase(traced) as phase:
        for gpa in range(SLOT_GPA, SLOT_GPA + size, PAGE_SIZE):
            access(kvm, 0, gpa, write=True)

    start_gfn = SLOT_GPA >> PAGE_SHIFT
    census = census_present_4k(kvm, start_gfn, start_gfn + writes)
    slot = kvm.slot(SLOT_ID)
    assert slot.dirty_bitmap is not None
    dirty_pages = sum(bin(b).count("1") for b in slot.dirty_bitmap)
    expect(dirty_pages == writes, f"dirty bitmap has {dirty_pages} bits set, want {writes}")
    return {
        "config": config,
        "size_mib": size_mib,
        "traced": traced,
        "writes": writes,
        "write_phase": phase.as_dict(),
        "pages_4k_delta": kvm.stat.pages_4k - pages_4k_before,
        "installed_4k": kvm.model_installed_4k - installed_before,
        "removed_4k": kvm.model_removed_4k,
        "census_4k": census,
        "pages_2m_after": kvm.stat.pages_2m,
        "pf_taken": vcpu.stat.pf_taken - pf_taken_before,
        "pf_fast": vcpu.stat.pf_fast - pf_fast_before,
        "remote_tlb_flush": kvm.stat.remote_tlb_flush - flushes_before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="slot size in MiB, a multiple of 2 (default 1024)")
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma-separated MMU configs (default {','.join(CONFIGS)})"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="untraced runs per case; the fastest is reported (default 1)"
    )
    parser.add_argument("--no-tracemalloc", action="store_true", help="skip the separate tracemalloc run per config")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat} is below 1")
    if args.size_mib <= 0 or args.size_mib % 2:
        parser.error(
            f"--size-mib {args.size_mib} is not a positive multiple of 2 (the slot is mapped with 2 MiB pages)"
        )

    if args.case:
        emit_result(run_case(args.case, args.size_mib, args.traced))
        return

    configs = [c for c in args.configs.split(",") if c]
    for c in configs:
        if c not in CONFIGS:
            parser.error(f"--configs: {c!r} is not one of {', '.join(CONFIGS)}")
    started = start_info()
    results = []
    for config in configs:
        child = ["--case", config, "--size-mib", str(args.size_mib)]
        r = run_best_of(__file__, child, args.repeat, lambda r: r["write_phase"]["seconds"])
        if not args.no_tracemalloc:
            t = run_child(__file__, [*child, "--traced"])
            r["traced_run"] = t
            results.append(t)
        results.append(r)

    print("bench_dirty_log: 4 KiB write faults over a 2 MiB-mapped THP slot under dirty logging")
    print("\n".join(describe_run(started, results[0]["source"])))
    print(
        f"slot:    {args.size_mib} MiB at gpa {SLOT_GPA:#x}, eager_page_split=N, {args.size_mib * MIB // PAGE_SIZE} writes"
    )
    print()

    rows = []
    for r in results:
        if r["traced"]:
            continue
        p = r["write_phase"]
        t = r.get("traced_run", {}).get("write_phase", {})
        rows.append(
            [
                r["config"],
                f"{r['writes']:,}",
                fmt_s(p["seconds"]),
                f"{r['pages_4k_delta']:,}",
                f"{r['installed_4k']:,}",
                f"{r['census_4k']:,}",
                fmt_rate(r["installed_4k"], p["seconds"]),
                fmt_rate(r["writes"], p["seconds"]),
                f"{r['pf_taken']:,}",
                f"{r['pf_fast']:,}",
                fmt_mib(p["rss_before_mib"]),
                fmt_mib(p["rss_peak_mib"]),
                fmt_mib(t.get("traced_peak_mib")),
                fmt_mib(t.get("traced_kept_mib")),
            ]
        )
    headers = [
        "config",
        "writes",
        "time s",
        "d.pages_4k",
        "4K installed",
        "4K present",
        "SPTEs/s",
        "accesses/s",
        "faults",
        "fast",
        "RSS before MiB",
        "RSS peak MiB",
        "traced peak MiB",
        "traced kept MiB",
    ]
    print(format_table(headers, rows))
    print()
    print("time s          wall time of the write phase (time.perf_counter), untraced run")
    print("d.pages_4k      change of kvm->stat.pages[PG_LEVEL_4K] over the write phase")
    print("4K installed    4K leaf SPTEs made present, counted at kvm_update_page_stats()")
    print("4K present      census of present 4K leaf SPTEs in the slot after the write phase")
    print("SPTEs/s         4K installed / time s;  accesses/s: writes / time s")
    print("faults, fast    vcpu->stat.pf_taken and pf_fast over the write phase")
    print("RSS before/peak ru_maxrss of the case's own process before and after the write phase (setup included)")
    print("traced peak     tracemalloc peak of Python allocations during the write phase (separate run)")
    print("traced kept     tracemalloc allocations still live at the end of the write phase (separate run)")
    if args.repeat > 1:
        for r in results:
            if not r["traced"]:
                runs = ", ".join(f"{x:.3f}" for x in r["all_seconds"])
                print(f"runs {r['config']}: {runs} s (fastest shown)")
    warning = check_same_source(results)
    if warning:
        print(warning)


if __name__ == "__main__":
    main()
