"""Unit tests for kvmsplit/realkvm/ioctls.py: numbers and layouts as the uapi header has them."""

from __future__ import annotations

from kvmsplit.realkvm import ioctls as k


def test_ioctl_numbers_match_the_uapi_header() -> None:
    # Values checked against linux/kvm.h with a C program (docs: real-kvm.md, section 6).
    assert k.KVM_GET_API_VERSION == 0xAE00
    assert k.KVM_CREATE_VM == 0xAE01
    assert k.KVM_CHECK_EXTENSION == 0xAE03
    assert k.KVM_GET_VCPU_MMAP_SIZE == 0xAE04
    assert k.KVM_GET_SUPPORTED_CPUID == 0xC008AE05
    assert k.KVM_CREATE_VCPU == 0xAE41
    assert k.KVM_GET_DIRTY_LOG == 0x4010AE42
    assert k.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert k.KVM_ENABLE_CAP_IOCTL == 0x4068AEA3
    assert k.KVM_CLEAR_DIRTY_LOG == 0xC018AEC0
    assert k.KVM_GET_STATS_FD == 0xAECE
    assert k.KVM_RUN == 0xAE80
    assert (k.KVM_GET_REGS, k.KVM_SET_REGS) == (0x8090AE81, 0x4090AE82)
    assert (k.KVM_GET_SREGS, k.KVM_SET_SREGS) == (0x8138AE83, 0x4138AE84)
    assert k.KVM_SET_CPUID2 == 0x4008AE90


def test_struct_layouts_have_the_uapi_sizes() -> None:
    assert k.KVM_USERSPACE_MEMORY_REGION.size == 32
    assert k.KVM_CLEAR_DIRTY_LOG_ARGS.size == 24
    assert k.KVM_ENABLE_CAP.size == 104
    assert k.KVM_SREGS_SIZE == 312
    assert k.KVM_CPUID_ENTRY2.size == 40
    assert k.KVM_STATS_DESC.size == 16


def test_clear_dirty_log_args_put_num_pages_before_first_page() -> None:
    raw = k.KVM_CLEAR_DIRTY_LOG_ARGS.pack(3, 64, 128, 0xDEAD000)
    assert raw[:4] == (3).to_bytes(4, "little")
    assert raw[4:8] == (64).to_bytes(4, "little")
    assert raw[8:16] == (128).to_bytes(8, "little")
