"""The Hypothesis state machine: rules are KVM entry points, invariants run after every step.

Each rule builds one trace operation (kvmsplit/trace.py) and runs it, so a
shrunk failure reads as a KVM trace and is saved as a replayable JSON trace.
Every named invariant runs after each operation and at every point where
KVM drops mmu_lock.  Split events (a 1G split, a reused page with a
non-leaf child, -ENOSPC, a lost race...) are reported with `event()` so a
run shows what it exercised, and `target()` steers toward the rare ones.

Example::

    from kvmsplit.machine import machine_for
    TestTdpMerged = machine_for("tdp", "merged").TestCase

Model: the VM is small on purpose (two vCPUs, an 8 MiB THP slot, a 4 MiB
4K slot, guest page tables in their own slot, and in initially-set runs a
1 GiB hugetlb slot), so every invariant can walk the whole MMU cheaply.
"""

from __future__ import annotations

from typing import Any

import attrs
from hypothesis import event, target
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import RULE_MARKER, RuleBasedStateMachine, initialize, precondition, rule

from kvmsplit.errors import HarnessError
from kvmsplit.guest import EPT_GPT, X86_GPT
from kvmsplit.kvm import MMU_CONFIGS
from kvmsplit.memslot import KVM_MEM_LOG_DIRTY_PAGES
from kvmsplit.profiles import freeze_hypothesis_constants
from kvmsplit.scenarios import HVA_BASE as HVA
from kvmsplit.scenarios import PT_GFN, PT_GPA, PT_SLOT, GiB, MiB, identity_map_op
from kvmsplit.trace import TraceConfig, make_kvm, run_op, validate_op

GUEST_SPAN = 24 * MiB  # what the guest's identity map covers below 4 GiB
BIG_GPA = GiB

# (slot, gpa, size, backing)
SLOTS = {0: (0, 8 * MiB, "thp"), 1: (16 * MiB, 4 * MiB, "4k"), 2: (BIG_GPA, GiB, "hugetlb-1g")}
MOVED_GPA = 12 * MiB  # slot 1 moves between 16 MiB and 12 MiB

# Events a CI run must see at least once (tests/stateful checks the union).
RARE_EVENTS = (
    "split_1g",
    "split_2m",
    "reuse_nonleaf_flush",
    "enospc",
    "eagain",
    "enomem",
    "race_lost",
    "unsync_resynced",
    "initially_set_clear_split",
)


# Starting states a run may draw (see KvmMachine.setup()).
FOCUSES = ("none", "clear", "race", "logging", "unsync", "alias", "alias_1g")


def setup_draws(focus: st.SearchStrategy[str]) -> dict[str, st.SearchStrategy[Any]]:
    """What KvmMachine.setup() draws: the VM's configuration, the split paths' plan, the focus."""
    return dict(
        initially_set=st.booleans(),
        no_eager=st.booleans(),
        nx=st.booleans(),
        plan=st.tuples(
            st.integers(0, 2),
            st.integers(0, 1),
            st.integers(0, 1),
            st.sampled_from(["none", "accessed", "zap"]),
            st.sampled_from([0, 4, 5, 6, 7]),
        ),
        focus=focus,
    )


