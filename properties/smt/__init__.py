"""Z3 queries over the SPTE helpers and the split loop, run against the model's own functions.

`QUERIES` maps each query's name to its `Query` in a stable order;
`run_query()` proves one against a model (or refutes it, with a
counterexample in kernel vocabulary); `write_regression_test()` turns a
counterexample into a standalone pytest file that replays it through the
Python model.  docs/proofs.md lists the queries.

    >>> from kvmsplit.properties.smt import run_query
    >>> run_query("split_child_ps_matches_level", model="mutants/split_keeps_ps_at_4k").status
    'refuted'
"""

from __future__ import annotations

from pathlib import Path

from kvmsplit.properties.smt import engine
from kvmsplit.properties.smt.engine import Query, QueryResult

from kvmsplit.errors import HarnessError

__all__ = ["QUERIES", "Query", "QueryResult", "replay", "run_query", "write_regression_test"]


def _queries() -> dict[str, Query]:
    from kvmsplit.properties.smt import split_loop, spte_lemmas

    out: dict[str, Query] = {}
    for q in (*spte_lemmas.QUERIES, *split_loop.QUERIES):
        if q.name in out:
            raise HarnessError(f"two Z3 queries are named {q.name!r}")
        out[q.name] = q
    return out


QUERIES: dict[str, Query] = _queries()


def get_query(name: str) -> Query:
    q = QUERIES.get(name)
    if q is None:
        raise HarnessError(f"no Z3 query named {name!r}; the queries are: {', '.join(QUERIES)}")
    return q


def run_query(name: str, timeout_s: float = 30.0, model: str = "merged") -> QueryResult:
    """Prove query @name against @model within @timeout_s seconds.

    @model is a model name for kvmsplit.models_registry.load_model() ('merged',
    'v3', 'mutants/<name>', a .py path) or a local twin ('twin/<name>').
    """
    return engine.run(get_query(name), timeout_s, model)


def replay(name: str, values: dict[str, int], model: str = "merged", found_on: str | None = None) -> None:
    """Replay a counterexample of query @name, found on model @found_on, through @model's Python functions."""
    engine.replay(get_query(name), values, model, found_on)


def write_regression_test(result: QueryResult, path: str | Path) -> Path:
    """Write a standalone pytest file replaying @result's counterexample; return its path."""
    return engine.write_regression_test(get_query(result.name), result, path)
