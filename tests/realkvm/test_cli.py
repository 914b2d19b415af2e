"""Tests for `kvmsplit conform` (kvmsplit/realkvm/cli.py), invoked through click's test runner.

Exit codes: 0 all agree, 1 a disagreement, 2 bad usage, 3 real KVM unusable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from kvmsplit.realkvm import conform as conform_mod
from kvmsplit.realkvm.cli import conform
from kvmsplit.realkvm.scenarios import SCENARIOS
from kvmsplit.realkvm.vm import KvmSystem, KvmUnavailable


def test_list_names_every_scenario() -> None:
    result = CliRunner().invoke(conform, ["--list"])
    assert result.exit_code == 0
    for name in SCENARIOS:
        assert name in result.output
    assert len(SCENARIOS) >= 15


def test_unknown_scenario_is_a_usage_error() -> None:
    result = CliRunner().invoke(conform, ["no_such_scenario"])
    assert result.exit_code == 2
    assert "no_such_scenario" in result.output


def test_without_kvm_the_command_exits_3_with_the_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def unavailable(cls: Any) -> KvmSystem:
        raise KvmUnavailable("/dev/kvm does not exist (test)")

    monkeypatch.setattr(KvmSystem, "open", classmethod(unavailable))
    out = tmp_path / "out.json"
    result = CliRunner().invoke(conform, ["thp_guest_2m_read", "--json", str(out)])
    assert result.exit_code == 3
    assert "/dev/kvm does not exist (test)" in result.output
    assert json.loads(out.read_text()) == {"kvm_unavailable": "/dev/kvm does not exist (test)"}


def test_agreeing_scenarios_exit_0_with_a_table(real_kvm: Any, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    result = CliRunner().invoke(conform, ["thp_guest_2m_read", "dirty_log_lazy_split", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "pages_2m" in result.output and "agree" in result.output
    doc = json.loads(out.read_text())
    assert [s["status"] for s in doc["scenarios"]] == ["agree", "agree"]
    assert doc["model_config"]["mmu"] in ("shadow", "tdp", "tdp-legacy")


def test_a_disagreement_exits_1(real_kvm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit 1 once the model's prediction differs: here the model is made to see the wrong eager_page_split."""
    real_from_host = conform_mod.ModelConfig.from_host

    def wrong(cls: Any) -> conform_mod.ModelConfig:
        import attrs

        return attrs.evolve(real_from_host(), mmio_caching=not real_from_host().mmio_caching)

    monkeypatch.setattr(conform_mod.ModelConfig, "from_host", classmethod(wrong))
    result = CliRunner().invoke(conform, ["thp_guest_2m_read"])
    assert result.exit_code == 1, result.output
    assert "DISAGREE" in result.output
