"""Model: traces, the operations a scenario, a state machine or a reproducer runs.

A trace is a configuration plus a list of operations, each named after the
KVM entry point it drives, with its arguments.  `run_trace()` replays one
on a fresh VM, checking every invariant after every operation and at
every mmu_lock release, and stops at the first finding.  The JSON form is
documented in docs/trace-format.md.

Bad input (an unknown operation, a missing or ill-typed argument) raises
`HarnessError` naming the operation's position and the field; nothing runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs

from kvmsplit import mmu, x86
from kvmsplit.errors import HarnessError, InvariantViolation, KvmBugOn
from kvmsplit.guest import EPT_GPT, X86_GPT, guest_build_identity_map
from kvmsplit.kvm import MMU_CONFIGS, Kvm, KvmConfig
from kvmsplit.memslot import dirty_bitmap_gfns

TRACE_FORMAT = "kvmsplit-trace"
TRACE_VERSION = 1

_INT = (int,)


@attrs.frozen
class Arg:
    name: str
    kind: str  # "int", "bool", "str", "gfns", "pte", "intlist"
    required: bool = True
    default: Any = None
    choices: tuple[str, ...] = ()


@attrs.frozen
class OpSpec:
    name: str
    args: tuple[Arg, ...]
    run: Callable[..., Any]
    doc: str


def _access(kvm: Kvm, vcpu: int, addr: int, access: str, pte: list[int] | None, width: int = 8) -> dict[str, Any]:
    if pte is None and width != 8:
        raise HarnessError(f"kvm_vcpu_access: field 'width' is {width!r} but no 'pte' is written")
    r = mmu.kvm_vcpu_access(
        kvm,
        vcpu,
        addr,
        write=access == "write",
        exec=access == "exec",
        data=(pte[0], pte[1], width) if pte is not None else None,
    )
    return {"outcome": r.outcome, "gfn": r.gfn, "faults": r.faults}


def _run(kvm: Kvm, vcpu: int, start: int, end: int, stride: int, access: str) -> dict[str, Any]:
    """Model: one KVM_RUN of a guest loop touching [start, end) every @stride bytes."""
    if stride <= 0 or end < start:
        raise HarnessError(f"kvm_vcpu_run: bad range {start:#x}..{end:#x} stride {stride:#x}")
    outcomes: dict[str, int] = {}
    for addr in range(start, end, stride):
        r = mmu.kvm_vcpu_access(kvm, vcpu, addr, write=access == "write", exec=access == "exec")
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    return outcomes


def _identity_map(
    kvm: Kvm,
    format: str,
    root_gfn: int,
    table_gfns: list[int],
    gfn_start: int,
    npages: int,
    page_level: int,
    access: int,
) -> None:
    guest_build_identity_map(
        kvm,
        EPT_GPT if format == "ept" else X86_GPT,
        root_gfn=root_gfn,
        table_gfns=table_gfns,
        gfn_start=gfn_start,
        npages=npages,
        page_level=page_level,
        access=access,
    )


def _store_table(kvm: Kvm, format: str, gfn: int, first_gfn: int, access: int) -> None:
    from kvmsplit import shadow_mmu

    if any(sp.gfn == gfn for sp in shadow_mmu.for_each_gfn_valid_sp_with_gptes(kvm, gfn)):
        raise HarnessError(f"guest_store_table: gfn {gfn:#x} is shadowed; a guest store there goes through KVM")
    if kvm.gfn_to_memslot(gfn) is None:
        raise HarnessError(f"guest_store_table: gfn {gfn:#x} is in no memslot")
    fmt = EPT_GPT if format == "ept" else X86_GPT
    kvm.guest_tables[gfn] = [fmt.make_gpte(first_gfn + i, access) for i in range(512)]


def _get_dirty_log(kvm: Kvm, slot: int) -> dict[str, Any]:
    bitmap = x86.kvm_get_dirty_log(kvm, slot)
    return {"gfns": dirty_bitmap_gfns(kvm.slot(slot), bitmap)}


def _clear_dirty_log(kvm: Kvm, slot: int, first_page: int, num_pages: int, gfns: list[int]) -> None:
    s = kvm.slot(slot)
    bitmap = bytearray(((num_pages + 63) // 64) * 8)
    for gfn in gfns:
        rel = gfn - s.base_gfn - first_page
        if not 0 <= rel < num_pages:
            raise HarnessError(
                f"kvm_clear_dirty_log: gfn {gfn:#x} is outside pages {first_page:#x}+{num_pages:#x} of slot {slot}"
            )
        bitmap[rel >> 3] |= 1 << (rel & 7)
    x86.kvm_clear_dirty_log(kvm, slot, first_page, num_pages, bytes(bitmap))


def _zap(kvm: Kvm, start: int, end: int) -> None:
    mmu.kvm_zap_gfn_range(kvm, start, end)


def _change_mmu_pages(kvm: Kvm, headroom: int) -> None:
    from kvmsplit import shadow_mmu

    shadow_mmu.kvm_mmu_change_mmu_pages(kvm, kvm.n_used_mmu_pages + headroom)
    kvm.mmu_unlock("kvm_mmu_change_mmu_pages")


def _split_env(kvm: Kvm, need_resched: int, topup_fails: int, tdp_alloc_fails: int) -> None:
    env = kvm.model_split_env
    env.need_resched += [True] * need_resched
    env.topup_fails += [True] * topup_fails
    env.tdp_alloc_fails += [True] * tdp_alloc_fails


def _arm_tdp_race(kvm: Kvm, kind: str) -> None:
    """Arm one racing change at the next TDP compare-and-exchange on a huge SPTE."""
    from kvmsplit import tdp_mmu
    from kvmsplit.spte import is_large_pte, is_shadow_present_pte

    if kind == "none":
        kvm.model_tdp_race = None
        return

    def race(k: Kvm, it: Any) -> None:
        if not (is_shadow_present_pte(it.old_spte) and is_large_pte(it.old_spte)):
            return
        k.model_tdp_race = None
        k.model_split_env.events[f"race_{kind}"] += 1
        old = it.sptep.spte
        if kind == "accessed":
            # The CPU sets the accessed bit of a huge SPTE it walks.
            it.sptep.sp.spt[it.sptep.index] = old | k.masks.shadow_accessed_mask
        else:
            # A concurrent zap (freeze, flush, clear) of the same SPTE.
            it.sptep.sp.spt[it.sptep.index] = 0
            tdp_mmu.handle_changed_spte(k, it.gfn, old, 0, it.level, True)
            k.kvm_flush_remote_tlbs("racing tdp_mmu_zap_spte_atomic()")

    kvm.model_tdp_race = race


def _expect(kvm: Kvm, **expected: int) -> None:
    stats = kvm.stat.as_dict()
    for key, want in expected.items():
        if key == "n_used_mmu_pages":
            got = kvm.n_used_mmu_pages
        elif key in stats:
            got = stats[key]
        else:
            raise HarnessError(f"expect: unknown stat {key!r}; known: {sorted(stats)} and n_used_mmu_pages")
        if got != want:
            raise InvariantViolation("scenario_expectation", f"{key} is {got}, the scenario expects {want}")


OPS: dict[str, OpSpec] = {}


def _op(name: str, run: Callable[..., Any], doc: str, *args: Arg) -> None:
    OPS[name] = OpSpec(name, tuple(args), run, doc)


_op(
    "kvm_set_user_memory_region",
    lambda kvm, slot, flags, gpa, size, hva, backing: x86.kvm_set_user_memory_region(
        kvm, slot, flags, gpa, size, hva, backing
    ),
    "KVM_SET_USER_MEMORY_REGION: create, delete (size 0), move or change flags",
    Arg("slot", "int"),
    Arg("flags", "int", False, 0),
    Arg("gpa", "int"),
    Arg("size", "int"),
    Arg("hva", "int"),
    Arg("backing", "str", False, None, ("4k", "thp", "hugetlb-2m", "hugetlb-1g")),
)
_op(
    "kvm_vcpu_access",
    _access,
    "a guest read, write or instruction fetch at a gpa (L1 with TDP), gva (shadow paging) or L2 gpa",
    Arg("vcpu", "int", False, 0),
    Arg("addr", "int"),
    Arg("access", "str", False, "read", ("read", "write", "exec")),
    Arg("pte", "pte", False, None),
    # Model: bytes of the guest PTE store, from its first byte (1, 2, 4 or 8).
    Arg("width", "int", False, 8),
)
_op(
    "kvm_vcpu_run",
    _run,
    "Model: one KVM_RUN of a guest loop touching [start, end) every stride bytes",
    Arg("vcpu", "int", False, 0),
    Arg("start", "int"),
    Arg("end", "int"),
    Arg("stride", "int", False, 4096),
    Arg("access", "str", False, "read", ("read", "write", "exec")),
)
_op(
    "guest_build_identity_map",
    _identity_map,
    "Model: the guest lays out page tables (x86 or EPT format) mapping addr == gpa",
    Arg("format", "str", True, None, ("x86", "ept")),
    Arg("root_gfn", "int"),
    Arg("table_gfns", "intlist"),
    Arg("gfn_start", "int"),
    Arg("npages", "int"),
    Arg("page_level", "int"),
    Arg("access", "int", False, 7),
)
_op(
    "guest_store_table",
    lambda kvm, format, gfn, first_gfn, access: _store_table(kvm, format, gfn, first_gfn, access),
    "Model: the guest fills a fresh page (not yet shadowed) with 512 4K PTEs mapping first_gfn..+511",
    Arg("format", "str", True, None, ("x86", "ept")),
    Arg("gfn", "int"),
    Arg("first_gfn", "int"),
    Arg("access", "int", False, 7),
)
_op(
    "kvm_set_cr3",
    lambda kvm, vcpu, root_gfn: x86.kvm_set_cr3(kvm, vcpu, root_gfn),
    "guest CR3 load (shadow paging)",
    Arg("vcpu", "int", False, 0),
    Arg("root_gfn", "int"),
)
_op(
    "nested_vmx_enter",
    lambda kvm, vcpu, eptp_gfn: x86.nested_vmx_enter(kvm, vcpu, eptp_gfn),
    "VMLAUNCH/VMRESUME into L2 with L1's EPT",
    Arg("vcpu", "int", False, 0),
    Arg("eptp_gfn", "int"),
)
_op(
    "nested_vmx_vmexit",
    lambda kvm, vcpu: x86.nested_vmx_vmexit(kvm, vcpu),
    "exit from L2 to L1",
    Arg("vcpu", "int", False, 0),
)
_op(
    "kvm_guest_tlb_flush",
    lambda kvm, vcpu: x86.kvm_guest_tlb_flush(kvm, vcpu),
    "guest TLB flush: CR3 reload or INVEPT",
    Arg("vcpu", "int", False, 0),
)
_op(
    "kvm_enable_cap_manual_dirty_log_protect",
    lambda kvm, flags: x86.kvm_vm_ioctl_enable_cap_manual_dirty_log_protect(kvm, flags),
    "KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): 1 = manual, 3 = manual + initially set",
    Arg("flags", "int"),
)
_op("kvm_get_dirty_log", _get_dirty_log, "KVM_GET_DIRTY_LOG", Arg("slot", "int"))
_op(
    "kvm_clear_dirty_log",
    _clear_dirty_log,
    "KVM_CLEAR_DIRTY_LOG for the listed gfns",
    Arg("slot", "int"),
    Arg("first_page", "int"),
    Arg("num_pages", "int"),
    Arg("gfns", "intlist"),
)
_op(
    "kvm_vm_ioctl_set_nr_mmu_pages",
    lambda kvm, nr: x86.kvm_vm_ioctl_set_nr_mmu_pages(kvm, nr),
    "KVM_SET_NR_MMU_PAGES",
    Arg("nr", "int"),
)
_op(
    "set_eager_page_split",
    lambda kvm, value: x86.set_eager_page_split(kvm, value),
    "write the eager_page_split module parameter",
    Arg("value", "bool"),
)
_op(
    "set_nx_huge_pages",
    lambda kvm, value: x86.set_nx_huge_pages(kvm, value),
    "write the nx_huge_pages module parameter",
    Arg("value", "bool"),
)
_op(
    "host_thp_split",
    lambda kvm, hva: x86.host_thp_split(kvm, hva),
    "the host splits the huge page at hva (MMU notifier)",
    Arg("hva", "int"),
)
_op(
    "host_thp_collapse",
    lambda kvm, hva: x86.host_thp_collapse(kvm, hva),
    "the host collapses the 2M frame at hva (MMU notifier)",
    Arg("hva", "int"),
)
_op(
    "host_madv_dontneed",
    lambda kvm, hva, size: x86.host_madv_dontneed(kvm, hva, size),
    "MADV_DONTNEED on the host (MMU notifier)",
    Arg("hva", "int"),
    Arg("size", "int"),
)
_op(
    "host_clear_young",
    lambda kvm, hva, size: mmu.kvm_mmu_notifier_clear_young(kvm, hva, hva + size),
    "the host ages pages (MMU notifier clear_young): A bits cleared, no flush",
    Arg("hva", "int"),
    Arg("size", "int"),
)
_op(
    "kvm_mmu_change_mmu_pages",
    lambda kvm, headroom: _change_mmu_pages(kvm, headroom),
    "Model: set n_max_mmu_pages to n_used_mmu_pages + headroom (kvm_mmu_change_mmu_pages(), "
    "without the ioctl's KVM_MIN_ALLOC_MMU_PAGES floor, so small VMs reach the split guard)",
    Arg("headroom", "int"),
)
_op(
    "model_split_env",
    lambda kvm, need_resched, topup_fails, tdp_alloc_fails: _split_env(kvm, need_resched, topup_fails, tdp_alloc_fails),
    "Model: queue split nondeterminism: -EAGAIN from need_resched(), failed top-ups, failed TDP allocations",
    Arg("need_resched", "int", False, 0),
    Arg("topup_fails", "int", False, 0),
    Arg("tdp_alloc_fails", "int", False, 0),
)
_op(
    "model_tdp_race",
    lambda kvm, kind: _arm_tdp_race(kvm, kind),
    "Model: another thread changes the next huge SPTE the TDP MMU is about to cmpxchg",
    Arg("kind", "str", True, None, ("accessed", "zap", "none")),
)
_op("kvm_zap_gfn_range", _zap, "kvm_zap_gfn_range(start, end)", Arg("start", "int"), Arg("end", "int"))


def validate_op(index: int, raw: Any) -> tuple[OpSpec, dict[str, Any]]:
    """Check one operation's shape; return its spec and arguments."""
    where = f"operation {index}"
    if not isinstance(raw, dict):
        raise HarnessError(f"{where}: expected an object, got {type(raw).__name__}")
    name = raw.get("op")
    if name == "expect":
        expected = {k: v for k, v in raw.items() if k != "op"}
        for k, v in expected.items():
            if not isinstance(v, int) or isinstance(v, bool):
                raise HarnessError(f"{where} (expect): field {k!r} must be an int, got {v!r}")
        return OpSpec("expect", (), _expect, "check page stats"), expected
    if name not in OPS:
        raise HarnessError(f"{where}: unknown operation {name!r}; known: {', '.join(sorted(OPS))}, expect")
    spec = OPS[name]
    known = {a.name for a in spec.args}
    extra = sorted(set(raw) - known - {"op", "expect"})
    if "expect" in raw and name != "kvm_get_dirty_log":
        extra = sorted([*extra, "expect"])
    if extra:
        raise HarnessError(f"{where} ({name}): unknown field(s) {extra}; fields are {sorted(known)}")
    args: dict[str, Any] = {}
    for a in spec.args:
        if a.name not in raw:
            if a.required:
                raise HarnessError(f"{where} ({name}): missing field {a.name!r}")
            args[a.name] = a.default
            continue
        v = raw[a.name]
        ok = {
            "int": isinstance(v, int) and not isinstance(v, bool) and v >= 0,
            "bool": isinstance(v, bool),
            "str": isinstance(v, str) and (not a.choices or v in a.choices),
            "intlist": isinstance(v, list)
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v),
            "pte": v is None
            or (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)),
        }[a.kind]
        if v is None and not a.required and a.kind != "pte":
            ok = True
        if not ok:
            want = {
                "int": "a non-negative int",
                "bool": "true or false",
                "intlist": "a list of non-negative ints",
                "pte": "[index, value]",
            }.get(a.kind, f"one of {list(a.choices)}" if a.choices else "a string")
            raise HarnessError(f"{where} ({name}): field {a.name!r} must be {want}, got {v!r}")
        args[a.name] = v
    # Bounds a type check cannot express; each keeps one operation of a
    # malformed trace from hanging or exhausting memory instead of failing.
    for field, lo, hi in _FIELD_RANGES.get(name, ()):
        v = args.get(field)
        if isinstance(v, int) and not lo <= v <= hi:
            bound = f"{hi:#x}" if hi > 4096 else str(hi)
            raise HarnessError(f"{where} ({name}): field {field!r} is {v!r}, outside {lo}..{bound}")
    for a in spec.args:
        v = args.get(a.name)
        if a.kind == "int" and isinstance(v, int) and v >= 1 << 64:
            raise HarnessError(f"{where} ({name}): field {a.name!r} is {v:#x}, wider than 64 bits")
        if a.kind == "intlist" and isinstance(v, list) and any(x >= 1 << 64 for x in v):
            raise HarnessError(f"{where} ({name}): field {a.name!r} holds a value wider than 64 bits")
    if name == "kvm_vcpu_access" and args.get("pte") is not None:
        pte_index, value = args["pte"]
        if not 0 <= pte_index < 512 or not 0 <= value < 1 << 64:
            raise HarnessError(
                f"{where} ({name}): field 'pte' must be [index 0..511, a 64-bit value], got {args['pte']!r}"
            )
    if name == "kvm_vcpu_run" and args["stride"] > 0 and args["end"] > args["start"]:
        accesses = (args["end"] - args["start"] + args["stride"] - 1) // args["stride"]
        if accesses > MAX_RUN_ACCESSES:
            raise HarnessError(
                f"{where} ({name}): fields 'start', 'end' and 'stride' make {accesses} guest accesses, "
                f"more than {MAX_RUN_ACCESSES}; use a larger stride"
            )
    if name == "kvm_get_dirty_log" and "expect" in raw:
        want = raw["expect"]
        if not isinstance(want, list) or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in want
        ):
            raise HarnessError(f"{where} ({name}): field 'expect' must be a list of gfns, got {want!r}")
    return spec, args


