"""A small KVM userspace: /dev/kvm, a VM, vCPUs, memslots, dirty logging and binary stats.

Every resource is a context manager and is released on error too: file
descriptors are closed, mappings unmapped.  Every KVM_RUN is bounded by an
ITIMER_REAL alarm, so a guest that never exits makes KVM_RUN return EINTR
instead of hanging the process; the previous SIGALRM handler and timer are
restored afterwards.

Nothing here writes under /sys or /proc: module parameters and smaps are
only read.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import signal
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from kvmsplit.realkvm import ioctls as k

MiB = 1 << 20
HPAGE_SIZE = 2 * MiB
KVM_DEV = "/dev/kvm"
KVM_PARAMS = Path("/sys/module", "kvm", "parameters")
# Bound for one KVM_RUN: a pass over a few thousand pages takes milliseconds.
RUN_TIMEOUT_S = 2.0


class KvmUnavailable(Exception):
    """Real KVM cannot be used here; the message says why."""


class GuestError(Exception):
    """The guest did something the oracle did not ask for (a shutdown, an unexpected exit)."""


def module_params_dir(module: str) -> Path:
    return Path("/sys/module", module, "parameters")


def read_kvm_params(base: Path = KVM_PARAMS) -> dict[str, str]:
    """The kvm module's parameters, read only; missing files are left out."""
    params: dict[str, str] = {}
    if not base.is_dir():
        return params
    for p in sorted(base.iterdir()):
        with contextlib.suppress(OSError):
            params[p.name] = p.read_text().strip()
    return params


def vendor_module() -> str | None:
    """The loaded KVM vendor module: kvm_intel, kvm_amd or kvm_pvm."""
    for name in ("kvm_pvm", "kvm_intel", "kvm_amd"):
        if Path("/sys/module", name).is_dir():
            return name
    return None


# --- host memory ------------------------------------------------------------------


@attrs.define(eq=False)
class HostMemory:
    """An anonymous private mapping used as guest memory.

    The usable range starts @misalign bytes past a 2 MiB boundary.  PROT_NONE
    guard regions on both sides keep the VMA from merging with neighbours,
    so its smaps entry describes exactly this range.
    """

    size: int
    backing: str  # "thp" or "4k"
    misalign: int = 0
    hva: int = 0
    _reserve: int = 0
    _reserve_size: int = 0

    def __attrs_post_init__(self) -> None:
        if self.backing not in ("thp", "4k"):
            raise ValueError(f"HostMemory: backing {self.backing!r} is not 'thp' or '4k'")
        if self.size <= 0 or self.size % 4096 or self.misalign % 4096 or not 0 <= self.misalign < HPAGE_SIZE:
            raise ValueError(f"HostMemory: size {self.size:#x} misalign {self.misalign:#x} not page aligned")
        self._reserve_size = self.size + 3 * HPAGE_SIZE
        self._reserve = k.mmap_anon(self._reserve_size, k.PROT_NONE)
        try:
            self.hva = ((self._reserve + HPAGE_SIZE) & ~(HPAGE_SIZE - 1)) + self.misalign
            k.mprotect(self.hva, self.size, k.PROT_READ | k.PROT_WRITE)
            k.madvise(self.hva, self.size, k.MADV_HUGEPAGE if self.backing == "thp" else k.MADV_NOHUGEPAGE)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._reserve:
            k.munmap(self._reserve, self._reserve_size)
            self._reserve = 0

    def __enter__(self) -> HostMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def populate(self, offset: int = 0, size: int | None = None) -> None:
        """Write every page so the host allocates it (a THP where the policy allows)."""
        size = self.size - offset if size is None else size
        ctypes.memset(self.hva + offset, 0x5A, size)

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"HostMemory.write: {offset:#x}+{len(data):#x} outside {self.size:#x}")
        ctypes.memmove(self.hva + offset, data, len(data))

    def read(self, offset: int, size: int) -> bytes:
        return ctypes.string_at(self.hva + offset, size)

    def madvise(self, offset: int, size: int, advice: int) -> None:
        k.madvise(self.hva + offset, size, advice)

    def anon_huge_bytes(self) -> int:
        """AnonHugePages of this VMA from /proc/self/smaps (read only)."""
        return smaps_field(self.hva, "AnonHugePages")


def smaps_field(start: int, field: str) -> int:
    """A kB field of the /proc/self/smaps entry that starts at @start, in bytes (0 if absent)."""
    found = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                lo = int(head.split("-")[0], 16)
                if found:
                    break
                found = lo == start
            elif found and head == field + ":":
                return int(line.split()[1]) * 1024
    return 0


# --- binary stats -----------------------------------------------------------------------