class KvmMachine(RuleBasedStateMachine):
    """Drive one VM through KVM operations; subclasses fix the MMU configuration and model."""

    mmu_kind = "tdp"
    model = "merged"
    # None checks every invariant; a list checks only those (a quality test
    # shows one invariant alone catches its mutant).
    checked_invariants: tuple[str, ...] | None = None

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[dict[str, Any]] = []
        self.kvm: Any = None
        self.checker: Any = None
        self.initially_set = False
        self.table_level: dict[int, int] = {}
        self.next_table = PT_GFN + 64
        self.seen_events: dict[str, int] = {}
        self.focus = "none"

    # --- plumbing ---------------------------------------------------------------

    def apply(self, op: dict[str, Any]) -> Any:
        """Run one operation; record it; check every invariant."""
        spec, args = validate_op(len(self.ops), op)
        self.ops.append(op)
        try:
            out = run_op(self.kvm, spec, args)
        except HarnessError:
            # An operation KVM would reject (-EINVAL, -EEXIST...): no state change.
            self.ops.pop()
            return None
        self.checker.after_operation()
        self._report_events()
        return out

    def _report_events(self) -> None:
        events = dict(self.kvm.model_split_env.events)
        if not currently_in_test_context():
            # Driven by hand or by a plain random walk: nothing to report to.
            self.seen_events = events
            return
        for name, count in events.items():
            if count > self.seen_events.get(name, 0):
                event(f"split: {name}")
        self.seen_events = events

    def config(self) -> TraceConfig:
        return TraceConfig(mmu=self.mmu_kind, nr_vcpus=2, model=self.model)

    @property
    def guest_format(self) -> str:
        return "x86" if self.mmu_kind == "shadow" else "ept"

    @property
    def nested(self) -> bool:
        return self.mmu_kind != "shadow"

    # --- setup ----------------------------------------------------------------------

    @initialize(**setup_draws(st.sampled_from(FOCUSES)))  # type: ignore[call-overload]
    def setup(
        self,
        initially_set: bool,
        no_eager: bool,
        nx: bool,
        plan: tuple[int, int, int, str, int],
        focus: str = "none",
    ) -> None:
        # Hypothesis already runs a random subset of rules per test case
        # (swarm testing through its feature flags).  Drawing "eager off"
        # keeps the simplest draw, which it favours, the richest run.
        # A focus steers a run toward rare branches by its starting state:
        # "clear" harvests with KVM_CLEAR_DIRTY_LOG, eager splitting on for
        # good, so clears split 2M and 1G pages; "unsync" starts with an unsync 4K
        # guest table (KVM shadowed it, then the guest wrote one of its PTEs);
        # "alias" maps one L1 2M page at two L2 addresses, both huge, so a
        # split reuses the page the other alias's split made;
        # "alias_1g" is "clear" plus a second L2 alias of the 1G page, mapped
        # 4K under logging, so a CLEAR's split reuses a page with a non-leaf;
        # "race" arms a racing thread for the compare-and-exchange of the
        # first TDP MMU split under the read lock (logging start, eager on);
        # "logging" ends setup with dirty logging on slot 0, as the selftest
        # does after populating, so one guest write is a logged write.
        self.focus = focus
        if focus in ("clear", "alias_1g"):
            initially_set, no_eager = True, False
        elif focus == "race":
            initially_set, no_eager = False, False
        elif focus == "logging":
            initially_set = False
        eager = not no_eager
        self.initially_set = initially_set
        cfg = self.config()
        cfg.eager_page_split = eager
        cfg.nx_huge_pages = nx
        self.kvm = make_kvm(cfg)
        from kvmsplit.checker import Checker

        self.checker = Checker(self.kvm, list(self.checked_invariants) if self.checked_invariants is not None else None)
        self.ops = []
        if initially_set:
            self.apply({"op": "kvm_enable_cap_manual_dirty_log_protect", "flags": 3})
        for slot in (0, 1) + ((2,) if initially_set else ()):
            gpa, size, backing = SLOTS[slot]
            self.apply(self._slot_op(slot, gpa, size, 0, backing))
        self.apply(self._slot_op(PT_SLOT, PT_GPA, 4 * MiB, 0, "4k"))
        fmt = self.guest_format
        tables = list(range(PT_GFN + 1, PT_GFN + 40))
        self.apply(identity_map_op(fmt, PT_GFN, tables, 0, GUEST_SPAN >> 12, 2))
        if fmt == "x86":
            # The guest also maps its own tables, to be able to edit them.
            self.apply(identity_map_op(fmt, PT_GFN, tables[3:], PT_GFN, 1024, 2))
        if initially_set:
            self.apply(identity_map_op(fmt, PT_GFN, tables[6:], BIG_GPA >> 12, GiB >> 12, 3))
        # Record which guest tables hold 2M entries (the ones worth editing).
        self.table_level = {}
        self._index_tables(PT_GFN, 4)
        if not self.nested:
            for v in range(2):
                self.apply({"op": "kvm_set_cr3", "vcpu": v, "root_gfn": PT_GFN})
        # Fault in slot 0 with huge pages: L1 on vCPU 0, and L2 on vCPU 1 when nested.
        self.apply({"op": "kvm_vcpu_run", "vcpu": 0, "start": 0, "end": 8 * MiB, "stride": 2 * MiB, "access": "read"})
        if self.nested:
            self.apply({"op": "nested_vmx_enter", "vcpu": 1, "eptp_gfn": PT_GFN})
            self.apply(
                {"op": "kvm_vcpu_run", "vcpu": 1, "start": 0, "end": 8 * MiB, "stride": 2 * MiB, "access": "read"}
            )
        if initially_set:
            self.apply(
                {
                    "op": "kvm_vcpu_run",
                    "vcpu": 1,
                    "start": BIG_GPA,
                    "end": BIG_GPA + 1,
                    "stride": 4096,
                    "access": "read",
                }
            )
        # The split paths' nondeterminism for the first splits of the run;
        # rules queue more later.  All of it shrinks away to "none".
        need_resched, topup_fails, tdp_alloc_fails, race, headroom = plan
        if focus == "alias_1g":
            # Room and memory for its split: the guard or -ENOMEM would stop it.
            headroom = topup_fails = tdp_alloc_fails = 0
        if focus == "race" and race == "none":
            race = "zap"
        if need_resched or topup_fails or tdp_alloc_fails:
            self.apply(
                {
                    "op": "model_split_env",
                    "need_resched": need_resched,
                    "topup_fails": topup_fails,
                    "tdp_alloc_fails": tdp_alloc_fails,
                }
            )
        if race != "none" and self.mmu_kind == "tdp":
            self.apply({"op": "model_tdp_race", "kind": race})
        if headroom:
            self.apply({"op": "kvm_mmu_change_mmu_pages", "headroom": headroom})
        if focus == "clear":
            # L1 maps the 1G slot with one TDP MMU 1G page, for clears to split.
            self.apply({"op": "kvm_vcpu_access", "vcpu": 0, "addr": BIG_GPA, "access": "read"})
        # The vCPU whose guest tables KVM shadows: L1's under shadow paging,
        # L2's (L1's EPT tables) on vCPU 1 when nested.
        shadowed = 1 if self.nested else 0
        if focus == "unsync":
            self.guest_write_pde(shadowed, 3, 3, 7, "table")
            self._enter_l2(shadowed)
            self.kvm_vcpu_run(shadowed, 3, "read")
            self.guest_write_pte(shadowed, 0, 7)
        if focus == "alias" and self.nested:
            # L2's 2M page at 8 MiB aliases L1's frame 0, and both are mapped huge.
            self.guest_write_pde(shadowed, 4, 0, 7, "huge")
            self._enter_l2(shadowed)
            self.kvm_vcpu_run(shadowed, 4, "read")
        if initially_set or focus == "logging":
            # Logging on from the start: the initially-set use, where
            # userspace harvests with KVM_CLEAR_DIRTY_LOG, which splits, or
            # the logging focus, where the enable itself splits.
            self.kvm_mmu_slot_apply_flags()
        if focus == "alias_1g" and self.nested:
            # L2's 1G page at 2 GiB aliases the 1G slot its page at 1 GiB maps
            # huge; touched under logging, it maps 4K through a direct 1G-level
            # page a later split of the 1 GiB alias reuses, non-leaf and all.
            pdpt = next(g for g, lvl in sorted(self.table_level.items()) if lvl == 3)
            self._edit_pte(shadowed, pdpt, 2, EPT_GPT.make_gpte(BIG_GPA >> 12, 7, 3, large=True))
            self._enter_l2(shadowed)
            self.apply({"op": "kvm_vcpu_access", "vcpu": shadowed, "addr": 2 * GiB, "access": "read"})

    def _index_tables(self, gfn: int, level: int) -> None:
        fmt = EPT_GPT if self.guest_format == "ept" else X86_GPT
        self.table_level[gfn] = level
        if level == 1:
            return
        for gpte in self.kvm.guest_tables.get(gfn, []):
            if fmt.is_present_gpte(gpte) and not fmt.is_last_gpte(level, gpte):
                self._index_tables(fmt.gpte_to_gfn_lvl(gpte, 1), level - 1)

    @staticmethod
    def _slot_op(slot: int, gpa: int, size: int, flags: int, backing: str | None) -> dict[str, Any]:
        op: dict[str, Any] = {
            "op": "kvm_set_user_memory_region",
            "slot": slot,
            "flags": flags,
            "gpa": gpa,
            "size": size,
            "hva": HVA + gpa,
        }
        if slot == 1:
            op["hva"] = HVA + SLOTS[1][0]
        if backing is not None:
            op["backing"] = backing
        return op

    # --- memslots ---------------------------------------------------------------------

    @rule()
    def kvm_mmu_slot_apply_flags(self) -> None:
        """Start dirty logging on slot 0 (and on the 1G slot in initially-set runs)."""
        self._set_logging(0, True)
        if self.initially_set:
            self._set_logging(2, True)

    @rule(slot=st.sampled_from([0, 1, 2]))
    def kvm_mmu_slot_apply_flags_stop(self, slot: int) -> None:
        """Stop dirty logging on a slot (zap collapsible SPTEs)."""
        self._set_logging(slot, False)

    @rule(slot=st.sampled_from([1, 2]))
    def kvm_mmu_slot_apply_flags_start(self, slot: int) -> None:
        self._set_logging(slot, True)

    def _set_logging(self, slot: int, on: bool) -> None:
        # Separate start and stop rules, not a toggle, so the shrinker can drop
        # any one of them without flipping the meaning of the rest.
        s = self.kvm.memslots.get(slot)
        if s is None or bool(s.flags & KVM_MEM_LOG_DIRTY_PAGES) == on:
            return
        flags = s.flags ^ KVM_MEM_LOG_DIRTY_PAGES
        self.apply(self._slot_op(slot, s.base_gfn << 12, s.npages << 12, flags, None) | {"hva": s.userspace_addr})

    @rule(action=st.sampled_from(["delete", "create", "move"]))
    def kvm_set_memory_region(self, action: str) -> None:
        """Delete, re-create or move slot 1 (kvm_invalidate_memslot() zaps all fast)."""
        s = self.kvm.memslots.get(1)
        gpa0, size, backing = SLOTS[1]
        if action == "delete" and s is not None:
            self.apply(
                {
                    "op": "kvm_set_user_memory_region",
                    "slot": 1,
                    "flags": 0,
                    "gpa": s.base_gfn << 12,
                    "size": 0,
                    "hva": s.userspace_addr,
                }
            )
        elif action == "create" and s is None:
            self.apply(self._slot_op(1, gpa0, size, 0, backing))
        elif action == "move" and s is not None:
            new = MOVED_GPA if s.base_gfn << 12 == gpa0 else gpa0
            self.apply(self._slot_op(1, new, size, s.flags, None) | {"hva": s.userspace_addr})

    # --- guest accesses ---------------------------------------------------------------

    def _addresses(self) -> st.SearchStrategy[int]:
        return st.one_of(
            # Slot 0 twice over: its THP frames are where splits happen.
            st.integers(0, SLOTS[0][1] - 1),
            st.integers(0, GUEST_SPAN - 1),
            st.integers(BIG_GPA, BIG_GPA + 4 * MiB),
            st.sampled_from([0, 0x1000, 2 * MiB, 2 * MiB + 0x5000, 6 * MiB - 4096, 16 * MiB, 20 * MiB - 4096]),
        )

    @rule(data=st.data(), vcpu=st.integers(0, 1), access=st.sampled_from(["read", "write", "write", "exec"]))
    def kvm_vcpu_access(self, data: st.DataObject, vcpu: int, access: str) -> None:
        """A guest read, write or fetch; faults into KVM as needed and fills the TLB."""
        addr = data.draw(self._addresses(), label="addr")
        addr &= ~0xFFF
        self.apply({"op": "kvm_vcpu_access", "vcpu": vcpu, "addr": addr, "access": access})

    @rule(vcpu=st.integers(0, 1), frame=st.integers(0, 11), access=st.sampled_from(["read", "write"]))
    def kvm_vcpu_run(self, vcpu: int, frame: int, access: str) -> None:
        """One guest pass over a 2M frame, every 64 KiB."""
        start = frame * 2 * MiB
        self.apply(
            {
                "op": "kvm_vcpu_run",
                "vcpu": vcpu,
                "start": start,
                "end": start + 2 * MiB,
                "stride": 64 * 1024,
                "access": access,
            }
        )

    @precondition(lambda self: self.nested)
    @rule(vcpu=st.integers(0, 1))
    def nested_vmx_enter(self, vcpu: int) -> None:
        """VMLAUNCH/VMRESUME: the vCPU now runs L2 on the shadow MMU (guest_mode)."""
        if not self.kvm.vcpus[vcpu].guest_mode:
            self.apply({"op": "nested_vmx_enter", "vcpu": vcpu, "eptp_gfn": PT_GFN})

    @precondition(lambda self: self.nested)
    @rule(vcpu=st.integers(0, 1))
    def nested_vmx_vmexit(self, vcpu: int) -> None:
        if self.kvm.vcpus[vcpu].guest_mode:
            self.apply({"op": "nested_vmx_vmexit", "vcpu": vcpu})

    # --- guest page tables ---------------------------------------------------------------

    def _enter_l2(self, vcpu: int) -> None:
        if self.nested and not self.kvm.vcpus[vcpu].guest_mode:
            self.apply({"op": "nested_vmx_enter", "vcpu": vcpu, "eptp_gfn": PT_GFN})

    def _edit_pte(self, vcpu: int, table: int, index: int, value: int) -> None:
        v = self.kvm.vcpus[vcpu]
        if v.guest_mode:
            self.apply({"op": "nested_vmx_vmexit", "vcpu": vcpu})
        # L1 stores to its table: through the TDP MMU, or through its identity map.
        self.apply(
            {
                "op": "kvm_vcpu_access",
                "vcpu": vcpu,
                "addr": table << 12 | index << 3,
                "access": "write",
                "pte": [index, value],
            }
        )

    @rule(
        vcpu=st.integers(0, 1),
        index=st.integers(0, 11),
        target_frame=st.integers(0, 11),
        access=st.sampled_from([7, 7, 5, 3, 1, 4]),
        kind=st.sampled_from(["huge", "huge", "table", "none"]),
    )
    def guest_write_pde(self, vcpu: int, index: int, target_frame: int, access: int, kind: str) -> None:
        """The guest rewrites a 2M-level entry: another 2M page, a new 4K table, or nothing."""
        fmt = EPT_GPT if self.guest_format == "ept" else X86_GPT
        pds = sorted(g for g, lvl in self.table_level.items() if lvl == 2)
        if not pds:
            return
        pd = pds[0]
        gfn = target_frame * 512
        if kind == "none":
            value = 0
        elif kind == "huge":
            value = fmt.make_gpte(gfn, access, 2, large=True)
        else:
            table = self.next_table
            if table >= PT_GFN + 1024:
                return
            self.next_table += 1
            self.apply(
                {
                    "op": "guest_store_table",
                    "format": self.guest_format,
                    "gfn": table,
                    "first_gfn": gfn,
                    "access": access,
                }
            )
            self.table_level[table] = 1
            value = fmt.make_gpte(table, 7)
        self._edit_pte(vcpu, pd, index, value)

    @rule(vcpu=st.integers(0, 1), index=st.integers(0, 7), access=st.sampled_from([7, 5, 0]))
    def guest_write_pte(self, vcpu: int, index: int, access: int) -> None:
        """The guest rewrites a 4K entry of one of its 4K tables (these may be unsync)."""
        fmt = EPT_GPT if self.guest_format == "ept" else X86_GPT
        pts = sorted(g for g, lvl in self.table_level.items() if lvl == 1)
        if not pts:
            return
        table = pts[index % len(pts)]
        old = self.kvm.guest_tables[table][index]
        base = fmt.gpte_to_gfn_lvl(old, 1) if old else 0
        value = fmt.make_gpte(base + 1, access) if access else 0
        self._edit_pte(vcpu, table, index, value)

    @rule(vcpu=st.integers(0, 1))
    def kvm_guest_tlb_flush(self, vcpu: int) -> None:
        """The guest flushes its TLB: CR3 reload (shadow paging) or INVEPT (L2)."""
        self.apply({"op": "kvm_guest_tlb_flush", "vcpu": vcpu})

    # --- dirty log ioctls ---------------------------------------------------------------

    @rule(slot=st.sampled_from([0, 1, 2]))
    def kvm_get_dirty_log(self, slot: int) -> None:
        s = self.kvm.memslots.get(slot)
        if s is not None and s.dirty_bitmap is not None:
            self.apply({"op": "kvm_get_dirty_log", "slot": slot})

    @precondition(lambda self: self.initially_set)
    @rule(
        slot=st.sampled_from([0, 0, 1, 2]),
        word=st.integers(0, 15),
        bits=st.lists(st.integers(0, 63), min_size=1, max_size=4),
    )
    def kvm_clear_dirty_log(self, slot: int, word: int, bits: list[int]) -> None:
        s = self.kvm.memslots.get(slot)
        if s is None or s.dirty_bitmap is None or word * 64 >= s.npages:
            return
        events = self.kvm.model_split_env.events
        before = sum(v for k, v in events.items() if "split_" in k)
        gfns = sorted({s.base_gfn + word * 64 + b for b in bits})
        self.apply({"op": "kvm_clear_dirty_log", "slot": slot, "first_page": word * 64, "num_pages": 64, "gfns": gfns})
        if sum(v for k, v in events.items() if "split_" in k) > before:
            events["initially_set_clear_split"] += 1

    # --- host and parameters --------------------------------------------------------------

    @rule(frame=st.integers(0, 3), what=st.sampled_from(["split", "collapse", "dontneed", "clear_young"]))
    def kvm_mmu_notifier(self, frame: int, what: str) -> None:
        """A host mm change in slot 0's backing reaches KVM's MMU notifier."""
        hva = HVA + frame * 2 * MiB
        op = {
            "split": {"op": "host_thp_split", "hva": hva},
            "collapse": {"op": "host_thp_collapse", "hva": hva},
            "dontneed": {"op": "host_madv_dontneed", "hva": hva + 0x3000, "size": 0x2000},
            "clear_young": {"op": "host_clear_young", "hva": hva, "size": 2 * MiB},
        }[what]
        self.apply(op)

    # The alias_1g focus needs room for its split: the guard would stop it.
    @precondition(lambda self: self.focus != "alias_1g")
    @rule(headroom=st.sampled_from([4, 5, 6, 7, 40]))
    def kvm_mmu_change_mmu_pages(self, headroom: int) -> None:
        self.apply({"op": "kvm_mmu_change_mmu_pages", "headroom": headroom})

    @precondition(lambda self: self.focus not in ("clear", "alias_1g", "race"))
    @rule(which=st.sampled_from(["eager_page_split", "nx_huge_pages"]), value=st.booleans())
    def set_module_param(self, which: str, value: bool) -> None:
        self.apply({"op": f"set_{which}", "value": value})

    @precondition(lambda self: self.focus != "alias_1g")
    @rule(need_resched=st.integers(0, 3), topup_fails=st.integers(0, 1), tdp_alloc_fails=st.integers(0, 1))
    def model_split_env(self, need_resched: int, topup_fails: int, tdp_alloc_fails: int) -> None:
        """Queue the split paths' nondeterminism: -EAGAIN, failed top-ups, failed allocations."""
        self.apply(
            {
                "op": "model_split_env",
                "need_resched": need_resched,
                "topup_fails": topup_fails,
                "tdp_alloc_fails": tdp_alloc_fails,
            }
        )

    @precondition(lambda self: self.mmu_kind == "tdp")
    @rule(kind=st.sampled_from(["accessed", "zap"]))
    def model_tdp_race(self, kind: str) -> None:
        """Arm another thread at the TDP MMU's next compare-and-exchange on a huge SPTE."""
        self.apply({"op": "model_tdp_race", "kind": kind})

    def teardown(self) -> None:
        if self.kvm is not None:
            events = self.kvm.model_split_env.events
            rare = sum(1 for e in RARE_EVENTS if any(e in k for k in events))
            # Steer toward runs that reach many of the rare branches.
            if currently_in_test_context():
                target(float(rare), label="distinct rare split events")
        if self.checker is not None:
            self.checker.detach()