# Model: one KVM_RUN touches at most this many addresses (a 4 GiB range at 4K).
MAX_RUN_ACCESSES = 1 << 20
# (field, lowest, highest) per operation.
_FIELD_RANGES: dict[str, tuple[tuple[str, int, int], ...]] = {
    "kvm_vcpu_access": (("vcpu", 0, 63),),
    "kvm_vcpu_run": (("vcpu", 0, 63),),
    "kvm_set_cr3": (("vcpu", 0, 63),),
    "nested_vmx_enter": (("vcpu", 0, 63),),
    "nested_vmx_vmexit": (("vcpu", 0, 63),),
    "kvm_guest_tlb_flush": (("vcpu", 0, 63),),
    "guest_build_identity_map": (("page_level", 1, 3), ("access", 0, 7), ("npages", 0, 1 << 24)),
    "guest_store_table": (("access", 0, 7),),
    "model_split_env": (("need_resched", 0, 1 << 16), ("topup_fails", 0, 1 << 16), ("tdp_alloc_fails", 0, 1 << 16)),
    "kvm_clear_dirty_log": (("num_pages", 0, 1 << 32),),
}


def _check_against_config(cfg: TraceConfig, ops: list[dict[str, Any]]) -> None:
    """Checks that need the trace as a whole: vCPU ids and gfns that must lie in a memslot.

    The memslot layout is followed statically through the
    kvm_set_user_memory_region operations (size 0 deletes a slot).
    """
    slots: dict[int, tuple[int, int]] = {}

    def in_slot(gfn: int) -> bool:
        return any(base <= gfn < base + npages for base, npages in slots.values())

    def layout() -> str:
        if not slots:
            return "no memslot exists yet"
        return "memslots: " + ", ".join(
            f"{sid} at gfn {base:#x}+{npages:#x}" for sid, (base, npages) in sorted(slots.items())
        )

    for i, op in enumerate(ops):
        name = op["op"]
        where = f"operation {i} ({name})"
        vcpu = op.get("vcpu")
        if isinstance(vcpu, int) and vcpu >= cfg.nr_vcpus:
            raise HarnessError(
                f"{where}: field 'vcpu': vcpu {vcpu} does not exist (config 'nr_vcpus' is {cfg.nr_vcpus})"
            )
        if name == "kvm_set_user_memory_region":
            if op["size"] == 0:
                slots.pop(op["slot"], None)
            else:
                slots[op["slot"]] = (op["gpa"] >> 12, op["size"] >> 12)
            continue
        gfn_fields: list[tuple[str, int]] = []
        if name == "nested_vmx_enter":
            gfn_fields = [("eptp_gfn", op["eptp_gfn"])]
        elif name == "kvm_set_cr3" and cfg.mmu == "shadow":
            gfn_fields = [("root_gfn", op["root_gfn"])]
        elif name == "guest_build_identity_map":
            gfn_fields = [("root_gfn", op["root_gfn"])] + [("table_gfns", g) for g in op["table_gfns"]]
        elif name == "guest_store_table":
            gfn_fields = [("gfn", op["gfn"])]
        elif name == "kvm_clear_dirty_log":
            gfn_fields = [("gfns", g) for g in op["gfns"]]
        for field, gfn in gfn_fields:
            if not in_slot(gfn):
                raise HarnessError(f"{where}: field {field!r} holds gfn {gfn:#x}, outside every memslot ({layout()})")


