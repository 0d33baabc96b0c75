"""Issue 3: deltas (extract, find, apply, replay, size) against numpy and python-lz4.

Each test times one case from workloads.py; the ratio table at the end of the run divides
statecore's figure by the baseline's. Sizes follow --bench-scale (see conftest.py).
"""
import pytest


@pytest.mark.parametrize("key", ["delta.extract", "delta.extract_numpy"])
def test_delta_extract(measure, key):
    """store.delta(a, b) of D dirty pages against a numpy gather of the same pages."""
    res = measure(key, group="delta-extract")
    if key == "delta.extract":
        # header + 24 bytes of index per page, nothing else, uncompressed
        m = res.metrics
        assert m["encoded_none"] == 128 + m["pages"] * (24 + 4096)


@pytest.mark.parametrize("key", ["changed.lo", "changed.hi", "changed.numpy_scan"])
def test_changed_pages(measure, key):
    """Finding 0.1% dirty pages: the same dirty count in a small and a 4x larger store
    (cost must follow dirty pages), and a numpy scan of one version per page."""
    res = measure(key, group="changed-pages")
    if key != "changed.numpy_scan":
        assert res.metrics["found"] == res.metrics["dirty"]


@pytest.mark.parametrize("key", ["apply.none", "apply.object", "apply.memcpy"])
def test_apply_raw(measure, key):
    """store.apply of an uncompressed delta (wire bytes, and an in-process Delta) against
    a numpy copy of the payload bytes."""
    measure(key, group="apply-raw")


@pytest.mark.parametrize("key", ["apply.lz4", "apply.lz4_decompress"])
def test_apply_lz4(measure, key):
    """Delta.decode(lz4 bytes) + apply against lz4.block.decompress of the same payload."""
    measure(key, group="apply-lz4")


@pytest.mark.parametrize("key", ["replay.many", "replay.one", "replay.many_wire",
                                 "replay.one_wire"])
def test_replay_coalescing(measure, key):
    """sc.replay of 100 deltas that each rewrite the same 1% of pages against applying
    one: coalescing writes each page once, so the ratio must stay <= 3."""
    measure(key, group="replay")
