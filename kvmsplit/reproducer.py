"""Model: turn a failing trace into things a developer can run and read.

A finding leaves three artefacts behind:

- the JSON trace (kvmsplit/trace.py, docs/trace-format.md), for
  `kvmsplit replay` and `kvmsplit show`;
- a standalone pytest file that replays the operations through the Python
  API, with no Hypothesis involved, and fails with the same invariant while
  the bug is present, so it can be checked in as a regression test;
- on request, the skeleton of a KVM selftest in C in the style of
  tools/testing/selftests/kvm/x86/dirty_log_page_splitting_test.c.

`describe_op()` prints one operation the way a KVM developer would say it
(ioctl names, hex addresses), for shrunk traces on a terminal.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from kvmsplit.errors import InvariantViolation, KvmBugOn
from kvmsplit.memslot import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from kvmsplit.trace import TraceConfig, dump_trace

PAGE_SIZE = 4096


def _size(n: int) -> str:
    for shift, unit in ((30, "G"), (20, "M"), (10, "K")):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n:#x}"


def _memslot_flags(flags: int) -> str:
    names = []
    if flags & KVM_MEM_LOG_DIRTY_PAGES:
        names.append("KVM_MEM_LOG_DIRTY_PAGES")
    if flags & KVM_MEM_READONLY:
        names.append("KVM_MEM_READONLY")
    rest = flags & ~(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY)
    if rest:
        names.append(f"{rest:#x}")
    return "|".join(names) or "0"


def _getter(op: dict[str, Any]) -> Callable[..., Any]:
    def g(key: str, default: Any = None) -> Any:
        return op.get(key, default)

    return g


def describe_op(op: dict[str, Any]) -> str:
    """One operation in kernel vocabulary: ioctls by name, addresses in hex."""
    name = op.get("op")
    g = _getter(op)
    vcpu = f"vcpu{g('vcpu', 0)}"
    if name == "kvm_set_user_memory_region":
        if g("size") == 0:
            return f"KVM_SET_USER_MEMORY_REGION slot {g('slot')}: delete"
        backing = f", backed by {g('backing')}" if g("backing") else ""
        return (
            f"KVM_SET_USER_MEMORY_REGION slot {g('slot')}: gpa {g('gpa'):#x} size {_size(g('size'))} "
            f"hva {g('hva'):#x} flags {_memslot_flags(g('flags', 0))}{backing}"
        )
    if name == "kvm_vcpu_access":
        access = g("access", "read")
        verb = {"read": "reads", "write": "writes", "exec": "fetches from"}[access]
        pte = g("pte")
        extra = f" (stores {pte[1]:#x} into entry {pte[0]} of its page table)" if pte else ""
        return f"{vcpu}: guest {verb} {g('addr'):#x}{extra}"
    if name == "kvm_vcpu_run":
        access = g("access", "read")
        return (
            f"{vcpu}: KVM_RUN, guest {access}s [{g('start'):#x}, {g('end'):#x}) every {_size(g('stride', PAGE_SIZE))}"
        )
    if name == "kvm_get_dirty_log":
        return f"KVM_GET_DIRTY_LOG slot {g('slot')}"
    if name == "kvm_clear_dirty_log":
        gfns = g("gfns", [])
        shown = ", ".join(f"{x:#x}" for x in gfns[:4]) + (", ..." if len(gfns) > 4 else "")
        return (
            f"KVM_CLEAR_DIRTY_LOG slot {g('slot')}: first_page {g('first_page'):#x} num_pages {g('num_pages')}, "
            f"gfns {shown}"
        )
    if name == "kvm_enable_cap_manual_dirty_log_protect":
        flags = g("flags")
        what = "MANUAL_PROTECT_ENABLE|INITIALLY_SET" if flags == 3 else f"{flags:#x}"
        return f"KVM_ENABLE_CAP KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 ({what})"
    if name == "kvm_vm_ioctl_set_nr_mmu_pages":
        return f"KVM_SET_NR_MMU_PAGES {g('nr')}"
    if name == "nested_vmx_enter":
        return f"{vcpu}: VMLAUNCH into L2, EPTP gfn {g('eptp_gfn'):#x}"
    if name == "nested_vmx_vmexit":
        return f"{vcpu}: VM-exit from L2 to L1"
    if name == "kvm_set_cr3":
        return f"{vcpu}: guest loads CR3 = gfn {g('root_gfn'):#x}"
    if name == "kvm_guest_tlb_flush":
        return f"{vcpu}: guest flushes its TLB (CR3 reload / INVEPT)"
    if name in ("set_eager_page_split", "set_nx_huge_pages"):
        param = name.removeprefix("set_")
        return f"echo {'Y' if g('value') else 'N'} > /sys/module/kvm/parameters/{param}"
    if name == "host_thp_split":
        return f"host splits the THP at hva {g('hva'):#x} (MMU notifier)"
    if name == "host_thp_collapse":
        return f"host collapses the 2M frame at hva {g('hva'):#x} (MMU notifier)"
    if name == "host_madv_dontneed":
        return f"host madvise(MADV_DONTNEED) hva {g('hva'):#x} size {_size(g('size'))} (MMU notifier)"
    if name == "host_clear_young":
        return f"host ages hva {g('hva'):#x} size {_size(g('size'))} (clear_young MMU notifier)"
    if name == "guest_build_identity_map":
        return (
            f"guest builds {g('format')} page tables at gfn {g('root_gfn'):#x}: gfn {g('gfn_start'):#x} "
            f"+ {g('npages'):#x} pages, level-{g('page_level')} leaves"
        )
    if name == "guest_store_table":
        return f"guest fills a {g('format')} page table at gfn {g('gfn'):#x} mapping gfn {g('first_gfn'):#x}.."
    if name == "kvm_mmu_change_mmu_pages":
        return f"kvm_mmu_change_mmu_pages(n_used_mmu_pages + {g('headroom')})"
    if name == "model_split_env":
        parts = [f"{k}={g(k)}" for k in ("need_resched", "topup_fails", "tdp_alloc_fails") if g(k)]
        return "model: queue split nondeterminism " + (", ".join(parts) or "(none)")
    if name == "model_tdp_race":
        return f"model: another thread races the next huge SPTE cmpxchg ({g('kind')})"
    if name == "kvm_zap_gfn_range":
        return f"kvm_zap_gfn_range({g('start'):#x}, {g('end'):#x})"
    if name == "expect":
        return "expect " + ", ".join(f"{k} == {v}" for k, v in op.items() if k != "op")
    args = ", ".join(f"{k}={v!r}" for k, v in op.items() if k != "op")
    return f"{name}({args})"


@attrs.frozen(kw_only=True)
class Finding:
    """What failed, where, and the trace that gets there."""

    config: TraceConfig
    ops: list[dict[str, Any]]
    step: int
    kind: str  # "invariant", "kvm_bug_on" or "crash"
    name: str  # the invariant, the WARN site or the exception type
    message: str

    @classmethod
    def from_exception(cls, config: TraceConfig, ops: list[dict[str, Any]], step: int, e: BaseException) -> Finding:
        if isinstance(e, InvariantViolation):
            return cls(config=config, ops=ops, step=step, kind="invariant", name=e.name, message=str(e))
        if isinstance(e, KvmBugOn):
            return cls(config=config, ops=ops, step=step, kind="kvm_bug_on", name=e.site, message=str(e))
        return cls(config=config, ops=ops, step=step, kind="crash", name=type(e).__name__, message=str(e))

    def slug(self) -> str:
        model = re.sub(
            r"[^A-Za-z0-9]+",
            "_",
            Path(self.config.model).stem if self.config.model.endswith(".py") else self.config.model,
        )
        mmu = self.config.mmu.replace("-", "_")
        return f"{model.strip('_')}_{mmu}_{self.name}"


def write_trace(finding: Finding, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_trace(finding.config, finding.ops) + "\n")
    return path


_PYTEST_TEMPLATE = '''\
"""Regression test written by `kvmsplit check`: {headline}

