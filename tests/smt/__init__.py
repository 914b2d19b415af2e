"""Tests of the Z3 queries in properties/smt."""
