"""Model: the Hypothesis profiles shared by the test suite and `kvmsplit check`.

ci is bounded and reproducible (derandomized, no example database), dev and
thorough run longer and keep failing examples in a database so they come
back first on the next run.  The database is a local directory, or Redis
when KVMSPLIT_REDIS_URL is set, so counterexamples survive between runs and
machines.

Example::

    from kvmsplit.profiles import register_profiles
    register_profiles()
    settings.load_profile("dev")
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase, ExampleDatabase

PROFILES = ("ci", "dev", "thorough")
DEFAULT_PROFILE = "ci"
DEFAULT_DATABASE_DIR = os.path.join(".hypothesis", "examples")

# No explain phase: its line tracing made shrinking a state machine failure
# take minutes instead of a fraction of a second.
PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink)
# ci has no target phase: with 60 examples Hypothesis would spend the second
# half hill-climbing on the rare-event score, mutating one test case thirty
# times, and a small budget finds more bugs spread over distinct cases.
CI_PHASES = tuple(p for p in PHASES if p is not Phase.target)

_registered = False

_constants_frozen = False


def freeze_hypothesis_constants() -> None:
    """Keep the project's own literals out of Hypothesis's draws.

    Hypothesis draws some integers and strings from the literals of the
    project modules loaded at the time (not test files, not site-packages).
    A derandomized run then draws differently whenever any kvmsplit module
    gains or loses a constant, or when another set of modules happens to be
    loaded (pytest of one folder against the whole suite), and a mutant one
    run found the next one missed.  With this pool left empty, what the ci
    profile draws depends only on the strategies and the pinned Hypothesis
    version.  The pool is an internal of Hypothesis, hence the exact pin in
    pyproject.toml.
    """
    global _constants_frozen
    if _constants_frozen:
        return
    from hypothesis.internal.conjecture import providers

    empty = providers.Constants()
    providers._get_local_constants = lambda: empty
    # Forget what earlier tests in this process may have drawn from.
    providers.CONSTANTS_CACHE.cache.clear()
    _constants_frozen = True


def example_database(directory: str = DEFAULT_DATABASE_DIR) -> ExampleDatabase:
    """Redis when KVMSPLIT_REDIS_URL is set, else @directory."""
    url = os.environ.get("KVMSPLIT_REDIS_URL")
    if url:
        import redis
        from hypothesis.extra.redis import RedisExampleDatabase

        return RedisExampleDatabase(redis.Redis.from_url(url))
    return DirectoryBasedExampleDatabase(directory)


def register_profiles(database_dir: str = DEFAULT_DATABASE_DIR) -> None:
    """Register ci, dev and thorough; dev and thorough keep examples under @database_dir.

    Hypothesis ships a "ci" profile of its own; this replaces it.
    """
    global _registered
    _registered = True
    freeze_hypothesis_constants()
    common: dict[str, Any] = dict(
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.register_profile(
        "ci",
        max_examples=60,
        stateful_step_count=40,
        derandomize=True,
        database=None,
        print_blob=True,
        phases=CI_PHASES,
        **common,
    )
    db = example_database(database_dir)
    settings.register_profile("dev", max_examples=200, stateful_step_count=50, database=db, phases=PHASES, **common)
    settings.register_profile(
        "thorough", max_examples=2000, stateful_step_count=80, database=db, phases=PHASES, **common
    )


def profile_settings(name: str) -> settings:
    """The registered profile @name (registering the defaults first if needed)."""
    if name not in PROFILES:
        raise ValueError(f"unknown Hypothesis profile {name!r}; known: {', '.join(PROFILES)}")
    if not _registered:
        register_profiles()
    return settings.get_profile(name)
