"""The conformance oracle: run each scenario on real KVM and on the model, compare what both report.

RealSide drives /dev/kvm through vm.py; ModelSide drives the model through
its trace operations (kvmsplit.trace.OPS), configured from the running
kernel's module parameters so the prediction is for that kernel.  Both
record the same observations: at every `Check`, the VM stats pages_4k,
pages_2m, pages_1g, mmu_cache_miss, mmu_shadow_zapped and
remote_tlb_flush_requests plus each vCPU's pf_taken and pf_fixed, and the
exact bitmap of every KVM_GET_DIRTY_LOG.

A kernel value differing from the model's is a disagreement, unless it is
listed in EXPECTED_DIFFERENCES with the reason (behaviour of a
non-upstream kernel).  A host that does not provide what a scenario needs
(no THP where one was asked for, a failed MADV_COLLAPSE) leaves the
scenario's precondition unmet; its observations are then not compared.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Protocol

import attrs

from kvmsplit.realkvm import guest as g
from kvmsplit.realkvm import ioctls as k
from kvmsplit.realkvm.scenarios import ClearDirtyLog, ConformScenario, Run, Slot, StorePte
from kvmsplit.realkvm.vm import (
    HPAGE_SIZE,
    GuestError,
    HostMemory,
    KvmSystem,
    KvmUnavailable,
    Vcpu,
    Vm,
    module_params_dir,
    read_kvm_params,
    vendor_module,
)

VM_QUANTITIES = (
    "pages_4k",
    "pages_2m",
    "pages_1g",
    "mmu_cache_miss",
    "mmu_shadow_zapped",
    "remote_tlb_flush_requests",
    "mmu_unsync",
    "mmu_pte_write",
    "mmu_flooded",
    "mmu_pde_zapped",
    "max_mmu_rmap_size",
    "max_mmu_page_hash_collisions",
)
VCPU_QUANTITIES = ("pf_taken", "pf_fixed", "pf_emulate", "pf_spurious", "pf_fast", "insn_emulation")

# (scenario or "*", quantity) -> why the kernel here is expected to differ from upstream.
EXPECTED_DIFFERENCES: dict[tuple[str, str], str] = {}

# Model: hvas of the model's host VMAs; only their value modulo 2 MiB matters.
MODEL_HVA_BASE = 0x7F00_0000_0000
MODEL_HVA_STRIDE = 1 << 32


class Side(Protocol):
    observations: dict[tuple[str, str], Any]
    unmet: list[str]

    def create_slot(self, step: Slot) -> None: ...
    def set_flags(self, slot: int, flags: int) -> None: ...
    def move_slot(self, slot: int, gpa: int) -> None: ...
    def delete_slot(self, slot: int) -> None: ...
    def store_pte(self, step: StorePte) -> None: ...
    def enable_manual_protect(self, flags: int) -> None: ...
    def run(self, step: Run) -> None: ...
    def get_dirty_log(self, slot: int, label: str) -> None: ...
    def clear_dirty_log(self, step: ClearDirtyLog) -> None: ...
    def madv_dontneed(self, slot: int, offset: int, size: int) -> None: ...
    def madv_collapse(self, slot: int, offset: int) -> None: ...
    def split_thp(self, slot: int, offset: int) -> None: ...
    def check(self, label: str) -> None: ...


def bitmap_offsets(bitmap: bytes, npages: int) -> tuple[int, ...]:
    """Page offsets (within the slot) whose bit is set."""
    out = []
    for i, byte in enumerate(bitmap):
        while byte:
            low = byte & -byte
            bit = i * 8 + low.bit_length() - 1
            if bit < npages:
                out.append(bit)
            byte ^= low
    return tuple(out)


def offsets_bitmap(offsets: list[int] | tuple[int, ...], num_pages: int) -> bytes:
    bm = bytearray(((num_pages + 63) // 64) * 8)
    for o in offsets:
        bm[o >> 3] |= 1 << (o & 7)
    return bytes(bm)


def _clear_offsets(step: ClearDirtyLog) -> tuple[int, ...]:
    return tuple(range(step.num_pages)) if step.gfn_offsets is None else step.gfn_offsets


def full_frames(hva: int, size: int) -> int:
    """Bytes of whole 2 MiB-aligned frames inside [hva, hva + size): what THP can back."""
    first = (hva + HPAGE_SIZE - 1) & ~(HPAGE_SIZE - 1)
    last = (hva + size) & ~(HPAGE_SIZE - 1)
    return max(0, last - first)


# --- the real kernel --------------------------------------------------------------------


@attrs.define(eq=False)
class RealSide:
    scenario: ConformScenario
    system: KvmSystem
    cpuid: bytes
    stack: contextlib.ExitStack = attrs.field(factory=contextlib.ExitStack)
    vm: Vm | None = None
    sysmem: HostMemory | None = None
    vcpus: list[Vcpu] = attrs.field(factory=list)
    slots: dict[int, tuple[Slot, HostMemory]] = attrs.field(factory=dict)
    # Guest page tables placed in test slots, stored once their slot exists.
    pending: dict[int, bytes] = attrs.field(factory=dict)
    observations: dict[tuple[str, str], Any] = attrs.field(factory=dict)
    unmet: list[str] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)

    def __enter__(self) -> RealSide:
        try:
            self.vm = self.stack.enter_context(Vm.create(self.system))
            self.sysmem = self.stack.enter_context(HostMemory(g.SYS_SIZE, "4k"))
            for gpa, data in self.scenario.layout.system_image().items():
                if gpa < g.SYS_SIZE:
                    self.sysmem.write(gpa, data)
                else:
                    self.pending[gpa] = data
            self.vm.set_user_memory_region(g.SYS_SLOT, 0, 0, g.SYS_SIZE, self.sysmem.hva)
            for i in range(self.scenario.nr_vcpus):
                vcpu = self.vm.create_vcpu(i)
                vcpu.set_cpuid(self.cpuid)
                vcpu.set_sregs(g.cpl3_sregs(bytes(vcpu.get_sregs())))
                vcpu.set_regs(g.cpl3_regs())
                self.vcpus.append(vcpu)
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    @property
    def _vm(self) -> Vm:
        assert self.vm is not None
        return self.vm

    def create_slot(self, step: Slot) -> None:
        mem = self.stack.enter_context(HostMemory(step.size, step.backing, step.misalign))
        mem.populate()
        for gpa in [a for a in self.pending if step.gpa <= a < step.gpa + step.size]:
            mem.write(gpa - step.gpa, self.pending.pop(gpa))
        if step.backing == "thp":
            want = full_frames(mem.hva, step.size)
            got = mem.anon_huge_bytes()
            self.notes.append(f"slot {step.slot}: AnonHugePages {got >> 10} kB of {want >> 10} kB possible")
            if got < want:
                self.unmet.append(f"slot {step.slot}: the host gave {got >> 20} MiB of THP, not {want >> 20} MiB")
        self.slots[step.slot] = (step, mem)
        self._vm.set_user_memory_region(step.slot, step.flags, step.gpa, step.size, mem.hva)

    def set_flags(self, slot: int, flags: int) -> None:
        step, mem = self.slots[slot]
        self._vm.set_user_memory_region(slot, flags, step.gpa, step.size, mem.hva)
        self.slots[slot] = (attrs.evolve(step, flags=flags), mem)

    def move_slot(self, slot: int, gpa: int) -> None:
        step, mem = self.slots[slot]
        self._vm.set_user_memory_region(slot, step.flags, gpa, step.size, mem.hva)
        self.slots[slot] = (attrs.evolve(step, gpa=gpa), mem)

    def delete_slot(self, slot: int) -> None:
        step, mem = self.slots.pop(slot)
        self._vm.set_user_memory_region(slot, step.flags, step.gpa, 0, mem.hva)

    def store_pte(self, step: StorePte) -> None:
        old = int.from_bytes(self.sysmem_read(step.table_gpa + 8 * step.index, 8), "little")
        self.run(step.run, value=step.new_gpte(old))

    def sysmem_read(self, gpa: int, size: int) -> bytes:
        assert self.sysmem is not None
        return self.sysmem.read(gpa, size)

    def enable_manual_protect(self, flags: int) -> None:
        self._vm.enable_cap(k.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags)

    def run(self, step: Run, value: int = 0) -> None:
        assert self.sysmem is not None
        self.sysmem.write(g.MAILBOX_GPA, g.mailbox(step.lo, step.hi, step.stride, step.mailbox_op, value))
        vcpu = self.vcpus[step.vcpu]
        reason = vcpu.kvm_run()
        if reason == k.KVM_EXIT_MMIO:
            phys, length, is_write = vcpu.mmio_exit()
            if (phys, length, is_write) == (g.MMIO_GPA, 1, True):
                return
            raise GuestError(
                f"vcpu {step.vcpu}: MMIO exit at {phys:#x} len {length} write {is_write}, not the pass end"
            )
        name = k.EXIT_REASON_NAMES.get(reason, str(reason))
        if reason == k.KVM_EXIT_INTR:
            raise GuestError(f"vcpu {step.vcpu}: KVM_RUN did not exit within the timer for {step}")
        raise GuestError(f"vcpu {step.vcpu}: exit {name} during {step} (a guest exception is a triple fault)")

    def get_dirty_log(self, slot: int, label: str) -> None:
        step, _mem = self.slots[slot]
        npages = step.size >> 12
        bm = self._vm.get_dirty_log(slot, npages)
        self.observations[(label, f"dirty_bitmap[slot{slot}]")] = bitmap_offsets(bm, npages)

    def clear_dirty_log(self, step: ClearDirtyLog) -> None:
        self._vm.clear_dirty_log(
            step.slot, step.first_page, step.num_pages, offsets_bitmap(_clear_offsets(step), step.num_pages)
        )

    def madv_dontneed(self, slot: int, offset: int, size: int) -> None:
        self.slots[slot][1].madvise(offset, size, k.MADV_DONTNEED)

    def madv_collapse(self, slot: int, offset: int) -> None:
        mem = self.slots[slot][1]
        before = mem.anon_huge_bytes()
        try:
            mem.madvise(offset, HPAGE_SIZE, k.MADV_COLLAPSE)
        except OSError as e:
            self.unmet.append(f"slot {slot}: MADV_COLLAPSE at {offset:#x} failed: {e.strerror}")
            return
        after = mem.anon_huge_bytes()
        self.notes.append(f"slot {slot}: MADV_COLLAPSE AnonHugePages {before >> 10} -> {after >> 10} kB")
        if after < before + HPAGE_SIZE:
            self.unmet.append(f"slot {slot}: MADV_COLLAPSE at {offset:#x} did not produce a huge page")

    def split_thp(self, slot: int, offset: int) -> None:
        mem = self.slots[slot][1]
        before = mem.anon_huge_bytes()
        page = offset & ~0xFFF
        k.mprotect(mem.hva + page, 4096, k.PROT_READ)
        k.mprotect(mem.hva + page, 4096, k.PROT_READ | k.PROT_WRITE)
        after = mem.anon_huge_bytes()
        self.notes.append(f"slot {slot}: mprotect split AnonHugePages {before >> 10} -> {after >> 10} kB")
        if after != before - HPAGE_SIZE:
            self.unmet.append(f"slot {slot}: mprotect at {offset:#x} did not split exactly one THP")

    def check(self, label: str) -> None:
        stats = self._vm.read_stats()
        for q in VM_QUANTITIES:
            self.observations[(label, q)] = stats[q]
        for v in self.vcpus:
            vs = v.read_stats()
            for q in VCPU_QUANTITIES:
                self.observations[(label, f"vcpu{v.vcpu_id}.{q}")] = vs[q]


# --- the model ----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ModelConfig:
    """The model's configuration for the running kernel, from its module parameters (read only)."""

    mmu: str = "shadow"
    tdp_mmu: bool = False
    eager_page_split: bool = True
    nx_huge_pages: bool = False
    mmio_caching: bool = True
    pml: bool = False
    vendor: str | None = None

    @classmethod
    def from_host(cls) -> ModelConfig:
        """tdp_enabled from the vendor module (ept/npt; PVM has none), the rest from kvm's parameters."""
        params = read_kvm_params()
        vendor = vendor_module()
        yes = _param_enabled
        tdp_enabled = False
        pml = False
        if vendor == "kvm_intel":
            p = read_kvm_params(module_params_dir("kvm_intel"))
            tdp_enabled, pml = yes(p.get("ept")), yes(p.get("enable_pml"))
        elif vendor == "kvm_amd":
            tdp_enabled = yes(read_kvm_params(module_params_dir("kvm_amd")).get("npt"))
        tdp_mmu = yes(params.get("tdp_mmu"))
        mmu = "shadow" if not tdp_enabled else ("tdp" if tdp_mmu else "tdp-legacy")
        return cls(
            mmu=mmu,
            tdp_mmu=tdp_mmu,
            eager_page_split=yes(params.get("eager_page_split", "Y")),
            nx_huge_pages=yes(params.get("nx_huge_pages", "N")),
            mmio_caching=yes(params.get("mmio_caching", "Y")),
            pml=pml,
            vendor=vendor,
        )


