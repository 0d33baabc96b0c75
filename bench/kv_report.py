"""KVStore against dict, py-lmdb and Redis pipelined (when redis-server is installed):
single and batch calls, put / get / mixed, a markdown table of ratios from one run, plus
the delta size after updating 1% of the keys and the longest put pause while growing.

    python bench/kv_report.py                 # 1M keys, 64 B and 1 KiB values (~1-2 min)
    python bench/kv_report.py --full          # 10M keys, the issue's size (~15 min, ~16 GB)
    python bench/kv_report.py --keys 200000 --values 64 --systems statecore,py-lmdb

See bench/kv_workloads.py for what each workload does and how the baselines are set up.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kv_workloads as kw  # noqa: E402
import workloads  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=1_000_000, help="keys per data set (1M)")
    ap.add_argument("--full", action="store_true", help="10M keys, as in the issue")
    ap.add_argument("--values", default="64,1024", help="value sizes in bytes (64,1024)")
    ap.add_argument("--batch", type=int, default=10_000, help="keys per batch call (10000)")
    ap.add_argument("--systems", default="statecore,dict,py-lmdb,redis",
                    help="comma-separated subset of statecore,dict,py-lmdb,redis")
    ap.add_argument("--no-extras", action="store_true", help="skip the delta and pause runs")
    ap.add_argument("--redis-keys", type=int, default=200_000,
                    help="keys Redis is measured on (its time per op is client-bound; "
                         "default 200000)")
    ap.add_argument("--json", metavar="PATH", help="also write the raw figures here")
    ap.add_argument("--enforce", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    n = 10_000_000 if args.full else args.keys
    vlens = [int(v) for v in args.values.split(",") if v]
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    avail = kw.available_systems()
    unknown = [s for s in wanted if s not in avail]
    if unknown:
        ap.error(f"unknown systems {unknown}; choose from {sorted(avail)}")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    skipped = {s: why for s, why in avail.items() if s in wanted and why}
    systems = [s for s in wanted if s not in skipped]
    info = workloads.machine_info()
    t_start = time.perf_counter()
    results, failed = {}, False
    sections = []
    for vlen in vlens:
        log(f"== {n:,} keys, {vlen}-byte values: generating data")
        data = kw.dataset(n, vlen)
        times = {}
        rounds = 2 if n <= 2_000_000 else 1
        for name in systems:
            if name == "redis":
                continue  # last: it runs on a smaller data set
            log(f"   {name} ...")
            times[name] = kw.measure_system(name, data, args.batch, rounds,
                                            log=lambda s: log("     " + s))
        delta, pauses = None, {}
        if not args.no_extras and "statecore" in systems:
            log("   delta after 1% updates ...")
            delta = kw.measure_delta(data)
            for name in ("statecore", "dict"):
                if name in systems:
                    log(f"   pause while loading: {name} ...")
                    pauses[name] = kw.measure_pause(name, data)
        if "redis" in systems:
            m = min(n, args.redis_keys)
            log(f"   redis on {m:,} keys ...")
            times["redis"] = kw.measure_system("redis", kw.dataset(m, vlen), args.batch, 1,
                                               log=lambda s: log("     " + s))
        failed |= any(v == "FAIL" for _, _, v in kw.evaluate(times))
        notes = {k: dict(v) for k, v in kw.NOTES.items()}
        kw.NOTES.clear()
        sections.append(kw.render(n, vlen, times) + "\n\n" + kw.render_extras(n, vlen, delta, pauses)
                        + kw.render_notes(notes))
        results[vlen] = {"times": times, "delta": delta, "pauses": pauses, "notes": notes}
    elapsed = time.perf_counter() - t_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    print("## KVStore benchmark: statecore vs dict, py-lmdb, Redis\n")
    print(f"Machine: {info}. Load after: {open('/proc/loadavg').read().split()[:3]}. "
          f"Run took {elapsed:.0f} s, peak RSS {workloads.human_bytes(peak)}. Batch calls: "
          f"{args.batch:,} keys each. Times are per operation; a ratio is statecore's time "
          "over the baseline's (the target is a maximum), speed-up its inverse.\n")
    for why_name, why in skipped.items():
        print(f"- {why_name}: skipped ({why})")
    if "redis" in systems:
        print(f"- Redis: a private redis-server on a Unix socket, no persistence, driven by "
              f"redis-py pipelines of {args.batch:,} commands, measured on "
              f"{min(n, args.redis_keys):,} keys (its time per operation is bound by the "
              "client, not by the data size)")
    if skipped or "redis" in systems:
        print()
    print("\n\n".join(sections))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"keys": n, "batch": args.batch, "machine": info, "results": results},
                      f, indent=1)
    return 1 if args.enforce and failed else 0


if __name__ == "__main__":
    sys.exit(main())
