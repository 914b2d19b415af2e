"""Bad input to the trace commands: exit 2, the file, the operation and the field named, nothing run.

Every class of bad trace is tried on each command that reads a trace, so
no command can print a partial run that looks like success.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.cli.helpers import GOOD_OPS, HVA, RUN_2M, SLOT_0, invoke, write_doc

COMMANDS = [("replay",), ("replay", "--json"), ("show",), ("show", "--format", "dot"), ("selftest",)]


def _doc(ops: list[Any], **overrides: Any) -> dict[str, Any]:
    return {"format": "kvmsplit-trace", "version": 1, "config": {"mmu": "tdp"}, "ops": ops} | overrides


# (name, document, fragments the message must hold)
BAD: list[tuple[str, Any, tuple[str, ...]]] = [
    ("malformed JSON", '{"format": "kvmsplit-trace", "version": 1, "ops": [', ("not valid JSON", "line 1")),
    ("not an object", "[1, 2]", ("a trace is a JSON object",)),
    ("wrong format", _doc(GOOD_OPS, format="other"), ("field 'format' is 'other'",)),
    ("unknown version", _doc(GOOD_OPS, version=2), ("trace version 2 is not supported",)),
    ("ops not a list", _doc({"op": "x"}), ("field 'ops' must be a list",)),  # type: ignore[arg-type]
    ("operation not an object", _doc([SLOT_0, 5]), ("operation 1: expected an object",)),
    ("unknown operation", _doc([SLOT_0, {"op": "kvm_frobnicate"}]), ("operation 1: unknown operation 'kvm_frobnicate'",)),
    ("unknown field", _doc([SLOT_0 | {"colour": 1}]), ("operation 0 (kvm_set_user_memory_region)", "'colour'")),
    ("missing field", _doc([SLOT_0, {"op": "kvm_vcpu_access"}]), ("operation 1 (kvm_vcpu_access)", "missing field 'addr'")),
    ("ill-typed field", _doc([SLOT_0, RUN_2M | {"start": "0"}]), ("operation 1 (kvm_vcpu_run)", "field 'start'")),
    ("negative field", _doc([SLOT_0 | {"gpa": -4096}]), ("operation 0 (kvm_set_user_memory_region)", "field 'gpa'")),
    ("choice outside its set", _doc([SLOT_0 | {"backing": "huge"}]), ("operation 0", "field 'backing'", "4k")),
    ("vcpu out of range", _doc([SLOT_0, RUN_2M | {"vcpu": 3}]), ("operation 1 (kvm_vcpu_run)", "field 'vcpu'", "vcpu 3 does not exist")),
    ("page level out of range",
     _doc([SLOT_0, {"op": "guest_build_identity_map", "format": "ept", "root_gfn": 0, "table_gfns": [1], "gfn_start": 0, "npages": 1, "page_level": 5}]),
     ("operation 1 (guest_build_identity_map)", "field 'page_level' is 5")),
    ("pte index out of range", _doc([SLOT_0, {"op": "kvm_vcpu_access", "addr": 0, "access": "write", "pte": [512, 1]}]),
     ("operation 1 (kvm_vcpu_access)", "field 'pte'")),
    ("value wider than 64 bits", _doc([SLOT_0, {"op": "kvm_vcpu_access", "addr": 1 << 70}]), ("operation 1", "field 'addr'", "64 bits")),
    ("endless guest loop", _doc([SLOT_0, RUN_2M | {"end": 1 << 46, "stride": 1}]), ("operation 1 (kvm_vcpu_run)", "guest accesses")),
    ("gfn outside every slot", _doc([SLOT_0, {"op": "nested_vmx_enter", "eptp_gfn": 0x99999}]),
     ("operation 1 (nested_vmx_enter)", "field 'eptp_gfn'", "gfn 0x99999, outside every memslot", "0 at gfn 0x0+0x400")),
    ("gfn in a deleted slot",
     _doc([SLOT_0, SLOT_0 | {"size": 0, "backing": None}, {"op": "guest_store_table", "format": "ept", "gfn": 3, "first_gfn": 0}]),
     ("operation 2 (guest_store_table)", "field 'gfn'", "no memslot exists yet")),
    ("expect on an operation that takes none", _doc([SLOT_0, RUN_2M | {"expect": [1]}]), ("operation 1 (kvm_vcpu_run)", "'expect'")),
    ("bad dirty log expectation", _doc([SLOT_0, {"op": "kvm_get_dirty_log", "slot": 0, "expect": "all"}]),
     ("operation 1 (kvm_get_dirty_log)", "field 'expect'")),
    ("bad config", _doc(GOOD_OPS, config={"mmu": "npt"}), ("trace config: field 'mmu' is 'npt'",)),
    ("unknown config field", _doc(GOOD_OPS, config={"cpus": 2}), ("trace config: unknown field(s) ['cpus']",)),
    ("unknown model", _doc(GOOD_OPS, config={"model": "mutants/nope"}), ("no model named 'mutants/nope'",)),
    ("rejected while running", _doc([SLOT_0, SLOT_0 | {"slot": 1, "hva": HVA + (1 << 30)}]),
     ("operation 1 (kvm_set_user_memory_region)",)),
]  # fmt: skip


@pytest.mark.parametrize(("what", "doc", "fragments"), BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_bad_trace_exits_2_naming_file_operation_and_field(
    tmp_path: Path, command: tuple[str, ...], what: str, doc: Any, fragments: tuple[str, ...]
) -> None:
    path = write_doc(tmp_path, doc)
    result = invoke(command[0], path, *command[1:])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("kvmsplit: error: ")
    assert "Traceback" not in result.stderr
    if what not in ("unknown model",):
        assert path in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize("command", ["replay", "show", "selftest"])
def test_a_missing_or_unreadable_trace_exits_2_naming_it(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "absent.json"
    result = invoke(command, str(missing))
    assert result.exit_code == 2
    assert f"{missing}: No such file or directory" in result.stderr
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    result = invoke(command, str(binary))
    assert result.exit_code == 2
    assert str(binary) in result.stderr


def test_the_good_trace_used_above_is_accepted(tmp_path: Path) -> None:
    """The bad traces differ from this one in one place each."""
    path = write_doc(tmp_path, _doc(GOOD_OPS))
    assert invoke("replay", path).exit_code == 0
    assert json.loads(Path(path).read_text())["ops"] == GOOD_OPS