@attrs.define
class TraceConfig:
    mmu: str = "tdp"
    nr_vcpus: int = 1
    eager_page_split: bool = True
    nx_huge_pages: bool = False
    pml: bool = False
    model: str = "merged"

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def parse_config(raw: Any) -> TraceConfig:
    if not isinstance(raw, dict):
        raise HarnessError(f"trace config: expected an object, got {type(raw).__name__}")
    fields = {f.name: f for f in attrs.fields(TraceConfig)}
    extra = sorted(set(raw) - set(fields))
    if extra:
        raise HarnessError(f"trace config: unknown field(s) {extra}; fields are {sorted(fields)}")
    cfg = TraceConfig(**raw)
    if not isinstance(cfg.mmu, str) or not isinstance(cfg.model, str):
        raise HarnessError("trace config: fields 'mmu' and 'model' must be strings")
    if cfg.mmu not in MMU_CONFIGS:
        raise HarnessError(f"trace config: field 'mmu' is {cfg.mmu!r}, not one of {', '.join(MMU_CONFIGS)}")
    for name in ("eager_page_split", "nx_huge_pages", "pml"):
        if not isinstance(getattr(cfg, name), bool):
            raise HarnessError(f"trace config: field {name!r} must be true or false")
    if not isinstance(cfg.nr_vcpus, int) or isinstance(cfg.nr_vcpus, bool) or not 1 <= cfg.nr_vcpus <= 64:
        raise HarnessError(f"trace config: field 'nr_vcpus' is {cfg.nr_vcpus!r}, not 1..64")
    return cfg


