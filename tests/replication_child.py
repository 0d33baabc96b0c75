"""Helper process for tests/test_replication.py: a statecore Primary or Follower driven
over stdin/stdout, one JSON object per line (request -> reply).

    python replication_child.py primary  --size S --page-size P [--dir D | --plain]
                                         [--port N] [--secret X]
    python replication_child.py follower --size S --page-size P --address HOST:PORT
                                         [--dir D] [--secret X]
    (either: [--part-bytes N] to move large deltas in parts of N bytes)

The first line printed is a hello ({"ready": true, ...}); every request gets exactly one
reply line. Logs go to stderr. Every page checksum reported is sc.page_checksum of the
page's bytes, so two processes compare their states page by page.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback

import numpy as np

import statecore as sc


def page_sums(store: sc.Store) -> list:
    ps = store.page_size
    data = store.read(0, store.size)
    return [sc.page_checksum(data[i * ps:(i + 1) * ps]) for i in range(store.n_pages)]


def random_writes(store: sc.Store, rng: np.random.Generator, pages: int, small: int,
                  span: int) -> None:
    """`pages` whole pages among the first `span`, some of them back to zero, then `small`
    short writes at random offsets (crossing page boundaries) inside the same span."""
    ps = store.page_size
    span = max(1, min(span or store.n_pages, store.n_pages))
    if pages:
        ids = np.sort(rng.choice(span, size=min(pages, span), replace=False))
        data = rng.integers(0, 256, len(ids) * ps, dtype=np.uint8)
        zero = rng.random(len(ids)) < 0.1
        for i in np.flatnonzero(zero):
            data[i * ps:(i + 1) * ps] = 0
        store.write_pages(ids, data)
    limit = span * ps
    for _ in range(small):
        n = int(rng.integers(1, 97))
        off = int(rng.integers(0, max(1, limit - n)))
        store.write(off, rng.integers(0, 256, n, dtype=np.uint8).tobytes())


def reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def run_primary(args: argparse.Namespace) -> None:
    if args.plain:
        store = sc.Store(size=args.size, page_size=args.page_size)
    else:
        store = sc.DurableStore(args.dir, size=args.size, page_size=args.page_size)
    recovered = store.epoch
    primary = sc.Primary(store, host="127.0.0.1", port=args.port, secret=args.secret)

    def commit() -> int:
        return primary.publish() if args.plain else store.commit()

    reply({"ready": True, "role": "primary", "address": list(primary.address),
           "epoch": primary.epoch, "recovered_open_epoch": recovered,
           "uuid": store.uuid.hex()})
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "step":
                rng = np.random.default_rng(req["seed"])
                random_writes(store, rng, req.get("pages", 8), req.get("small", 8),
                              req.get("span", 0))
                epoch = commit()
                reply({"epoch": epoch, "sums": page_sums(store)})
            elif op == "write":  # uncommitted writes (lost by a crash)
                rng = np.random.default_rng(req["seed"])
                random_writes(store, rng, req.get("pages", 8), req.get("small", 8),
                              req.get("span", 0))
                reply({"ok": True})
            elif op == "load":
                rng = np.random.default_rng(req["seed"])
                durations = []
                epoch = primary.epoch
                deadline = time.monotonic() + req.get("max_seconds", 30)
                for _ in range(req["commits"]):
                    t0 = time.perf_counter()
                    random_writes(store, rng, req.get("pages", 8), req.get("small", 4),
                                  req.get("span", 0))
                    epoch = commit()
                    durations.append(time.perf_counter() - t0)
                    if req.get("pause"):
                        time.sleep(req["pause"])
                    if time.monotonic() > deadline:
                        break
                reply({"epoch": epoch, "durations": durations, "sums": page_sums(store)})
            elif op == "sums":
                reply({"epoch": primary.epoch, "sums": page_sums(store)})
            elif op == "followers":
                reply({"epoch": primary.epoch, "followers": primary.followers})
            elif op == "quit":
                primary.close()
                store.close()
                reply({"ok": True})
                return
            else:
                reply({"error": f"unknown op {op}"})
        except Exception as e:  # reported to the test, which fails with it
            reply({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})


def run_follower(args: argparse.Namespace) -> None:
    if args.dir:
        store = sc.DurableStore(args.dir, size=args.size, page_size=args.page_size)
        replica_epoch = store.replica_epoch
    else:
        store = sc.Store(size=args.size, page_size=args.page_size)
        replica_epoch = 0
    host, port = args.address.rsplit(":", 1)
    follower = sc.Follower(store, (host, int(port)), secret=args.secret)
    reply({"ready": True, "role": "follower", "replica_epoch": replica_epoch,
           "start_epoch": follower.epoch, "store_epoch": store.epoch})

    def status() -> dict:
        st = follower.status()
        if args.dir:
            st["replica_epoch"] = store.replica_epoch
        return st

    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "wait":
                t0 = time.monotonic()
                try:
                    follower.wait_for(req["epoch"], timeout=req.get("timeout", 20))
                except Exception as e:
                    reply({"ok": False, "error": f"{type(e).__name__}: {e}",
                           "status": status()})
                    continue
                reply({"ok": True, "epoch": follower.epoch, "elapsed": time.monotonic() - t0,
                       "sums": page_sums(store), "status": status()})
            elif op == "status":
                reply({"epoch": follower.epoch, "status": status()})
            elif op == "quit":
                follower.close()
                store.close()
                reply({"ok": True})
                return
            else:
                reply({"error": f"unknown op {op}"})
        except Exception as e:
            reply({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["primary", "follower"])
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--page-size", type=int, default=4096)
    ap.add_argument("--dir")
    ap.add_argument("--plain", action="store_true")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--address")
    ap.add_argument("--secret")
    ap.add_argument("--part-bytes", type=int, help="size of the parts large deltas move in")
    args = ap.parse_args()
    if args.part_bytes:
        from statecore import transfer
        transfer.PART_BYTES = args.part_bytes
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {args.role}[%(process)d] %(message)s")
    if args.role == "primary":
        run_primary(args)
    else:
        run_follower(args)


if __name__ == "__main__":
    main()
