"""Mutants: split policies with one deliberate bug each, many from real KVM fixes.

Every mutant must be caught by a named invariant (tests/quality/).
"""
