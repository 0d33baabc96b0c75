"""Keyed state: sc.KVStore against dict, py-lmdb and Redis pipelined (when redis-server
is installed), 16-byte keys, 64-byte and 1 KiB values; 200K keys at --bench-scale small,
10M at full. The cases live in bench/kv_workloads.py and join the ratio table at the end
of the run (rows marked "kv"); bench/kv_report.py prints the same comparison standalone.

    python -m pytest bench/test_bench_kv.py --benchmark-only -q
"""
import pytest

import kv_workloads
import workloads

kv_workloads.register(workloads)

SYSTEMS = ["statecore", "py-lmdb", "dict", "redis"]


@pytest.mark.parametrize("vlen", kv_workloads.VALUE_SIZES)
@pytest.mark.parametrize("workload", kv_workloads.WORKLOADS)
@pytest.mark.parametrize("system", SYSTEMS)
def test_kv_workload(measure, system, workload, vlen):
    """One system, one workload: put/get/mixed through single calls (kv[k] = v) or batch
    calls of 10,000 keys (put_many/get_many, LMDB putmulti/getmulti, Redis pipelines)."""
    if system == "redis" and not workload.endswith("_batch"):
        pytest.skip("Redis is compared pipelined only")
    measure(f"kv{vlen}.{system}.{workload}", group=f"kv-{workload}-{vlen}B")


@pytest.mark.parametrize("vlen", kv_workloads.VALUE_SIZES)
def test_kv_delta_after_one_percent_update(measure, vlen):
    """Rewrite 1% of the values in place; the delta carries the pages they sit on."""
    res = measure(f"kv{vlen}.statecore.delta", group=f"kv-delta-{vlen}B")
    m = res.metrics
    assert m["changed_bytes"] <= m["delta_bytes"] <= m["state_bytes"]


@pytest.mark.parametrize("vlen", kv_workloads.VALUE_SIZES)
@pytest.mark.parametrize("system", ["statecore", "dict"])
def test_kv_longest_put_while_growing(measure, system, vlen):
    """Every put of a load timed: the longest is the pause growth costs (KVStore: at most
    two bucket splits per put; dict: a full resize)."""
    res = measure(f"kv{vlen}.{system}.pause", group=f"kv-pause-{vlen}B")
    assert res.metrics["max_ns"] >= res.metrics["p9999_ns"]
