"""Shared pytest configuration: hypothesis profiles and small store fixtures.

Profiles (pick one with STATECORE_HYPOTHESIS_PROFILE; default `ci` when CI is set, else
`dev`):
- ci:  derandomized, so a CI failure reproduces on every rerun; moderate example counts.
- dev: random exploration with the same budget, so local runs keep finding new cases.
Neither has a deadline: the first call into a fresh mapping pays page faults that have
nothing to do with the code under test.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

import statecore as sc

settings.register_profile(
    "ci", derandomize=True, max_examples=60, stateful_step_count=40, deadline=None,
    print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "dev", max_examples=40, stateful_step_count=40, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("STATECORE_HYPOTHESIS_PROFILE",
                                     "ci" if os.environ.get("CI") else "dev"))

# Small enough that whole-store comparisons stay cheap, large enough to span many pages.
SMALL_PAGE = 512
SMALL_PAGES = 16


@pytest.fixture
def store():
    """An anonymous 16-page store of 4 KiB pages, closed after the test."""
    s = sc.Store(size=16 * 4096)
    yield s
    s.close()


@pytest.fixture
def small_store():
    """An anonymous store of 16 pages of 512 bytes, closed after the test."""
    s = sc.Store(size=SMALL_PAGES * SMALL_PAGE, page_size=SMALL_PAGE)
    yield s
    s.close()


@pytest.fixture
def store_path(tmp_path):
    """A path for a file-backed store that does not exist yet."""
    return tmp_path / "state.store"
