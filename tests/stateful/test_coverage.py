"""The state machine runs are not vacuous: under the ci profile they reach every rare split event.

Each run starts from one focus (a setup draw the machine also makes on its
own): none, KVM_CLEAR_DIRTY_LOG harvesting, the same with a second EPT
alias of the 1G page mapped 4K, a racing thread armed, or an unsync 4K
guest table.  The union of the events of the five runs must hold every
event of kvmsplit.machine.RARE_EVENTS.
"""

from collections import Counter

from hypothesis.stateful import run_state_machine_as_test

import kvmsplit.machine as machine

FOCUSED_RUNS = (("tdp", "none"), ("tdp", "clear"), ("tdp", "alias_1g"), ("tdp", "race"), ("shadow", "unsync"))


def run_collecting_events(mmu: str, model: str, focus: str) -> Counter[str]:
    seen: Counter[str] = Counter()
    base = machine.machine_for(mmu, model, focus=focus)

    class Counting(base):  # type: ignore[misc, valid-type]
        def teardown(self) -> None:
            if self.kvm is not None:
                seen.update(set(self.kvm.model_split_env.events))
            super().teardown()

    run_state_machine_as_test(Counting)
    return seen


def test_ci_runs_reach_every_rare_split_event() -> None:
    seen: Counter[str] = Counter()
    for mmu, focus in FOCUSED_RUNS:
        seen += run_collecting_events(mmu, "merged", focus)
    missing = [e for e in machine.RARE_EVENTS if not any(e in k for k in seen)]
    assert not missing, f"never happened under this profile: {missing}; seen {dict(seen)}"
    # Both MMUs split.
    assert seen["tdp_split_2m"] and seen["shadow_split_2m"], dict(seen)


def test_v3_runs_split_under_the_shadow_mmu() -> None:
    seen = run_collecting_events("tdp", "v3", "clear")
    assert seen["shadow_split_2m"] and seen["initially_set_clear_split"], dict(seen)
