"""Issue 5: replication over loopback TCP (full sync, delta streaming) against raw socket
throughput of the same bytes, and follower lag under a writer committing every 10 ms.

Each test times one case from replication_workloads.py; the ratio table at the end of the
run divides statecore's figure by the baseline's. Sizes follow --bench-scale (see
conftest.py).
"""
import pytest

import replication_workloads  # noqa: F401  (registers the issue-5 cases and rows)


@pytest.mark.parametrize("key", ["replica.full_sync", "replica.full_sync_raw"])
def test_full_sync(measure, key):
    """A fresh Follower on an empty Store taking the primary's whole state (1 GiB; small
    scale 128 MiB), against sendall/recv_into of as many bytes between two threads."""
    res = measure(key, group="replica-full-sync")
    if key == "replica.full_sync":
        assert res.metrics["verified"] == 1


@pytest.mark.parametrize("key", ["replica.stream", "replica.stream_raw"])
def test_delta_streaming(measure, key):
    """Many publishes of changed pages to a caught-up Follower, against raw TCP of the
    same bytes."""
    measure(key, group="replica-stream")


def test_follower_lag(measure):
    """A DurableStore committing every 10 ms for a few seconds; the follower's applies
    (on_apply) timed against the commits. The time is the writer's run; the lag figures
    are in extra_info and the ratio table."""
    res = measure("replica.lag", group="replica-lag")
    m = res.metrics
    assert m["commits"] > 0 and m["lag_p50_ms"] <= m["lag_p99_ms"] <= m["lag_max_ms"]
