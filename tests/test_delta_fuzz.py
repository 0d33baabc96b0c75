"""Fuzzing the decoders that take bytes from outside: sc.Delta.decode, store.apply and
sc.replay of encoded deltas, and sc.Store.load of checkpoint files.

Every malformed input must raise the documented exception (sc.CorruptDelta /
sc.CorruptCheckpoint, or sc.UnsupportedFormat for a newer format version), never crash,
and leave the target store exactly as it was: bytes, epoch and apply counters.

Mutations that keep a valid header or index checksum recompute it (`reseal`), so the
deeper checks (sizes, page ids, versions, chunk tables, page checksums) are reached.
Bounded and seeded: a few thousand cases in a few seconds.
"""
from __future__ import annotations

import random
import struct
from typing import Callable, Iterator, List, Tuple

import lz4.block
import mmh3
import numpy as np
import pytest

import statecore as sc
import statecore.delta as delta_module

PS = 512
N_PAGES = 48
SIZE = PS * N_PAGES
HEADER = 128
LZ4_CHUNK = 4 * PS  # small chunks, so a small delta has a table of several

OFF_VERSION, OFF_KIND, OFF_COMPRESSION, OFF_PAGE_SIZE = 8, 10, 12, 16
OFF_STORE_PAGES, OFF_BASE, OFF_TARGET, OFF_N_PAGES = 24, 32, 40, 48
OFF_SCHEMA, OFF_PAYLOAD_BYTES, OFF_UUID, OFF_INDEX_SUM, OFF_HEADER_SUM = 56, 64, 72, 88, 120

U64_MAX = (1 << 64) - 1

# A decoder fed hostile bytes must not even warn (an overflowing cast is a missed check).
pytestmark = pytest.mark.filterwarnings("error")


def murmur(data) -> int:
    return mmh3.hash64(bytes(data), signed=False)[0]


def get_u64(buf, off: int) -> int:
    return struct.unpack_from("<Q", buf, off)[0]


def reseal(buf: bytearray, *, index: bool = False) -> bytearray:
    """Recompute the index checksum (optionally) and the header checksum."""
    if index:
        n = get_u64(buf, OFF_N_PAGES)
        struct.pack_into("<Q", buf, OFF_INDEX_SUM, murmur(buf[HEADER:HEADER + 24 * n]))
    struct.pack_into("<Q", buf, OFF_HEADER_SUM, murmur(buf[:OFF_HEADER_SUM]))
    return buf


def with_field(blob: bytes, off: int, fmt: str, value: int, *, seal: bool = True) -> bytes:
    buf = bytearray(blob)
    struct.pack_into(fmt, buf, off, value)
    return bytes(reseal(buf) if seal else buf)


