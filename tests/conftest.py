"""Hypothesis profiles: ci (bounded, reproducible), dev and thorough.

Select with HYPOTHESIS_PROFILE=dev|thorough (default ci).  The profiles
live in kvmsplit/profiles.py so `kvmsplit check --profile` runs the same
ones; the test suite keeps its example database at the top of the tree.
"""

import os

from hypothesis import settings

from kvmsplit.profiles import DEFAULT_PROFILE, register_profiles

register_profiles(os.path.join(os.path.dirname(__file__), "..", ".hypothesis", "examples"))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", DEFAULT_PROFILE))
