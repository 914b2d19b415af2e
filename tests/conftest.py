"""Hypothesis profiles: ci (bounded, reproducible), dev and thorough.

Select with HYPOTHESIS_PROFILE=dev|thorough (default ci).  The example
database is a local directory, or Redis when KVMSPLIT_REDIS_URL is set, so
counterexamples survive between runs and machines.
"""

import os

from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase


def _database():  # type: ignore[no-untyped-def]
    url = os.environ.get("KVMSPLIT_REDIS_URL")
    if url:
        import redis
        from hypothesis.extra.redis import RedisExampleDatabase

        return RedisExampleDatabase(redis.Redis.from_url(url))
    return DirectoryBasedExampleDatabase(os.path.join(os.path.dirname(__file__), "..", ".hypothesis", "examples"))


# No explain phase: its line tracing made shrinking a state machine failure
# take minutes instead of a fraction of a second.
_PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink)
_common = dict(deadline=None, phases=_PHASES, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "ci", max_examples=60, stateful_step_count=40, derandomize=True, database=None, print_blob=True, **_common
)
settings.register_profile("dev", max_examples=200, stateful_step_count=50, database=_database(), **_common)
settings.register_profile("thorough", max_examples=2000, stateful_step_count=80, database=_database(), **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