def _param_enabled(value: str | None) -> bool:
    """A bool or tristate module parameter as sysfs prints it (Y/N, 1/0, or nx_huge_pages' force/off)."""
    return value is not None and value.strip().upper() in ("Y", "1", "ON", "FORCE")


@attrs.define(eq=False)
class ModelSide:
    scenario: ConformScenario
    config: ModelConfig
    check_invariants: bool = True
    kvm: Any = None
    checker: Any = None
    slots: dict[int, tuple[Slot, int]] = attrs.field(factory=dict)
    observations: dict[tuple[str, str], Any] = attrs.field(factory=dict)
    unmet: list[str] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        from kvmsplit.checker import Checker
        from kvmsplit.kvm import Kvm, KvmConfig
        from kvmsplit.models_registry import load_model

        c = self.config
        kvm_config = KvmConfig.named(c.mmu, tdp_mmu=c.tdp_mmu, mmio_caching=c.mmio_caching, pml=c.pml)
        self.kvm = Kvm.create(kvm_config, nr_vcpus=self.scenario.nr_vcpus)
        self.kvm.eager_page_split = c.eager_page_split
        self.kvm.nx_huge_pages = c.nx_huge_pages
        self.kvm.model_split_policy = load_model("merged")
        if self.check_invariants:
            self.checker = Checker(self.kvm)
        self._op(
            op="kvm_set_user_memory_region", slot=g.SYS_SLOT, gpa=0, size=g.SYS_SIZE, hva=MODEL_HVA_BASE, backing="4k"
        )
        # The host wrote the system image, so exactly those pages are present.
        for gpa, data in self.scenario.layout.system_image().items():
            if gpa >= g.SYS_SIZE:
                continue
            for page in range(gpa & ~0xFFF, gpa + len(data), 4096):
                self.kvm.host.hva_to_pfn(MODEL_HVA_BASE + page)
        for op in self.scenario.layout.model_ops():
            self._op(**op)
        if not c.mmu.startswith("tdp"):
            for v in range(self.scenario.nr_vcpus):
                self._op(op="kvm_set_cr3", vcpu=v, root_gfn=g.PML4_GPA >> 12)

    def _op(self, **raw: Any) -> Any:
        from kvmsplit.trace import validate_op

        spec, args = validate_op(0, raw)
        out = spec.run(self.kvm, **args)
        if self.checker is not None:
            self.checker.after_operation()
        return out

    def create_slot(self, step: Slot) -> None:
        hva = MODEL_HVA_BASE + step.slot * MODEL_HVA_STRIDE + step.misalign
        self.slots[step.slot] = (step, hva)
        self._op(
            op="kvm_set_user_memory_region",
            slot=step.slot,
            flags=step.flags,
            gpa=step.gpa,
            size=step.size,
            hva=hva,
            backing=step.backing,
        )
        # The host writes every page first (HostMemory.populate()).
        for off in range(0, step.size, 4096):
            self.kvm.host.hva_to_pfn(hva + off)

    def set_flags(self, slot: int, flags: int) -> None:
        step, hva = self.slots[slot]
        self._op(op="kvm_set_user_memory_region", slot=slot, flags=flags, gpa=step.gpa, size=step.size, hva=hva)
        self.slots[slot] = (attrs.evolve(step, flags=flags), hva)

    def move_slot(self, slot: int, gpa: int) -> None:
        step, hva = self.slots[slot]
        self._op(op="kvm_set_user_memory_region", slot=slot, flags=step.flags, gpa=gpa, size=step.size, hva=hva)
        self.slots[slot] = (attrs.evolve(step, gpa=gpa), hva)

    def delete_slot(self, slot: int) -> None:
        step, hva = self.slots.pop(slot)
        self._op(op="kvm_set_user_memory_region", slot=slot, flags=step.flags, gpa=step.gpa, size=0, hva=hva)

    def store_pte(self, step: StorePte) -> None:
        """The same pass as run(), with the guest's store carrying the new gpte to the model's tables."""
        image = self.scenario.layout.system_image()
        old = int.from_bytes(image[step.table_gpa][8 * step.index : 8 * step.index + 8], "little")
        current = self.kvm.guest_tables.get(step.table_gpa >> 12)
        if current is not None:
            old = current[step.index]
        v = step.vcpu
        self._op(op="kvm_vcpu_access", vcpu=v, addr=g.CODE_GPA, access="exec")
        self._op(op="kvm_vcpu_access", vcpu=v, addr=g.MAILBOX_GPA, access="read")
        self._op(
            op="kvm_vcpu_access",
            vcpu=v,
            addr=step.run.lo,
            access="write",
            pte=[step.index, step.new_gpte(old)],
            width=step.width,
        )
        r = self._op(op="kvm_vcpu_access", vcpu=v, addr=g.MMIO_GPA, access="write")
        if r["outcome"] != "mmio":
            raise GuestError(f"model: the pass-ending store at {g.MMIO_GPA:#x} was {r['outcome']}, not an MMIO exit")

    def enable_manual_protect(self, flags: int) -> None:
        self._op(op="kvm_enable_cap_manual_dirty_log_protect", flags=flags)

    def run(self, step: Run) -> None:
        """The pass as the CPU performs it: fetch the loop, read the mailbox, the range, the MMIO store."""
        v = step.vcpu
        self._op(op="kvm_vcpu_access", vcpu=v, addr=g.CODE_GPA, access="exec")
        self._op(op="kvm_vcpu_access", vcpu=v, addr=g.MAILBOX_GPA, access="read")
        if step.hi > step.lo:
            self._op(op="kvm_vcpu_run", vcpu=v, start=step.lo, end=step.hi, stride=step.stride, access=step.op)
        r = self._op(op="kvm_vcpu_access", vcpu=v, addr=g.MMIO_GPA, access="write")
        if r["outcome"] != "mmio":
            raise GuestError(f"model: the pass-ending store at {g.MMIO_GPA:#x} was {r['outcome']}, not an MMIO exit")

    def get_dirty_log(self, slot: int, label: str) -> None:
        step, _hva = self.slots[slot]
        out = self._op(op="kvm_get_dirty_log", slot=slot)
        base = step.gpa >> 12
        self.observations[(label, f"dirty_bitmap[slot{slot}]")] = tuple(gfn - base for gfn in out["gfns"])

    def clear_dirty_log(self, step: ClearDirtyLog) -> None:
        base = self.slots[step.slot][0].gpa >> 12
        gfns = [base + step.first_page + o for o in _clear_offsets(step)]
        self._op(
            op="kvm_clear_dirty_log", slot=step.slot, first_page=step.first_page, num_pages=step.num_pages, gfns=gfns
        )

    def madv_dontneed(self, slot: int, offset: int, size: int) -> None:
        self._op(op="host_madv_dontneed", hva=self.slots[slot][1] + offset, size=size)

    def madv_collapse(self, slot: int, offset: int) -> None:
        if not self._op(op="host_thp_collapse", hva=self.slots[slot][1] + offset):
            self.unmet.append(f"model: host_thp_collapse at slot {slot} offset {offset:#x} collapsed nothing")

    def split_thp(self, slot: int, offset: int) -> None:
        if not self._op(op="host_thp_split", hva=self.slots[slot][1] + offset):
            self.unmet.append(f"model: host_thp_split at slot {slot} offset {offset:#x} split nothing")

    def check(self, label: str) -> None:
        stats = self.kvm.stat.as_dict()
        for q in VM_QUANTITIES:
            self.observations[(label, q)] = stats[q]
        for v in self.kvm.vcpus:
            for q in VCPU_QUANTITIES:
                self.observations[(label, f"vcpu{v.vcpu_id}.{q}")] = getattr(v.stat, q)


