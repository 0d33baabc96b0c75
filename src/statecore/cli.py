"""The `statecore` command (also `python -m statecore`)."""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import time
from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from . import errors
from .progress import ProgressBar, parse_size

if TYPE_CHECKING:
    from .durable import DurableStore


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


# ---- argument types (argparse reports their errors with the usage line) ---------------------

def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _port_arg(text: str, lowest: int = 0) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not lowest <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r} ({lowest} to 65535)")
    return port


def _address_arg(text: str) -> Tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"invalid address {text!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):  # [::1]:7000
        host = host[1:-1]
    return host or "127.0.0.1", _port_arg(port, lowest=1)  # port 0 cannot be connected to


def _positive_float_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r} (a positive number)")
    return value


# ---- durable directories --------------------------------------------------------------------

def _check_geometry(size: Optional[int], page_size: Optional[int]) -> None:
    """The library's checks (statecore._args), worded in the command's flags."""
    from ._args import DEFAULT_PAGE_SIZE, check_page_size, check_size
    ps = check_page_size(DEFAULT_PAGE_SIZE if page_size is None else page_size, "--page-size")
    if size is not None:
        check_size(size, ps, "--size", "the page size")


def _holds_store(directory: str) -> bool:
    """Whether DIR has a MANIFEST or the checkpoints or journal segments recovery rebuilds
    one from; asked before anything is created (no directory, no LOCK file)."""
    from .manifest import NAME, scan_directory
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), directory)
    return os.path.isdir(directory) and (os.path.exists(os.path.join(directory, NAME))
                                         or any(scan_directory(directory)))


def _no_store(directory: str, hint: str = "") -> errors.StateError:
    return errors.StateError(f"{directory!r} holds no durable store (no MANIFEST, checkpoint "
                             f"or journal segment){hint}")


def _require_manifest_or_size(directory: str, size: Optional[int]) -> None:
    """Opening rebuilds a missing or damaged MANIFEST only from a given size: say which
    flags do it, before the library's open takes the directory's lock."""
    from ._args import DEFAULT_PAGE_SIZE
    from .manifest import read_manifest
    if size is not None:
        return
    try:
        read_manifest(directory)
        return
    except FileNotFoundError:
        why = "MANIFEST missing"
    except errors.CorruptData as e:
        why = str(e)
    raise errors.CorruptData(f"{directory!r}: {why}; pass --size (and --page-size if the "
                             f"store's page size is not {DEFAULT_PAGE_SIZE}) to rebuild it "
                             "from the checkpoints and journal")


def _open_store(args: argparse.Namespace, create: bool = False,
                progress: Optional[Callable[[int, int], None]] = None) -> "DurableStore":
    """DIR's durable store, checked first so that a mistake leaves nothing on disk (no
    directory, no LOCK file); `create` makes a new one when DIR holds none and --size is
    given."""
    from .durable import DurableStore
    _check_geometry(args.size, args.page_size)
    if _holds_store(args.directory):
        _require_manifest_or_size(args.directory, args.size)
    elif not create:
        raise _no_store(args.directory)
    elif args.size is None:
        raise _no_store(args.directory, "; pass --size to create one")
    try:
        return DurableStore(args.directory, size=args.size, page_size=args.page_size,
                            progress=progress)
    except errors.StoreMismatch as e:
        raise errors.StoreMismatch(f"{e} (--size and --page-size must match the store, or "
                                   "be left out)") from e
    except errors.IncompatibleDelta as e:
        if args.size is None:
            raise
        # The MANIFEST was being rebuilt from --size and --page-size, and they are not the
        # geometry the checkpoints and journal were written with.
        raise errors.IncompatibleDelta(f"{e}: --size and --page-size must be the store's "
                                       "(`statecore info` on its files shows them)") from e


# ---- subcommands ---------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo
    _check_geometry(args.size, None)
    log: Callable[[str], None] = (lambda m: None) if args.json else (lambda m: print(m, flush=True))
    results = run_demo(size=args.size, seconds=args.seconds, seed=args.seed, log=log)
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
    if not _holds_store(args.directory):
        raise _no_store(args.directory)
    bar = ProgressBar("verify", enabled=None if not args.json else False)
    report = verify_directory(args.directory, progress=bar)
    bar.close()
    lines = [f"{c['file']}: {c['status']}" + (f" ({c['detail']})" if c.get("detail") else "")
             for c in report["files"]]
    lines.append(f"recovery would: {report['recovery']}")
    _print(args, report, "\n".join(lines))
    return 0 if report["ok"] else 1


