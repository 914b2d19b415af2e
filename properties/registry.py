"""The invariant registry: named checks over a `Kvm`.

An invariant is a plain function that raises `InvariantViolation` (via
`fail()`) when it does not hold.  `@invariant` registers it with the
kernel function that relies on it and the mutant that breaks it, so reports
and docs can say both.

Example::

    @invariant(kernel="check_spte_writable_invariants()", mutant="mutants/split_drops_mmu_writable")
    def leaf_spte_writable_triad(kvm):
        '''Every present leaf: W => MMU-writable => Host-writable.'''
        ...

Kinds: "state" invariants take the `Kvm` and hold after every operation;
"unlock" invariants hold at every point where KVM drops mmu_lock
(`Kvm.mmu_unlock()`); "return" invariants hold when an ioctl returns to
userspace; "split" invariants are transition invariants, taking the `Kvm`
and a `kvmsplit.split.SplitRecord` (the huge SPTE before, the table that
replaced it after) for every huge page a split replaces; "split_pass"
invariants take a `kvmsplit.split.SplitPass` after every call of the two
split entry points.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from kvmsplit.errors import InvariantViolation


@attrs.frozen
class Invariant:
    name: str
    func: Callable[..., None]
    kind: str
    kernel: str
    # The mutant in models/mutants/ that breaks it; None until one exists.
    mutant: str | None

    @property
    def statement(self) -> str:
        doc = (self.func.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else self.name

    def __call__(self, *args: Any) -> None:
        self.func(*args)


INVARIANTS: dict[str, Invariant] = {}

KINDS = ("state", "unlock", "return", "split", "split_pass")


def invariant(
    *, kernel: str, mutant: str | None, kind: str = "state"
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    if kind not in KINDS:
        raise ValueError(f"invariant kind {kind!r} is not one of {KINDS}")

    def register(func: Callable[..., None]) -> Callable[..., None]:
        name = func.__name__
        if name in INVARIANTS:
            raise ValueError(f"invariant {name!r} is registered twice")
        INVARIANTS[name] = Invariant(name=name, func=func, kind=kind, kernel=kernel, mutant=mutant)
        return func

    return register


def fail(name: str, message: str) -> None:
    raise InvariantViolation(name, message)


def of_kind(kind: str) -> list[Invariant]:
    return [inv for inv in INVARIANTS.values() if inv.kind == kind]


def by_mutant() -> dict[str, tuple[str, ...]]:
    """Each mutant named by an @invariant(mutant=...), with the invariants that name it."""
    out: dict[str, tuple[str, ...]] = {}
    for inv in INVARIANTS.values():
        if inv.mutant is not None:
            out[inv.mutant] = (*out.get(inv.mutant, ()), inv.name)
    return out