{statement}
Found on model {model} ({mmu_name} MMU); the last operation ({step}) fails with:

    {message}

The test replays the operations through the Python API, checking every
invariant after each one and at every mmu_lock release, and fails while the
bug is present.  Run it against another model with KVMSPLIT_MODEL=<name>.
The same operations as a JSON trace: `kvmsplit replay {trace_name}`.
"""

import os

from kvmsplit.checker import Checker
from kvmsplit.trace import TraceConfig, make_kvm, run_op, validate_op

CONFIG = TraceConfig(
    mmu={mmu},
    nr_vcpus={nr_vcpus},
    eager_page_split={eager_page_split},
    nx_huge_pages={nx_huge_pages},
    pml={pml},
    model=os.environ.get("KVMSPLIT_MODEL", {model_literal}),
)


def run(kvm, checker, index, op):
    spec, args = validate_op(index, op)
    run_op(kvm, spec, args)
    checker.after_operation()


# One operation a line, as in the trace: keep it that way.
# fmt: off
def test_{func}():
    kvm = make_kvm(CONFIG)
    checker = Checker(kvm)
    try:
{body}
    finally:
        checker.detach()
# fmt: on
'''


def py_literal(value: Any) -> str:
    """@value as Python source in the style ruff formats: double quotes, True/False/None."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(py_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {py_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