# --- comparison ------------------------------------------------------------------------------


@attrs.define
class Row:
    checkpoint: str
    quantity: str
    kernel: Any
    model: Any
    expected_difference: str | None = None
    # False when one side failed before it observed anything comparable.
    compared: bool = True

    @property
    def agree(self) -> bool:
        return self.kernel == self.model

    @property
    def verdict(self) -> str:
        if not self.compared:
            return "not compared"
        if self.agree:
            return "agree"
        return "expected difference" if self.expected_difference else "DISAGREE"

    def to_json(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        for key in ("kernel", "model"):
            if isinstance(d[key], tuple):
                d[key] = list(d[key])
        d["verdict"] = self.verdict
        return d


@attrs.define
class ScenarioResult:
    name: str
    doc: str
    kernel_functions: str
    rows: list[Row] = attrs.field(factory=list)
    unmet: list[str] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)
    error: str | None = None
    seconds: float = 0.0

    @property
    def status(self) -> str:
        if self.error:
            return "error"
        if self.unmet:
            return "precondition unmet"
        if any(r.verdict == "DISAGREE" for r in self.rows):
            return "disagree"
        return "agree"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "doc": self.doc,
            "kernel_functions": self.kernel_functions,
            "status": self.status,
            "error": self.error,
            "preconditions_unmet": self.unmet,
            "notes": self.notes,
            "seconds": round(self.seconds, 3),
            "rows": [r.to_json() for r in self.rows],
        }