_MACHINES: dict[tuple[str, str, tuple[str, ...] | None, str | None], type[KvmMachine]] = {}


def machine_for(
    mmu_kind: str, model: str, invariants: tuple[str, ...] | None = None, focus: str | None = None
) -> type[KvmMachine]:
    """The state machine class for one MMU configuration and one model.

    @invariants, if given, are the only ones checked; @focus, if given, is
    the starting state of every test case instead of a draw.
    """
    if focus is not None and focus not in FOCUSES:
        raise HarnessError(f"unknown focus {focus!r}; known: {', '.join(FOCUSES)}")
    freeze_hypothesis_constants()
    key = (mmu_kind, model, invariants, focus)
    if key not in _MACHINES:
        name = f"KvmMachine_{mmu_kind.replace('-', '_')}_{model.replace('/', '_').replace('.', '_')}"
        attrs: dict[str, Any] = {"mmu_kind": mmu_kind, "model": model, "checked_invariants": invariants}
        if focus is not None:
            name += f"_{focus}"
            # The same setup with the focus drawn from one value, so a
            # printed trace shows the focus it ran from.
            draws = setup_draws(st.just(focus))
            attrs["setup"] = initialize(**draws)(KvmMachine.setup.__wrapped__)  # type: ignore[call-overload]
        _MACHINES[key] = type(name, (KvmMachine,), attrs)
    return _MACHINES[key]


