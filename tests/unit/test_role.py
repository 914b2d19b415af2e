"""Unit tests for kvmsplit/role.py (union kvm_mmu_page_role, arch/x86/include/asm/kvm_host.h)."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings

from kvmsplit.role import PT64_ROOT_MAX_LEVEL, KvmMmuPageRole, kvm_mmu_role_as_id, root_role
from kvmsplit.spte import ACC_ALL, PT64_ROOT_4LEVEL
from tests.strategies import roles

# A role whose word is only its level (1): every other field at zero.
ZERO_ROLE = KvmMmuPageRole(level=1, access=0, efer_nx=False, cr0_wp=False)


def test_zero_role_word_is_just_the_level() -> None:
    assert ZERO_ROLE.word == 1


@pytest.mark.parametrize(
    ("field", "value", "bits"),
    [
        ("level", 5, 5),
        ("level", 3, 3),
        ("has_4_byte_gpte", True, 1 << 4),
        ("quadrant", 1, 1 << 5),
        ("quadrant", 3, 3 << 5),
        ("direct", True, 1 << 7),
        ("access", 1, 1 << 8),
        ("access", 7, 7 << 8),
        ("invalid", True, 1 << 11),
        ("efer_nx", True, 1 << 12),
        ("cr0_wp", True, 1 << 13),
        ("smep_andnot_wp", True, 1 << 14),
        ("smap_andnot_wp", True, 1 << 15),
        ("ad_disabled", True, 1 << 16),
        ("guest_mode", True, 1 << 17),
        ("passthrough", True, 1 << 18),
        ("smm", 1, 1 << 24),
        ("smm", 255, 0xFF << 24),
    ],
)
def test_word_packs_each_field_at_the_kernels_bit_position(field: str, value: object, bits: int) -> None:
    role = ZERO_ROLE.evolve(**{field: value})
    if field == "level":
        assert role.word == bits
    else:
        assert role.word == ZERO_ROLE.word | bits


@settings(max_examples=100)
@given(role=roles)
def test_word_fits_32_bits_and_leaves_bits_19_to_23_clear(role: KvmMmuPageRole) -> None:
    assert 0 <= role.word < 1 << 32
    assert role.word & (0x1F << 19) == 0


@settings(max_examples=100)
@given(role=roles)
def test_word_decodes_back_to_every_field(role: KvmMmuPageRole) -> None:
    w = role.word
    assert w & 0xF == role.level
    assert (w >> 4) & 1 == role.has_4_byte_gpte
    assert (w >> 5) & 3 == role.quadrant
    assert (w >> 7) & 1 == role.direct
    assert (w >> 8) & 7 == role.access
    assert (w >> 11) & 1 == role.invalid
    assert (w >> 16) & 1 == role.ad_disabled
    assert (w >> 17) & 1 == role.guest_mode
    assert (w >> 24) & 0xFF == role.smm


@settings(max_examples=100)
@given(a=roles, b=roles)
def test_roles_differ_exactly_when_their_words_differ(a: KvmMmuPageRole, b: KvmMmuPageRole) -> None:
    """kvm_mmu_find_shadow_page() compares whole role words, so the packing must be injective."""
    assert (a == b) == (a.word == b.word)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("level", 0),
        ("level", PT64_ROOT_MAX_LEVEL + 1),
        ("level", True),
        ("level", "1"),
        ("quadrant", 4),
        ("quadrant", -1),
        ("access", 8),
        ("access", -1),
        ("smm", 256),
        ("smm", -1),
    ],
)
def test_validator_rejects_an_out_of_range_field_and_names_it(field: str, value: object) -> None:
    fields = {"level": 1, field: value}
    with pytest.raises(ValueError, match=rf"kvm_mmu_page_role\.{field}="):
        KvmMmuPageRole(**fields)  # type: ignore[arg-type]


def test_validator_also_guards_evolve() -> None:
    with pytest.raises(ValueError, match=r"kvm_mmu_page_role\.level="):
        ZERO_ROLE.evolve(level=ZERO_ROLE.level - 1)


def test_role_is_frozen() -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        ZERO_ROLE.level = 2  # type: ignore[misc]


@settings(max_examples=30)
@given(role=roles)
def test_address_space_id_is_the_smm_field(role: KvmMmuPageRole) -> None:
    """kvm_mmu_role_as_id() reads role.smm."""
    assert kvm_mmu_role_as_id(role) == role.smm


def test_tdp_root_role_is_direct_with_every_access() -> None:
    """kvm_calc_tdp_mmu_root_page_role(): direct, ACC_ALL, not guest_mode for L1."""
    role = root_role(direct=True)
    assert role.direct and not role.guest_mode
    assert role.access == ACC_ALL
    assert role.level == PT64_ROOT_4LEVEL


def test_nested_ept_root_role_is_indirect_guest_mode() -> None:
    """kvm_calc_shadow_ept_root_page_role() for L2."""
    role = root_role(direct=False, guest_mode=True)
    assert not role.direct
    assert role.guest_mode
    assert role.word & (1 << 17)
