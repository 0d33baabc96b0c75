"""The Redis peer: a private redis-server, spoken to in RESP over a plain socket (no client
library needed), loading the pages as values, BGSAVE, and a pipelined SETRANGE writer."""
from __future__ import annotations

import os
import socket
import subprocess
import time
from typing import Any, Dict, Optional

import numpy as np

from .common import MiB, PAGE, SEED, now
from .writer import WriterThread


class RedisError(RuntimeError):
    pass


def redis_timeout(size: int) -> float:
    """Seconds allowed for a BGSAVE or a restart of `size` bytes of values."""
    return max(120.0, size / (20 * MiB))


def redis_version(binary: str) -> str:
    v = subprocess.run([binary, "--version"], capture_output=True, text=True,
                       timeout=10).stdout.split()
    return "Redis " + next((x.split("=", 1)[1] for x in v if x.startswith("v=")), "?")


def redis_key(p: int) -> bytes:
    return b"p:%08d" % p


# ---- RESP ------------------------------------------------------------------------------------

def resp(*args: Any) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = b"%d" % a
        n = a.nbytes if isinstance(a, memoryview) else len(a)
        out += [b"$%d\r\n" % n, a, b"\r\n"]
    return b"".join(out)


def _read_reply(f: Any) -> Any:
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RedisError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(f) for _ in range(n)]
    raise RedisError(f"unexpected reply {line[:60]!r}")


class Conn:
    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = self.sock.makefile("rb", buffering=1 << 20)

    def call(self, *args: Any) -> Any:
        self.sock.sendall(resp(*args))
        return _read_reply(self.rfile)

    def pipeline(self, blob: bytes, n: int, reply: bytes) -> None:
        """Send n commands at once; each must answer exactly `reply`."""
        self.sock.sendall(blob)
        got = self.rfile.read(len(reply) * n)
        if got != reply * n:
            bad = next((got[i:i + 80] for i in range(0, len(got), len(reply))
                        if got[i:i + len(reply)] != reply), got[:80])
            raise RedisError(f"unexpected pipelined reply {bad!r}")

    def info(self, section: str) -> Dict[str, str]:
        text = self.call("INFO", section).decode()
        return dict(line.split(":", 1) for line in text.splitlines()
                    if ":" in line and not line.startswith("#"))

    def close(self) -> None:
        for c in (self.rfile, self.sock):
            try:
                c.close()
            except OSError:
                pass


# ---- the server ------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Exited(Exception):
    pass


class RedisServer:
    """A private redis-server on 127.0.0.1 with persistence off except explicit BGSAVE."""

    def __init__(self, binary: str, directory: str) -> None:
        self.binary, self.dir = binary, directory
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        self.conn: Optional[Conn] = None

    def start(self, timeout: float) -> float:
        """Start (loading dump.rdb if present); seconds until PING answers and loading:0."""
        for attempt in range(3):
            self.port = _free_port()
            args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                    "--protected-mode", "yes", "--save", "", "--appendonly", "no",
                    "--dir", self.dir, "--dbfilename", "dump.rdb", "--daemonize", "no",
                    "--hz", "100", "--logfile", os.path.join(self.dir, "redis.log")]
            t0 = now()
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                self._wait_ready(t0 + timeout)
                return now() - t0
            except _Exited:
                if attempt == 2:
                    raise RuntimeError(f"redis-server exited: {self._log_tail()}") from None
        raise AssertionError("unreachable")

    def _wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                raise _Exited()
            try:
                if self.conn is None:
                    self.conn = Conn(self.port)
                if self.conn.call("PING") == "PONG" and \
                        self.conn.info("persistence").get("loading") == "0":
                    return
            except RedisError as e:
                if not str(e).startswith("LOADING"):
                    raise
            except OSError:
                if self.conn is not None:
                    self.conn.close()
                    self.conn = None
            if now() > deadline:
                raise TimeoutError("redis-server did not become ready in time")
            time.sleep(0.002)

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log")) as f:
                return " | ".join(f.read().strip().splitlines()[-3:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SHUTDOWN NOSAVE, or kill; idempotent."""
        if self.conn is not None:
            try:
                self.conn.call("SHUTDOWN", "NOSAVE")
            except (OSError, RedisError):
                pass
            self.conn.close()
            self.conn = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


# ---- what the backup section asks of it ------------------------------------------------------

def load_values(conn: Conn, view: memoryview, n_pages: int) -> None:
    """SET every page as one value, pipelined 1024 at a time."""
    per = 1024
    for start in range(0, n_pages, per):
        stop = min(start + per, n_pages)
        blob = b"".join(resp("SET", redis_key(p), view[p * PAGE:(p + 1) * PAGE])
                        for p in range(start, stop))
        conn.pipeline(blob, stop - start, b"+OK\r\n")


def bgsave(conn: Conn, timeout: float) -> Dict[str, Any]:
    """BGSAVE and wait for it to finish: seconds, the fork's pause and the COW bytes."""
    deadline = now() + timeout
    t0 = now()
    reply = conn.call("BGSAVE")
    if "started" not in reply:
        raise RedisError(f"BGSAVE: {reply}")
    while True:
        p = conn.info("persistence")
        if p.get("rdb_bgsave_in_progress") == "0":
            break
        if now() > deadline:
            raise TimeoutError("BGSAVE did not finish in time")
        time.sleep(0.003)
    secs = now() - t0
    if p.get("rdb_last_bgsave_status") != "ok":
        raise RedisError(f"BGSAVE failed: {p.get('rdb_last_bgsave_status')}")
    fork_us = int(conn.info("stats")["latest_fork_usec"])
    return {"bgsave_s": secs, "fork_s": fork_us / 1e6,
            "cow_bytes": int(p.get("rdb_last_cow_size", 0))}


class RedisWriter(WriterThread):
    """Random 8-byte SETRANGE writes into the 4 KiB values, pipelined in batches."""

    def __init__(self, port: int, n_pages: int, batch: int = 2048, batches: int = 64) -> None:
        super().__init__("statecore-bench-redis-writer")
        rng = np.random.default_rng(SEED + 2)
        keys = rng.integers(0, n_pages, size=batch * batches)
        offs = rng.integers(0, PAGE // 8, size=batch * batches) * 8
        self.blobs = [b"".join(resp("SETRANGE", redis_key(int(k)), int(o), b"ABCDEFGH")
                               for k, o in zip(keys[b * batch:(b + 1) * batch],
                                               offs[b * batch:(b + 1) * batch]))
                      for b in range(batches)]
        self.batch = batch
        self.reply = b":%d\r\n" % PAGE
        self.port = port

    def write_until_stopped(self) -> None:
        conn = Conn(self.port)
        try:
            i = 0
            while not self.stop.is_set():
                conn.pipeline(self.blobs[i % len(self.blobs)], self.batch, self.reply)
                self.done += self.batch
                i += 1
        finally:
            conn.close()
