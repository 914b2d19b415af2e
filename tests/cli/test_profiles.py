"""kvmsplit/profiles.py: the Hypothesis profiles shared by the test suite and `kvmsplit check`."""

from __future__ import annotations

import unittest
from pathlib import Path

import fakeredis
import pytest
import redis
from hypothesis import HealthCheck, Phase, settings
from hypothesis.extra.redis import RedisExampleDatabase
from hypothesis.stateful import run_state_machine_as_test

from kvmsplit.errors import InvariantViolation
from kvmsplit.machine import machine_for
from kvmsplit.profiles import PROFILES, example_database, profile_settings, register_profiles
from tests.cli.helpers import invoke


def test_profiles_replace_hypothesis_own_ci_profile() -> None:
    ci = profile_settings("ci")
    assert (ci.max_examples, ci.stateful_step_count, ci.derandomize, ci.database) == (60, 40, True, None)
    assert profile_settings("dev").max_examples == 200
    assert profile_settings("thorough").stateful_step_count == 80
    assert PROFILES == ("ci", "dev", "thorough")


def test_dev_and_thorough_keep_examples_in_the_directory_given(tmp_path: Path) -> None:
    try:
        register_profiles(str(tmp_path / "db"))
        assert str(tmp_path / "db") in repr(settings.get_profile("dev").database)
    finally:
        register_profiles(str(Path(__file__).resolve().parents[2] / ".hypothesis" / "examples"))


def test_check_runs_under_the_dev_profile(tmp_path: Path) -> None:
    result = invoke("check", "--profile", "dev", "--mmu", "shadow", "--max-examples", "2", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert "profile dev (2 examples of up to 50 steps, seed 1)" in result.stdout


def test_kvmsplit_redis_url_keeps_counterexamples_in_redis_for_the_next_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure found on one machine is replayed from Redis, with no generation, on the next."""
    server = fakeredis.FakeServer()
    monkeypatch.setattr(redis.Redis, "from_url", classmethod(lambda cls, url: fakeredis.FakeRedis(server=server)))
    monkeypatch.setenv("KVMSPLIT_REDIS_URL", "redis://kvmsplit.invalid:6379/0")
    db = example_database(".hypothesis-unused")
    assert isinstance(db, RedisExampleDatabase)
    machine = machine_for("tdp", "mutants/split_no_rmap", ("rmap_holds_exactly_present_leaves",), focus="logging")
    dev = settings(profile_settings("dev"), database=db, max_examples=5, suppress_health_check=list(HealthCheck))
    with pytest.raises(InvariantViolation):
        run_state_machine_as_test(machine, settings=dev)
    assert fakeredis.FakeRedis(server=server).keys(), "nothing was saved in Redis"
    # Reuse only: the run can fail only by replaying what Redis holds (with
    # nothing stored, Hypothesis would run no test case and skip).
    try:
        run_state_machine_as_test(machine, settings=settings(dev, phases=[Phase.reuse]))
    except InvariantViolation:
        pass
    except unittest.SkipTest:
        pytest.fail("the second run found nothing in Redis to replay")
    else:
        pytest.fail("the example replayed from Redis did not fail")