def flip(blob: bytes, bit: int) -> bytes:
    buf = bytearray(blob)
    buf[bit // 8] ^= 1 << (bit % 8)
    return bytes(buf)


# ---- fixtures: a primary with two snapshots, a target replica at the first -------------------

class Fixture:
    def __init__(self) -> None:
        self.primary = sc.Store(size=SIZE, page_size=PS)
        rng = np.random.default_rng(42)
        random_pages = rng.integers(0, 256, 12 * PS, dtype=np.uint8).tobytes()
        self.primary.write_pages(np.arange(0, 24, 2), random_pages)
        self.primary.write(30 * PS, b"compressible" * 200)
        self.a = self.primary.snapshot()
        patterned = np.arange(1, 40, 3)  # compressible, and no two pages alike
        self.primary.write_pages(patterned, b"".join(bytes([p]) * 256 + bytes(range(256))
                                                     for p in patterned.tolist()))
        self.primary.write_pages([4, 47], rng.integers(0, 256, 2 * PS, dtype=np.uint8))
        self.b = self.primary.snapshot()
        self.delta = self.primary.delta(self.a, self.b)
        self.n = self.delta.n_pages
        self.plain = bytes(self.delta.encode())
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(delta_module, "LZ4_CHUNK_BYTES", LZ4_CHUNK)
            self.packed = bytes(self.delta.encode("lz4"))
        self.payload_offset = HEADER + 24 * self.n
        chunk, count = struct.unpack_from("<QQ", self.packed, self.payload_offset)
        assert (chunk, count) == (LZ4_CHUNK, -(-self.n * PS // LZ4_CHUNK)) and count >= 4
        self.chunk_sizes = list(struct.unpack_from(f"<{count}Q", self.packed,
                                                   self.payload_offset + 16))
        self.target = sc.Store(size=SIZE, page_size=PS)
        self.target.apply(self.primary.delta(0, self.a))
        self.target_state = self.fingerprint()

    def fingerprint(self) -> Tuple[bytes, int, int, int]:
        stats = self.target.stats()
        return (self.target.read(0, SIZE), self.target.epoch, stats["deltas_applied"],
                stats["pages_applied"])

    def close(self) -> None:
        self.a.release()
        self.b.release()
        self.primary.close()
        self.target.close()


@pytest.fixture(scope="module")
def fx():
    f = Fixture()
    yield f
    f.close()


def rejected(fx: Fixture, blob, what: str, exc=sc.CorruptDelta, *,
             not_in_message: str = "") -> None:
    """decode, apply and replay must all raise `exc`, with a message that (for cases built
    to pass the header checksum) names a deeper check, and the target must be unchanged."""
    calls: List[Tuple[str, Callable]] = [
        ("decode", lambda: sc.Delta.decode(blob)),
        ("apply", lambda: fx.target.apply(blob)),
        ("replay", lambda: sc.replay(fx.target, [blob])),
    ]
    for name, call in calls:
        try:
            call()
        except exc as e:
            # (UnsupportedFormat and CorruptDelta are siblings: catching one is not the other.)
            assert isinstance(e, sc.StateError)
            assert str(e), f"{what}: {name} raised {type(e).__name__} without a message"
            if not_in_message:
                assert not_in_message not in str(e), (
                    f"{what}: {name} stopped at the {not_in_message!r} check: {e}")
        except Exception as e:  # noqa: BLE001 - report the wrong exception with the case
            raise AssertionError(f"{what}: {name} raised {e!r}, expected {exc.__name__}") from e
        else:
            raise AssertionError(f"{what}: {name} accepted a malformed delta")
    assert fx.fingerprint() == fx.target_state, f"{what}: the target store changed"


def test_fixture_blobs_are_valid(fx):
    """The fuzz baseline: both encodings decode to the delta and apply on a scratch copy."""
    for blob in (fx.plain, fx.packed):
        d = sc.Delta.decode(blob)
        assert d.page_ids.tolist() == fx.delta.page_ids.tolist()
        assert bytes(d.payload) == bytes(fx.delta.payload)
        with sc.Store(size=SIZE, page_size=PS) as scratch:
            scratch.apply(fx.primary.delta(0, fx.a))
            assert scratch.apply(blob) == fx.n
            assert scratch.read(0, SIZE) == fx.b.read(0, SIZE)
    # reseal() itself must be right, or every "deeper check" case below proves nothing.
    for blob in (fx.plain, fx.packed):
        assert sc.Delta.decode(bytes(reseal(bytearray(blob), index=True))).n_pages == fx.n
        changed = sc.Delta.decode(with_field(blob, OFF_SCHEMA, "<Q", 99))
        assert changed.schema_version == 99
    assert fx.fingerprint() == fx.target_state


# ---- truncation and extension ---------------------------------------------------------------

def boundaries(fx: Fixture, blob: bytes) -> Iterator[int]:
    n, po = fx.n, fx.payload_offset
    fields = [0, 8, 10, 12, 14, 16, 20, 24, 32, 40, 48, 56, 64, 72, 88, 96, 120, 128]
    marks = fields + [HEADER + 8 * n, HEADER + 16 * n, po]
    if blob is fx.plain:
        marks += [po + i * PS for i in range(n + 1)]
    else:
        table_end = po + 16 + 8 * len(fx.chunk_sizes)
        marks += [po + 8, po + 16, table_end]
        marks += [table_end + s for s in np.cumsum(fx.chunk_sizes).tolist()]
    for m in marks:
        for k in (m - 1, m, m + 1):
            if 0 <= k < len(blob):
                yield k


@pytest.mark.parametrize("which", ["plain", "packed"])
def test_truncation_at_every_boundary_and_random_cuts(fx, which):
    blob = getattr(fx, which)
    rng = random.Random(f"truncate-{which}")
    cuts = set(boundaries(fx, blob)) | {rng.randrange(len(blob)) for _ in range(150)}
    assert len(cuts) > 100
    for cut in sorted(cuts):
        rejected(fx, blob[:cut], f"{which} cut to {cut} of {len(blob)} bytes")


@pytest.mark.parametrize("which", ["plain", "packed"])
def test_trailing_bytes(fx, which):
    blob = getattr(fx, which)
    for extra in (b"\0", b"\0" * 8, b"\0" * PS, b"garbage"):
        rejected(fx, blob + extra, f"{which} + {len(extra)} trailing bytes")


# ---- bit flips -----------------------------------------------------------------------------

def test_every_header_bit_flip(fx):
    for blob_name in ("plain", "packed"):
        blob = getattr(fx, blob_name)
        for bit in range(HEADER * 8):
            rejected(fx, flip(blob, bit), f"{blob_name}: header bit {bit} flipped")


def test_index_bit_flips(fx):
    rng = random.Random("index")
    index_bits = 24 * fx.n * 8
    bits = set(range(0, index_bits, 61)) | {rng.randrange(index_bits) for _ in range(150)}
    for bit in sorted(bits):
        for blob_name in ("plain", "packed"):
            rejected(fx, flip(getattr(fx, blob_name), HEADER * 8 + bit),
                     f"{blob_name}: index bit {bit} flipped")


def test_plain_payload_bit_flips(fx):
    rng = random.Random("payload")
    start = fx.payload_offset * 8
    bits = {start + rng.randrange(fx.n * PS * 8) for _ in range(250)}
    bits |= {start + i * PS * 8 for i in range(fx.n)} | {len(fx.plain) * 8 - 1}
    for bit in sorted(bits):
        rejected(fx, flip(fx.plain, bit), f"plain: payload bit {bit} flipped")


def test_lz4_chunk_table_bit_flips(fx):
    start = fx.payload_offset * 8
    table_bits = (16 + 8 * len(fx.chunk_sizes)) * 8
    for bit in range(table_bits):
        rejected(fx, flip(fx.packed, start + bit), f"lz4 table bit {bit} flipped")


def test_lz4_compressed_bit_flips(fx):
    """A flip inside compressed data either fails to decompress, fails a page checksum, or
    (a changed match offset inside a run of equal bytes) decompresses to the very same
    pages. What decodes must be exactly the original delta."""
    rng = random.Random("lz4 data")
    start = (fx.payload_offset + 16 + 8 * len(fx.chunk_sizes)) * 8
    bits = {rng.randrange(start, len(fx.packed) * 8) for _ in range(300)}
    rejected_count = 0
    for bit in sorted(bits):
        blob = flip(fx.packed, bit)
        try:
            d = sc.Delta.decode(blob)
        except sc.CorruptDelta:
            rejected(fx, blob, f"lz4 data bit {bit} flipped")
            rejected_count += 1
        else:
            assert bytes(d.payload) == bytes(fx.delta.payload), f"lz4 bit {bit}: wrong pages"
            assert d.page_ids.tolist() == fx.delta.page_ids.tolist()
    assert rejected_count > len(bits) * 0.8


def mutate(rng: random.Random, blob: bytes) -> bytes:
    """One to four random edits: bit flips, byte and word overwrites, inserts, deletes."""
    buf = bytearray(blob)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        pos = rng.randrange(len(buf))
        if kind == 0:
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:
            buf[pos] = rng.randrange(256)
        elif kind == 2:
            pos -= pos % 8
            buf[pos:pos + 8] = rng.choice([0, 1, U64_MAX, 1 << 63, rng.getrandbits(64)]) \
                .to_bytes(8, "little")[:len(buf[pos:pos + 8])]
        elif kind == 3:
            buf[pos:pos] = rng.randbytes(rng.choice([1, 8, 24, PS]))
        elif kind == 4:
            del buf[pos:pos + rng.choice([1, 8, 24, PS])]
        else:
            end = min(len(buf), pos + rng.randrange(1, 64))
            buf[pos:pos] = buf[pos:end]
    return bytes(buf)


def test_random_mutations(fx):
    """Unsealed random edits anywhere, passed as bytes, bytearray and misaligned views."""
    rng = random.Random("mutations")
    for i in range(600):
        which = "plain" if i % 2 else "packed"
        original = getattr(fx, which)
        blob = mutate(rng, original)
        if blob == original:
            continue
        form = i % 3
        arg = blob if form == 0 else bytearray(blob) if form == 1 else memoryview(b"\0" + blob)[1:]
        what = f"{which} mutation #{i} ({['bytes', 'bytearray', 'misaligned view'][form]})"
        if which == "packed" and len(blob) == len(original):
            try:
                d = sc.Delta.decode(arg)
            except sc.CorruptDelta:
                pass
            else:  # only edits inside compressed runs can leave the decoded pages intact
                assert bytes(d.payload) == bytes(fx.delta.payload), what
                assert d.page_ids.tolist() == fx.delta.page_ids.tolist(), what
                assert bytes(d.encode()) == fx.plain, what
                continue
        rejected(fx, arg, what)


# ---- random bytes ------------------------------------------------------------------------------

def test_random_bytes(fx):
    rng = random.Random("random")
    for i in range(300):
        n = rng.choice([0, 1, 7, 8, 127, 128, 129, 152, 640, rng.randrange(4096)])
        blob = rng.randbytes(n)
        if i % 3 == 1:
            blob = b"SCDELTA1" + blob
        elif i % 3 == 2 and n >= HEADER:
            # A random header with a valid checksum: the field checks must catch it.
            buf = bytearray(b"SCDELTA1" + blob[8:])
            version = struct.unpack_from("<H", buf, OFF_VERSION)[0]
            reseal(buf)
            exc = sc.UnsupportedFormat if version > 1 else sc.CorruptDelta
            rejected(fx, bytes(buf), f"random sealed header #{i}", exc)
            continue
        rejected(fx, blob, f"random bytes #{i} ({n} bytes)")


def test_random_sealed_headers_over_a_real_index_and_payload(fx):
    """Random values in one header field at a time, checksum recomputed."""
    rng = random.Random("fields")
    fields = [(OFF_KIND, "<H"), (OFF_COMPRESSION, "<H"), (OFF_PAGE_SIZE, "<I"),
              (OFF_STORE_PAGES, "<Q"), (OFF_BASE, "<Q"), (OFF_TARGET, "<Q"),
              (OFF_N_PAGES, "<Q"), (OFF_PAYLOAD_BYTES, "<Q")]
    for i in range(400):
        off, fmt = rng.choice(fields)
        bits = struct.calcsize(fmt) * 8
        blob = fx.plain if i % 2 else fx.packed
        original = struct.unpack_from(fmt, blob, off)[0]
        value = rng.choice([0, 1, original + 1, original - 1, original * 2,
                            rng.getrandbits(bits), (1 << bits) - 1, 1 << (bits - 1)])
        value &= (1 << bits) - 1
        if value == original:
            continue
        if off == OFF_STORE_PAGES and value > max(fx.delta.page_ids):
            continue  # still a valid delta, for a bigger store (see the test below)
        if off == OFF_BASE and value < fx.delta.versions.min():
            continue  # a valid, wider claim
        if off == OFF_TARGET and value >= fx.delta.versions.max():
            continue
        rejected(fx, with_field(blob, off, fmt, value),
                 f"{'plain' if i % 2 else 'lz4'} field @{off} = {value}",
                 not_in_message="header checksum")


# ---- valid-looking headers that lie -------------------------------------------------------------

HUGE = [1 << 32, 1 << 48, 1 << 61, 1 << 63, U64_MAX - 1, U64_MAX]


def test_huge_counts_and_sizes(fx):
    for blob_name in ("plain", "packed"):
        blob = getattr(fx, blob_name)
        fit = (len(blob) - HEADER) // 24
        for n in HUGE + [fx.n + 1, fit, fit + 1]:
            rejected(fx, with_field(blob, OFF_N_PAGES, "<Q", n), f"{blob_name}: n_pages={n}",
                     not_in_message="header checksum")
            # ... with store_pages raised to match, so only the size checks stand in the way
            buf = bytearray(with_field(blob, OFF_N_PAGES, "<Q", n, seal=False))
            struct.pack_into("<Q", buf, OFF_STORE_PAGES, max(n, N_PAGES))
            rejected(fx, bytes(reseal(buf)), f"{blob_name}: n_pages=store_pages={n}",
                     not_in_message="header checksum")
        for p in HUGE + [0, 1, len(blob), len(blob) - fx.payload_offset + 1]:
            rejected(fx, with_field(blob, OFF_PAYLOAD_BYTES, "<Q", p),
                     f"{blob_name}: payload_bytes={p}", not_in_message="header checksum")


def test_n_pages_and_payload_bytes_that_agree_with_each_other_but_not_the_buffer(fx):
    for n in (fx.n - 1, fx.n + 1, 2 * fx.n):
        buf = bytearray(fx.plain)
        struct.pack_into("<Q", buf, OFF_N_PAGES, n)
        struct.pack_into("<Q", buf, OFF_PAYLOAD_BYTES, n * PS)
        rejected(fx, bytes(reseal(buf, index=True)), f"n_pages={n}, payload_bytes={n * PS}",
                 not_in_message="header checksum")
    # A consistent, shorter delta: n - 1 entries, the index rebuilt, the last page cut off.
    n = fx.n - 1
    d = fx.delta
    index = (d.page_ids[:n].tobytes() + d.versions[:n].tobytes() + d.checksums[:n].tobytes())
    buf = bytearray(fx.plain[:HEADER]) + index + bytes(d.payload)[:n * PS]
    struct.pack_into("<Q", buf, OFF_N_PAGES, n)
    struct.pack_into("<Q", buf, OFF_PAYLOAD_BYTES, n * PS)
    shorter = sc.Delta.decode(bytes(reseal(buf, index=True)))  # the control: this is valid
    assert shorter.page_ids.tolist() == d.page_ids[:n].tolist()
    # ... and the same with one page checksum wrong is not.
    struct.pack_into("<Q", buf, HEADER + 16 * n, int(d.checksums[0]) ^ 1)
    rejected(fx, bytes(reseal(buf, index=True)), "shortened delta, page 0 checksum wrong",
             not_in_message="header checksum")


@pytest.mark.parametrize("page_size", [0, 1, 256, 511, 513, 1024, 4096, 3 * 512, 1 << 21,
                                       1 << 31, (1 << 32) - 1])
def test_wrong_page_size(fx, page_size):
    for blob_name in ("plain", "packed"):
        rejected(fx, with_field(getattr(fx, blob_name), OFF_PAGE_SIZE, "<I", page_size),
                 f"{blob_name}: page_size={page_size}", not_in_message="header checksum")


def test_wrong_magic_kind_and_compression(fx):
    for blob_name in ("plain", "packed"):
        blob = getattr(fx, blob_name)
        for magic in (b"SCCKPT01", b"SCDELTA2", b"scdelta1", bytes(8), b"\xffSCDELTA"):
            rejected(fx, magic + blob[8:], f"{blob_name}: magic {magic!r}")
            rejected(fx, bytes(reseal(bytearray(magic + blob[8:]))),
                     f"{blob_name}: magic {magic!r}, resealed")
        for kind in (0, 2, 3, 0xFFFF):
            rejected(fx, with_field(blob, OFF_KIND, "<H", kind), f"{blob_name}: kind {kind}",
                     not_in_message="header checksum")
        for comp in (2, 3, 0xFF, 0xFFFF):
            rejected(fx, with_field(blob, OFF_COMPRESSION, "<H", comp),
                     f"{blob_name}: compression {comp}", not_in_message="header checksum")
    # Swapped compression flags: raw pages read as a chunk table, a table read as pages.
    rejected(fx, with_field(fx.plain, OFF_COMPRESSION, "<H", 1), "plain marked lz4")
    rejected(fx, with_field(fx.packed, OFF_COMPRESSION, "<H", 0), "lz4 marked plain")


@pytest.mark.parametrize("version", [2, 3, 0x100, 0xFFFF])
def test_future_format_version_is_unsupported_not_corrupt(fx, version):
    for blob_name in ("plain", "packed"):
        blob = with_field(getattr(fx, blob_name), OFF_VERSION, "<H", version)
        rejected(fx, blob, f"{blob_name}: format_version {version}", sc.UnsupportedFormat)
        # Without a valid checksum a changed version byte is corruption, not a new format.
        unsealed = with_field(getattr(fx, blob_name), OFF_VERSION, "<H", version, seal=False)
        rejected(fx, unsealed, f"{blob_name}: format_version {version}, unsealed")


def test_target_epoch_at_the_end_of_time(fx):
    """target_epoch 2**64 - 1 fits every other check, but applying it would move the store
    to epoch target + 1, which wraps to 0: no real store gets there, so it is corrupt."""
    for blob_name in ("plain", "packed"):
        rejected(fx, with_field(getattr(fx, blob_name), OFF_TARGET, "<Q", U64_MAX),
                 f"{blob_name}: target_epoch 2**64 - 1", not_in_message="header checksum")


def test_format_version_zero_is_corrupt(fx):
    rejected(fx, with_field(fx.plain, OFF_VERSION, "<H", 0), "format_version 0",
             not_in_message="header checksum")


def test_epoch_fields_that_contradict_the_versions(fx):
    lo, hi = int(fx.delta.versions.min()), int(fx.delta.versions.max())
    base, target = fx.delta.base_epoch, fx.delta.target_epoch
    assert base < lo <= hi <= target
    cases = [(OFF_BASE, lo), (OFF_BASE, hi), (OFF_BASE, target), (OFF_BASE, target + 1),
             (OFF_BASE, U64_MAX), (OFF_TARGET, hi - 1), (OFF_TARGET, base),
             (OFF_TARGET, base - 1 if base else 0), (OFF_TARGET, 0)]
    for blob_name in ("plain", "packed"):
        for off, value in cases:
            rejected(fx, with_field(getattr(fx, blob_name), off, "<Q", value),
                     f"{blob_name}: {'base' if off == OFF_BASE else 'target'}={value}",
                     not_in_message="header checksum")


# ---- the index: ids and versions that lie, checksums recomputed ---------------------------------

def with_index(blob: bytes, n: int, column: int, row: int, value: int) -> bytes:
    buf = bytearray(blob)
    struct.pack_into("<Q", buf, HEADER + 8 * (column * n + row), value)
    return bytes(reseal(buf, index=True))


def test_page_ids_out_of_range_or_unsorted(fx):
    ids = fx.delta.page_ids.tolist()
    n = fx.n
    cases = []
    for row in (0, 1, n // 2, n - 1):
        cases += [(row, N_PAGES), (row, N_PAGES + 1), (row, 1 << 32), (row, 1 << 63),
                  (row, U64_MAX)]
    cases += [(1, ids[0]),                 # duplicate
              (0, ids[1]),                 # duplicate the other way
              (n - 1, ids[n - 2]),         # duplicate at the end
              (0, ids[-1]),                # unsorted
              (n // 2, ids[0]),            # unsorted in the middle
              (n - 1, 0)]                  # unsorted at the end
    for blob_name in ("plain", "packed"):
        for row, value in cases:
            rejected(fx, with_index(getattr(fx, blob_name), n, 0, row, value),
                     f"{blob_name}: page_ids[{row}] = {value}",
                     not_in_message="header checksum")
        # Swapping two ids (with their versions and checksums) keeps every checksum valid.
        buf = bytearray(getattr(fx, blob_name))
        for col in range(3):
            a, b = HEADER + 8 * (col * n), HEADER + 8 * (col * n + 1)
            buf[a:a + 8], buf[b:b + 8] = buf[b:b + 8], buf[a:a + 8]
        rejected(fx, bytes(reseal(buf, index=True)), f"{blob_name}: rows 0 and 1 swapped",
                 not_in_message="header checksum")


def test_versions_outside_the_interval(fx):
    base, target = fx.delta.base_epoch, fx.delta.target_epoch
    n = fx.n
    for blob_name in ("plain", "packed"):
        for row in (0, n // 3, n - 1):
            for value in (0, base, target + 1, target + 1000, 1 << 63, U64_MAX):
                rejected(fx, with_index(getattr(fx, blob_name), n, 1, row, value),
                         f"{blob_name}: versions[{row}] = {value}",
                         not_in_message="header checksum")


def test_page_checksums_that_do_not_match(fx):
    n = fx.n
    for blob_name in ("plain", "packed"):
        for row in range(n):
            value = int(fx.delta.checksums[row]) ^ (1 << (row % 64))
            rejected(fx, with_index(getattr(fx, blob_name), n, 2, row, value),
                     f"{blob_name}: checksums[{row}] wrong", not_in_message="header checksum")


def test_index_checksum_alone_wrong(fx):
    for blob_name in ("plain", "packed"):
        blob = getattr(fx, blob_name)
        bad = get_u64(blob, OFF_INDEX_SUM) ^ 1
        rejected(fx, with_field(blob, OFF_INDEX_SUM, "<Q", bad),
                 f"{blob_name}: index checksum", not_in_message="header checksum")


# ---- lz4 chunk tables and chunks -----------------------------------------------------------------

def rebuild_lz4(fx: Fixture, chunk: int, count: int, sizes: List[int], blobs: List[bytes]) -> bytes:
    """The lz4 blob with this table and these chunks, payload_bytes and header resealed."""
    body = struct.pack(f"<QQ{len(sizes)}Q", chunk, count, *sizes) + b"".join(blobs)
    buf = bytearray(fx.packed[:fx.payload_offset]) + body
    struct.pack_into("<Q", buf, OFF_PAYLOAD_BYTES, len(body))
    return bytes(reseal(buf))


def chunks_of(fx: Fixture) -> List[bytes]:
    start = fx.payload_offset + 16 + 8 * len(fx.chunk_sizes)
    out = []
    for size in fx.chunk_sizes:
        out.append(fx.packed[start:start + size])
        start += size
    return out


def test_rebuild_lz4_control(fx):
    assert rebuild_lz4(fx, LZ4_CHUNK, len(fx.chunk_sizes), fx.chunk_sizes, chunks_of(fx)) \
        == fx.packed


def test_corrupt_chunk_tables(fx):
    sizes, blobs = fx.chunk_sizes, chunks_of(fx)
    k = len(sizes)
    cases = {
        "chunk 0": (0, k, sizes),
        "chunk not a page multiple": (LZ4_CHUNK + 1, k, sizes),
        "chunk smaller than a page": (PS - 1, k, sizes),
        "chunk doubled": (2 * LZ4_CHUNK, k, sizes),
        "chunk halved": (LZ4_CHUNK // 2, k, sizes),
        "chunk huge": (1 << 63, k, sizes),
        "chunk max": (U64_MAX, k, sizes),
        "count 0": (LZ4_CHUNK, 0, sizes),
        "count - 1": (LZ4_CHUNK, k - 1, sizes),
        "count + 1": (LZ4_CHUNK, k + 1, sizes),
        "count huge": (LZ4_CHUNK, 1 << 61, sizes),
        "count max": (LZ4_CHUNK, U64_MAX, sizes),
        "size + 1": (LZ4_CHUNK, k, [sizes[0] + 1] + sizes[1:]),
        "size - 1": (LZ4_CHUNK, k, sizes[:-1] + [sizes[-1] - 1]),
        "size 0": (LZ4_CHUNK, k, [0] + sizes[1:]),
        "sizes shifted": (LZ4_CHUNK, k, [sizes[0] - 7, sizes[1] + 7] + sizes[2:]),
        "sizes swapped": (LZ4_CHUNK, k, [sizes[1], sizes[0]] + sizes[2:]),
        "sizes wrap around 2**64": (LZ4_CHUNK, k, [sizes[0] + (1 << 63),
                                                   sizes[1] + (1 << 63)] + sizes[2:]),
        "one size takes all": (LZ4_CHUNK, k, [sum(sizes)] + [0] * (k - 1)),
        "size max, next compensates": (LZ4_CHUNK, k, [U64_MAX, sizes[0] + sizes[1] + 1]
                                       + sizes[2:]),
    }
    assert sizes[0] != sizes[1]  # else "sizes swapped" would be no change
    for what, (chunk, count, table) in cases.items():
        if (chunk, count, table) == (LZ4_CHUNK, k, sizes):
            continue
        rejected(fx, rebuild_lz4(fx, chunk, count, table, blobs), f"lz4: {what}",
                 not_in_message="header checksum")
    # The table itself cut short (payload_bytes resealed to match).
    for keep in (0, 1, 8, 15, 16, 23, 16 + 8 * k - 1):
        body = (struct.pack(f"<QQ{k}Q", LZ4_CHUNK, k, *sizes))[:keep]
        buf = bytearray(fx.packed[:fx.payload_offset]) + body
        struct.pack_into("<Q", buf, OFF_PAYLOAD_BYTES, len(body))
        rejected(fx, bytes(reseal(buf)), f"lz4: table cut to {keep} bytes",
                 not_in_message="header checksum")


def test_corrupt_chunks(fx):
    sizes, blobs = fx.chunk_sizes, chunks_of(fx)
    k = len(sizes)
    payload = bytes(fx.delta.payload)
    rng = random.Random("chunks")

    def with_chunk(i: int, new: bytes) -> bytes:
        table = sizes[:i] + [len(new)] + sizes[i + 1:]
        return rebuild_lz4(fx, LZ4_CHUNK, k, table, blobs[:i] + [new] + blobs[i + 1:])

    for i in (0, 1, k - 1):
        piece = payload[i * LZ4_CHUNK:(i + 1) * LZ4_CHUNK]
        other = payload[((i + 1) % k) * LZ4_CHUNK:((i + 1) % k + 1) * LZ4_CHUNK]
        cases = {
            "random bytes": rng.randbytes(sizes[i]),
            "empty": b"",
            "one byte": b"\0",
            "cut short": blobs[i][:-1],
            "another chunk's data": lz4.block.compress(other, store_size=False),
            "shorter output": lz4.block.compress(piece[:-PS], store_size=False),
            "longer output": lz4.block.compress(piece + piece[:PS], store_size=False),
            "size-prefixed": lz4.block.compress(piece, store_size=True),
            "one byte changed in content": lz4.block.compress(
                piece[:-1] + bytes([piece[-1] ^ 1]), store_size=False),
            "zeros": bytes(sizes[i]),
        }
        if len(other) != len(piece):
            cases.pop("another chunk's data")
        for what, new in cases.items():
            rejected(fx, with_chunk(i, new), f"lz4 chunk {i}: {what}",
                     not_in_message="header checksum")
    # Chunks in the wrong order, with a table that matches them.
    order = list(range(k))[::-1]
    rejected(fx, rebuild_lz4(fx, LZ4_CHUNK, k, [sizes[j] for j in order],
                             [blobs[j] for j in order]), "lz4 chunks reversed",
             not_in_message="header checksum")


# ---- checkpoints: sc.Store.load -----------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(fx, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "good.ckpt"
    fx.b.save(path)
    blob = path.read_bytes()
    assert blob[:8] == b"SCCKPT01"
    with sc.Store.load(path) as restored:  # the control
        assert restored.read(0, SIZE) == fx.b.read(0, SIZE)
        assert restored.epoch == fx.b.epoch + 1
    return blob


class LoadRejects:
    def __init__(self, tmp_path):
        self.dir = tmp_path
        self.count = 0

    def __call__(self, blob: bytes, what: str, exc=sc.CorruptCheckpoint, *,
                 restore_path: bool = False) -> None:
        self.count += 1
        src = self.dir / f"case{self.count}.ckpt"
        src.write_bytes(blob)
        dest = self.dir / f"case{self.count}.store" if restore_path else None
        try:
            sc.Store.load(src, dest)
        except exc as e:
            assert isinstance(e, sc.StateError) and str(e)
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"{what}: raised {e!r}, expected {exc}") from e
        else:
            raise AssertionError(f"{what}: a malformed checkpoint was loaded")
        finally:
            src.unlink()
        if dest is not None:
            assert not dest.exists(), f"{what}: a failed load left {dest} behind"


@pytest.fixture
def load_rejects(tmp_path):
    return LoadRejects(tmp_path)


def test_checkpoint_truncated_and_extended(checkpoint, load_rejects):
    n = get_u64(checkpoint, OFF_N_PAGES)
    po = HEADER + 24 * n
    rng = random.Random("ckpt cut")
    cuts = {0, 1, 8, 64, 119, 120, 127, 128, 129, HEADER + 8 * n, po - 1, po, po + 1,
            len(checkpoint) - PS, len(checkpoint) - 1}
    cuts |= {rng.randrange(len(checkpoint)) for _ in range(40)}
    for i, cut in enumerate(sorted(cuts)):
        load_rejects(checkpoint[:cut], f"checkpoint cut to {cut}", restore_path=i % 4 == 0)
    load_rejects(checkpoint + b"\0", "checkpoint + 1 byte")


def test_checkpoint_bit_flips(checkpoint, load_rejects):
    n = get_u64(checkpoint, OFF_N_PAGES)
    rng = random.Random("ckpt flips")
    bits = set(range(0, HEADER * 8, 3))                                     # header
    bits |= {HEADER * 8 + rng.randrange(24 * n * 8) for _ in range(60)}      # index
    bits |= {rng.randrange((HEADER + 24 * n) * 8, len(checkpoint) * 8) for _ in range(80)}
    for i, bit in enumerate(sorted(bits)):
        load_rejects(flip(checkpoint, bit), f"checkpoint bit {bit} flipped",
                     restore_path=i % 16 == 0)


def test_checkpoint_random_bytes_and_wrong_kinds(checkpoint, fx, load_rejects):
    rng = random.Random("ckpt random")
    for i in range(40):
        blob = rng.randbytes(rng.choice([1, 64, 128, 1000, 9000]))
        load_rejects(b"SCCKPT01" + blob if i % 2 else blob, f"random checkpoint #{i}")
    load_rejects(fx.plain, "a delta is not a checkpoint")
    load_rejects(b"SCCKPT01" + fx.plain[8:], "a delta with a checkpoint magic")
    load_rejects(bytes(reseal(bytearray(b"SCCKPT01" + fx.plain[8:]))),
                 "a delta with a checkpoint magic, resealed")
    load_rejects(with_field(checkpoint, OFF_KIND, "<H", 1), "checkpoint of kind delta")
    for comp in (2, 0xFFFF):
        load_rejects(with_field(checkpoint, OFF_COMPRESSION, "<H", comp),
                     f"checkpoint compression {comp}")


def test_checkpoint_marked_compressed(checkpoint, load_rejects):
    """statecore writes checkpoints uncompressed. One whose (resealed) header says lz4 must
    be refused as corrupt or unsupported, not reach the store and fail with a ValueError
    about missing pages."""
    load_rejects(with_field(checkpoint, OFF_COMPRESSION, "<H", 1), "checkpoint marked lz4",
                 (sc.CorruptCheckpoint, sc.UnsupportedFormat), restore_path=True)


def test_checkpoint_empty_file(tmp_path):
    path = tmp_path / "empty.ckpt"
    path.write_bytes(b"")
    with pytest.raises(sc.CorruptCheckpoint, match="empty"):
        sc.Store.load(path)


def test_checkpoint_future_format_version(checkpoint, load_rejects):
    for version in (2, 0xFFFF):
        load_rejects(with_field(checkpoint, OFF_VERSION, "<H", version),
                     f"checkpoint format {version}", sc.UnsupportedFormat, restore_path=True)
        load_rejects(with_field(checkpoint, OFF_VERSION, "<H", version, seal=False),
                     f"checkpoint format {version}, unsealed")


def test_checkpoint_lying_fields(checkpoint, load_rejects):
    n = get_u64(checkpoint, OFF_N_PAGES)
    ids = struct.unpack_from(f"<{n}Q", checkpoint, HEADER)
    for value in HUGE + [n + 1, n - 1]:
        load_rejects(with_field(checkpoint, OFF_N_PAGES, "<Q", value), f"n_pages={value}")
        load_rejects(with_field(checkpoint, OFF_PAYLOAD_BYTES, "<Q", value),
                     f"payload_bytes={value}")
    for value in (0, 511, 1024, 1 << 21):
        load_rejects(with_field(checkpoint, OFF_PAGE_SIZE, "<I", value), f"page_size={value}")
    for value in (0, max(ids)):
        load_rejects(with_field(checkpoint, OFF_STORE_PAGES, "<Q", value),
                     f"store_pages={value}")
    load_rejects(with_field(checkpoint, OFF_BASE, "<Q", 1), "checkpoint base_epoch 1")
    load_rejects(with_field(checkpoint, OFF_TARGET, "<Q", 0), "checkpoint target_epoch 0")
    load_rejects(with_index(checkpoint, n, 0, 1, ids[0]), "checkpoint ids unsorted")
    load_rejects(with_index(checkpoint, n, 0, n - 1, N_PAGES), "checkpoint id out of range")
    load_rejects(with_index(checkpoint, n, 1, 0, 0), "checkpoint version 0")
    load_rejects(with_index(checkpoint, n, 2, 0, get_u64(checkpoint, HEADER + 16 * n) ^ 1),
                 "checkpoint page checksum")


@pytest.mark.parametrize("store_pages", [1 << 32, 1 << 40, 1 << 63, U64_MAX])
def test_checkpoint_claiming_an_impossible_store_size(checkpoint, load_rejects, store_pages):
    """A header (valid checksums) claiming more pages than any store can have: the
    file was not written by statecore, so it is a corrupt checkpoint, not a ValueError
    from creating the store or an OverflowError from converting its size."""
    load_rejects(with_field(checkpoint, OFF_STORE_PAGES, "<Q", store_pages),
                 f"store_pages={store_pages}", restore_path=True)