def compare(name: str, kernel: dict[tuple[str, str], Any], model: dict[tuple[str, str], Any]) -> list[Row]:
    rows = []
    for key in list(dict.fromkeys([*kernel, *model])):
        label, q = key
        expected = EXPECTED_DIFFERENCES.get((name, q)) or EXPECTED_DIFFERENCES.get(("*", q))
        rows.append(Row(label, q, kernel.get(key), model.get(key), expected))
    return rows


def run_scenario(
    scenario: ConformScenario, system: KvmSystem, cpuid: bytes, config: ModelConfig, check_invariants: bool = True
) -> ScenarioResult:
    """Run @scenario on the kernel, then on the model, and compare the observations."""
    from kvmsplit.errors import HarnessError, InvariantViolation, KvmBugOn

    result = ScenarioResult(scenario.name, scenario.doc, scenario.kernel)
    start = time.monotonic()
    kernel_obs: dict[tuple[str, str], Any] = {}
    try:
        with RealSide(scenario, system, cpuid) as real:
            try:
                for step in scenario.steps:
                    step.apply(real)
            finally:
                kernel_obs = real.observations
                result.unmet += real.unmet
                result.notes += real.notes
    except (GuestError, OSError) as e:
        result.error = f"kernel side: {e}"
    model_obs: dict[tuple[str, str], Any] = {}
    if result.error is None:
        side = None
        try:
            side = ModelSide(scenario, config, check_invariants=check_invariants)
            for step in scenario.steps:
                step.apply(side)
        except (GuestError, HarnessError) as e:
            result.error = f"model side: {e}"
        except (InvariantViolation, KvmBugOn) as e:
            result.error = f"model side: {type(e).__name__}: {e}"
        if side is not None:
            model_obs = side.observations
            result.unmet += side.unmet
    result.rows = compare(scenario.name, kernel_obs, model_obs)
    if result.error is not None or result.unmet:
        for row in result.rows:
            row.compared = False
    result.seconds = time.monotonic() - start
    return result


