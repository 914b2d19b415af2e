"""Shared pieces of the kvmsplit command's tests: a runner and small traces."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from kvmsplit.cli import main
from kvmsplit.trace import TraceConfig, dump_trace

MiB = 1 << 20
GiB = 1 << 30
HVA = 0x7F00_0000_0000

SLOT_0: dict[str, Any] = {
    "op": "kvm_set_user_memory_region",
    "slot": 0,
    "gpa": 0,
    "size": 4 * MiB,
    "hva": HVA,
    "backing": "thp",
}
RUN_2M: dict[str, Any] = {"op": "kvm_vcpu_run", "start": 0, "end": 4 * MiB, "stride": 2 * MiB, "access": "write"}
LOGGING_ON: dict[str, Any] = {
    "op": "kvm_set_user_memory_region",
    "slot": 0,
    "flags": 1,
    "gpa": 0,
    "size": 4 * MiB,
    "hva": HVA,
}
# Eager splitting turns the two 2M mappings into 1024 4K ones at step 2.
GOOD_OPS: list[dict[str, Any]] = [SLOT_0, RUN_2M, LOGGING_ON, {"op": "expect", "pages_2m": 0, "pages_4k": 1024}]


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def write_trace(tmp_path: Path, ops: list[Any], name: str = "trace.json", **config: Any) -> str:
    path = tmp_path / name
    path.write_text(dump_trace(TraceConfig(**config), ops))
    return str(path)


def write_doc(tmp_path: Path, doc: Any, name: str = "trace.json") -> str:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)