NO_PLAN = (0, 0, 0, "none", 0)
# The setup draws Hypothesis shrinks toward: no initially-set mode, eager
# splitting on, no NX mitigation, nothing queued, no focus.
SIMPLEST_SETUP: dict[str, Any] = {
    "initially_set": False,
    "no_eager": False,
    "nx": False,
    "plan": NO_PLAN,
    "focus": "none",
}


def _is_setup_draw(instance: Any, attribute: Any, value: dict[str, Any]) -> None:
    unknown = sorted(set(value) - set(SIMPLEST_SETUP))
    if unknown:
        raise HarnessError(f"{attribute.name}: {unknown} are not setup draws; known: {sorted(SIMPLEST_SETUP)}")
    if value.get("focus", "none") not in FOCUSES:
        raise HarnessError(f"{attribute.name}: unknown focus {value['focus']!r}; known: {', '.join(FOCUSES)}")


def _are_rules(instance: Any, attribute: Any, value: tuple[tuple[str, tuple[Any, ...]], ...]) -> None:
    for name, _args in value:
        if not hasattr(getattr(KvmMachine, name, None), RULE_MARKER):
            raise HarnessError(f"{attribute.name}: {name!r} is not a rule of the state machine")


@attrs.frozen(kw_only=True)
class StatedTrace:
    """A trace of the state machine, as a mutant states its shortest exposing one.

    @setup holds the setup draws that differ from SIMPLEST_SETUP, @rules the
    rules after setup as (name, args); the trace is `steps` steps long,
    setup included, the unit a shrunk Hypothesis trace is counted in.
    """

    mmu: str = attrs.field(default="tdp", validator=attrs.validators.in_(MMU_CONFIGS))
    setup: dict[str, Any] = attrs.field(factory=dict, validator=_is_setup_draw, hash=False)
    rules: tuple[tuple[str, tuple[Any, ...]], ...] = attrs.field(default=(), converter=tuple, validator=_are_rules)

    @property
    def steps(self) -> int:
        return 1 + len(self.rules)

    def run(self, model: str, invariants: tuple[str, ...] | None = None) -> None:
        """Run the trace on @model, checking @invariants (all by default); a finding raises."""
        state = machine_for(self.mmu, model, invariants)()
        try:
            state.setup(**(SIMPLEST_SETUP | self.setup))
            for name, args in self.rules:
                getattr(state, name)(*args)
        finally:
            state.teardown()


@attrs.frozen(kw_only=True)
class Hunt:
    """Where the ci-profile state machine finds a mutant by itself.

    The MMU configuration, and the focus every test case starts from, or
    None when the machine draws the focus too.  tests/quality runs it with
    the mutant's own invariant alone: a failure it finds that way is found
    at the same example or earlier with every invariant checked, since the
    draws do not depend on what is checked until something fails.
    """

    mmu: str = attrs.field(default="tdp", validator=attrs.validators.in_(MMU_CONFIGS))
    focus: str | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.in_(FOCUSES)))
