"""The `statecore` command: mistakes and damaged input end in one line and a nonzero exit,
nothing is created on disk before the arguments and the directory are checked, and a
follower that stops for good ends `statecore follow`, which says why once."""
from __future__ import annotations

import json
import logging
import os
import re
import struct
import subprocess
import sys

import pytest

import statecore as sc
from statecore import cli, errors
from statecore._args import MAX_PAGES
from statecore.progress import parse_size
from statecore.recovery import RecoveryReport

SIZE = 16 * 4096


def run(capsys, *argv: str):
    """cli.main(argv) -> (exit code, stdout, stderr); argparse's exits included."""
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if not ln.startswith(("WARNING ", "INFO "))]
    assert len(lines) == 1 and lines[0].startswith("statecore: error: "), err
    return lines[0]


def make_store(path, page_size: int = 4096, commits: int = 2) -> int:
    with sc.DurableStore(str(path), size=SIZE, page_size=page_size) as ds:
        for i in range(commits):
            ds.write(i * page_size, b"state %d" % i)
            ds.commit()
        return ds.committed_epoch


def listing(path) -> list:
    return sorted(os.listdir(path))


# ---- 1: errors are one line; bugs keep their traceback ---------------------------------------

@pytest.mark.parametrize("head,why", [(b"SCSTORE1\x01\x00", "store file: header truncated"),
                                      (b"SCCKPT01\x01", "checkpoint truncated"),
                                      (b"SCDELTA1", "delta truncated")])
def test_info_on_a_truncated_header_is_a_one_line_error(capsys, tmp_path, head, why):
    path = tmp_path / "t.sc"
    path.write_bytes(head)
    code, out, err = run(capsys, "info", str(path))
    assert code == 1 and out == ""
    assert f"{str(path)!r}: {why}" in one_line_error(err)


@pytest.mark.parametrize("exc", [errors.CorruptData("bad\nbytes"), ValueError("bad value"),
                                 FileNotFoundError(2, "No such file", "x")])
def test_library_and_environment_errors_are_one_line(capsys, monkeypatch, exc):
    def fail(args):
        raise exc
    monkeypatch.setattr(cli, "cmd_info", fail)
    code, _, err = run(capsys, "info", "x")
    assert code == 1
    one_line_error(err)
    with pytest.raises(type(exc)):  # --debug shows the traceback
        cli.main(["info", "x", "--debug"])


def test_a_bug_keeps_its_traceback(monkeypatch):
    def fail(args):
        raise TypeError("a bug")
    monkeypatch.setattr(cli, "cmd_info", fail)
    with pytest.raises(TypeError, match="a bug"):
        cli.main(["info", "x"])