def pytest_source(finding: Finding, trace_name: str = "TRACE") -> str:
    """A standalone pytest module replaying @finding, one line per operation."""
    body = []
    for i, op in enumerate(finding.ops):
        body.append(f"        # {i}: {describe_op(op)}")
        if i == finding.step:
            body.append(f"        # Fails here: {finding.kind} {finding.name}")
        body.append(f"        run(kvm, checker, {i}, {py_literal(op)})")
    statement = ""
    if finding.kind == "invariant":
        from kvmsplit.properties import invariants as _registers  # noqa: F401
        from kvmsplit.properties.registry import INVARIANTS

        inv = INVARIANTS.get(finding.name)
        if inv is not None:
            statement = f"Invariant {inv.name}: {inv.statement}\nRelied on by {inv.kernel}.\n"
    cfg = finding.config
    return _PYTEST_TEMPLATE.format(
        headline=f"{finding.kind} {finding.name}",
        statement=statement,
        model=cfg.model,
        mmu=py_literal(cfg.mmu),
        mmu_name=cfg.mmu,
        nr_vcpus=py_literal(cfg.nr_vcpus),
        eager_page_split=py_literal(cfg.eager_page_split),
        nx_huge_pages=py_literal(cfg.nx_huge_pages),
        pml=py_literal(cfg.pml),
        model_literal=py_literal(cfg.model),
        step=finding.step,
        message=finding.message,
        trace_name=trace_name,
        func=re.sub(r"\W+", "_", f"{finding.name}_holds").lower(),
        body="\n".join(body),
    )


def write_pytest(finding: Finding, path: Path, trace_name: str = "TRACE") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(pytest_source(finding, trace_name))
    return path


# --- KVM selftest skeleton -----------------------------------------------------------------

_BACKING = {
    "4k": "VM_MEM_SRC_ANONYMOUS",
    "thp": "VM_MEM_SRC_ANONYMOUS_THP",
    "hugetlb-2m": "VM_MEM_SRC_ANONYMOUS_HUGETLB_2MB",
    "hugetlb-1g": "VM_MEM_SRC_ANONYMOUS_HUGETLB_1GB",
}

