"""Unit tests for kvmsplit/trace.py (the trace format, its validation and its replay).

Bad input is a HarnessError that names the operation's position and the
field, raised before anything runs; a replay stops at the first finding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvmsplit.errors import HarnessError, InvariantViolation, KvmBugOn
from kvmsplit.memslot import KVM_MEM_LOG_DIRTY_PAGES
from kvmsplit.trace import OPS, TRACE_FORMAT, TRACE_VERSION, TraceConfig, dump_trace, load_trace, run_trace

MiB = 1 << 20
HVA = 0x7F00_0000_0000

SLOT_0: dict[str, Any] = {
    "op": "kvm_set_user_memory_region",
    "slot": 0,
    "gpa": 0,
    "size": 8 * MiB,
    "hva": HVA,
    "backing": "thp",
}
RUN_2M: dict[str, Any] = {"op": "kvm_vcpu_run", "start": 0, "end": 8 * MiB, "stride": 2 * MiB, "access": "write"}
LOGGING_ON: dict[str, Any] = {
    "op": "kvm_set_user_memory_region",
    "slot": 0,
    "flags": KVM_MEM_LOG_DIRTY_PAGES,
    "gpa": 0,
    "size": 8 * MiB,
    "hva": HVA,
}


def _good_ops() -> list[dict[str, Any]]:
    return [
        SLOT_0,
        RUN_2M,
        {"op": "expect", "pages_2m": 4, "pages_4k": 0},
        LOGGING_ON,
        {"op": "kvm_vcpu_access", "addr": 0x5000, "access": "write"},
        {"op": "kvm_get_dirty_log", "slot": 0, "expect": [0x5]},
        {"op": "expect", "pages_2m": 0, "pages_4k": 2048},
    ]


def _failing_ops() -> list[dict[str, Any]]:
    """The good trace with a wrong page count expected at step 2, then more work."""
    ops = _good_ops()
    ops[2] = {"op": "expect", "pages_2m": 3}
    return ops


def _doc(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format": TRACE_FORMAT,
        "version": TRACE_VERSION,
        "config": {"mmu": "tdp"},
        "ops": _good_ops(),
    }
    doc.update(overrides)
    return doc


def _load_error(doc: Any) -> str:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(HarnessError) as excinfo:
        load_trace(text, "t.json")
    return str(excinfo.value)


# --- load_trace(): the document. ----------------------------------------------------------


def test_load_trace_reads_a_good_trace() -> None:
    cfg, ops = load_trace(json.dumps(_doc()), "t.json")
    assert cfg == TraceConfig(mmu="tdp")
    assert ops == _good_ops()


@pytest.mark.parametrize("text", ["{", '{"format": "kvmsplit-trace",}', "", "[1, 2"])
def test_load_trace_rejects_malformed_json_naming_the_source(text: str) -> None:
    message = _load_error(text)
    assert message.startswith("t.json: not valid JSON")
    assert "line" in message and "column" in message


def test_load_trace_rejects_a_document_that_is_not_an_object() -> None:
    assert _load_error([_good_ops()]) == "t.json: a trace is a JSON object"


@pytest.mark.parametrize("fmt", ["kvmsplit-traces", None, 1])
def test_load_trace_rejects_a_wrong_format(fmt: Any) -> None:
    message = _load_error(_doc(format=fmt))
    assert message.startswith("t.json: field 'format'")
    assert repr(TRACE_FORMAT) in message


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_load_trace_rejects_a_wrong_version(version: Any) -> None:
    message = _load_error(_doc(version=version))
    assert message.startswith("t.json: trace version")
    assert repr(version) in message


@pytest.mark.parametrize("ops", [{"op": "expect"}, "ops", None, 3])
def test_load_trace_rejects_ops_that_are_not_a_list(ops: Any) -> None:
    assert _load_error(_doc(ops=ops)) == "t.json: field 'ops' must be a list"


@pytest.mark.parametrize(
    ("config", "field"),
    [({"mmu": "ept"}, "mmu"), ({"nr_vcpus": 0}, "nr_vcpus"), ({"pml": 1}, "pml"), ({"vcpus": 2}, "vcpus")],
)
def test_load_trace_rejects_a_bad_config_naming_the_field(config: dict[str, Any], field: str) -> None:
    message = _load_error(_doc(config=config))
    assert message.startswith("t.json: trace config:")
    assert repr(field) in message


# --- load_trace(): each operation. ------------------------------------------------------------


def _with_op(index: int, op: Any) -> dict[str, Any]:
    ops = _good_ops()
    ops[index] = op
    return _doc(ops=ops)


OP_ERRORS = {
    # name: (index, op, exact message)
    "not_an_object": (1, ["kvm_vcpu_run"], "operation 1: expected an object, got list"),
    "unknown_op": (
        3,
        {"op": "kvm_set_memory_region", "slot": 0},
        "operation 3: unknown operation 'kvm_set_memory_region'",
    ),
    "missing_op": (4, {"addr": 0}, "operation 4: unknown operation None"),
    "unknown_field": (
        5,
        {"op": "kvm_get_dirty_log", "slot": 0, "slots": 1},
        "operation 5 (kvm_get_dirty_log): unknown field(s) ['slots']",
    ),
    "missing_field": (
        1,
        {"op": "kvm_vcpu_run", "start": 0, "stride": 4096},
        "operation 1 (kvm_vcpu_run): missing field 'end'",
    ),
    "int_as_string": (
        0,
        {**SLOT_0, "slot": "0"},
        "operation 0 (kvm_set_user_memory_region): field 'slot' must be a non-negative int, got '0'",
    ),
    "int_as_bool": (
        0,
        {**SLOT_0, "gpa": True},
        "operation 0 (kvm_set_user_memory_region): field 'gpa' must be a non-negative int, got True",
    ),
    "negative_int": (
        4,
        {"op": "kvm_vcpu_access", "addr": -4096},
        "operation 4 (kvm_vcpu_access): field 'addr' must be a non-negative int, got -4096",
    ),
    "choice_not_allowed": (
        4,
        {"op": "kvm_vcpu_access", "addr": 0, "access": "fetch"},
        "operation 4 (kvm_vcpu_access): field 'access' must be one of ['read', 'write', 'exec'], got 'fetch'",
    ),
    "backing_not_allowed": (
        0,
        {**SLOT_0, "backing": "2m"},
        "operation 0 (kvm_set_user_memory_region): field 'backing' must be one of ['4k', 'thp', 'hugetlb-2m', 'hugetlb-1g'], got '2m'",
    ),
    "bool_as_int": (
        2,
        {"op": "set_eager_page_split", "value": 1},
        "operation 2 (set_eager_page_split): field 'value' must be true or false, got 1",
    ),
    "intlist_with_a_negative": (
        5,
        {"op": "kvm_clear_dirty_log", "slot": 0, "first_page": 0, "num_pages": 64, "gfns": [1, -1]},
        "operation 5 (kvm_clear_dirty_log): field 'gfns' must be a list of non-negative ints, got [1, -1]",
    ),
    "pte_of_wrong_length": (
        4,
        {"op": "kvm_vcpu_access", "addr": 0, "access": "write", "pte": [1]},
        "operation 4 (kvm_vcpu_access): field 'pte' must be [index, value], got [1]",
    ),
    "expect_with_a_string": (
        2,
        {"op": "expect", "pages_2m": "4"},
        "operation 2 (expect): field 'pages_2m' must be an int, got '4'",
    ),
    "expect_with_a_bool": (
        6,
        {"op": "expect", "pages_4k": False},
        "operation 6 (expect): field 'pages_4k' must be an int, got False",
    ),
}


@pytest.mark.parametrize("case", sorted(OP_ERRORS))
def test_load_trace_rejects_a_bad_operation_naming_its_index_and_field(case: str) -> None:
    index, op, message = OP_ERRORS[case]
    got = _load_error(_with_op(index, op))
    assert message in got and got.split(": ", 1)[1].startswith(message), got


def test_an_unknown_operation_error_lists_the_known_ones() -> None:
    message = _load_error(_with_op(0, {"op": "nope"}))
    for name in ("kvm_set_user_memory_region", "kvm_get_dirty_log", "expect"):
        assert name in message


def test_run_trace_validates_every_operation_before_running_any() -> None:
    ops = [*_good_ops(), {"op": "kvm_vcpu_run", "start": 0}]
    with pytest.raises(HarnessError, match=r"^operation 7 \(kvm_vcpu_run\): missing field 'end'"):
        run_trace(TraceConfig(), ops)


# --- dump_trace() and load_trace() round trip. ---------------------------------------------------


def test_dump_then_load_gives_back_config_and_ops() -> None:
    cfg = TraceConfig(mmu="tdp-legacy", nr_vcpus=2, eager_page_split=False, nx_huge_pages=True, pml=True, model="v3")
    text = dump_trace(cfg, _good_ops())
    assert load_trace(text) == (cfg, _good_ops())
    doc = json.loads(text)
    assert (doc["format"], doc["version"]) == (TRACE_FORMAT, TRACE_VERSION)


def test_a_loaded_trace_dumps_to_the_same_text() -> None:
    text = dump_trace(TraceConfig(mmu="shadow"), _failing_ops())
    assert dump_trace(*load_trace(text)) == text


# --- run_trace(). ---------------------------------------------------------------------------


def test_run_trace_runs_a_good_trace_to_the_end() -> None:
    result = run_trace(TraceConfig(), _good_ops())
    assert result.ok
    assert result.failed_step is None
    assert [rec.index for rec in result.steps] == list(range(7))
    assert result.steps[1].stats["pages_2m"] == 4
    assert result.steps[5].result == {"gfns": [0x5]}
    assert result.kvm.stat.pages == [2048, 0, 0]


def test_run_trace_stops_at_a_failed_expectation() -> None:
    result = run_trace(TraceConfig(), _failing_ops())
    assert not result.ok
    assert result.failed_step == 2
    assert isinstance(result.failure, InvariantViolation)
    assert result.failure.name == "scenario_expectation"
    assert result.failure.message == "pages_2m is 4, the scenario expects 3"
    # Nothing after the failing step ran: logging was never enabled.
    assert len(result.steps) == 3
    assert result.kvm.slot(0).dirty_bitmap is None


def test_run_trace_stops_when_get_dirty_log_reports_other_gfns() -> None:
    ops = _good_ops()
    ops[5] = {"op": "kvm_get_dirty_log", "slot": 0, "expect": [0x6]}
    result = run_trace(TraceConfig(), ops)
    assert result.failed_step == 5
    assert isinstance(result.failure, InvariantViolation)
    assert result.failure.name == "scenario_expectation"


def test_an_expect_on_an_unknown_stat_is_a_harness_error() -> None:
    ops = [SLOT_0, {"op": "expect", "pages_8m": 0}]
    with pytest.raises(HarnessError, match=r"expect: unknown stat 'pages_8m'"):
        run_trace(TraceConfig(), ops)


BUGGY_MODEL = '''"""A model whose eager split trips a mirrored WARN."""

from kvmsplit.errors import KvmBugOn
from kvmsplit.split import MergedSplit


class WarnOnSplit(MergedSplit):
    def kvm_mmu_slot_try_split_huge_pages(self, kvm, slot, target_level):
        raise KvmBugOn("kvm_mmu_slot_try_split_huge_pages", f"slot {slot.id} split refused")


MODEL = WarnOnSplit()
'''


def test_run_trace_stops_at_a_mirrored_warn(tmp_path: Path) -> None:
    model = tmp_path / "warn_on_split.py"
    model.write_text(BUGGY_MODEL)
    result = run_trace(TraceConfig(model=str(model)), _good_ops())
    assert result.failed_step == 3
    assert isinstance(result.failure, KvmBugOn)
    assert result.failure.site == "kvm_mmu_slot_try_split_huge_pages"
    assert len(result.steps) == 4


def test_run_trace_attaches_a_checker_only_when_asked() -> None:
    """check=False leaves only the trace's own expectations: no hook runs at mmu_lock releases."""
    assert run_trace(TraceConfig(), _good_ops()).kvm.unlock_hooks
    unchecked = run_trace(TraceConfig(), _good_ops(), check=False)
    assert unchecked.ok
    assert unchecked.kvm.unlock_hooks == []
    # Expectations still hold the trace to its outcome.
    assert run_trace(TraceConfig(), _failing_ops(), check=False).failed_step == 2