def cmd_recover(args: argparse.Namespace) -> int:
    bar = ProgressBar("recover", enabled=False if args.json else None)
    try:
        ds = _open_store(args, progress=bar)
    finally:
        bar.close()  # ends the bar's line, also before an error's
    rep = ds.recovery
    ds.close()
    _print(args, {"recovery": rep}, str(rep))
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    ds = _open_store(args)
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
    from .replication import Primary
    ds = _open_store(args)
    try:
        primary = Primary(ds, host=args.host, port=args.port, secret=_secret(args))
    except BaseException:
        ds.close()
        raise
    print(json.dumps({"address": list(primary.address)}) if args.json
          else f"serving {args.directory} on {primary.address[0]}:{primary.address[1]}", flush=True)
    return _run_until_interrupted(lambda: primary.followers, [primary.close, ds.close], args)


def cmd_follow(args: argparse.Namespace) -> int:
    from .replication import FOLLOWER_STOPPED, Follower
    ds = _open_store(args, create=True)

    def not_reported_here(record: logging.LogRecord) -> bool:
        # This command reports the follower's failure itself, as its one error line, so the
        # library's warning of it is left out; one with a traceback (a bug in statecore)
        # still shows, since the error line alone would hide where it came from.
        return not getattr(record, FOLLOWER_STOPPED, False) or record.exc_info is not None

    library_log = logging.getLogger("statecore")
    if not args.debug:  # --debug shows every record
        # Before the follower starts: it can fail (a wrong secret) before Follower() returns.
        library_log.addFilter(not_reported_here)
    try:
        follower = Follower(ds, args.address, secret=_secret(args))
    except BaseException:
        library_log.removeFilter(not_reported_here)
        ds.close()
        raise

    def failure() -> Optional[str]:
        st = follower.status()
        if st["state"] != "failed":
            return None
        host, port = follower.address
        return f"follower of {_host_port(host, port)} stopped: {st['error']}"

    # The filter goes after follower.close(), which joins the thread that logs.
    return _run_until_interrupted(
        follower.status, [follower.close, ds.close,
                          lambda: library_log.removeFilter(not_reported_here)], args, failure)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # as _address_arg reads it


def _run_until_interrupted(status: Callable[[], Any], closers: List[Callable[[], None]],
                           args: argparse.Namespace,
                           failure: Optional[Callable[[], Optional[str]]] = None) -> int:
    """Run until Ctrl-C (exit 0), printing status() every --interval under -v; raise once
    failure() says why the work stopped for good (also at Ctrl-C), since waiting longer would
    only hide it."""
    try:
        next_report = time.monotonic() + args.interval
        while True:
            time.sleep(min(args.interval, 0.1))
            why = failure() if failure is not None else None
            if why is not None:
                raise errors.StateError(why)
            if args.verbose and time.monotonic() >= next_report:
                print(json.dumps(status(), default=_jsonable), flush=True)
                next_report = time.monotonic() + args.interval
    except KeyboardInterrupt:
        # A failure in the last moment before Ctrl-C is still reported: nothing else says it.
        why = failure() if failure is not None else None
        if why is not None:
            raise errors.StateError(why) from None
        return 0
    finally:
        for close in closers:
            close()


def cmd_bench(args: argparse.Namespace) -> int:
    from .compare import run_comparison
    return run_comparison(size=args.size, json_out=args.json, chart=args.chart)


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
    d.add_argument("--size", type=_size_arg, default="1G", help="state size (default 1G; e.g. 64M)")
    d.add_argument("--seconds", type=_positive_float_arg, default=5.0,
                   help="write-load phase length")
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
    s.add_argument("--port", type=_port_arg, default=0, help="0 (default): any free port")
    f = sub.add_parser("follow", help="keep a durable directory equal to a primary")
    f.add_argument("directory")
    f.add_argument("address", type=_address_arg, help="HOST:PORT of the primary")
    # Opening a directory whose MANIFEST is missing or damaged rebuilds it, which needs the
    # store's geometry; follow also creates a new store from it.
    for q, when in ((r, "to rebuild a damaged MANIFEST"), (c, "to rebuild a damaged MANIFEST"),
                    (s, "to rebuild a damaged MANIFEST"),
                    (f, "to create the store, or rebuild a damaged MANIFEST")):
        q.add_argument("--size", type=_size_arg, default=None,
                       help=f"state size, e.g. 64M ({when})")
        q.add_argument("--page-size", type=_size_arg, default=None,
                       help="page size (default 4096; must match the store's)")
    for q in (s, f):
        q.add_argument("--secret", help="shared secret (or env STATECORE_SECRET)")
        q.add_argument("--interval", type=_positive_float_arg, default=1.0,
                       help="seconds between status lines under -v (default 1)")
        q.add_argument("--verbose", "-v", action="store_true", help="print status every interval")
    s.set_defaults(func=cmd_serve)
    f.set_defaults(func=cmd_follow)

    b = sub.add_parser("bench", help="compare with fork(), LMDB, Redis and numpy on one machine")
    b.add_argument("--size", type=_size_arg, default="1G")
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
    except (errors.StateError, OSError, ValueError) as e:
        # Bad input, damaged files or the environment (a missing file, a port in use): one
        # line. Anything else is a bug in statecore and keeps its traceback.
        if args.debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"statecore: error: {message}", file=sys.stderr)
        return 1
