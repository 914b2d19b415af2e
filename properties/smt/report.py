"""Run every Z3 query and write docs/proofs.md: what each proves, its scope, time and broken twin.

.venv/bin/python -m kvmsplit.properties.smt.report docs/proofs.md
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import z3
from kvmsplit.properties.smt import QUERIES, QueryResult, run_query

HEADER = """# Z3 proofs

Random testing samples; these queries cover every input.  Each one runs the
model's own functions (kvmsplit/spte.py, the split policy's methods in
kvmsplit/split.py) on Z3 bit-vectors, first checks that its assumptions alone
are satisfiable (no vacuous proof), and has a broken twin it refutes: a mutant
in models/mutants/ or a local twin in properties/smt/twins.py.  `unknown` or a
timeout is never reported as proved.

Run them with `.venv/bin/python -m pytest tests/smt` (part of the default
test command), or one at a time with `run_query(name, model=...)` from
`kvmsplit.properties.smt`.  Regenerate this file with
`.venv/bin/python -m kvmsplit.properties.smt.report docs/proofs.md`.

Preconditions stated by the queries (properties/smt/spec.py): a huge SPTE is
shadow-present, has PS set and a pfn aligned to its size; leaf SPTEs are well
formed (an A/D type make_spte() writes, and an empty access-tracking save
area unless access-tracked); pfns lie below the model's 46-bit host limit.
The split-loop queries take every entry of the child page as an
unconstrained 64-bit value, so each is non-present, a present leaf or a
present non-leaf by its own bits; the "maps every gfn" query also assumes
what a direct page guarantees, that present leaves it already holds map the
pfn the huge SPTE maps there.  The guard query assumes that one split
allocates at most one shadow page (shadow_mmu_get_sp_for_split()).

How the larger queries stay fast, and what they leave out:

- The split-loop queries build the whole 512-entry table symbolically but
  refute their goal one conjunct (one entry) at a time: not (A and B) is
  satisfiable iff not A or not B is.  "Maps every gfn or flushes" asks each
  entry for its mapping or its own flush request, which implies the claim
  with the split's flush; a counterexample is replayed on ints with the
  split's real flush before it is reported.  It asks each entry twice,
  once present before the loop and once empty (the loop's own branch),
  which Z3 refutes in about half the time of the whole.  The gfn to entry
  arithmetic itself is `index_helpers_agree`.
- make_spte() takes its flags concretely (every combination is a case) and
  the pfn symbolically; the unsync check runs for real on a VM whose gfn is
  write-tracked or not, with no shadow pages to unsync.
- The guard query runs the policy's split_lacks_free_mmu_pages() on Z3
  integers; the available-pages arithmetic is a twin of
  Kvm.kvm_mmu_available_pages() with an agreement test.
- Not covered: the TDP MMU's tdp_mmu_split_huge_page() (it reuses
  make_huge_page_split_spte(), which is covered), and an inductive step of
  the state machine.

"""


def measure() -> list[tuple[str, QueryResult, QueryResult]]:
    rows = []
    for name, query in QUERIES.items():
        for model in query.models:
            proved = run_query(name, model=model)
            twin = run_query(name, model=query.mutant) if query.mutant else None
            rows.append((model, proved, twin))  # type: ignore[arg-type]
    return rows


def markdown(rows: list[tuple[str, QueryResult, QueryResult]]) -> str:
    lines = [
        HEADER,
        f"Measured on {platform.machine()} with {os.cpu_count()} CPUs, z3-solver {z3.get_version_string()}, "
        "one query at a time.\n",
        "| query | proves | scope | model | status | time (s) | broken twin | twin status | twin time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    total = 0.0
    for model, r, twin in rows:
        q = QUERIES[r.name]
        total += r.seconds
        lines.append(
            f"| `{r.name}` | {q.proves} | {q.scope} | {model} | {r.status} | {r.seconds:.2f} | "
            f"`{q.mutant}` | {twin.status if twin else '-'} | {twin.seconds if twin else 0:.2f} |"
        )
    lines.append(f"\nTotal time of the proofs: {total:.1f} s.\n")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    rows = measure()
    text = markdown(rows)
    if argv:
        Path(argv[0]).write_text(text)
    else:
        print(text)
    bad = [r.name for _, r, twin in rows if r.status != "proved" or (twin is not None and twin.status != "refuted")]
    if bad:
        print(f"not proved, or broken twin not refuted: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