def test_run_trace_reports_each_step_to_on_step() -> None:
    seen: list[int] = []
    run_trace(TraceConfig(), _good_ops(), on_step=lambda rec: seen.append(rec.index))
    assert seen == list(range(7))


def test_every_operation_is_documented() -> None:
    for name, spec in OPS.items():
        assert spec.doc.strip(), name
        assert spec.name == name


# --- Replays are deterministic. -------------------------------------------------------------------


def _replay(ops: list[dict[str, Any]]) -> tuple[Any, ...]:
    result = run_trace(TraceConfig(nr_vcpus=2), ops)
    return (
        [rec.stats for rec in result.steps],
        [rec.result for rec in result.steps],
        result.failed_step,
        str(result.failure),
        result.kvm.stat.as_dict(),
        dict(result.kvm.model_split_env.events),
    )


@pytest.mark.parametrize("ops", [_good_ops(), _failing_ops()], ids=["good", "failing"])
def test_the_same_trace_replays_identically(ops: list[dict[str, Any]]) -> None:
    first = _replay(ops)
    assert _replay(ops) == first


def test_a_replayed_failure_is_the_same_step_and_message() -> None:
    failing = _replay(_failing_ops())
    assert failing[2] == 2
    assert failing[3] == "invariant scenario_expectation violated: pages_2m is 4, the scenario expects 3"
    assert _replay(_failing_ops())[2:4] == failing[2:4]
