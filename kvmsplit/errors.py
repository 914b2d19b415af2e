"""The three kinds of failure kvmsplit keeps apart.

Only a mirrored kernel WARN/KVM_BUG_ON (`KvmBugOn`) and a named invariant
(`InvariantViolation`) are findings about the model under test.  A
`HarnessError` is a bug in kvmsplit itself or bad input to its API, and is
never reported as a finding.
"""

from __future__ import annotations

from collections.abc import Callable


class HarnessError(Exception):
    """Bad input to the model's API, or a bug in the harness itself."""


class KvmBugOn(Exception):
    """A kernel WARN_ON/KVM_BUG_ON mirrored in the model fired.

    `site` names the kernel function holding the check, so a report reads like
    the kernel's own splat.
    """

    def __init__(self, site: str, message: str) -> None:
        super().__init__(f"WARN in {site}(): {message}")
        self.site = site
        self.message = message


class InvariantViolation(Exception):
    """A named whole-state or transition invariant does not hold."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"invariant {name} violated: {message}")
        self.name = name
        self.message = message


def kvm_bug_on(cond: bool, site: str, message: str | Callable[[], str]) -> None:
    """Raise `KvmBugOn` when @cond holds, like WARN_ON_ONCE() at @site.

    A message that needs formatting is passed as a lambda, so the checks on
    per-SPTE paths cost nothing when they pass.
    """
    if cond:
        raise KvmBugOn(site, message() if callable(message) else message)
