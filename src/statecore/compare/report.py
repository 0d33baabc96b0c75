"""What `statecore bench` prints: the markdown table of ratio rows with its notes, or the
JSON of the whole result, and optionally a PNG chart of the ratios."""
from __future__ import annotations

import json
import logging
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..progress import human_bytes
from .common import PAGE, THREAD_BATCH
from .rows import get

log = logging.getLogger("statecore")


def print_result(result: Dict[str, Any], json_out: bool, chart: Optional[str]) -> None:
    if json_out:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(format_table(result))
        if chart:
            print(f"\nChart: {result['chart'] or 'not written (matplotlib not installed)'}")


def _fmt(v: Any, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "s":
        if v < 1e-3:
            return f"{v * 1e6:.1f} µs"
        return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"
    if unit == "B":
        return human_bytes(v)
    if unit == "x":
        return f"{v:.2f}x"
    return str(v)


def _fmt_times(xs: Sequence[float]) -> str:
    return ", ".join(_fmt(x, "s") for x in xs)


def _fmt_ratio(r: Optional[float]) -> str:
    if r is None:
        return "-"
    return f"{r:,.0f}x" if r >= 100 else (f"{r:.1f}x" if r >= 10 else f"{r:.2f}x")


def format_table(result: Dict[str, Any]) -> str:
    lines = [
        f"## statecore vs peers: {human_bytes(result['size'])} as {result['n_pages']:,} "
        f"pages/values of {PAGE} B",
        "",
        f"Machine: {result['machine']['cpus']} CPUs, THP {result['machine']['thp']}, load "
        f"{result['machine']['load_before']} -> {result['machine']['load_after']}. Peers: "
        + ", ".join(f"{k}: {v}" for k, v in result["peers"].items()) + ". "
        f"Run took {result['seconds']:.0f} s; peak RSS of this process "
        f"{human_bytes(result['peak_rss'])}.",
        "",
        "Ratio = peer ÷ statecore; every figure is lower-is-better, so > 1 means statecore "
        "is better.",
        "",
        "| section | measure | statecore | peer | peer figure | ratio | better |",
        "| --- | --- | ---: | --- | ---: | ---: | --- |",
    ]
    for r in result["rows"]:
        peer_fig = _fmt(r["peer_value"], r["unit"]) if r["peer_value"] is not None \
            else (r["peer_missing"] or "-")
        lines.append(f"| {r['section']} | {r['measure']} | {_fmt(r['statecore'], r['unit'])} | "
                     f"{r['peer']} | {peer_fig} | {_fmt_ratio(r['ratio'])} | {r['better']} |")
    notes = _snapshot_notes(result) + _backup_notes(result) + _later_notes(result)
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    if result["errors"]:
        lines += ["", "Errors:", *[f"- {e}" for e in result["errors"]]]
    return "\n".join(lines)


# ---- notes under the table -------------------------------------------------------------------

def _writer_rates(d: Dict[str, Any], scale: float, digits: int, suffix: str) -> str:
    """The writer's rate before -> during, e.g. "48.2M -> 41.2M"."""
    idle, during = (d.get("writes_per_s_idle") or 0), (d.get("writes_per_s_during") or 0)
    return f"{idle / scale:.{digits}f}{suffix} -> {during / scale:.{digits}f}{suffix}"


def _snapshot_notes(result: Dict[str, Any]) -> List[str]:
    n: List[str] = []
    s = result["snapshot"]
    sc1 = s.get("statecore") or {}
    if sc1:
        n.append(f"[1] {s['writes']:,} writes touched {s['pages_touched']:,} pages; statecore "
                 f"preserved {human_bytes(sc1['preserved_bytes'])}, writes took "
                 f"{_fmt(sc1['writes_s'], 's')} without a snapshot; with a live snapshot "
                 f"rounds took {_fmt_times(sc1['writes_live_rounds_s'])} (the first also "
                 f"grows the store's pool of preserved pages).")
    fk = s.get("fork") or {}
    if fk:
        n.append(f"[1] fork: the same writes took {_fmt(fk['writes_s'], 's')} with no child; "
                 f"with a child alive {_fmt_times(fk['writes_live_rounds_s'])}.")
    return n


def _backup_notes(result: Dict[str, Any]) -> List[str]:
    n: List[str] = []
    b = result["backup"]
    uw = get(b, "statecore", "under_writes") or {}
    if uw:
        n.append(f"[2] statecore snap.save under a writer (StateArray, 8-B random writes in "
                 f"batches of {THREAD_BATCH}): {_fmt(uw.get('save_s'), 's')}, preserved "
                 f"{human_bytes(uw.get('preserved_bytes') or 0)}; writer "
                 f"{_writer_rates(uw, 1e6, 1, 'M')} writes/s during the save "
                 f"(first pass in a new store: every page touched is preserved once, into a "
                 f"pool that grows from fresh memory).")
    rd = b.get("redis") or {}
    if rd:
        n.append(f"[2] Redis: load {_fmt(rd['load_s'], 's')}, used_memory "
                 f"{human_bytes(rd['used_memory'])} (RSS {human_bytes(rd['used_memory_rss'])}); "
                 f"idle BGSAVE COW {human_bytes(rd['cow_bytes'])}; Redis defaults "
                 f"(rdbcompression, rdbchecksum, rdb-save-incremental-fsync: fsync every 4 MiB).")
        ru = rd.get("under_writes") or {}
        if ru:
            n.append(f"[2] Redis BGSAVE under a pipelined SETRANGE writer: COW "
                     f"{human_bytes(ru.get('cow_bytes') or 0)}, fork "
                     f"{_fmt(ru.get('fork_s'), 's')}, {_writer_rates(ru, 1e3, 0, 'K')} "
                     f"SETRANGE/s. The writer is a Python client, bound by itself and the "
                     f"server's command processing, so its slowdown says little about "
                     f"fork/COW cost.")
    lm = b.get("lmdb") or {}
    if lm:
        n.append(f"[2] LMDB: load {_fmt(lm['load_s'], 's')}; env file "
                 f"{human_bytes(lm['env_file']['apparent'])} for {human_bytes(result['size'])} "
                 f"of values (a 4 KiB value needs 2 overflow pages); env.copy writes with "
                 f"O_DIRECT, snap.save and np.save through the page cache + fsync.")
    return n


def _later_notes(result: Dict[str, Any]) -> List[str]:
    n: List[str] = []
    r = result["recovery"].get("statecore") or {}
    if "durable_reopen_s" in r:
        n.append(f"[3] DurableStore reopen replayed {r['durable_deltas_replayed']} deltas "
                 f"({human_bytes(r['durable_journal_bytes'])} journal) after a "
                 f"{human_bytes(r['durable_checkpoint_bytes'])} checkpoint.")
    i = result["incremental"].get("statecore") or {}
    if i:
        n.append(f"[4] {i['pages_changed']:,} pages changed per round; replica verified equal: "
                 f"{i['replica_equal']}; fresh replica full sync moved "
                 f"{human_bytes(i['full_sync_bytes'])}.")
    return n


# ---- the chart -------------------------------------------------------------------------------

def write_chart(result: Dict[str, Any], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("statecore bench: matplotlib not installed; no chart written")
        return False
    rows = [r for r in result["rows"] if r["ratio"]]
    if not rows:
        return False
    labels = [f"{r['section'][0]}. {r['measure']}\nvs {r['peer']}" for r in rows]
    ratios = [r["ratio"] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(rows) + 1.5))
    y = np.arange(len(rows))[::-1]
    colors = {"statecore": "tab:green", "tie": "tab:gray"}
    ax.barh(y, [v - 1 for v in ratios], left=1,
            color=[colors.get(r["better"], "tab:red") for r in rows])
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    for yy, v in zip(y, ratios):
        ax.text(v, yy, f" {_fmt_ratio(v)} " if v >= 1 else f"{_fmt_ratio(v)} ",
                va="center", ha="left" if v >= 1 else "right", fontsize=7)
    ax.set_xlabel("peer ÷ statecore (log; > 1: statecore better)")
    ax.set_title(f"statecore vs peers, {human_bytes(result['size'])} of {PAGE} B pages")
    lo, hi = min(ratios + [1.0]), max(ratios + [1.0])
    ax.set_xlim(lo / 8, hi * 8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
