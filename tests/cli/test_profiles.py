"""kvmsplit/profiles.py: the Hypothesis profiles shared by the test suite and `kvmsplit check`."""

from __future__ import annotations

from pathlib import Path

from hypothesis import settings

from kvmsplit.profiles import PROFILES, profile_settings, register_profiles
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
