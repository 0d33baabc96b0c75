"""Issue 4: the durable store (recovery, commit latency, writers during a checkpoint)
against reading its files, write+fdatasync, Redis restarting from an RDB, and the same
writer with no checkpoint running.

Each test times one case from durable_workloads.py; the ratio table at the end of the run
divides statecore's figure by the baseline's. Sizes follow --bench-scale (see conftest.py).
"""
import pytest

import durable_workloads  # noqa: F401  (registers the issue-4 cases and rows)


@pytest.mark.parametrize("key", ["durable.recovery", "durable.recovery_read",
                                 "durable.recovery_redis"])
def test_recovery(measure, key):
    """Reopen a DurableStore holding a checkpoint plus a journal (1 GiB + 256 MiB; small
    scale 128 + 32 MiB), against reading the same files into a buffer from the page cache,
    and against redis-server loading an RDB of the same state."""
    if key == "durable.recovery_redis" and durable_workloads.REDIS is None:
        pytest.skip("redis-server is not on PATH")
    res = measure(key, group="durable-recovery")
    if key == "durable.recovery":
        m = res.metrics
        assert m["deltas_replayed"] == m["journal_commits"] and m["discarded"] == 0
        assert m["checkpoint_bytes"] > 0


@pytest.mark.parametrize("key", ["durable.commit", "durable.commit_fdatasync"])
def test_commit_latency(measure, key):
    """commit() of 1 MiB of dirty pages against appending 1 MiB + fdatasync in the same
    directory; the table compares p50s (and shows p99s)."""
    res = measure(key, group="durable-commit")
    assert 0 < res.metrics["p50_ms"] <= res.metrics["p99_ms"]


@pytest.mark.parametrize("key", ["durable.writer_checkpoint", "durable.writer_idle"])
def test_writer_during_checkpoint(measure, key):
    """A thread doing random int64 writes through a StateArray while ds.checkpoint() runs
    (the time is the checkpoint's), against the same writer alone for a fixed window."""
    res = measure(key, group="durable-writer")
    assert res.metrics["writes_per_s"] > 0
