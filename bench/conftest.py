"""pytest-benchmark suites for statecore. Not part of the normal test run (pyproject's
testpaths is ["tests"]); run them by naming the directory:

    python -m pytest bench --benchmark-only -q                    # small scale, ~1 min
    python -m pytest bench --benchmark-only --bench-scale full    # the sizes in the issues
    STATECORE_BENCH_SCALE=full python -m pytest bench --benchmark-only

Each test times one case (statecore, or the baseline it is compared with) from
bench/workloads.py; at the end a table divides each statecore figure by its baseline from
the same run and checks it against its target. `--bench-enforce` turns a missed target into
a failing exit status (off by default: these machines are shared and noisy).
"""
from __future__ import annotations

import os
import sys

# numpy's OpenBLAS threads spin-wait after start-up; on a 2-core machine that is noise.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from typing import Callable, Dict  # noqa: E402

import pytest  # noqa: E402

import workloads  # noqa: E402

_RESULTS = pytest.StashKey[Dict[str, workloads.Result]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("statecore-bench")
    group.addoption("--bench-scale", choices=sorted(workloads.SCALES), default=None,
                    help="sizes to benchmark: small (default, quick) or full (the issues' "
                         "sizes; needs ~14 GiB and minutes). Env: STATECORE_BENCH_SCALE.")
    group.addoption("--bench-enforce", action="store_true", default=False,
                    help="exit non-zero when a ratio misses its target")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RESULTS] = {}


@pytest.fixture(scope="session")
def scale(request: pytest.FixtureRequest) -> workloads.Scale:
    return workloads.get_scale(request.config.getoption("--bench-scale"))


@pytest.fixture
def measure(benchmark, scale: workloads.Scale,
            request: pytest.FixtureRequest) -> Callable[..., workloads.Result]:
    """measure(key, group) -> Result: build the case's state, time it with
    benchmark.pedantic, free the state, and keep the figures for the ratio table."""
    results = request.config.stash[_RESULTS]

    def run(key: str, group: str) -> workloads.Result:
        benchmark.group = group
        with workloads.CASES[key](scale) as c:
            setup = (lambda: (c.setup(), {})) if c.setup else None
            benchmark.pedantic(c.run, setup=setup, teardown=c.teardown, rounds=c.rounds,
                               warmup_rounds=c.warmup)
            metrics = dict(c.metrics)
        benchmark.extra_info.update(metrics)
        stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
        times = list(stats.stats.data) if stats is not None else [float("nan")]
        results[key] = res = workloads.Result(times=times, metrics=metrics)
        return res

    yield run
    workloads.free_memory()


def _ratio_rows(config: pytest.Config):
    return workloads.evaluate(config.stash.get(_RESULTS, {}))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if session.config.getoption("--bench-enforce", False) and any(
            verdict == "FAIL" for _, _, verdict in _ratio_rows(session.config)):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    results = config.stash.get(_RESULTS, {})
    if not results:
        return
    scale = workloads.get_scale(config.getoption("--bench-scale"))
    terminalreporter.write_sep("-", f"statecore ratios, scale {scale.name} "
                                    "(times: best / median; ratio uses best)")
    terminalreporter.write_line(workloads.machine_info())
    terminalreporter.write_line(workloads.render_table(results, scale))