def test_error_exit_status_through_python_m(tmp_path):
    path = tmp_path / "t.sc"
    path.write_bytes(b"SCSTORE1\x01\x00")
    proc = subprocess.run([sys.executable, "-m", "statecore", "info", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    one_line_error(proc.stderr)


# ---- 2: ports are checked by argparse ---------------------------------------------------------

@pytest.mark.parametrize("port", ["99999", "-5", "65536", "http"])
def test_serve_rejects_a_port_out_of_range(capsys, tmp_path, port):
    make_store(tmp_path / "ds")
    code, _, err = run(capsys, "serve", str(tmp_path / "ds"), "--port", port)
    assert code == 2 and f"invalid port '{port}'" in err and "Traceback" not in err


@pytest.mark.parametrize("address,why", [("localhost", "expected HOST:PORT"),
                                         ("localhost:99999", "invalid port"),
                                         ("localhost:0", "invalid port"),
                                         ("localhost:-1", "invalid port")])
def test_follow_rejects_a_bad_address_before_creating_anything(capsys, tmp_path, address, why):
    target = tmp_path / "fx"
    code, _, err = run(capsys, "follow", str(target), address, "--size", "64K")
    assert code == 2 and why in err
    assert not target.exists()


def test_follow_address_forms():
    assert cli._address_arg("example.org:7000") == ("example.org", 7000)
    assert cli._address_arg(":7000") == ("127.0.0.1", 7000)
    assert cli._address_arg("[::1]:7000") == ("::1", 7000)


# ---- 3: a failed follower ends `statecore follow` ---------------------------------------------

@pytest.mark.parametrize("extra,why", [(["--secret", "wrong"], "authentication"),
                                       (["--secret", "right", "--size", "128K"], "geometry")])
def test_follow_exits_1_once_the_follower_failed(tmp_path, extra, why):
    store = sc.Store(size=SIZE)
    primary = sc.Primary(store, secret="right")
    try:
        argv = [sys.executable, "-m", "statecore", "follow", str(tmp_path / "f"),
                f"127.0.0.1:{primary.address[1]}", "--interval", "0.1"]
        if "--size" not in extra:
            argv += ["--size", str(SIZE)]
        proc = subprocess.run(argv + extra, capture_output=True, text=True, timeout=60)
    finally:
        primary.close()
        store.close()
    assert proc.returncode == 1, proc.stderr
    # Said once: the command's error line, not also the library's warning of it.
    assert proc.stderr.splitlines() == [one_line_error(proc.stderr)], proc.stderr
    assert why in proc.stderr
    assert f"follower of 127.0.0.1:{primary.address[1]} stopped" in proc.stderr


@pytest.fixture
def primary_port():
    store = sc.Store(size=SIZE)
    primary = sc.Primary(store, secret="right")
    yield primary.address[1]
    primary.close()
    store.close()


def _follower_stopped_records(caplog) -> list:
    from statecore.replication import FOLLOWER_STOPPED
    return [r for r in caplog.records if getattr(r, FOLLOWER_STOPPED, False)]


def test_follow_leaves_out_only_the_record_it_reports(capsys, caplog, tmp_path, primary_port):
    library_log = logging.getLogger("statecore")
    filters = list(library_log.filters)
    code, _, err = run(capsys, "follow", str(tmp_path / "f"), f"127.0.0.1:{primary_port}",
                       "--size", str(SIZE), "--secret", "wrong", "--interval", "0.1")
    assert code == 1 and "authentication" in one_line_error(err)
    assert _follower_stopped_records(caplog) == []
    # Once the command is done, a library user in the same process sees the warning again.
    assert library_log.filters == filters
    with sc.Store(size=SIZE) as store, \
            sc.Follower(store, ("127.0.0.1", primary_port), secret="wrong") as follower:
        with pytest.raises((sc.PeerError, sc.AuthenticationError), match="authentication"):
            follower.wait_for(1, timeout=30)
    assert len(_follower_stopped_records(caplog)) == 1


def test_follow_keeps_the_traceback_of_a_bug(capsys, caplog, monkeypatch, tmp_path,
                                            primary_port):
    from statecore.replication import Follower

    def session(self):
        raise RuntimeError("a bug in the follower")
    monkeypatch.setattr(Follower, "_session", session)
    code, _, err = run(capsys, "follow", str(tmp_path / "f"), f"127.0.0.1:{primary_port}",
                       "--size", str(SIZE), "--interval", "0.1")
    assert code == 1 and "a bug in the follower" in one_line_error(err)
    [record] = _follower_stopped_records(caplog)
    assert record.exc_info is not None


# ---- 4: nothing is created for a directory that holds no store --------------------------------

@pytest.mark.parametrize("command", ["recover", "checkpoint", "serve", "verify"])
def test_commands_refuse_a_missing_directory_and_create_nothing(capsys, tmp_path, command):
    target = tmp_path / "nonexistent"
    code, _, err = run(capsys, command, str(target))
    assert code == 1 and "holds no durable store" in one_line_error(err)
    assert not target.exists()


@pytest.mark.parametrize("command", ["recover", "checkpoint", "serve", "verify"])
def test_commands_refuse_a_plain_directory_and_leave_no_lock(capsys, tmp_path, command):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("not a store")
    code, _, err = run(capsys, command, str(tmp_path / "plain"))
    assert code == 1 and "holds no durable store" in one_line_error(err)
    assert listing(tmp_path / "plain") == ["notes.txt"]


def test_follow_without_size_on_a_new_directory_says_which_flag(capsys, tmp_path):
    target = tmp_path / "fx"
    code, _, err = run(capsys, "follow", str(target), "127.0.0.1:9")
    assert code == 1 and "pass --size to create one" in one_line_error(err)
    assert not target.exists()


def test_commands_refuse_a_file_as_directory(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "recover", str(tmp_path / "file"))
    assert code == 1 and "Not a directory" in one_line_error(err)


def test_recover_and_checkpoint_an_existing_store(capsys, tmp_path):
    epoch = make_store(tmp_path / "ds")
    code, out, _ = run(capsys, "recover", str(tmp_path / "ds"))
    assert code == 0 and f"recovered epoch {epoch}" in out
    code, out, _ = run(capsys, "checkpoint", str(tmp_path / "ds"))
    assert code == 0 and "checkpoint at epoch" in out


# ---- 5: a damaged MANIFEST is rebuilt with the command's flags --------------------------------

def test_recover_rebuilds_a_damaged_manifest_with_size_and_page_size(capsys, tmp_path):
    ds = tmp_path / "ds"
    epoch = make_store(ds, page_size=1024)
    (ds / "MANIFEST").write_bytes(b"garbage")
    before = listing(ds)
    code, _, err = run(capsys, "recover", str(ds))
    line = one_line_error(err)
    assert code == 1 and "--size" in line and "--page-size" in line and "size=" not in line
    assert listing(ds) == before  # refused before the store was opened

    code, out, _ = run(capsys, "verify", str(ds))
    assert code == 1 and "size=" not in out and "statecore recover DIR --size" in out

    code, _, err = run(capsys, "recover", str(ds), "--size", "64K")  # wrong page size
    assert code == 1 and "--page-size must be the store's" in one_line_error(err)

    code, out, _ = run(capsys, "recover", str(ds), "--size", "64K", "--page-size", "1K")
    assert code == 0 and f"recovered epoch {epoch}" in out and "rebuilt" in out
    code, out, _ = run(capsys, "recover", str(ds))
    assert code == 0 and f"recovered epoch {epoch}" in out


def test_a_size_that_does_not_match_the_store_names_the_flags(capsys, tmp_path):
    make_store(tmp_path / "ds")
    code, _, err = run(capsys, "recover", str(tmp_path / "ds"), "--size", "128K")
    line = one_line_error(err)
    assert code == 1 and "--size and --page-size must match the store" in line


@pytest.mark.parametrize("argv,why", [
    (["--size", "4000"], "--size must be a positive multiple of the page size (4096) in "
                         "[4096, 17592186040320] (4294967295 pages, 16.0 TiB), got 4000"),
    (["--size", "64K", "--page-size", "3000"],
     "--page-size must be a power of two from 512 to 1048576, got 3000")])
def test_store_geometry_is_checked_in_flag_terms(capsys, tmp_path, argv, why):
    code, _, err = run(capsys, "follow", str(tmp_path / "fx"), "127.0.0.1:9", *argv)
    assert code == 1 and why in one_line_error(err)
    assert not (tmp_path / "fx").exists()


@pytest.mark.parametrize("size,page_size", [(4000, 4096), (SIZE, 3000), (SIZE, 256),
                                            (SIZE, 1 << 21), ((MAX_PAGES + 1) * 512, 512)])
def test_store_geometry_has_one_check(capsys, tmp_path, size, page_size):
    """The Python API, the manifest and the command refuse the same geometries with the
    same words, the command in its flags' names."""
    from statecore.manifest import Manifest
    with pytest.raises(ValueError) as refused:
        sc.Store(size=size, page_size=page_size)
    library = str(refused.value)
    manifest = Manifest(size=size, page_size=page_size, uuid="ab" * 16, segments=[0])
    with pytest.raises(sc.CorruptData, match="manifest fields invalid") as corrupt:
        Manifest.decode(manifest.encode())
    assert library in str(corrupt.value)
    code, _, err = run(capsys, "follow", str(tmp_path / "fx"), "127.0.0.1:9",
                       "--size", str(size), "--page-size", str(page_size))
    flags = re.sub(r"^(page_)?size", lambda m: "--page-size" if m[1] else "--size", library)
    assert code == 1 and flags.replace("of page_size (", "of the page size (") in \
        one_line_error(err)


# ---- 6: sizes ---------------------------------------------------------------------------------

def test_parse_size():
    assert parse_size("1G") == 1 << 30
    assert parse_size("64M") == parse_size("64MiB") == parse_size("64 mb") == 64 << 20
    assert parse_size("4096") == parse_size("4K") == 4096
    assert parse_size("1.5GiB") == 3 << 29
    for bad in ["abc", "-1G", "0", "0K", "", "1e3", "M", "64X"]:
        with pytest.raises(ValueError, match=r"invalid size .* \(e\.g\. 64M, 1G\)"):
            parse_size(bad)


@pytest.mark.parametrize("value", ["abc", "-1G", "0"])
def test_a_bad_size_is_reported_by_argparse(capsys, value):
    code, out, err = run(capsys, "demo", f"--size={value}")  # never reaches the demo
    assert code == 2 and out == ""
    assert f"argument --size: invalid size '{value}' (e.g. 64M, 1G)" in err


# ---- 7: the demo's recovered epoch is the one recovery reported -------------------------------

def test_demo_records_the_recovered_epoch_before_the_new_primary_commits(tmp_path):
    from statecore.demo import _restart_primary
    epoch = make_store(tmp_path / "ds", commits=3)
    results: dict = {}
    logged: list = []
    ds, primary = _restart_primary(str(tmp_path / "ds"), 0, epoch, results, logged.append)
    try:
        assert ds.committed_epoch > epoch  # the new Primary committed again
        assert results["recovered_epoch"] == epoch == results["recovery"].committed_epoch
        assert f"recovered epoch {epoch} " in logged[0]
    finally:
        primary.close()
        ds.close()


# ---- 8: only a journal segment's name makes an empty file one ---------------------------------

@pytest.mark.parametrize("name", ["empty.bin", "journal.txt"])
def test_info_on_an_empty_file_is_an_error(capsys, tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    code, _, err = run(capsys, "info", str(tmp_path / name))
    assert code == 1 and "is empty" in one_line_error(err)


def test_info_on_an_empty_journal_segment(capsys, tmp_path):
    path = tmp_path / "journal-00000000000000000003.log"
    path.write_bytes(b"")
    code, out, _ = run(capsys, "info", str(path))
    assert code == 0 and "kind: journal segment" in out and "records: 0" in out


@pytest.mark.parametrize("device", ["/dev/null", "/dev/urandom"])
def test_info_on_a_device_is_an_error(capsys, device):
    if not os.path.exists(device):
        pytest.skip(f"no {device}")
    code, _, err = run(capsys, "info", device)
    assert code == 1 and "not a regular file" in one_line_error(err)


def _delta_file(tmp_path, compression: str):
    with sc.Store(size=SIZE) as store:
        store.write(0, b"one")
        with store.snapshot() as first:
            store.write(3 * 4096, b"two")
            delta = store.delta(since=first)
            path = tmp_path / f"{compression}.delta"
            path.write_bytes(delta.encode(compression))
            return path, delta


def test_info_reads_checkpoint_and_delta_headers_through_the_core(capsys, tmp_path):
    ds = tmp_path / "ds"
    make_store(ds)
    with sc.DurableStore(str(ds)) as store:
        epoch = store.checkpoint().result()
    ckpt = ds / f"ckpt-{epoch:020d}.sc"
    code, out, _ = run(capsys, "info", str(ckpt), "--json")
    info = json.loads(out)
    assert code == 0 and info["kind"] == "checkpoint" and info["epoch"] == epoch
    assert (info["size"], info["page_size"], info["file_bytes"]) == \
        (SIZE, 4096, ckpt.stat().st_size)
    for compression in ("none", "lz4"):
        path, delta = _delta_file(tmp_path, compression)
        code, out, _ = run(capsys, "info", str(path), "--json")
        info = json.loads(out)
        assert code == 0 and info["kind"] == "delta" and info["compression"] == compression
        assert (info["base_epoch"], info["epoch"], info["pages"], info["store_uuid"]) == \
            (delta.base_epoch, delta.target_epoch, delta.n_pages, delta.store_uuid.hex())
        assert info["file_bytes"] == path.stat().st_size


@pytest.mark.parametrize("offset,why", [(30, "header checksum mismatch"),
                                        (-1, "structure invalid")])
def test_info_on_a_damaged_delta_names_the_file(capsys, tmp_path, offset, why):
    path, _ = _delta_file(tmp_path, "none")
    data = bytearray(path.read_bytes())
    if offset < 0:
        del data[offset:]  # a payload cut short
    else:
        data[offset] ^= 1
    path.write_bytes(data)
    code, out, err = run(capsys, "info", str(path))
    assert code == 1 and out == ""
    assert f"{str(path)!r}: delta {why}" in one_line_error(err)


@pytest.mark.parametrize("offset,why", [(16, "header damaged (checksum or geometry)"),
                                        (8, "store format version 2 is newer")])
def test_info_on_a_damaged_store_file_header_names_the_file(capsys, tmp_path, offset, why):
    # The core checks a store file's header for `info` without opening the store.
    path = tmp_path / "s.sc"
    sc.Store(str(path), size=SIZE).close()
    data = bytearray(path.read_bytes())
    data[offset] ^= 3  # in size (the checksum no longer matches), or format_version 1 -> 2
    path.write_bytes(data)
    code, out, err = run(capsys, "info", str(path))
    assert code == 1 and out == ""
    assert f"{str(path)!r}: store file: {why}" in one_line_error(err)


def test_info_on_a_newer_format_says_so(capsys, tmp_path):
    path, _ = _delta_file(tmp_path, "none")
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 8, 99)  # format_version, then a valid header checksum
    struct.pack_into("<Q", data, 120, sc.page_checksum(bytes(data[:120])))
    path.write_bytes(data)
    code, _, err = run(capsys, "info", str(path))
    assert code == 1 and "format version is newer" in one_line_error(err)


def test_info_on_a_directory_that_holds_no_store(capsys, tmp_path):
    code, _, err = run(capsys, "info", str(tmp_path))
    assert code == 1 and "not a durable store directory" in one_line_error(err)


# ---- 9: recovery report sizes -----------------------------------------------------------------

def test_recovery_report_shows_small_sizes():
    text = str(RecoveryReport(checkpoint_epoch=4, checkpoint_bytes=4096, journal_bytes=1024,
                              committed_epoch=5, deltas_replayed=1))
    assert "(5.0 KiB)" in text and "MiB" not in text
    assert "(100 B)" in str(RecoveryReport(journal_bytes=100))
