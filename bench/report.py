"""Ratio report without pytest: the cases of bench/workloads.py timed with
time.perf_counter (best of N, median shown too), each divided by its baseline from the
same run, as a markdown table.

    python bench/report.py                  # small scale, under a minute
    python bench/report.py --scale full     # the issues' sizes: a few minutes, < 14 GiB
    python bench/report.py --only replay    # rows whose case keys or labels match
    python bench/report.py --repeat 3       # three passes, best of all rounds (noisy box)
    python bench/report.py --interleave     # each row's two cases alive together, their
                                            # rounds alternating (drift hits both alike)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time

# numpy's OpenBLAS threads spin-wait after start-up; on a 2-core machine that is noise.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import workloads  # noqa: E402
import durable_workloads  # noqa: E402,F401  (issue 4: registers its cases and rows)
import replication_workloads  # noqa: E402,F401  (issue 5: the same)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(workloads.SCALES), default=None,
                    help="small (default; env STATECORE_BENCH_SCALE) or full")
    ap.add_argument("--only", action="append", default=[],
                    help="run only rows whose label or case keys contain this (repeatable)")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="run the whole set N times, pooling rounds (best of all): a burst "
                         "of load from other processes then spoils one pass, not a row")
    ap.add_argument("--interleave", action="store_true",
                    help="per row, set up both cases at once and alternate their rounds, so "
                         "that a slow minute of the host slows statecore and its baseline "
                         "alike (a case in several rows is measured once per row, pooled)")
    ap.add_argument("--json", metavar="PATH", help="also write the raw figures here")
    ap.add_argument("--enforce", action="store_true",
                    help="exit 1 when a ratio misses its target")
    args = ap.parse_args(argv)
    scale = workloads.get_scale(args.scale)

    rows = [r for r in workloads.ROWS
            if not args.only or any(o in r.label(scale) or o in r.num[0] or o in r.den[0]
                                    for o in args.only)]
    keys = list(dict.fromkeys(k for r in rows for k in r.keys()))
    info_before = workloads.machine_info()
    results = {}
    t_start = time.perf_counter()
    groups = ([tuple(dict.fromkeys(r.keys())) for r in rows] if args.interleave
              else [(k,) for k in keys])
    for rep in range(max(1, args.repeat)):
        measured_in_pass = set()
        for i, group in enumerate(groups, 1):
            if frozenset(group) in measured_in_pass:
                continue  # two rows of one case (memory) or of the same pair
            measured_in_pass.add(frozenset(group))
            t0 = time.perf_counter()
            print(f"[{rep + 1}:{i}/{len(groups)}] {' + '.join(group)} ...", end=" ",
                  file=sys.stderr, flush=True)
            with contextlib.ExitStack() as stack:
                cases = [stack.enter_context(workloads.CASES[k](scale)) for k in group]
                measured = workloads.run_interleaved(cases)
                for key, case, times in zip(group, cases, measured):
                    if key in results:
                        results[key].times.extend(times)
                    else:
                        results[key] = workloads.Result(times=times, metrics=dict(case.metrics))
            bests = ", ".join(workloads.human_seconds(min(t)) for t in measured)
            print(f"best {bests} ({sum(map(len, measured))} rounds, "
                  f"{time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    elapsed = time.perf_counter() - t_start

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"## statecore benchmark ratios, scale {scale.name}\n")
    print(f"Machine: {info_before}. Load after: "
          f"{open('/proc/loadavg').read().split()[:3]}. Run took {elapsed:.0f} s, "
          f"peak RSS {workloads.human_bytes(peak)}.\n")
    print("Times are best / median of the rounds; ratios use the best. Memory rows compare "
          "bytes. \"info\" rows have no target.\n")
    print(workloads.render_table(results, scale))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"scale": scale.name, "machine": info_before,
                       "results": {k: {"times": r.times, "metrics": r.metrics}
                                   for k, r in results.items()}}, f, indent=1)
    failed = [row for row, _, verdict in workloads.evaluate(results) if verdict == "FAIL"]
    return 1 if args.enforce and failed else 0


if __name__ == "__main__":
    sys.exit(main())
