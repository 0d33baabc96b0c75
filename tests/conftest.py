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
import signal
from typing import Callable

import pytest
from hypothesis import HealthCheck, settings

import statecore as sc

settings.register_profile(
    "ci", derandomize=True, max_examples=60, stateful_step_count=40, deadline=None,
    print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "dev", max_examples=40, stateful_step_count=40, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "soak", max_examples=2000, stateful_step_count=80, deadline=None, print_blob=True,
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


def outcome_in_child(call: Callable[[], object], timeout: int = 60) -> str:
    """Run `call` in a forked child and describe what happened there: the name of the
    exception it raised, "no exception", or the signal that killed it (SIGALRM after
    `timeout` seconds). Calls that could crash or hang the native core run here, so such
    a bug fails one test instead of ending the run."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(r)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(timeout)
            try:
                call()
                msg = "no exception"
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                msg = type(e).__name__
            os.write(w, msg.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return msg


@pytest.fixture
def in_child():
    """outcome_in_child, as a fixture."""
    return outcome_in_child