@attrs.define
class ConformRun:
    config: ModelConfig
    params: dict[str, str]
    results: list[ScenarioResult]

    @property
    def any_disagreement(self) -> bool:
        return any(r.status in ("disagree", "error") for r in self.results)

    def to_json(self) -> dict[str, Any]:
        return {
            "model_config": attrs.asdict(self.config),
            "kvm_params": self.params,
            "scenarios": [r.to_json() for r in self.results],
        }


def probe_guest(system: KvmSystem, cpuid: bytes) -> None:
    """Run one empty pass; raise KvmUnavailable unless the CPL3 guest runs natively.

    Natively means the pass costs a single emulated instruction (the MMIO
    store) and maps guest memory with shadow PTEs; a VMM that emulates the
    whole guest never creates SPTEs, and then there is nothing to compare.
    """
    from kvmsplit.realkvm.scenarios import ConformScenario

    probe = ConformScenario(name="probe", doc="", kernel="", steps=())
    try:
        with RealSide(probe, system, cpuid) as real:
            real.run(Run(0, 0))
            real.check("probe")
            emulated = real.vcpus[0].read_stats().get("insn_emulation", 0)
    except GuestError as e:
        raise KvmUnavailable(f"the CPL3 mailbox guest does not run: {e}") from None
    except OSError as e:
        raise KvmUnavailable(f"setting up the CPL3 guest failed: {e}") from None
    if emulated > 2 or real.observations[("probe", "pages_4k")] == 0:
        raise KvmUnavailable(
            f"the CPL3 guest does not run natively (insn_emulation={emulated}, "
            f"pages_4k={real.observations[('probe', 'pages_4k')]}): KVM emulates it, so no shadow PTEs to observe"
        )


