"""Smoke test of `statecore bench` (statecore.compare) at a tiny size, without Redis and
LMDB, so it runs in seconds whether or not they are installed."""
from __future__ import annotations

import json
import sys

import pytest

from statecore.compare import run_comparison

SIZE = 8 << 20
PAGE = 4096

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the comparison reads /proc and uses fork()")


def _positive(d, *keys):
    for k in keys:
        v = d[k]
        assert isinstance(v, (int, float)) and v > 0, f"{k} = {v!r}"


def test_compare_smoke(capsys, monkeypatch):
    monkeypatch.delenv("STATECORE_BENCH_SKIP", raising=False)
    rc = run_comparison(SIZE, json_out=True, skip=("redis", "lmdb"), writes=200_000)
    out = capsys.readouterr().out
    res = json.loads(out)
    assert rc == 0, res["errors"]
    assert res["errors"] == []
    assert res["size"] == SIZE and res["n_pages"] == SIZE // PAGE
    assert res["peers"]["redis"] == "disabled" and res["peers"]["lmdb"] == "disabled"

    # 1. snapshot pause and writer slowdown, statecore and fork
    snap = res["snapshot"]
    sc, fk = snap["statecore"], snap["fork"]
    _positive(sc, "pause_s", "writes_s", "writes_live_snapshot_s", "writer_slowdown",
              "preserved_bytes")
    _positive(fk, "pause_s", "fork_exit_wait_s", "writes_s", "writes_live_child_s",
              "writer_slowdown", "memory_growth_bytes")
    # The first pass after a snapshot preserves every page it touches, once.
    assert snap["pages_touched"] > 0
    assert sc["preserved_bytes"] == snap["pages_touched"] * PAGE
    assert sc["pause_s"] < fk["fork_exit_wait_s"]

    # 2. backup
    bk = res["backup"]
    _positive(bk["statecore"], "save_s", "file_bytes")
    assert bk["statecore"]["file_bytes"] >= SIZE
    _positive(bk["statecore"]["under_writes"], "save_s", "writes_per_s_idle")
    _positive(bk["numpy"], "save_s", "file_bytes")
    assert "redis" not in bk and "lmdb" not in bk

    # 3. recovery
    rec = res["recovery"]
    _positive(rec["statecore"], "load_s", "durable_reopen_s", "durable_checkpoint_bytes",
              "durable_journal_bytes")
    assert rec["statecore"]["durable_deltas_replayed"] >= 10
    _positive(rec["numpy"], "load_s")

    # 4. incremental transfer
    inc = res["incremental"]
    _positive(inc["statecore"], "delta_bytes", "delta_apply_s", "full_sync_s",
              "full_sync_bytes", "delta_pages")
    assert inc["statecore"]["replica_equal"] is True
    assert inc["statecore"]["delta_pages"] == inc["statecore"]["pages_changed"]
    # 1% of the pages plus headers: far less than the full state a copy moves.
    assert inc["statecore"]["delta_bytes"] < SIZE // 20
    _positive(inc["full_copy"], "copy_s", "bytes")

    # The ratio rows: present peers have positive ratios; disabled ones say so.
    rows = res["rows"]
    assert {r["section"] for r in rows} == {"1 snapshot", "2 backup", "3 recovery",
                                           "4 incremental"}
    for r in rows:
        if r["peer_value"] is None:
            assert r["peer_missing"] in ("disabled", "not installed", "error"), r
            assert r["ratio"] is None
        else:
            assert r["ratio"] > 0 and r["statecore"] > 0, r
            assert r["better"] in ("statecore", "tie") or r["better"] in ("fork", "numpy"), r
    assert any(r["peer_missing"] == "disabled" for r in rows)
    assert sum(r["ratio"] is not None for r in rows) >= 10


def test_compare_table_output(capsys):
    rc = run_comparison(2 << 20, json_out=False, skip=("redis", "lmdb", "fork", "numpy"),
                        writes=65536)
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("## statecore vs peers")
    assert "| section | measure | statecore | peer | peer figure | ratio | better |" in out
    assert "disabled" in out
