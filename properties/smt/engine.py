"""The Z3 query engine: run a named claim against a model, or replay a counterexample.

A `Query` is a claim over named variables: assumptions (the preconditions
KVM maintains) and a goal.  `run_query()` first checks that the assumptions
alone are satisfiable, so no proof is vacuous, then asks Z3 for an input that
meets the assumptions and breaks the goal: none means proved, one is a
counterexample, anything else (timeout, `unknown`) is reported as unknown.

The claim functions call the model's own code (kvmsplit/spte.py and the
methods of the split policy in kvmsplit/split.py or a model variant), which
run on Z3 bit-vectors and on ints alike, so a counterexample replays through
the very same functions on ints (`replay()`, `write_regression_test()`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import z3
from kvmsplit.properties.smt import sym

from kvmsplit.errors import HarnessError
from kvmsplit.models_registry import load_model

TWIN_PREFIX = "twin/"


@attrs.frozen(kw_only=True)
class Var:
    """A quantified input: a bit-vector of @width bits, or an integer when @width is 0."""

    name: str
    width: int = 64
    # Left out of a counterexample when zero (a non-present table entry), and
    # read back as zero when a replay does not name it.
    omit_if_zero: bool = False

    def z3_term(self) -> Any:
        if self.width == 0:
            return z3.Int(self.name)
        return z3.BitVec(self.name, self.width)


@attrs.frozen(kw_only=True)
class Claim:
    """What a query states for one case: assumptions imply goal; @shown names derived values."""

    assumptions: Sequence[Any]
    # One term, or a list of conjuncts the engine refutes one at a time.
    goal: Any
    shown: dict[str, Any] = attrs.field(factory=dict)
    # Assumptions of the claim that concern only one conjunct of @goal (one
    # table entry), and the variables they name; part of the claim's assumptions.
    local: Sequence[Sequence[Any]] = ()
    local_vars: Sequence[Sequence[str]] = ()


@attrs.frozen(kw_only=True)
class Impl:
    """The code under test: a split policy (a model) and named helper overrides (local twins)."""

    model: str
    policy: Any
    overrides: dict[str, Callable[..., Any]] = attrs.field(factory=dict)

    def fn(self, name: str) -> Callable[..., Any]:
        """The helper @name as this implementation has it (properties/smt/twins.py DEFAULTS)."""
        if name in self.overrides:
            return self.overrides[name]
        from kvmsplit.properties.smt.twins import DEFAULTS

        return DEFAULTS[name]


ClaimFn = Callable[[Impl, dict[str, Any], dict[str, int]], Claim]


@attrs.frozen(kw_only=True)
class Query:
    """A named claim, its scope and the broken twin it refutes."""

    name: str
    proves: str
    scope: str
    mutant: str | None
    variables: tuple[Var, ...]
    claim: ClaimFn = attrs.field(repr=False)
    # Concrete parameters (a mask set, an access, the NX mitigation), one solver call each.
    cases: tuple[dict[str, int], ...] = ({},)
    # Z3 tactic for the refutation check; None is the default solver.
    tactic: str | None = None
    # The models the proof is run against by the tests and the docs table.
    models: tuple[str, ...] = ("merged",)
    # A variable to enumerate concretely when the model's code branches on it.
    enumerate_on_branch: tuple[str, int] | None = None


@attrs.frozen(kw_only=True)
class QueryResult:
    name: str
    status: str
    seconds: float
    counterexample: dict[str, int] | None = None
    detail: str = ""
    model: str = "merged"

    def __str__(self) -> str:
        head = f"{self.name} [{self.model}]: {self.status} in {self.seconds:.3f} s"
        if self.detail:
            head += f" ({self.detail})"
        if self.counterexample is not None:
            head += "\n" + format_counterexample(self.counterexample)
        return head


def format_counterexample(values: dict[str, int]) -> str:
    width = max((len(k) for k in values), default=0)
    lines = []
    for k, v in values.items():
        shown = f"{v:#x}" if abs(v) > 9 else str(v)
        lines.append(f"  {k:<{width}} = {shown}")
    return "\n".join(lines)


# --- resolving a model name ---------------------------------------------------------


def resolve_impl(model: str) -> Impl:
    """A model by name ('merged', 'v3', 'mutants/<name>', a .py path) or a local twin ('twin/<name>')."""
    if model.startswith(TWIN_PREFIX):
        from kvmsplit.properties.smt.twins import TWINS

        twin = TWINS.get(model)
        if twin is None:
            raise HarnessError(f"no local twin named {model!r}; the twins are {', '.join(sorted(TWINS))}")
        return twin
    return Impl(model=model, policy=load_model(model))


# --- running ------------------------------------------------------------------------


def _check(solver: Any, deadline: float) -> tuple[Any, str]:
    remaining_ms = int((deadline - time.perf_counter()) * 1000)
    if remaining_ms <= 0:
        return z3.unknown, "timeout"
    solver.set("timeout", remaining_ms)
    r = solver.check()
    return r, (solver.reason_unknown() if r == z3.unknown else "")


def _solver(tactic: str | None) -> Any:
    if tactic is None:
        return z3.Solver()
    return z3.Then(*tactic.split(","), "smt").solver() if "," in tactic else z3.Then(tactic, "smt").solver()


def _build(query: Query, impl: Impl, case: dict[str, int], terms: dict[str, Any]) -> tuple[Claim, str]:
    """The claim for @case, and a note when a branched-on variable had to be enumerated.

    A model's code may branch on a value the query makes symbolic (a mutant
    testing `if index:`); Z3 refuses to give a symbolic term a truth value,
    so the claim is then built once per concrete value and the variable
    selects among them.  The proof still covers every value.
    """
    try:
        return query.claim(impl, terms, case), ""
    except z3.Z3Exception:
        if query.enumerate_on_branch is None:
            raise
    var, count = query.enumerate_on_branch
    claims = []
    for value in range(count):
        claims.append((value, query.claim(impl, {**terms, var: value}, case)))
    sel = terms[var]
    assumptions = [sym.disj(*(z3.And(sel == v, *c.assumptions) for v, c in claims))]
    goal = z3.And(*(z3.Implies(sel == v, z3.And(*c.assumptions, c.goal)) for v, c in claims))
    shown: dict[str, Any] = {}
    for name in claims[0][1].shown:
        term = claims[-1][1].shown[name]
        for v, c in reversed(claims[:-1]):
            term = z3.If(sel == v, c.shown[name], term)
        shown[name] = term
    detail = f"the model branches on {var}, so each of its {count} values is enumerated"
    return Claim(assumptions=assumptions, goal=goal, shown=shown), detail


def run(query: Query, timeout_s: float = 30.0, model: str = "merged") -> QueryResult:
    """Prove @query against @model: vacuity check, then search for a counterexample."""
    impl = resolve_impl(model)
    start = time.perf_counter()
    deadline = start + timeout_s
    details: list[str] = []
    for case in query.cases:
        terms = {v.name: v.z3_term() for v in query.variables}
        claim, detail = _build(query, impl, case, terms)
        if detail and detail not in details:
            details.append(detail)
        goals = list(claim.goal) if isinstance(claim.goal, (list, tuple)) else [claim.goal]
        local = list(claim.local) or [[] for _ in goals]
        assumptions = [a for a in claim.assumptions if a is not True]
        every = [*assumptions, *(a for group in local for a in group if a is not True)]
        if any(a is False for a in every):
            return _result(query, model, "unknown", start, detail=f"vacuous: the assumptions are false for {case}")
        solver = _solver(None)
        solver.add(*every)
        r, why = _check(solver, deadline)
        if r == z3.unsat:
            return _result(
                query, model, "unknown", start, detail=f"vacuous: the assumptions are unsatisfiable for {case}"
            )
        if r == z3.unknown:
            return _result(query, model, "unknown", start, detail=f"vacuity check: {why} for {case}")
        refute = _solver(query.tactic)
        refute.add(*assumptions)
        # A goal given as a list of conjuncts is refuted conjunct by
        # conjunct, each under the shared assumptions and its own: not (A
        # and B) is satisfiable iff not A or not B is, and a conjunct that
        # holds under fewer assumptions holds under all of them.
        for i, goal in enumerate(goals):
            if len(goals) > 1:
                refute.push()
            refute.add(*local[i])
            refute.add(z3.Not(goal) if sym.is_symbolic(goal) else z3.BoolVal(not goal))
            r, why = _check(refute, deadline)
            where = f"{case}" + (f", conjunct {i}" if len(goals) > 1 else "")
            if r == z3.unknown:
                return _result(query, model, "unknown", start, detail=f"{why} for {where}")
            if r == z3.sat:
                cex: dict[str, int] | None = _counterexample(query, case, terms, claim, refute.model())
                if claim.local and cex is not None:
                    cex = _full_counterexample(query, impl, case, terms, claim, cex, i, deadline)
                    if cex is None:
                        return _result(
                            query,
                            model,
                            "unknown",
                            start,
                            detail=f"{where} fails under its own assumptions, but no input meeting all of them was found",
                        )
                return _result(query, model, "refuted", start, cex, detail=f"goal fails for {where}")
            if len(goals) > 1:
                refute.pop()
    return _result(query, model, "proved", start, detail="; ".join(details))


def _full_counterexample(
    query: Query,
    impl: Impl,
    case: dict[str, int],
    terms: dict[str, Any],
    claim: Claim,
    cex: dict[str, int],
    conjunct: int,
    deadline: float,
) -> dict[str, int] | None:
    """Extend a counterexample found under conjunct @conjunct's own assumptions to one meeting all of them.

    First try zeroing the variables no conjunct-local assumption names for
    @conjunct (a zero table entry is non-present, which meets every
    per-entry assumption), checked by a concrete replay; then ask Z3 with
    every assumption.
    """
    keep = set(claim.local_vars[conjunct]) if claim.local_vars else set()
    zeroed = {k: v for k, v in cex.items() if k in keep or not _omittable(query, k)}
    for candidate in (cex, zeroed):
        if _fails_concretely(query, impl, case, candidate):
            return _concrete_counterexample(query, impl, case, candidate)
    full = _solver(None)
    full.add(*claim.assumptions, *(a for group in claim.local for a in group))
    goals = list(claim.goal)
    full.add(z3.Not(goals[conjunct]))
    r, _ = _check(full, deadline)
    if r != z3.sat:
        return None
    return _counterexample(query, case, terms, claim, full.model())


def _omittable(query: Query, name: str) -> bool:
    return any(v.name == name and v.omit_if_zero for v in query.variables)


def _fails_concretely(query: Query, impl: Impl, case: dict[str, int], values: dict[str, int]) -> bool:
    concrete = {v.name: values.get(v.name, 0) for v in query.variables}
    claim = query.claim(impl, concrete, case)
    every = [*claim.assumptions, *(a for group in claim.local for a in group)]
    goals = list(claim.goal) if isinstance(claim.goal, (list, tuple)) else [claim.goal]
    return all(bool(a) for a in every) and not all(bool(g) for g in goals)


def _concrete_counterexample(query: Query, impl: Impl, case: dict[str, int], values: dict[str, int]) -> dict[str, int]:
    """@values with the claim's shown values recomputed on ints."""
    concrete = {v.name: values.get(v.name, 0) for v in query.variables}
    claim = query.claim(impl, concrete, case)
    out = dict(case)
    for v in query.variables:
        if v.omit_if_zero and concrete[v.name] == 0:
            continue
        out[v.name] = concrete[v.name]
    out.update({k: int(x) for k, x in claim.shown.items()})
    return out