_C_HEADER = """\
// SPDX-License-Identifier: GPL-2.0-only
/*
 * {title}
 *
 * Skeleton written by `kvmsplit selftest` from a kvmsplit trace
 * (model {model}, {mmu} MMU{failure}).
 * It follows the operations of the trace; it has not been compiled, and
 * the parts the reference model abstracts (nested EPT, guest page tables
 * built by hand, host THP changes) are left as TODOs.
 */
#include <stdio.h>
#include <stdlib.h>
#include <linux/bitmap.h>

#include "kvm_util.h"
#include "processor.h"
#include "test_util.h"
#include "ucall_common.h"

#define NR_VCPUS\t{nr_vcpus}
/*
 * Memslot 0 and the low gigabytes hold the test's own code, data and page
 * tables; the trace's slots and guest physical addresses are moved above
 * them.  4 GiB keeps every 1G page of the trace 1G-aligned.
 */
#define TEST_SLOT(n)\t(10 + (n))
#define TEST_GPA(x)\t(0x100000000ul + (x))

/* Model: the host tells the guest what to touch next through these. */
static uint64_t guest_start;
static uint64_t guest_end;
static uint64_t guest_stride;
static int guest_access;\t/* 0 read, 1 write */

static void guest_code(void)
{{
\tuint64_t gpa;

\tfor (;;) {{
\t\tfor (gpa = READ_ONCE(guest_start); gpa < READ_ONCE(guest_end);
\t\t     gpa += READ_ONCE(guest_stride)) {{
\t\t\tif (READ_ONCE(guest_access))
\t\t\t\t*(volatile uint64_t *)gpa = gpa;
\t\t\telse
\t\t\t\t(void)*(volatile uint64_t *)gpa;
\t\t}}
\t\tGUEST_SYNC(0);
\t}}
}}

static void guest_touch(struct kvm_vm *vm, struct kvm_vcpu *vcpu, uint64_t start,
\t\t\tuint64_t end, uint64_t stride, int write)
{{
\tstruct ucall uc;

\tguest_start = start;
\tguest_end = end;
\tguest_stride = stride;
\tguest_access = write;
\tsync_global_to_guest(vm, guest_start);
\tsync_global_to_guest(vm, guest_end);
\tsync_global_to_guest(vm, guest_stride);
\tsync_global_to_guest(vm, guest_access);
\tvcpu_run(vcpu);
\tTEST_ASSERT_EQ(get_ucall(vcpu, &uc), UCALL_SYNC);
}}

static void assert_page_stats(struct kvm_vm *vm, uint64_t pages_4k, uint64_t pages_2m,
\t\t\t      uint64_t pages_1g, const char *stage)
{{
\tTEST_ASSERT_EQ(vm_get_stat(vm, pages_4k), pages_4k);
\tTEST_ASSERT_EQ(vm_get_stat(vm, pages_2m), pages_2m);
\tTEST_ASSERT_EQ(vm_get_stat(vm, pages_1g), pages_1g);
\tpr_debug("page stats after %s match\\n", stage);
}}

int main(int argc, char *argv[])
{{
\tstruct kvm_vcpu *vcpus[NR_VCPUS];
\tstruct kvm_vm *vm;
\tunsigned long *bitmap;

\tTEST_REQUIRE(get_kvm_param_bool("tdp_mmu") == {tdp_mmu});
\tTEST_REQUIRE(get_kvm_param_bool("eager_page_split"));
{require_ept}
\tvm = vm_create_with_vcpus(NR_VCPUS, guest_code, vcpus);
\tbitmap = bitmap_zalloc(1 << 20);
\tif ({eager} != get_kvm_param_bool("eager_page_split"))
\t\tprintf("TODO: the trace starts with eager_page_split=%s\\n", "{eager_word}");

"""


def _c_stats(stats: dict[str, int] | None, stage: str) -> str:
    if not stats:
        return ""
    return f'\tassert_page_stats(vm, {stats["pages_4k"]}, {stats["pages_2m"]}, {stats["pages_1g"]}, "{stage}");\n'


