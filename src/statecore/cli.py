"""The `statecore` command (also `python -m statecore`)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, is_dataclass
from typing import Any, Callable, Dict, List, Optional

from . import errors
from .progress import ProgressBar, human_bytes, parse_size


def _print(args: argparse.Namespace, data: Dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(data, default=_jsonable, indent=2))
    else:
        print(text)


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    if isinstance(obj, bytes):
        return obj.hex()
    return str(obj)


# ---- subcommands ---------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo
    log: Callable[[str], None] = (lambda m: None) if args.json else (lambda m: print(m, flush=True))
    results = run_demo(size=parse_size(args.size), seconds=args.seconds, seed=args.seed, log=log)
    if args.json:
        print(json.dumps(results, default=_jsonable, indent=2))
    else:
        print()
        print(format_table(results))
    return 0


def cmd_demo_writer(args: argparse.Namespace) -> int:
    from .demo import run_writer
    run_writer(args.directory, int(args.size), float(args.seconds), int(args.seed))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .inspection import describe
    data = describe(args.path)
    _print(args, data, "\n".join(f"{k}: {v}" for k, v in data.items()))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .inspection import verify_directory
    bar = ProgressBar("verify", enabled=None if not args.json else False)
    report = verify_directory(args.directory, progress=bar)
    bar.close()
    lines = [f"{c['file']}: {c['status']}" + (f" ({c['detail']})" if c.get("detail") else "")
             for c in report["files"]]
    lines.append(f"recovery would: {report['recovery']}")
    _print(args, report, "\n".join(lines))
    return 0 if report["ok"] else 1


def cmd_recover(args: argparse.Namespace) -> int:
    from .durable import DurableStore
    bar = ProgressBar("recover", enabled=False if args.json else None)
    ds = DurableStore(args.directory, progress=bar)
    bar.close()
    rep = ds.recovery
    ds.close()
    _print(args, {"recovery": rep}, str(rep))
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from .durable import DurableStore
    ds = DurableStore(args.directory)
    try:
        t0 = time.perf_counter()
        bar = ProgressBar("checkpoint", enabled=False if args.json else None)
        epoch = ds.checkpoint(progress=bar).result()
        bar.close()
        secs = time.perf_counter() - t0
    finally:
        ds.close()
    _print(args, {"epoch": epoch, "seconds": secs},
           f"checkpoint at epoch {epoch} durable in {secs:.2f} s")
    return 0


def _secret(args: argparse.Namespace) -> Optional[str]:
    return args.secret or os.environ.get("STATECORE_SECRET")


def cmd_serve(args: argparse.Namespace) -> int:
    from .durable import DurableStore
    from .replication import Primary
    ds = DurableStore(args.directory)
    primary = Primary(ds, host=args.host, port=args.port, secret=_secret(args))
    print(json.dumps({"address": list(primary.address)}) if args.json
          else f"serving {args.directory} on {primary.address[0]}:{primary.address[1]}", flush=True)
    return _run_until_interrupted(lambda: primary.followers, [primary.close, ds.close], args)


def cmd_follow(args: argparse.Namespace) -> int:
    from .durable import DurableStore
    from .replication import Follower
    host, _, port = args.address.rpartition(":")
    ds = DurableStore(args.directory, size=parse_size(args.size) if args.size else None,
                      page_size=args.page_size)
    follower = Follower(ds, (host or "127.0.0.1", int(port)), secret=_secret(args))
    return _run_until_interrupted(follower.status, [follower.close, ds.close], args)


def _run_until_interrupted(status: Callable[[], Any], closers: List[Callable[[], None]],
                           args: argparse.Namespace) -> int:
    try:
        while True:
            time.sleep(args.interval)
            if args.verbose:
                print(json.dumps(status(), default=_jsonable), flush=True)
    except KeyboardInterrupt:
        return 0
    finally:
        for close in closers:
            close()


def cmd_bench(args: argparse.Namespace) -> int:
    from .compare import run_comparison
    return run_comparison(size=parse_size(args.size), json_out=args.json, chart=args.chart)


# ---- parser --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="statecore", description=__doc__)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    # The same flags after the subcommand (`statecore info X --json`); SUPPRESS keeps an
    # absent one from overwriting a value given before the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)
    real_add = sub.add_parser

    def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        return real_add(name, parents=[common], **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    d = sub.add_parser("demo", help="build state, snapshot under load, replicate, crash, recover")
    d.add_argument("--size", default="1G", help="state size (default 1G; e.g. 64M)")
    d.add_argument("--seconds", type=float, default=5.0, help="write-load phase length")
    d.add_argument("--seed", type=int, default=1)
    d.set_defaults(func=cmd_demo)

    w = sub.add_parser("_demo-writer")  # internal: the demo's child process
    for a in ("directory", "size", "seconds", "seed"):
        w.add_argument(a)
    w.set_defaults(func=cmd_demo_writer)

    i = sub.add_parser("info", help="describe a checkpoint, journal segment, store file or "
                                    "durable directory")
    i.add_argument("path")
    i.set_defaults(func=cmd_info)

    v = sub.add_parser("verify", help="check every checksum of a durable directory")
    v.add_argument("directory")
    v.set_defaults(func=cmd_verify)

    r = sub.add_parser("recover", help="recover a durable directory and print the report")
    r.add_argument("directory")
    r.set_defaults(func=cmd_recover)

    c = sub.add_parser("checkpoint", help="write a checkpoint of a durable directory")
    c.add_argument("directory")
    c.set_defaults(func=cmd_checkpoint)

    s = sub.add_parser("serve", help="serve a durable directory to followers")
    s.add_argument("directory")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    f = sub.add_parser("follow", help="keep a durable directory equal to a primary")
    f.add_argument("directory")
    f.add_argument("address", help="HOST:PORT of the primary")
    f.add_argument("--size", help="state size, when creating the directory")
    f.add_argument("--page-size", type=int, default=None)
    for q in (s, f):
        q.add_argument("--secret", help="shared secret (or env STATECORE_SECRET)")
        q.add_argument("--interval", type=float, default=1.0)
        q.add_argument("--verbose", "-v", action="store_true", help="print status every interval")
    s.set_defaults(func=cmd_serve)
    f.set_defaults(func=cmd_follow)

    b = sub.add_parser("bench", help="compare with fork(), LMDB, Redis and numpy on one machine")
    b.add_argument("--size", default="1G")
    b.add_argument("--chart", default=None, help="write a PNG chart here (needs matplotlib)")
    b.add_argument("--compare", action="store_true", help="(default) run the peer comparison")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `statecore info X | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (errors.StateError, OSError, ValueError, TypeError, RuntimeError,
            AssertionError, TimeoutError) as e:
        if args.debug:
            raise
        print(f"statecore: error: {e}", file=sys.stderr)
        return 1