def _result(
    query: Query, model: str, status: str, start: float, cex: dict[str, int] | None = None, detail: str = ""
) -> QueryResult:
    return QueryResult(
        name=query.name,
        status=status,
        seconds=time.perf_counter() - start,
        counterexample=cex,
        detail=detail,
        model=model,
    )


def _counterexample(query: Query, case: dict[str, int], terms: dict[str, Any], claim: Claim, m: Any) -> dict[str, int]:
    values: dict[str, int] = dict(case)
    for v in query.variables:
        value = m.eval(terms[v.name], model_completion=True)
        n = value.as_long()
        if v.omit_if_zero and n == 0:
            continue
        values[v.name] = n
    for name, term in claim.shown.items():
        if sym.is_symbolic(term):
            ev = m.eval(term, model_completion=True)
            values[name] = int(z3.is_true(ev)) if z3.is_bool(ev) else ev.as_long()
        else:
            values[name] = int(term)
    return values


# --- replaying ----------------------------------------------------------------------


def replay(query: Query, values: dict[str, int], model: str, found_on: str | None = None) -> None:
    """Evaluate @query's claim on the concrete @values through @model's Python functions.

    Raise AssertionError when the assumptions hold and the goal fails, as it
    does for the model the counterexample was found on.  Some assumptions
    run the model too (the guard query's "the split starts"); when they fail
    on @model the claim holds for these values.  On @found_on, the model
    the values came from, they must hold: if not, the claim changed since
    and HarnessError says to regenerate the test.
    """
    if found_on is not None and found_on != model:
        _assumptions_hold(query, values, found_on, required=True)
    claim = _assumptions_hold(query, values, model, required=model == found_on)
    if claim is None:
        return
    shown = {k: int(v) for k, v in claim.shown.items()}
    goals = list(claim.goal) if isinstance(claim.goal, (list, tuple)) else [claim.goal]
    assert all(goals), f"{query.name} fails on model {model!r}:\n{format_counterexample({**values, **shown})}"