def make_kvm(cfg: TraceConfig) -> Kvm:
    from kvmsplit.models_registry import load_model

    kvm = Kvm.create(KvmConfig.named(cfg.mmu, pml=cfg.pml), nr_vcpus=cfg.nr_vcpus)
    kvm.eager_page_split = cfg.eager_page_split
    kvm.nx_huge_pages = cfg.nx_huge_pages
    kvm.model_split_policy = load_model(cfg.model)
    return kvm


@attrs.define
class StepRecord:
    index: int
    op: dict[str, Any]
    result: Any
    stats: dict[str, int]


@attrs.define
class TraceResult:
    config: TraceConfig
    steps: list[StepRecord]
    kvm: Kvm
    failure: Exception | None = None
    failed_step: int | None = None
    # Model: how many times the invariants ran (after operations, at mmu_lock releases, across splits).
    step_checks: int = 0
    unlock_checks: int = 0
    split_checks: int = 0

    @property
    def ok(self) -> bool:
        return self.failure is None


def load_trace(text: str, source: str = "<trace>") -> tuple[TraceConfig, list[dict[str, Any]]]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise HarnessError(f"{source}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(doc, dict):
        raise HarnessError(f"{source}: a trace is a JSON object")
    if doc.get("format") != TRACE_FORMAT:
        raise HarnessError(f"{source}: field 'format' is {doc.get('format')!r}, expected {TRACE_FORMAT!r}")
    if doc.get("version") != TRACE_VERSION:
        raise HarnessError(
            f"{source}: trace version {doc.get('version')!r} is not supported (this kvmsplit reads {TRACE_VERSION})"
        )
    ops = doc.get("ops")
    if not isinstance(ops, list):
        raise HarnessError(f"{source}: field 'ops' must be a list")
    try:
        cfg = parse_config(doc.get("config", {}))
        for i, op in enumerate(ops):
            validate_op(i, op)
        _check_against_config(cfg, ops)
    except HarnessError as e:
        raise HarnessError(f"{source}: {e}") from None
    return cfg, ops


def dump_trace(cfg: TraceConfig, ops: list[dict[str, Any]]) -> str:
    return json.dumps({"format": TRACE_FORMAT, "version": TRACE_VERSION, "config": cfg.to_dict(), "ops": ops}, indent=1)


def run_op(kvm: Kvm, spec: OpSpec, args: dict[str, Any]) -> Any:
    """Run one validated operation, with the model's kernel patches in force (kvmsplit/mutation.py)."""
    from kvmsplit.mutation import kernel_patches_for

    with kernel_patches_for(kvm.model_split_policy):
        return spec.run(kvm, **args)


def run_trace(
    cfg: TraceConfig,
    ops: list[dict[str, Any]],
    check: bool = True,
    on_step: Callable[[StepRecord], None] | None = None,
    invariants: list[str] | None = None,
) -> TraceResult:
    """Replay @ops on a fresh VM; stop at the first invariant violation or mirrored WARN."""
    from kvmsplit.checker import Checker

    validated = [validate_op(i, op) for i, op in enumerate(ops)]
    kvm = make_kvm(cfg)
    checker = Checker(kvm, invariants) if check else None
    result = TraceResult(config=cfg, steps=[], kvm=kvm)
    for i, (spec, args) in enumerate(validated):
        try:
            out = run_op(kvm, spec, args)
            want = ops[i].get("expect")
            if want is not None and spec.name == "kvm_get_dirty_log" and out["gfns"] != want:
                raise InvariantViolation(
                    "scenario_expectation",
                    f"KVM_GET_DIRTY_LOG reported gfns {out['gfns'][:8]}..., the scenario expects {want[:8]}...",
                )
            if checker is not None:
                checker.after_operation()
        except (InvariantViolation, KvmBugOn) as e:
            result.failure = e
            result.failed_step = i
            result.steps.append(StepRecord(i, ops[i], None, kvm.stat.as_dict()))
            break
        rec = StepRecord(i, ops[i], out, kvm.stat.as_dict())
        result.steps.append(rec)
        if on_step is not None:
            on_step(rec)
    if checker is not None:
        result.step_checks, result.unlock_checks = checker.step_checks, checker.unlock_checks
        result.split_checks = checker.split_checks
    return result