def selftest_source(
    config: TraceConfig,
    ops: list[dict[str, Any]],
    stats: list[dict[str, int]] | None = None,
    failure: Finding | None = None,
    title: str = "kvmsplit trace replayed against a real KVM",
) -> str:
    """A C skeleton in the style of tools/testing/selftests/kvm driving @ops.

    @stats, one dict of page stats per operation (from `run_trace()`),
    become vm_get_stat() assertions after every operation that changes them,
    so the real kernel is held to what the reference model computed.
    """
    out = [
        _C_HEADER.format(
            title=title,
            model=config.model,
            mmu=config.mmu,
            failure=f"; fails at operation {failure.step} with {failure.kind} {failure.name}" if failure else "",
            nr_vcpus=config.nr_vcpus,
            tdp_mmu="true" if config.mmu == "tdp" else "false",
            require_ept="" if config.mmu != "shadow" else '\tTEST_REQUIRE(!get_kvm_param_bool("ept"));\n',
            eager="true" if config.eager_page_split else "false",
            eager_word="Y" if config.eager_page_split else "N",
        )
    ]
    mapped: set[int] = set()
    slot_base: dict[int, int] = {}
    last: dict[str, int] | None = None
    for i, op in enumerate(ops):
        name = op["op"]
        g = _getter(op)
        out.append(f"\t/* {i}: {describe_op(op)} */\n")
        if failure is not None and i == failure.step:
            out.append(f"\t/* The reference model fails here: {failure.message} */\n")
        if name == "kvm_set_user_memory_region":
            slot, flags, gpa, size = g("slot"), g("flags", 0), g("gpa"), g("size")
            flag_c = _memslot_flags(flags)
            old_base = slot_base.get(slot)
            if size:
                slot_base[slot] = gpa // PAGE_SIZE
            if size == 0:
                out.append(f"\tvm_mem_region_delete(vm, TEST_SLOT({slot}));\n")
                mapped.discard(slot)
                slot_base.pop(slot, None)
            elif g("backing") is not None and slot not in mapped:
                npages = size // PAGE_SIZE
                out.append(
                    f"\tvm_userspace_mem_region_add(vm, {_BACKING[g('backing')]}, TEST_GPA({gpa:#x}), "
                    f"TEST_SLOT({slot}), {npages:#x}, {flag_c});\n"
                    f"\tvirt_map(vm, TEST_GPA({gpa:#x}), TEST_GPA({gpa:#x}), {npages:#x});\n"
                )
                mapped.add(slot)
            elif old_base is not None and old_base != gpa // PAGE_SIZE:
                out.append(f"\tvm_mem_region_move(vm, TEST_SLOT({slot}), TEST_GPA({gpa:#x}));\n")
            else:
                out.append(f"\tvm_mem_region_set_flags(vm, TEST_SLOT({slot}), {flag_c});\n")
        elif name == "kvm_vcpu_run":
            write = int(g("access", "read") == "write")
            out.append(
                f"\tguest_touch(vm, vcpus[{g('vcpu', 0)}], TEST_GPA({g('start'):#x}), TEST_GPA({g('end'):#x}), "
                f"{g('stride', PAGE_SIZE):#x}, {write});\n"
            )
        elif name == "kvm_vcpu_access":
            write = int(g("access", "read") == "write")
            addr = g("addr") & ~(PAGE_SIZE - 1)
            out.append(
                f"\tguest_touch(vm, vcpus[{g('vcpu', 0)}], TEST_GPA({addr:#x}), TEST_GPA({addr + 8:#x}), 8, {write});\n"
            )
            if g("pte"):
                out.append("\t/* TODO: the access stores to a guest page table; write the PTE value above. */\n")
        elif name == "kvm_get_dirty_log":
            out.append(f"\tkvm_vm_get_dirty_log(vm, TEST_SLOT({g('slot')}), bitmap);\n")
        elif name == "kvm_clear_dirty_log":
            out.append(f"\tbitmap_zero(bitmap, {g('num_pages')});\n")
            base = slot_base.get(g("slot"), 0) + g("first_page")
            for gfn in g("gfns", []):
                out.append(f"\t__set_bit({gfn - base}, bitmap);\t/* gfn {gfn:#x} */\n")
            out.append(
                f"\tkvm_vm_clear_dirty_log(vm, TEST_SLOT({g('slot')}), bitmap, {g('first_page'):#x}, {g('num_pages')});\n"
            )
        elif name == "kvm_enable_cap_manual_dirty_log_protect":
            out.append(f"\tvm_enable_cap(vm, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, {g('flags')});\n")
        elif name == "kvm_vm_ioctl_set_nr_mmu_pages":
            out.append(f"\tvm_ioctl(vm, KVM_SET_NR_MMU_PAGES, (void *){g('nr')}ul);\n")
        elif name in ("set_eager_page_split", "set_nx_huge_pages"):
            param = name.removeprefix("set_")
            out.append(f"\t/* TODO: write {'Y' if g('value') else 'N'} to /sys/module/kvm/parameters/{param}. */\n")
        elif name.startswith("host_"):
            out.append("\t/* TODO: drive the host mm (madvise(MADV_HUGEPAGE/MADV_DONTNEED) on the backing). */\n")
        elif name == "expect":
            want = {k: v for k, v in op.items() if k.startswith("pages_")}
            for k, v in want.items():
                out.append(f"\tTEST_ASSERT_EQ(vm_get_stat(vm, {k}), {v});\n")
        else:
            out.append(f"\t/* TODO: {name} has no selftest library helper; see the comment above. */\n")
        if stats is not None and i < len(stats):
            cur = {k: stats[i][k] for k in ("pages_4k", "pages_2m", "pages_1g")}
            if cur != last:
                out.append(_c_stats(cur, f"operation {i}"))
            last = cur
        out.append("\n")
    out.append("\tfree(bitmap);\n\tkvm_vm_free(vm);\n\treturn 0;\n}\n")
    return "".join(out)
