"""Fixtures for the real-KVM tests: one /dev/kvm handle per session, or a skip naming the reason."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvmsplit.realkvm.vm import KvmSystem, KvmUnavailable


@pytest.fixture(scope="session")
def real_kvm() -> Iterator[tuple[KvmSystem, bytes]]:
    """/dev/kvm with the supported CPUID, once the CPL3 mailbox guest is known to run natively."""
    from kvmsplit.realkvm.conform import probe_guest

    try:
        system = KvmSystem.open()
    except KvmUnavailable as e:
        pytest.skip(f"real KVM unavailable: {e}")
    try:
        cpuid = system.supported_cpuid()
        try:
            probe_guest(system, cpuid)
        except KvmUnavailable as e:
            pytest.skip(f"real KVM unusable: {e}")
        yield system, cpuid
    finally:
        system.close()
