"""Where the merged code and the seed patch (v3 22/23) differ, scenario by scenario.

Kernel-brief section 14: v3 split without the TDP MMU and found child pages
with its own lookup; the merged code splits only with the TDP MMU and uses
__kvm_mmu_get_shadow_page(), which zaps an unsync page at the gfn.
"""

from kvmsplit.scenarios import get_scenario
from kvmsplit.trace import TraceConfig, run_trace


def run(name: str, model: str):
    sc = get_scenario(name)
    result = run_trace(TraceConfig(**(sc.config.to_dict() | {"model": model})), sc.ops)
    assert result.ok, f"{model} on {name}: {result.failure}"
    return result.kvm


def test_without_the_tdp_mmu_only_v3_splits_at_enable_time() -> None:
    merged, v3 = run("eager_split_without_tdp_mmu", "merged"), run("eager_split_without_tdp_mmu", "v3")
    assert merged.model_split_env.events["shadow_split_2m"] == 0
    assert v3.model_split_env.events["shadow_split_2m"] == 4
    # Merged pays a flush per lazily split frame; v3 only the memslot flush.
    assert merged.stat.remote_tlb_flush_requests > v3.stat.remote_tlb_flush_requests


def test_under_shadow_paging_only_v3_splits() -> None:
    merged, v3 = run("eager_split_shadow_paging", "merged"), run("eager_split_shadow_paging", "v3")
    assert merged.model_split_env.events["shadow_split_2m"] == 0
    assert v3.model_split_env.events["shadow_split_2m"] == 4


def test_merged_lookup_zaps_the_unsync_page_at_the_child_gfn_and_v3_does_not() -> None:
    merged = run("split_zaps_unsync_page_at_child_gfn", "merged")
    v3 = run("split_zaps_unsync_page_at_child_gfn", "v3")
    assert (merged.stat.mmu_shadow_zapped, merged.stat.mmu_unsync) == (1, 0)
    assert (v3.stat.mmu_shadow_zapped, v3.stat.mmu_unsync) == (0, 1)
