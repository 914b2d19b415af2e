"""union kvm_mmu_page_role, mirroring arch/x86/include/asm/kvm_host.h.

The role is a frozen value; `word` packs it exactly as the kernel's 32-bit
union does, and lookups compare the whole word, as kvm_mmu_find_shadow_page()
does.
"""

from __future__ import annotations

import attrs

from kvmsplit.spte import ACC_ALL, PT64_ROOT_4LEVEL

PT64_ROOT_MAX_LEVEL = 5


def _in_range(lo: int, hi: int):  # type: ignore[no-untyped-def]
    def check(inst: object, attribute: attrs.Attribute, value: int) -> None:  # type: ignore[type-arg]
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise ValueError(f"kvm_mmu_page_role.{attribute.name}={value!r} is outside {lo}..{hi}")

    return check


@attrs.frozen(kw_only=True)
class KvmMmuPageRole:
    """union kvm_mmu_page_role; bit positions in `word` are the kernel's."""

    level: int = attrs.field(validator=_in_range(1, PT64_ROOT_MAX_LEVEL))
    has_4_byte_gpte: bool = False
    quadrant: int = attrs.field(default=0, validator=_in_range(0, 3))
    direct: bool = False
    access: int = attrs.field(default=ACC_ALL, validator=_in_range(0, 7))
    invalid: bool = False
    efer_nx: bool = True
    cr0_wp: bool = True
    smep_andnot_wp: bool = False
    smap_andnot_wp: bool = False
    ad_disabled: bool = False
    guest_mode: bool = False
    passthrough: bool = False
    smm: int = attrs.field(default=0, validator=_in_range(0, 255))

    @property
    def word(self) -> int:
        return (
            self.level
            | int(self.has_4_byte_gpte) << 4
            | self.quadrant << 5
            | int(self.direct) << 7
            | self.access << 8
            | int(self.invalid) << 11
            | int(self.efer_nx) << 12
            | int(self.cr0_wp) << 13
            | int(self.smep_andnot_wp) << 14
            | int(self.smap_andnot_wp) << 15
            | int(self.ad_disabled) << 16
            | int(self.guest_mode) << 17
            | int(self.passthrough) << 18
            | self.smm << 24
        )

    def evolve(self, **changes: object) -> KvmMmuPageRole:
        return attrs.evolve(self, **changes)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        flags = [f"L{self.level}", "direct" if self.direct else "indirect", f"access={self.access}"]
        if self.guest_mode:
            flags.append("guest_mode")
        if self.invalid:
            flags.append("invalid")
        if self.ad_disabled:
            flags.append("ad_disabled")
        return f"role({' '.join(flags)} word={self.word:#x})"


def kvm_mmu_role_as_id(role: KvmMmuPageRole) -> int:
    return role.smm


def root_role(
    *, direct: bool, guest_mode: bool = False, ad_disabled: bool = False, level: int = PT64_ROOT_4LEVEL
) -> KvmMmuPageRole:
    """Model: the root role of the three MMU contexts the model supports.

    kvm_calc_tdp_mmu_root_page_role() (direct, ACC_ALL), the shadow paging
    root of a 4-level guest (indirect), and kvm_calc_shadow_ept_root_page_role()
    for L2 (indirect, guest_mode).
    """
    return KvmMmuPageRole(level=level, direct=direct, access=ACC_ALL, guest_mode=guest_mode, ad_disabled=ad_disabled)
