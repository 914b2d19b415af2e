"""KVM ioctl numbers and struct layouts, mirroring include/uapi/linux/kvm.h (x86).

Only what the conformance oracle uses.  Structs are packed and unpacked with
`struct` format strings whose sizes are asserted against the uapi sizes, so a
wrong layout fails at import rather than inside the kernel.  libc's ioctl,
mmap, munmap and madvise are reached through ctypes with errno preserved.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct

KVMIO = 0xAE
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _IO(nr: int) -> int:
    return _IOC(_IOC_NONE, nr, 0)


def _IOR(nr: int, size: int) -> int:
    return _IOC(_IOC_READ, nr, size)


def _IOW(nr: int, size: int) -> int:
    return _IOC(_IOC_WRITE, nr, size)


def _IOWR(nr: int, size: int) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, nr, size)


# struct layouts (little endian, natural alignment as in the uapi header)
KVM_USERSPACE_MEMORY_REGION = struct.Struct("<IIQQQ")  # slot, flags, gpa, size, hva
KVM_DIRTY_LOG = struct.Struct("<IIQ")  # slot, pad, bitmap pointer
KVM_CLEAR_DIRTY_LOG_ARGS = struct.Struct("<IIQQ")  # slot, num_pages, first_page, bitmap pointer
KVM_ENABLE_CAP = struct.Struct("<II4Q64x")  # cap, flags, args[4], pad[64]
KVM_REGS = struct.Struct("<18Q")
KVM_SEGMENT = struct.Struct("<QIHBBBBBBBBBx")  # base limit selector type present dpl db s l g avl unusable
KVM_DTABLE = struct.Struct("<QH6x")
KVM_CPUID2_HEADER = struct.Struct("<II")
KVM_CPUID_ENTRY2 = struct.Struct("<IIIIIII12x")  # function index flags eax ebx ecx edx pad[3]
KVM_STATS_HEADER = struct.Struct("<IIIIII")
KVM_STATS_DESC = struct.Struct("<IhHII")  # flags, exponent, size, offset, bucket_size

assert KVM_USERSPACE_MEMORY_REGION.size == 32
assert KVM_DIRTY_LOG.size == 16
assert KVM_CLEAR_DIRTY_LOG_ARGS.size == 24
assert KVM_ENABLE_CAP.size == 104
assert KVM_REGS.size == 144
assert KVM_SEGMENT.size == 24
assert KVM_DTABLE.size == 16
assert KVM_CPUID_ENTRY2.size == 40
assert KVM_STATS_HEADER.size == 24
assert KVM_STATS_DESC.size == 16

KVM_SREGS_SIZE = 8 * KVM_SEGMENT.size + 2 * KVM_DTABLE.size + 7 * 8 + 4 * 8
assert KVM_SREGS_SIZE == 312

# system ioctls
KVM_GET_API_VERSION = _IO(0x00)
KVM_CREATE_VM = _IO(0x01)
KVM_CHECK_EXTENSION = _IO(0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(0x05, KVM_CPUID2_HEADER.size)
# VM ioctls
KVM_CREATE_VCPU = _IO(0x41)
KVM_GET_DIRTY_LOG = _IOW(0x42, KVM_DIRTY_LOG.size)
KVM_SET_USER_MEMORY_REGION = _IOW(0x46, KVM_USERSPACE_MEMORY_REGION.size)
KVM_ENABLE_CAP_IOCTL = _IOW(0xA3, KVM_ENABLE_CAP.size)
KVM_CLEAR_DIRTY_LOG = _IOWR(0xC0, KVM_CLEAR_DIRTY_LOG_ARGS.size)
KVM_GET_STATS_FD = _IO(0xCE)
# vCPU ioctls
KVM_RUN = _IO(0x80)
KVM_GET_REGS = _IOR(0x81, KVM_REGS.size)
KVM_SET_REGS = _IOW(0x82, KVM_REGS.size)
KVM_GET_SREGS = _IOR(0x83, KVM_SREGS_SIZE)
KVM_SET_SREGS = _IOW(0x84, KVM_SREGS_SIZE)
KVM_SET_CPUID2 = _IOW(0x90, KVM_CPUID2_HEADER.size)

assert KVM_GET_DIRTY_LOG == 0x4010AE42
assert KVM_SET_USER_MEMORY_REGION == 0x4020AE46
assert KVM_ENABLE_CAP_IOCTL == 0x4068AEA3
assert KVM_CLEAR_DIRTY_LOG == 0xC018AEC0
assert KVM_GET_SREGS == 0x8138AE83
assert KVM_SET_CPUID2 == 0x4008AE90

KVM_API_VERSION = 12

# capabilities
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SYNC_MMU = 16
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_BINARY_STATS_FD = 203

KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

# struct kvm_run
KVM_RUN_EXIT_REASON = 8
KVM_RUN_EXIT_UNION = 32
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
EXIT_REASON_NAMES = {
    KVM_EXIT_IO: "IO",
    KVM_EXIT_HLT: "HLT",
    KVM_EXIT_MMIO: "MMIO",
    KVM_EXIT_SHUTDOWN: "SHUTDOWN",
    KVM_EXIT_FAIL_ENTRY: "FAIL_ENTRY",
    KVM_EXIT_INTR: "INTR",
    KVM_EXIT_INTERNAL_ERROR: "INTERNAL_ERROR",
}

# binary stats descriptor flags
KVM_STATS_TYPE_MASK = 0xF

# mmap(2), madvise(2)
PROT_NONE, PROT_READ, PROT_WRITE = 0x0, 0x1, 0x2
MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE = 0x02, 0x20, 0x4000
MAP_FAILED = ctypes.c_void_p(-1).value
MADV_DONTNEED = 4
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_COLLAPSE = 25

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.restype = ctypes.c_int


def _raise(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def ioctl(fd: int, request: int, arg: int | ctypes.Array | None = 0) -> int:  # type: ignore[type-arg]
    """ioctl(2); @arg is an integer, or a ctypes buffer passed by address. Raises OSError."""
    if isinstance(arg, ctypes.Array):
        ptr: int | None = ctypes.addressof(arg)
    else:
        ptr = arg
    ret = _libc.ioctl(fd, request, ptr)
    if ret < 0:
        _raise(f"ioctl({request:#x})")
    return ret


def mmap_anon(size: int, prot: int = PROT_READ | PROT_WRITE) -> int:
    addr = _libc.mmap(None, size, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    if addr is None or addr == MAP_FAILED:
        _raise(f"mmap({size:#x})")
    return int(addr)


def munmap(addr: int, size: int) -> None:
    if _libc.munmap(addr, size) < 0:
        _raise(f"munmap({addr:#x}, {size:#x})")


def mprotect(addr: int, size: int, prot: int) -> None:
    if _libc.mprotect(addr, size, prot) < 0:
        _raise(f"mprotect({addr:#x}, {size:#x}, {prot})")


def madvise(addr: int, size: int, advice: int) -> None:
    if _libc.madvise(addr, size, advice) < 0:
        _raise(f"madvise({addr:#x}, {size:#x}, {advice})")


def buffer_from(data: bytes) -> ctypes.Array:  # type: ignore[type-arg]
    return ctypes.create_string_buffer(data, len(data))