@attrs.define(eq=False)
class StatsReader:
    """KVM_GET_STATS_FD: descriptors parsed once, values read with pread() by descriptor offset."""

    fd: int
    id: str = ""
    names: dict[str, tuple[int, int, int]] = attrs.field(factory=dict)  # name -> (flags, size, offset)
    data_offset: int = 0
    data_size: int = 0

    @classmethod
    def open(cls, owner_fd: int) -> StatsReader:
        fd = k.ioctl(owner_fd, k.KVM_GET_STATS_FD)
        try:
            reader = cls(fd)
            reader._parse()
        except BaseException:
            os.close(fd)
            raise
        return reader

    def _parse(self) -> None:
        hdr = os.pread(self.fd, k.KVM_STATS_HEADER.size, 0)
        _flags, name_size, num_desc, id_offset, desc_offset, data_offset = k.KVM_STATS_HEADER.unpack(hdr)
        self.id = os.pread(self.fd, name_size, id_offset).split(b"\0", 1)[0].decode()
        desc_size = k.KVM_STATS_DESC.size + name_size
        raw = os.pread(self.fd, desc_size * num_desc, desc_offset)
        end = 0
        for i in range(num_desc):
            d = raw[i * desc_size : (i + 1) * desc_size]
            flags, _exp, size, offset, _bucket = k.KVM_STATS_DESC.unpack(d[: k.KVM_STATS_DESC.size])
            name = d[k.KVM_STATS_DESC.size :].split(b"\0", 1)[0].decode()
            self.names[name] = (flags, size, offset)
            end = max(end, offset + 8 * size)
        self.data_offset = data_offset
        self.data_size = end

    def read(self) -> dict[str, int]:
        """Every single-valued stat, indexed by its descriptor's offset (not its position)."""
        data = os.pread(self.fd, self.data_size, self.data_offset)
        out: dict[str, int] = {}
        for name, (_flags, size, offset) in self.names.items():
            if size == 1:
                out[name] = struct.unpack_from("<Q", data, offset)[0]
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- the timer that bounds KVM_RUN ---------------------------------------------------