def _assumptions_hold(query: Query, values: dict[str, int], model: str, required: bool) -> Claim | None:
    impl = resolve_impl(model)
    case = {k: values[k] for k in query.cases[0]}
    concrete = {v.name: values.get(v.name, 0) for v in query.variables}
    claim = query.claim(impl, concrete, case)
    every = [*claim.assumptions, *(a for group in claim.local for a in group)]
    failed = [i for i, a in enumerate(every) if not a]
    if not failed:
        return claim
    if required:
        raise HarnessError(
            f"{query.name}: the values no longer meet assumptions {failed} on {model!r}; regenerate the test"
        )
    return None


REGRESSION_TEMPLATE = '''"""Regression test for the Z3 query {name}, written by write_regression_test().

Z3 refuted {name} on model {model!r}: {proves}
This file replays the counterexample's concrete values through the model's
Python functions, so the failure shows without Z3.  It fails on {model!r}
and passes on a model that satisfies the claim (set KVMSPLIT_SMT_MODEL=merged).

Counterexample:
{pretty}
"""

import os

from kvmsplit.properties.smt import replay

QUERY = {name!r}
FOUND_ON = {model!r}
MODEL = os.environ.get("KVMSPLIT_SMT_MODEL", FOUND_ON)
COUNTEREXAMPLE = {{
{entries}
}}


def test_{ident}_holds_on_the_z3_counterexample() -> None:
    replay(QUERY, COUNTEREXAMPLE, model=MODEL, found_on=FOUND_ON)
'''


def write_regression_test(query: Query, result: QueryResult, path: str | Path) -> Path:
    if result.counterexample is None:
        raise HarnessError(f"{result.name} is {result.status}, not refuted: there is no counterexample to write")
    entries = "\n".join(f"    {k!r}: {v:#x}," for k, v in result.counterexample.items())
    ident = "".join(c if c.isalnum() else "_" for c in result.name)
    text = REGRESSION_TEMPLATE.format(
        name=result.name,
        model=result.model,
        proves=query.proves,
        pretty=format_counterexample(result.counterexample),
        entries=entries,
        ident=ident,
    )
    out = Path(path)
    out.write_text(text)
    return out
