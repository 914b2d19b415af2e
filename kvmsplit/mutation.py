"""Kernel patches: how a model variant changes code outside the split policy.

Most mutants override a method of `kvmsplit.split.MergedSplit`.  A bug in a
zap, a fault or an ioctl lives in the MMU itself, so a model may also list
`kernel_patches`: each names one kernel function of the reference MMU and
wraps it.  The patches are in force only while an operation of a VM using
that model runs (`kernel_patches_for()` around every trace operation), so
faithful VMs in the same process never see them.

Example::

    kernel_patches = (
        KernelPatch("kvmsplit.mmu.kvm_unmap_gfn_range", lambda orig: lambda *a: orig(*a) and False),
    )
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs

from kvmsplit.errors import HarnessError


@attrs.frozen
class KernelPatch:
    """Replace the function at @target ("module.function" or "module.Class.method") by wrap(original)."""

    target: str
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]]


def _resolve(target: str) -> tuple[Any, str, Any]:
    """(owner, attribute, original) for a dotted target."""
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            owner: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:-1]:
            owner = getattr(owner, name, None)
            if owner is None:
                break
        if owner is not None and hasattr(owner, parts[-1]):
            return owner, parts[-1], getattr(owner, parts[-1])
    raise HarnessError(f"kernel patch target {target!r} names no function of the model")


@contextmanager
def swapped(owner: Any, name: str, replacement: Any, everywhere: bool = True) -> Iterator[None]:
    """Rebind @name on @owner and, if @everywhere, in every kvmsplit module that imported it by name."""
    original = getattr(owner, name)
    bound: list[tuple[Any, str, Any]] = [(owner, name, original)]
    if everywhere and not isinstance(owner, type):
        for mod in list(sys.modules.values()):
            if mod is owner or not getattr(mod, "__name__", "").startswith("kvmsplit"):
                continue
            if getattr(mod, name, None) is original:
                bound.append((mod, name, original))
    for where, attr, _ in bound:
        setattr(where, attr, replacement)
    try:
        yield
    finally:
        for where, attr, old in reversed(bound):
            setattr(where, attr, old)


def during(target: str, inner: str, replacement: Callable[..., Any]) -> KernelPatch:
    """A patch that swaps @inner for @replacement while @target runs.

    Mutates the calls one kernel function makes (say, the
    mark_page_dirty_in_slot() of the fast page fault path) without touching
    other callers: @inner is rebound only in the module it is named in, so
    the swap reaches @target and the helpers of that same module.
    """

    def wrap(orig: Callable[..., Any]) -> Callable[..., Any]:
        def patched(*args: Any, **kwargs: Any) -> Any:
            owner, name, _ = _resolve(inner)
            with swapped(owner, name, replacement, everywhere=False):
                return orig(*args, **kwargs)

        return patched

    return KernelPatch(target, wrap)


@contextmanager
def kernel_patches_for(model: Any) -> Iterator[None]:
    """Put @model's kernel patches in force for the duration of the block."""
    patches = getattr(model, "kernel_patches", ())
    if not patches:
        yield
        return
    stack = []
    try:
        for p in patches:
            owner, name, original = _resolve(p.target)
            cm = swapped(owner, name, p.wrap(original))
            cm.__enter__()
            stack.append(cm)
        yield
    finally:
        for cm in reversed(stack):
            cm.__exit__(None, None, None)
