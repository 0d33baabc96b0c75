"""The ratio rows of `statecore bench`: which statecore figure is set against which peer
figure, the ratio peer / statecore (every figure is lower-is-better) and who is better."""
from __future__ import annotations

from typing import Any, Dict, List

from .common import CHANGE_FRACTION, JOURNAL_COMMITS, SHORT
from .run import Run


def get(d: Any, *keys: str) -> Any:
    """d[k1][k2]..., or None where a level is missing."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


class _Rows:
    def __init__(self, enabled: Dict[str, str]) -> None:
        self.enabled = enabled
        self.rows: List[Dict[str, Any]] = []

    def add(self, section: str, measure: str, unit: str, sc_val: Any, peer: str,
            peer_label: str, peer_val: Any) -> None:
        state = self.enabled.get(peer_label.split()[0], "")
        ratio = None
        if isinstance(sc_val, (int, float)) and isinstance(peer_val, (int, float)) \
                and sc_val > 0 and peer_val > 0:
            ratio = peer_val / sc_val
        if ratio is None:
            better = "-"
        elif ratio >= 1.1:
            better = "statecore"
        elif ratio <= 1 / 1.1:
            better = SHORT.get(peer_label, peer_label)
        else:
            better = "tie"
        missing = None
        if peer_val is None:
            missing = state if state.startswith(("not installed", "disabled")) else "error"
        self.rows.append({"section": section, "measure": measure, "unit": unit,
                          "statecore": sc_val, "peer": peer, "peer_value": peer_val,
                          "peer_missing": missing, "ratio": ratio, "better": better})


def ratio_rows(run: Run) -> List[Dict[str, Any]]:
    rows = _Rows(run.enabled)
    _snapshot_rows(rows, run)
    _backup_rows(rows, run)
    _recovery_rows(rows, run)
    _incremental_rows(rows, run)
    return rows.rows


def _snapshot_rows(rows: _Rows, run: Run) -> None:
    S, F = get(run.res, "snapshot", "statecore") or {}, get(run.res, "snapshot", "fork") or {}
    w = f"{run.writes / 1e6:g}M random 8-B writes"
    live = "fork() child alive"
    for measure, unit, sc_key, peer, fork_key in (
            ("pause to take a snapshot", "s", "pause_s", "fork() (return in parent)",
             "pause_s"),
            ("pause to take a snapshot", "s", "pause_s", "fork(), 4 KiB pages (THP off)",
             "pause_small_pages_s"),
            ("pause incl. child exit + reap", "s", "pause_s", "fork()+_exit+waitpid",
             "fork_exit_wait_s"),
            (f"{w}, snapshot/child live (median of 3)", "s", "writes_live_snapshot_s", live,
             "writes_live_child_s"),
            (f"{w}, first snapshot/fork of the process", "s", "writes_live_first_s", live,
             "writes_live_first_s"),
            ("writer slowdown (live ÷ none)", "x", "writer_slowdown", live, "writer_slowdown"),
            ("memory growth during those writes", "B", "memory_growth_bytes",
             "fork() (PSS parent+child)", "memory_growth_bytes")):
        rows.add("1 snapshot", measure, unit, S.get(sc_key), peer, "fork", F.get(fork_key))


def _backup_rows(rows: _Rows, run: Run) -> None:
    B = run.res["backup"]
    S = get(run.res, "snapshot", "statecore") or {}
    sb = B.get("statecore") or {}
    for peer, label, key in (("LMDB env.copy", "lmdb", "copy_s"),
                             ("Redis BGSAVE", "redis", "bgsave_s"),
                             ("np.save (blocks writers)", "numpy", "save_s")):
        rows.add("2 backup", "backup time, idle (snap.save)", "s", sb.get("save_s"),
                 peer, label, get(B, label, key))
    if run.redis_writer:  # statecore's own figures under a writer are in the notes
        _backup_under_writer_rows(rows, B)
    rows.add("2 backup", "pause to start the backup", "s", S.get("pause_s"),
             "Redis fork (latest_fork_usec)", "redis", get(B, "redis", "fork_s"))
    for peer, label in (("LMDB copy", "lmdb"), ("Redis RDB", "redis"),
                        ("np.save .npy", "numpy")):
        rows.add("2 backup", "backup file size", "B", sb.get("file_bytes"), peer, label,
                 get(B, label, "file_bytes"))


def _backup_under_writer_rows(rows: _Rows, B: Dict[str, Any]) -> None:
    sc, rd = get(B, "statecore", "under_writes"), get(B, "redis", "under_writes")
    writer = "Redis BGSAVE + SETRANGE writer"
    rows.add("2 backup", "backup time under a writer", "s", get(sc, "save_s"),
             writer, "redis", get(rd, "bgsave_s"))
    rows.add("2 backup", "writer slowdown during backup", "x", get(sc, "writer_slowdown"),
             writer, "redis", get(rd, "writer_slowdown"))
    sc_during, rd_during = get(sc, "writes_per_s_during"), get(rd, "writes_per_s_during")
    rows.add("2 backup", "time per 1M 8-B writes during backup", "s",
             1e6 / sc_during if sc_during else None,
             "Redis SETRANGE (pipelined client)", "redis",
             1e6 / rd_during if rd_during else None)


def _recovery_rows(rows: _Rows, run: Run) -> None:
    C = run.res["recovery"]
    sr = C.get("statecore") or {}
    for peer, label, val in (
            ("Redis restart from RDB", "redis", get(C, "redis", "restart_s")),
            ("LMDB reopen + read all", "lmdb", get(C, "lmdb", "reopen_read_s")),
            ("np.load full dump", "numpy", get(C, "numpy", "load_s"))):
        rows.add("3 recovery", "restore full state (Store.load)", "s", sr.get("load_s"), peer,
                 label, val)
    rows.add("3 recovery", f"DurableStore reopen (ckpt + {JOURNAL_COMMITS} commits)", "s",
             sr.get("durable_reopen_s"), "Redis restart from RDB", "redis",
             get(C, "redis", "restart_s"))


def _incremental_rows(rows: _Rows, run: Run) -> None:
    I = run.res["incremental"]
    si, fc = I.get("statecore") or {}, I.get("full_copy") or {}
    pct = f"{CHANGE_FRACTION * 100:g}%"
    rows.add("4 incremental", f"bytes to update a replica ({pct} changed)", "B",
             si.get("delta_bytes"), "full copy", "numpy", fc.get("bytes"))
    rows.add("4 incremental", f"seconds to update a replica ({pct} changed)", "s",
             si.get("delta_apply_s"), "full copy (np.copyto)", "numpy", fc.get("copy_s"))
    rows.add("4 incremental", "fresh replica: delta(0)+apply vs copy", "s",
             si.get("full_sync_s"), "full copy (np.copyto)", "numpy", fc.get("copy_s"))
