"""Shared test settings: seeded, derandomised hypothesis profiles for a reproducible run."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("long", max_examples=5000, deadline=None, derandomize=False)
settings.load_profile(os.environ.get("QKDNODE_HYPOTHESIS_PROFILE", "default"))