@contextlib.contextmanager
def run_timer(seconds: float) -> Iterator[None]:
    """Arm ITIMER_REAL so a blocked KVM_RUN returns EINTR; restore the old handler and timer."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("KVM_RUN is bounded with SIGALRM, which only the main thread can handle")
    old_handler = signal.signal(signal.SIGALRM, lambda signum, frame: None)
    old_timer = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_timer[0] > 0:
            signal.setitimer(signal.ITIMER_REAL, *old_timer)


# --- /dev/kvm, VM, vCPU ---------------------------------------------------------------------


@attrs.define(eq=False)
class KvmSystem:
    fd: int
    vcpu_mmap_size: int = 0

    @classmethod
    def open(cls) -> KvmSystem:
        """Open /dev/kvm, or raise KvmUnavailable naming the reason."""
        try:
            fd = os.open(KVM_DEV, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(f"{KVM_DEV} does not exist (KVM is not loaded or not exposed)") from None
        except PermissionError:
            raise KvmUnavailable(f"{KVM_DEV} is not accessible to this user (permission denied)") from None
        except OSError as e:
            raise KvmUnavailable(f"{KVM_DEV} cannot be opened: {e.strerror}") from None
        sysfd = cls(fd)
        try:
            version = k.ioctl(fd, k.KVM_GET_API_VERSION)
            if version != k.KVM_API_VERSION:
                raise KvmUnavailable(f"KVM_GET_API_VERSION is {version}, not {k.KVM_API_VERSION}")
            for cap, name in (
                (k.KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY"),
                (k.KVM_CAP_SYNC_MMU, "KVM_CAP_SYNC_MMU"),
                (k.KVM_CAP_BINARY_STATS_FD, "KVM_CAP_BINARY_STATS_FD"),
            ):
                if not sysfd.check_extension(cap):
                    raise KvmUnavailable(f"{name} is not supported")
            sysfd.vcpu_mmap_size = k.ioctl(fd, k.KVM_GET_VCPU_MMAP_SIZE)
        except BaseException:
            sysfd.close()
            raise
        return sysfd

    def check_extension(self, cap: int) -> int:
        return k.ioctl(self.fd, k.KVM_CHECK_EXTENSION, cap)

    def supported_cpuid(self) -> bytes:
        """KVM_GET_SUPPORTED_CPUID as a kvm_cpuid2 blob, ready for KVM_SET_CPUID2."""
        nent = 128
        while True:
            buf = ctypes.create_string_buffer(k.KVM_CPUID2_HEADER.size + nent * k.KVM_CPUID_ENTRY2.size)
            k.KVM_CPUID2_HEADER.pack_into(buf, 0, nent, 0)
            try:
                k.ioctl(self.fd, k.KVM_GET_SUPPORTED_CPUID, buf)
            except OSError as e:
                if e.errno == errno.E2BIG and nent < 4096:
                    nent *= 2
                    continue
                raise
            got = k.KVM_CPUID2_HEADER.unpack_from(buf, 0)[0]
            return buf.raw[: k.KVM_CPUID2_HEADER.size + got * k.KVM_CPUID_ENTRY2.size]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> KvmSystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@attrs.define(eq=False)
class Vcpu:
    vm: Vm
    vcpu_id: int
    fd: int
    run: mmap.mmap
    stats: StatsReader | None = None

    def set_cpuid(self, cpuid2: bytes) -> None:
        k.ioctl(self.fd, k.KVM_SET_CPUID2, k.buffer_from(cpuid2))

    def get_sregs(self) -> bytearray:
        buf = ctypes.create_string_buffer(k.KVM_SREGS_SIZE)
        k.ioctl(self.fd, k.KVM_GET_SREGS, buf)
        return bytearray(buf.raw)

    def set_sregs(self, sregs: bytes) -> None:
        k.ioctl(self.fd, k.KVM_SET_SREGS, k.buffer_from(bytes(sregs)))

    def set_regs(self, regs: list[int]) -> None:
        k.ioctl(self.fd, k.KVM_SET_REGS, k.buffer_from(k.KVM_REGS.pack(*regs)))

    def get_regs(self) -> list[int]:
        buf = ctypes.create_string_buffer(k.KVM_REGS.size)
        k.ioctl(self.fd, k.KVM_GET_REGS, buf)
        return list(k.KVM_REGS.unpack(buf.raw))

    def kvm_run(self, timeout: float = RUN_TIMEOUT_S) -> int:
        """One KVM_RUN bounded by a timer; returns the exit reason (KVM_EXIT_INTR on timeout)."""
        with run_timer(timeout):
            try:
                k.ioctl(self.fd, k.KVM_RUN)
            except OSError as e:
                if e.errno != errno.EINTR:
                    raise
                return k.KVM_EXIT_INTR
        return struct.unpack_from("<I", self.run, k.KVM_RUN_EXIT_REASON)[0]

    def mmio_exit(self) -> tuple[int, int, bool]:
        """(phys_addr, len, is_write) of the pending KVM_EXIT_MMIO."""
        phys, _data, length, is_write = struct.unpack_from("<Q8sIB", self.run, k.KVM_RUN_EXIT_UNION)
        return phys, length, bool(is_write)

    def read_stats(self) -> dict[str, int]:
        if self.stats is None:
            self.stats = StatsReader.open(self.fd)
        return self.stats.read()

    def close(self) -> None:
        if self.stats is not None:
            self.stats.close()
            self.stats = None
        if not self.run.closed:
            self.run.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@attrs.define(eq=False)
class Vm:
    system: KvmSystem
    fd: int
    vcpus: list[Vcpu] = attrs.field(factory=list)
    stats: StatsReader | None = None

    @classmethod
    def create(cls, system: KvmSystem) -> Vm:
        fd = k.ioctl(system.fd, k.KVM_CREATE_VM, 0)
        return cls(system, fd)

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        if self.stats is not None:
            self.stats.close()
            self.stats = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, cap: int) -> int:
        return k.ioctl(self.fd, k.KVM_CHECK_EXTENSION, cap)

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        fd = k.ioctl(self.fd, k.KVM_CREATE_VCPU, vcpu_id)
        try:
            run = mmap.mmap(fd, self.system.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        vcpu = Vcpu(self, vcpu_id, fd, run)
        self.vcpus.append(vcpu)
        return vcpu

    def set_user_memory_region(self, slot: int, flags: int, gpa: int, size: int, hva: int) -> None:
        """KVM_SET_USER_MEMORY_REGION; size 0 deletes the slot."""
        arg = k.buffer_from(k.KVM_USERSPACE_MEMORY_REGION.pack(slot, flags, gpa, size, hva))
        k.ioctl(self.fd, k.KVM_SET_USER_MEMORY_REGION, arg)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        a = [*args, 0, 0, 0, 0][:4]
        k.ioctl(self.fd, k.KVM_ENABLE_CAP_IOCTL, k.buffer_from(k.KVM_ENABLE_CAP.pack(cap, flags, *a)))

    def get_dirty_log(self, slot: int, npages: int) -> bytes:
        """KVM_GET_DIRTY_LOG into a bitmap of ALIGN(npages, 64) / 8 bytes."""
        bitmap = ctypes.create_string_buffer(((npages + 63) // 64) * 8)
        arg = k.buffer_from(k.KVM_DIRTY_LOG.pack(slot, 0, ctypes.addressof(bitmap)))
        k.ioctl(self.fd, k.KVM_GET_DIRTY_LOG, arg)
        return bitmap.raw

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: bytes) -> None:
        buf = ctypes.create_string_buffer(bytes(bitmap), max(len(bitmap), 8))
        arg = k.buffer_from(k.KVM_CLEAR_DIRTY_LOG_ARGS.pack(slot, num_pages, first_page, ctypes.addressof(buf)))
        k.ioctl(self.fd, k.KVM_CLEAR_DIRTY_LOG, arg)

    def read_stats(self) -> dict[str, int]:
        if self.stats is None:
            self.stats = StatsReader.open(self.fd)
        return self.stats.read()


def describe_host() -> dict[str, Any]:
    """What decides the model's configuration, read from the running kernel."""
    return {"vendor_module": vendor_module(), "params": read_kvm_params()}
