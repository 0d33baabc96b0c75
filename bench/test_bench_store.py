"""Issue 2: the page store against fork() and plain numpy.

Each test times one case from workloads.py; the ratio table at the end of the run divides
statecore's figure by the baseline's. Sizes follow --bench-scale (see conftest.py).
"""
import pytest


@pytest.mark.parametrize("key", ["snapshot.lo", "fork.lo"])
def test_snapshot_vs_fork_small_state(measure, key):
    """snapshot() against fork()+child _exit+waitpid of the process holding 64 MiB."""
    measure(key, group="snapshot-vs-fork-small-state")


@pytest.mark.parametrize("key", ["snapshot.hi", "fork.hi"])
def test_snapshot_vs_fork_large_state(measure, key):
    """The same at 4 GiB (small scale: 1 GiB) of touched state: snapshot() stays O(1)."""
    measure(key, group="snapshot-vs-fork-large-state")


@pytest.mark.parametrize("key", ["write_pages.statecore", "write_pages.numpy"])
def test_write_pages_throughput(measure, key):
    """store.write_pages of random page ids against np.copyto of the same bytes."""
    measure(key, group="write-pages")


@pytest.mark.parametrize("key", ["random.statecore", "random.statecore_snap", "random.numpy",
                                 "random.numpy_copy", "random.copy_floor",
                                 "random.numpy_4k", "random.fork"])
def test_random_int64_writes(measure, key):
    """1M random int64 writes: StateArray (no snapshot; one live snapshot taken just before,
    so every touched page is preserved) against numpy fancy assignment, and against numpy
    with a forked child holding the old state."""
    res = measure(key, group="random-int64-writes")
    if key == "random.statecore_snap":
        # one copy per touched page per live snapshot: no more, no fewer
        assert res.metrics["pages_preserved"] == res.metrics["pages_touched"]


@pytest.mark.parametrize("key", ["memory.part", "memory.all"])
def test_snapshot_memory(measure, key):
    """Memory a live snapshot holds after N distinct pages are written (the time is the
    writes'); the ratio table checks preserved_bytes and RSS growth against
    N*page_size + 1% of the state."""
    res = measure(key, group="snapshot-memory")
    assert res.metrics["preserved_bytes"] == res.metrics["page_bytes"]


@pytest.mark.parametrize("key", ["save.statecore_writer", "save.statecore_idle",
                                 "save.write_fsync"])
def test_save_under_writer(measure, key):
    """snap.save while a thread keeps writing, against write()+fsync of the same bytes."""
    measure(key, group="save")