def run_conformance(scenarios: list[ConformScenario], check_invariants: bool = True) -> ConformRun:
    """Open /dev/kvm (KvmUnavailable if it cannot be used), then run every scenario."""
    config = ModelConfig.from_host()
    with KvmSystem.open() as system:
        cpuid = system.supported_cpuid()
        probe_guest(system, cpuid)
        results = [run_scenario(s, system, cpuid, config, check_invariants) for s in scenarios]
    return ConformRun(config, read_kvm_params(), results)


# --- the table ------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):
        if not value:
            return "{}"
        ranges = []
        lo = prev = value[0]
        for v in value[1:]:
            if v != prev + 1:
                ranges.append((lo, prev))
                lo = v
            prev = v
        ranges.append((lo, prev))
        text = ",".join(f"{a:#x}" if a == b else f"{a:#x}-{b:#x}" for a, b in ranges)
        if len(text) > 40:
            text = text[:37] + "..."
        return f"{len(value)} pages {{{text}}}"
    return str(value)


def format_result(r: ScenarioResult) -> str:
    lines = [f"== {r.name}: {r.status} ({r.seconds:.2f} s)", f"   {r.doc.splitlines()[0] if r.doc else ''}"]
    for u in r.unmet:
        lines.append(f"   precondition unmet: {u}")
    if r.error:
        lines.append(f"   error: {r.error}")
    if r.rows:
        w_cp = max(len("checkpoint"), *(len(x.checkpoint) for x in r.rows))
        w_q = max(len("quantity"), *(len(x.quantity) for x in r.rows))
        cells = [(x, _fmt(x.kernel), _fmt(x.model)) for x in r.rows]
        w_k = max(len("kernel"), *(len(c[1]) for c in cells))
        w_m = max(len("model"), *(len(c[2]) for c in cells))
        lines.append(f"   {'checkpoint':<{w_cp}}  {'quantity':<{w_q}}  {'kernel':>{w_k}}  {'model':>{w_m}}  verdict")
        for x, kv, mv in cells:
            verdict = x.verdict + (f" ({x.expected_difference})" if x.expected_difference and not x.agree else "")
            lines.append(f"   {x.checkpoint:<{w_cp}}  {x.quantity:<{w_q}}  {kv:>{w_k}}  {mv:>{w_m}}  {verdict}")
    return "\n".join(lines)


