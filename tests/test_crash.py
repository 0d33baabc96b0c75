"""Crash at any instant (invariant 7): a forked child writes, commits and checkpoints in a
loop and is killed with SIGKILL at random moments -- at arbitrary times, right after a
commit returned, and in the middle of a checkpoint. After each kill the parent reopens the
directory and checks that the recovered state is exactly the state of a committed epoch
(its full-state hash equals the one the child announced for that epoch before committing
it) and that this epoch is at or after the last commit the child reported done.

The child keeps a pure-Python model (a bytearray) of the store; the announced hashes are
the model's, so the check compares the store against the model, not against itself."""
from __future__ import annotations

import multiprocessing
import os
import random
import select
import signal
import time
import traceback

import pytest

import statecore as sc
from statecore.journal import segment_name
from statecore.manifest import checkpoint_name

from _durable_util import Model, random_writes, state_hash

KILLS_PER_CONFIG = 60
CONFIGS = [  # (store size, page size)
    (512 * 1024, 4096),
    (256 * 1024, 512),
]


def _send(fd, line):
    os.write(fd, (line + "\n").encode())


def _child(directory, size, page_size, seed, wfd):
    """Runs in the forked child until killed. Lines (each one atomic write to the pipe):
    open E H | pre E H (about to commit epoch E, state hash H) | ckpt E (checkpoint()
    starts) | done E (the commit of E returned) | ckptdone E | error ..."""
    try:
        rng = random.Random(seed)
        ds = sc.DurableStore(directory, size=size, page_size=page_size, keep_checkpoints=2)
        model = Model(size, page_size, ds.read(0, size))
        _send(wfd, f"open {ds.epoch - 1} {model.hash()}")
        pending = None
        while True:
            random_writes(rng, ds, model, rng.randint(1, 6))
            e = ds.epoch
            _send(wfd, f"pre {e} {model.hash()}")
            if rng.random() < 0.15 and (pending is None or pending.done()):
                _send(wfd, f"ckpt {e}")
                pending = ds.checkpoint()
                _send(wfd, f"done {e}")
                if rng.random() < 0.5:
                    got = pending.result()
                    if got != e:
                        _send(wfd, f"error checkpoint future gave {got}, expected {e}")
                        os._exit(3)
                    _send(wfd, f"ckptdone {e}")
            else:
                got = ds.commit()
                if got != e or ds.epoch != e + 1:
                    _send(wfd, f"error commit returned {got} (epoch now {ds.epoch}), "
                               f"expected {e}")
                    os._exit(3)
                _send(wfd, f"done {e}")
    except BaseException:
        msg = traceback.format_exc().replace("\n", " | ")
        try:
            _send(wfd, f"error {msg[-3000:]}")
        finally:
            os._exit(2)


class _Lines:
    def __init__(self, fd):
        self.fd, self.buf, self.eof = fd, b"", False

    def read(self, timeout):
        """Lines available within `timeout` seconds (at least one unless EOF/timeout)."""
        if self.eof:
            return []
        r, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not r:
            return []
        chunk = os.read(self.fd, 65536)
        if not chunk:
            self.eof = True
            return []
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [ln.decode() for ln in lines]


def _run_and_kill(ctx, directory, size, page_size, seed, mode, rng, announced):
    """One child lifetime. Returns (last done epoch, open epoch/hash, mode detail)."""
    rfd, wfd = os.pipe()
    p = ctx.Process(target=_child, args=(directory, size, page_size, seed, wfd), daemon=True)
    p.start()
    os.close(wfd)
    lines = _Lines(rfd)
    last_done = None
    opened = None
    seen = []

    def take(batch):
        nonlocal last_done, opened
        for ln in batch:
            kind, _, rest = ln.partition(" ")
            seen.append(kind)
            if kind == "error":
                raise AssertionError(f"child failed: {rest}")
            if kind == "open":
                e, h = rest.split()
                opened = (int(e), h)
            elif kind == "pre":
                e, h = rest.split()
                announced[int(e)] = h
            elif kind == "done":
                last_done = int(rest)

    try:
        start = time.monotonic()
        if mode == "time":
            deadline = start + rng.uniform(0.0, 0.12)
            while time.monotonic() < deadline and not lines.eof:
                take(lines.read(deadline - time.monotonic()))
        else:
            # Kill right after the n-th returned commit, or inside a checkpoint: during its
            # commit and journal rotation, or (after its 'done') during the background save,
            # the manifest update and the trimming.
            if mode == "done":
                triggers = ["done"] * rng.randint(1, 12)
            else:
                triggers = ["ckpt"] + (["done"] if rng.random() < 0.6 else [])
            while triggers and not lines.eof and time.monotonic() - start < 20:
                batch = lines.read(1.0)
                take(batch)  # every line read was written before the kill
                for ln in batch:
                    if triggers and ln.split(" ", 1)[0] == triggers[0]:
                        triggers.pop(0)
            if triggers:
                raise AssertionError(f"child never reached '{triggers[0]}' ({mode}): "
                                     f"{seen[-5:]}")
            if mode == "ckpt":
                time.sleep(rng.uniform(0.0, 0.004))
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        assert p.exitcode == -signal.SIGKILL, f"child exited by itself ({p.exitcode}): {seen[-5:]}"
        # Lines written before the kill are facts too (a 'done' there was a returned commit).
        while not lines.eof:
            take(lines.read(5.0))
    finally:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
            p.join(30)
        os.close(rfd)
    return last_done, opened


