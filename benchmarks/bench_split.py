"""Benchmark: eager page splitting when dirty logging starts, on both MMUs.

Three cases, each in its own process, with eager_page_split=Y:

tdp-1g     The TDP MMU maps a 1 GiB hugetlb-1g slot with one 1G SPTE (one
           read); enabling dirty logging splits it to 4K in one pre-order
           pass: 512 2M SPTEs, then 512 x 512 4K SPTEs, 262,656 written.
nested-1g  The same slot seen by an L2 guest: L1's EPT maps it with one 1G
           guest page, so the nested shadow MMU maps it with one 1G SPTE
           (one L2 read).  L1 itself never touches the slot, so the TDP MMU
           has nothing to split there and the whole split is the shadow
           MMU's rmap walk (1G level, then 2M): 262,656 SPTEs written.
tdp-2m     The TDP MMU maps a THP slot (64 GiB unless --size-gib) with 2M
           SPTEs (one read per 2 MiB); enabling dirty logging splits every
           one: 512 4K SPTEs per 2 MiB, 16,777,216 for 64 GiB.

Timed: the whole KVM_SET_USER_MEMORY_REGION that sets
KVM_MEM_LOG_DIRTY_PAGES (kvm_mmu_slot_apply_flags(): split, write-protect,
flush), and within it kvm_mmu_slot_try_split_huge_pages() alone.  Beside
each, in the same process, the time to build a plain Python list of as many
ints as SPTEs written.  Memory: the case process's peak RSS (ru_maxrss) and,
in a separate traced run, the Python heap peak of the ioctl (tracemalloc).

Run:  .venv/bin/python benchmarks/bench_split.py [--size-gib 64] [--cases tdp-1g,nested-1g,tdp-2m]
      [--repeat N] [--no-tracemalloc]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from _common import (
    GIB,
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
    time_int_lists,
)

from kvmsplit import mmu, split, tdp_mmu, x86
from kvmsplit.guest import EPT_GPT, guest_build_identity_map
from kvmsplit.kvm import Kvm
from kvmsplit.memslot import KVM_MEM_LOG_DIRTY_PAGES, KvmMemorySlot
from kvmsplit.spte import (
    PAGE_SHIFT,
    PG_LEVEL_1G,
    PG_LEVEL_4K,
    SPTE_ENT_PER_PAGE,
    is_shadow_present_pte,
)

CASES = ("tdp-1g", "nested-1g", "tdp-2m")
FULL_SIZE_GIB = 64

SLOT_ID = 0
# 4 GiB gpa and a 1 TiB hva: 1 GiB aligned, so gfn and hva are congruent at
# every huge page level and lpage_info allows 1G mappings.
SLOT_GPA = 1 << 32
SLOT_HVA = 1 << 40
# L1's EPT tables: a small 4K-backed slot at 1 TiB gpa, clear of the big slot.
TABLES_SLOT_ID = 1
TABLES_GPA = 1 << 40
TABLES_HVA = 1 << 41
TABLES_NPAGES = 16
HPAGE_2M = 1 << 21


class TimedSplit(split.MergedSplit):
    """Model: the merged split policy, timing kvm_mmu_slot_try_split_huge_pages().

    Installed as Kvm.model_split_policy, the hook the model offers for
    variants, so the kernel code path is unchanged.
    """

    def __init__(self) -> None:
        self.seconds = 0.0

    def kvm_mmu_slot_try_split_huge_pages(self, kvm: Kvm, slot: KvmMemorySlot, target_level: int) -> None:
        t0 = time.perf_counter()
        super().kvm_mmu_slot_try_split_huge_pages(kvm, slot, target_level)
        self.seconds += time.perf_counter() - t0


def sample_leaf_spte(kvm: Kvm, gfn: int) -> int:
    """Model: a present 4K leaf SPTE of @gfn from either MMU, as a typical value."""
    for root in tdp_mmu.tdp_mmu_roots(kvm, only_valid=True):
        for it in tdp_mmu.for_each_tdp_pte_min_level(kvm, root, PG_LEVEL_4K, gfn, gfn + 1):
            if it.level == PG_LEVEL_4K and is_shadow_present_pte(it.old_spte):
                return it.old_spte
    for sp in kvm.active_mmu_pages:
        if sp.role.level == PG_LEVEL_4K and sp.role.direct:
            for spte in sp.spt:
                if is_shadow_present_pte(spte):
                    return spte
    raise SystemExit(f"benchmark: no present 4K SPTE found for gfn {gfn:#x}")


def setup_tdp_1g(kvm: Kvm) -> int:
    x86.kvm_set_user_memory_region(kvm, SLOT_ID, 0, SLOT_GPA, GIB, SLOT_HVA, backing="hugetlb-1g")
    mmu.kvm_vcpu_access(kvm, 0, SLOT_GPA)
    expect(kvm.stat.pages_1g == 1, f"pages_1g={kvm.stat.pages_1g} after one read, want 1")
    return GIB


def setup_nested_1g(kvm: Kvm) -> int:
    x86.kvm_set_user_memory_region(kvm, SLOT_ID, 0, SLOT_GPA, GIB, SLOT_HVA, backing="hugetlb-1g")
    x86.kvm_set_user_memory_region(
        kvm, TABLES_SLOT_ID, 0, TABLES_GPA, TABLES_NPAGES << PAGE_SHIFT, TABLES_HVA, backing="4k"
    )
    root_gfn = TABLES_GPA >> PAGE_SHIFT
    # L1 builds an identity EPT map of the big slot with one 1G guest page.
    guest_build_identity_map(
        kvm,
        EPT_GPT,
        root_gfn=root_gfn,
        table_gfns=list(range(root_gfn + 1, root_gfn + TABLES_NPAGES)),
        gfn_start=SLOT_GPA >> PAGE_SHIFT,
        npages=GIB >> PAGE_SHIFT,
        page_level=PG_LEVEL_1G,
    )
    x86.nested_vmx_enter(kvm, 0, root_gfn)
    mmu.kvm_vcpu_access(kvm, 0, SLOT_GPA)
    # Back to L1, which never accessed the slot: the TDP MMU maps none of it.
    x86.nested_vmx_vmexit(kvm, 0)
    expect(kvm.stat.pages_1g == 1, f"pages_1g={kvm.stat.pages_1g} after one L2 read, want 1")
    expect(kvm.tdp_mmu_pages == 0, f"tdp_mmu_pages={kvm.tdp_mmu_pages}: L1 mapped memory through the TDP MMU")
    return GIB


def setup_tdp_2m(kvm: Kvm, size: int) -> int:
    x86.kvm_set_user_memory_region(kvm, SLOT_ID, 0, SLOT_GPA, size, SLOT_HVA, backing="thp")
    for gpa in range(SLOT_GPA, SLOT_GPA + size, HPAGE_2M):
        mmu.kvm_vcpu_access(kvm, 0, gpa)
    expect(kvm.stat.pages_2m == size // HPAGE_2M, f"pages_2m={kvm.stat.pages_2m}, want {size // HPAGE_2M}")
    return size


def run_case(case: str, size_gib: int, traced: bool) -> dict[str, Any]:
    kvm = Kvm.create("tdp")
    x86.set_eager_page_split(kvm, True)
    policy = TimedSplit()
    kvm.model_split_policy = policy

    t0 = time.perf_counter()
    if case == "tdp-1g":
        size = setup_tdp_1g(kvm)
    elif case == "nested-1g":
        size = setup_nested_1g(kvm)
    else:
        size = setup_tdp_2m(kvm, size_gib * GIB)
    map_seconds = time.perf_counter() - t0
    npages = size >> PAGE_SHIFT
    huge_before = {"pages_2m": kvm.stat.pages_2m, "pages_1g": kvm.stat.pages_1g}

    with Phase(traced) as phase:
        x86.kvm_set_user_memory_region(kvm, SLOT_ID, KVM_MEM_LOG_DIRTY_PAGES, SLOT_GPA, size, SLOT_HVA)

    events = dict(kvm.model_split_env.events)
    splits = sum(events.get(k, 0) for k in ("tdp_split_1g", "tdp_split_2m", "shadow_split_1g", "shadow_split_2m"))
    sptes_written = splits * SPTE_ENT_PER_PAGE
    expected = npages + (SPTE_ENT_PER_PAGE if case != "tdp-2m" else 0)
    expect(sptes_written == expected, f"{sptes_written} SPTEs written ({events}), want {expected}")
    expect(
        kvm.stat.pages_4k == npages and kvm.stat.pages_2m == 0 and kvm.stat.pages_1g == 0,
        f"after the split pages_4k/2m/1g={kvm.stat.pages_4k}/{kvm.stat.pages_2m}/{kvm.stat.pages_1g}, want {npages}/0/0",
    )
    expect(not events.get("enospc") and not events.get("enomem"), f"split stopped early: {events}")

    spte = sample_leaf_spte(kvm, SLOT_GPA >> PAGE_SHIFT)
    lists = time_int_lists(sptes_written, spte, traced)
    return {
        "case": case,
        "size_gib": size >> 30,
        "traced": traced,
        "map_seconds": map_seconds,
        "huge_before": huge_before,
        "ioctl": phase.as_dict(),
        "split_seconds": policy.seconds,
        "sptes_written": sptes_written,
        "events": events,
        "sample_spte": spte,
        "lists": lists,
    }


def rows_for(r: dict[str, Any], scale: float = 1.0) -> list[str]:
    """One table row; @scale > 1 extrapolates linearly from a smaller run."""
    p = r["ioctl"]
    t = r.get("traced_run", {})
    tp = t.get("ioctl", {})
    ls, lr = r["lists"]["list_spte"], r["lists"]["list_range"]
    n = r["sptes_written"] * scale
    ioctl_s, split_s = p["seconds"] * scale, r["split_seconds"] * scale
    list_s, range_s = ls["seconds"] * scale, lr["seconds"] * scale
    rss_before = p["rss_before_mib"]
    rss_peak = rss_before + (p["rss_peak_mib"] - rss_before) * scale
    traced_peak = tp.get("traced_peak_mib")
    list_traced = t.get("lists", {}).get("list_spte", {}).get("traced_peak_mib")
    if traced_peak is not None:
        traced_peak *= scale
    if list_traced is not None:
        list_traced *= scale
    size = f"{r['size_gib'] * scale:g} GiB"
    return [
        r["case"],
        size,
        f"{n:,.0f}",
        fmt_s(r["map_seconds"] * scale),
        fmt_s(ioctl_s),
        fmt_s(split_s),
        fmt_rate(n, split_s),
        fmt_s(list_s),
        fmt_s(range_s),
        f"{split_s / list_s:.0f}x" if list_s else "-",
        fmt_mib(rss_before),
        fmt_mib(rss_peak),
        fmt_mib(traced_peak),
        fmt_mib(list_traced),
    ]


HEADERS = [
    "case",
    "slot",
    "SPTEs written",
    "map s",
    "ioctl s",
    "split s",
    "SPTEs/s",
    "list s",
    "range s",
    "split/list",
    "RSS before MiB",
    "RSS peak MiB",
    "traced peak MiB",
    "list traced MiB",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size-gib", type=int, default=FULL_SIZE_GIB, help=f"slot size of tdp-2m in GiB (default {FULL_SIZE_GIB})"
    )
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated cases (default {','.join(CASES)})")
    parser.add_argument(
        "--repeat", type=int, default=1, help="untraced runs per case; the fastest is reported (default 1)"
    )
    parser.add_argument("--no-tracemalloc", action="store_true", help="skip the separate tracemalloc run per case")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat} is below 1")
    if args.size_gib <= 0:
        parser.error(f"--size-gib {args.size_gib} is not positive")

    if args.case:
        emit_result(run_case(args.case, args.size_gib, args.traced))
        return

    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        if c not in CASES:
            parser.error(f"--cases: {c!r} is not one of {', '.join(CASES)}")

    started = start_info()
    results = []
    measured = []
    for case in cases:
        child = ["--case", case, "--size-gib", str(args.size_gib)]
        r = run_best_of(__file__, child, args.repeat, lambda r: r["ioctl"]["seconds"])
        if not args.no_tracemalloc:
            t = run_child(__file__, [*child, "--traced"])
            r["traced_run"] = t
            results.append(t)
        results.append(r)
        measured.append(r)

    print("bench_split: eager page splitting when dirty logging starts")
    print("\n".join(describe_run(started, measured[0]["source"])))
    print()
    print(format_table(HEADERS, [rows_for(r) for r in measured]))
    partial = [r for r in measured if r["case"] == "tdp-2m" and r["size_gib"] < FULL_SIZE_GIB]
    if partial:
        r = partial[0]
        scale = FULL_SIZE_GIB / r["size_gib"]
        print()
        print(
            f"EXTRAPOLATED, not measured: tdp-2m at {FULL_SIZE_GIB} GiB, scaled linearly x{scale:g} from {r['size_gib']} GiB"
        )
        print(format_table(HEADERS, [rows_for(r, scale)]))
    print()
    print("map s           the faults that mapped the slot huge before the timed ioctl")
    print(
        "ioctl s         wall time of KVM_SET_USER_MEMORY_REGION setting KVM_MEM_LOG_DIRTY_PAGES (split + write-protect + flush)"
    )
    print(
        "split s         kvm_mmu_slot_try_split_huge_pages() alone, inside the ioctl;  SPTEs/s = SPTEs written / split s"
    )
    print("SPTEs written   512 per huge SPTE split (kvm->model_split_env.events)")
    print(
        "list s          [spte | (i << 12) for i in range(n)] for n = SPTEs written, spte a 4K leaf of the case, same process"
    )
    print("range s         list(range(n)), same process;  split/list = split s / list s")
    print("RSS before/peak ru_maxrss of the case's own process before and after the ioctl (setup included)")
    print("traced peak     tracemalloc peak of Python allocations during the ioctl (separate run)")
    print("list traced     tracemalloc peak while building the SPTE-like list (separate run)")
    for r in measured:
        print(f"events {r['case']}: {r['events']}")
    if args.repeat > 1:
        for r in results:
            if not r["traced"]:
                runs = ", ".join(f"{x:.3f}" for x in r["all_seconds"])
                print(f"runs {r['case']}: {runs} s (fastest shown)")
    warning = check_same_source(results)
    if warning:
        print(warning)


if __name__ == "__main__":
    main()