def format_summary(run: ConformRun) -> str:
    c = run.config
    head = (
        f"model configuration from the running kernel: vendor={c.vendor} mmu={c.mmu} tdp_mmu={c.tdp_mmu} "
        f"eager_page_split={c.eager_page_split} nx_huge_pages={c.nx_huge_pages} mmio_caching={c.mmio_caching}"
    )
    counts: dict[str, int] = {}
    for r in run.results:
        counts[r.status] = counts.get(r.status, 0) + 1
    rows = sum(len(r.rows) for r in run.results)
    agree = sum(1 for r in run.results for x in r.rows if x.agree)
    tail = f"{len(run.results)} scenarios: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return f"{head}\n{tail}; {agree}/{rows} observations agree"


# --- recordings: the kernel's observations kept for machines without /dev/kvm ----------------

RECORD_FORMAT = "kvmsplit-kernel-observations"


def _ranges(offsets: tuple[int, ...]) -> list[list[int]]:
    out: list[list[int]] = []
    for o in offsets:
        if out and out[-1][1] == o - 1:
            out[-1][1] = o
        else:
            out.append([o, o])
    return out


def _unranges(ranges: list[list[int]]) -> tuple[int, ...]:
    return tuple(o for lo, hi in ranges for o in range(lo, hi + 1))


