"""Operators that take either concrete ints and bools or Z3 terms.

A claim is written once with these and runs two ways: on Z3 terms, where the
engine proves it for every input, and on the ints of a counterexample, where
a regression test replays it through the same model functions.  The kvmsplit
SPTE helpers follow the same rule (see the shims in kvmsplit/spte.py); these
add what claims need beyond them: unsigned comparisons, implication, and
n-ary connectives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import z3


def is_symbolic(*xs: Any) -> bool:
    return any(isinstance(x, z3.ExprRef) for x in xs)


def ult(a: Any, b: Any) -> Any:
    """Unsigned a < b (the Python `<` on a bit-vector is signed)."""
    if is_symbolic(a, b) and _is_bv(a, b):
        return z3.ULT(a, b)
    return a < b


def ule(a: Any, b: Any) -> Any:
    if is_symbolic(a, b) and _is_bv(a, b):
        return z3.ULE(a, b)
    return a <= b


def implies(a: Any, b: Any) -> Any:
    if is_symbolic(a, b):
        return z3.Implies(a, b)
    return (not a) or bool(b)


def conj(*xs: Any) -> Any:
    if is_symbolic(*xs):
        return z3.And(*xs)
    return all(bool(x) for x in xs)


def disj(*xs: Any) -> Any:
    if is_symbolic(*xs):
        return z3.Or(*xs)
    return any(bool(x) for x in xs)


def iff(a: Any, b: Any) -> Any:
    if is_symbolic(a, b):
        return a == b
    return bool(a) == bool(b)


def select(table: Sequence[Any], index: Any) -> Any:
    """table[index] for a concrete or a symbolic index (an If chain)."""
    if not is_symbolic(index):
        return table[index]
    term = table[-1]
    for i in range(len(table) - 2, -1, -1):
        term = z3.If(index == i, table[i], term)
    return term


def _is_bv(*xs: Any) -> bool:
    return any(isinstance(x, z3.BitVecRef) for x in xs)