@pytest.mark.parametrize("size,page_size", CONFIGS)
def test_kill_9_at_random_moments_recovers_a_committed_state(tmp_path, size, page_size):
    ctx = multiprocessing.get_context("fork")
    directory = str(tmp_path / "d")
    rng = random.Random(f"crash-{size}-{page_size}")
    announced = {0: Model(size, page_size).hash()}  # epoch -> model hash announced for it
    verified = 0  # the epoch whose state the parent last verified
    must_reach = 0  # the newest epoch whose commit returned in some child
    modes = {"time": 0, "done": 0, "ckpt": 0}
    inside_checkpoint = 0  # kills that left a checkpoint's temporary or trimmed files
    t0 = time.monotonic()
    for kill in range(KILLS_PER_CONFIG):
        mode = rng.choice(["time", "time", "done", "ckpt"])
        modes[mode] += 1
        last_done, opened = _run_and_kill(ctx, directory, size, page_size,
                                          rng.getrandbits(64), mode, rng, announced)
        if opened is not None:
            # The child recovered what the parent verified last time (the parent's
            # open and close of an unchanged store commit nothing).
            assert opened == (verified, announced[verified]), (kill, opened, verified)
        if last_done is not None:
            must_reach = max(must_reach, last_done)

        with sc.DurableStore(directory, size=size, page_size=page_size) as ds:
            r = ds.recovery
            got = r.committed_epoch
            assert ds.epoch == got + 1
            assert got >= must_reach, (
                f"kill {kill} ({mode}): recovered epoch {got}, but the commit of epoch "
                f"{must_reach} had returned")
            assert got in announced, f"kill {kill}: recovered epoch {got} was never committed"
            h = state_hash(ds)
            assert h == announced[got], (
                f"kill {kill} ({mode}): state recovered at epoch {got} is not the state "
                f"committed at that epoch (a mix or a lost write)")
            # A kill (not a power loss) can only tear the journal's tail; checkpoints and
            # manifests are replaced atomically.
            for x in r.discarded:
                assert x.what.startswith("journal-") and "torn or corrupt tail" in x.reason, (
                    f"kill {kill} ({mode}): unexpected damage: {x}")
            # Nothing a crash left behind outlives the reopen: temporary checkpoints,
            # checkpoints never listed, segments trimmed but not yet deleted. (Each may be
            # as large as the state: over many crashes they would fill the disk.)
            listed = ({"LOCK", "MANIFEST"} | {checkpoint_name(c) for c in ds.manifest.checkpoints}
                      | {segment_name(s) for s in ds.manifest.segments})
            inside_checkpoint += any(x.startswith("removed") for x in r.repairs)
            extra = sorted(set(os.listdir(directory)) - listed)
            assert extra == [], f"kill {kill} ({mode}): files left behind: {extra}"
        verified = got
        must_reach = got
        # Announcements past the recovered epoch were never committed: forget them, so a
        # later recovery cannot match a stale hash.
        for e in [e for e in announced if e > got]:
            del announced[e]
    elapsed = time.monotonic() - t0
    assert verified > KILLS_PER_CONFIG, "children made too little progress to test anything"
    assert min(modes.values()) > 0, modes
    assert inside_checkpoint > 0, "no kill landed inside a checkpoint"
    assert elapsed < 60, f"crash loop took {elapsed:.1f} s"