def scenario_fingerprint(scenario: ConformScenario) -> str:
    """A digest of a scenario's steps and layout: a recording is stale once it changes."""
    import hashlib

    return hashlib.sha256(repr((scenario.steps, scenario.layout, scenario.nr_vcpus)).encode()).hexdigest()[:16]


def kernel_record(run: ConformRun, scenarios_run: list[ConformScenario]) -> dict[str, Any]:
    """The kernel's side of @run, compact: dirty bitmaps as [first, last] page ranges."""
    by_name = {s.name: s for s in scenarios_run}
    scenarios: dict[str, Any] = {}
    for r in run.results:
        if r.error or r.unmet:
            continue
        obs: dict[str, Any] = {"fingerprint": scenario_fingerprint(by_name[r.name])}
        for row in r.rows:
            key = f"{row.checkpoint}|{row.quantity}"
            obs[key] = {"ranges": _ranges(row.kernel)} if isinstance(row.kernel, tuple) else row.kernel
        scenarios[r.name] = obs
    return {
        "format": RECORD_FORMAT,
        "model_config": attrs.asdict(run.config),
        "kvm_params": run.params,
        "scenarios": scenarios,
    }


def load_kernel_record(doc: dict[str, Any]) -> tuple[ModelConfig, dict[str, dict[tuple[str, str], Any]]]:
    """The recorded configuration and, per scenario, the kernel's observations."""
    if doc.get("format") != RECORD_FORMAT:
        raise ValueError(f"not a {RECORD_FORMAT} document (format {doc.get('format')!r})")
    config = ModelConfig(**doc["model_config"])
    scenarios: dict[str, dict[tuple[str, str], Any]] = {}
    for name, obs in doc["scenarios"].items():
        out: dict[tuple[str, str], Any] = {}
        for key, value in obs.items():
            if key == "fingerprint":
                continue
            label, q = key.split("|", 1)
            out[(label, q)] = _unranges(value["ranges"]) if isinstance(value, dict) else value
        scenarios[name] = out
    return config, scenarios


def run_model(
    scenario: ConformScenario, config: ModelConfig, check_invariants: bool = True
) -> dict[tuple[str, str], Any]:
    """The model's observations alone, for a configuration recorded elsewhere."""
    side = ModelSide(scenario, config, check_invariants=check_invariants)
    for step in scenario.steps:
        step.apply(side)
    return side.observations
