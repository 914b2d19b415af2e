"""Model: run the named invariants against a `Kvm` at the right moments.

"state" invariants run after every operation, "return" invariants when an
ioctl returns to userspace (also after every operation), and "unlock"
invariants at every point where KVM drops mmu_lock, through the
`Kvm.unlock_hooks` the model calls there, and "split" invariants after
every huge page a split replaces and "split_pass" ones after every split
entry point, as observers of the split environment.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from kvmsplit.kvm import Kvm


def _invariants():  # type: ignore[no-untyped-def]
    from kvmsplit.properties import invariants  # noqa: F401  (registers them)
    from kvmsplit.properties.registry import INVARIANTS

    return INVARIANTS


@attrs.define
class Checker:
    """Checks a chosen set of invariants (all by default) on one VM."""

    kvm: Kvm
    names: list[str] | None = None
    unlock_checks: int = 0
    step_checks: int = 0
    split_checks: int = 0

    def __attrs_post_init__(self) -> None:
        invs = _invariants()
        if self.names is not None:
            unknown = [n for n in self.names if n not in invs]
            if unknown:
                from kvmsplit.errors import HarnessError

                raise HarnessError(f"unknown invariant(s) {unknown}; known: {sorted(invs)}")
        self.kvm.unlock_hooks.append(self._at_unlock)
        if any(True for _ in self.selected("split")):
            self.kvm.model_split_env.observers.append(self._at_split)
        if any(True for _ in self.selected("split_pass")):
            self.kvm.model_split_env.pass_observers.append(self._at_split_pass)

    def selected(self, kind: str) -> Iterable:  # type: ignore[type-arg]
        for inv in _invariants().values():
            if inv.kind == kind and (self.names is None or inv.name in self.names):
                yield inv

    def _at_unlock(self, kvm: Kvm, where: str) -> None:
        from kvmsplit.properties.invariants import check_round

        self.unlock_checks += 1
        with check_round():
            for inv in self.selected("unlock"):
                inv(kvm)

    def _at_split(self, kvm: Kvm, record: object) -> None:
        self.split_checks += 1
        for inv in self.selected("split"):
            inv(kvm, record)

    def _at_split_pass(self, kvm: Kvm, split_pass: object) -> None:
        self.split_checks += 1
        for inv in self.selected("split_pass"):
            inv(kvm, split_pass)

    def after_operation(self) -> None:
        from kvmsplit.properties.invariants import check_round

        self.step_checks += 1
        with check_round():
            for kind in ("state", "return"):
                for inv in self.selected(kind):
                    inv(self.kvm)

    def detach(self) -> None:
        if self._at_unlock in self.kvm.unlock_hooks:
            self.kvm.unlock_hooks.remove(self._at_unlock)
        if self._at_split in self.kvm.model_split_env.observers:
            self.kvm.model_split_env.observers.remove(self._at_split)
        if self._at_split_pass in self.kvm.model_split_env.pass_observers:
            self.kvm.model_split_env.pass_observers.remove(self._at_split_pass)
