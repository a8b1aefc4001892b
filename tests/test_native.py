"""Known-answer tests of the C core (blocksnap._native) against the independent ``xxhash`` package.

Chunk ids must be exactly ``xxhash.xxh3_128_digest`` of each chunk's bytes; scan flags and the
``changed`` list follow the contract in csrc/blocksnap.h. Images are real sparse files made with
pwrite/truncate in the test's temp dir.
"""
import collections
import errno
import math
import os
import random

import pytest
import xxhash

from blocksnap import _native

KiB = 1 << 10
MiB = 1 << 20
ZERO_ID = bytes(16)
HOLE, ZERO, DATA, CHANGED = _native.CHUNK_HOLE, _native.CHUNK_ZERO, _native.CHUNK_DATA, _native.CHUNK_CHANGED
CHUNK_SIZES = [1 << k for k in range(12, 23)]  # 4 KiB .. 4 MiB


def xid(data):
    """The chunk id blocksnap must give ``data``: all zero for zero bytes, else XXH3-128."""
    return ZERO_ID if not any(data) else xxhash.xxh3_128_digest(bytes(data))


def rand(n, seed):
    return random.Random(seed).randbytes(n)


def scan_file(path, chunk_size, offset, length, parent_ids=b"", flags=os.O_RDONLY, buf=None):
    fd = os.open(path, flags)
    try:
        scanner = _native.Scanner(chunk_size, -(-length // chunk_size) or 1)
        if buf is None:
            buf = bytearray(length)
        ids, fl, changed = scanner.scan(fd, offset, length, buf, parent_ids)
        return ids, fl, changed, buf
    finally:
        os.close(fd)


def is_fs_hole(path, start, end):
    """True if the file system reports ``[start, end)`` as a hole (SEEK_DATA skips past it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            return os.lseek(fd, start, os.SEEK_DATA) >= end
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return True
            raise
    finally:
        os.close(fd)


class Image:
    """A sparse file on disk plus an in-memory copy of its exact bytes."""

    def __init__(self, path, size):
        self.path = str(path)
        self.bytes = bytearray(size)
        with open(self.path, "wb") as f:
            f.truncate(size)

    def pwrite(self, offset, data):
        fd = os.open(self.path, os.O_WRONLY)
        try:
            assert os.pwrite(fd, data, offset) == len(data)
        finally:
            os.close(fd)
        self.bytes[offset:offset + len(data)] = data

    def chunk(self, cs, i):
        return bytes(self.bytes[i * cs:(i + 1) * cs])


@pytest.fixture(autouse=True)
def needs_holes(tmp_path):
    """The hole tests need a file system that reports holes (ext4, xfs, btrfs, tmpfs do)."""
    probe = tmp_path / "hole-probe"
    with open(probe, "wb") as f:
        f.write(b"x" * 4096)
        f.truncate(4 * MiB)
    if not is_fs_hole(str(probe), 1 * MiB, 4 * MiB):
        pytest.skip("the temp file system does not report holes through SEEK_DATA")
    probe.unlink()


# --- hash128 -----------------------------------------------------------------------------------------
def test_hash128_matches_xxhash_for_lengths_0_to_300():
    """hash128 equals xxhash.xxh3_128_digest for every length 0..300 (all XXH3 short-input code paths)."""
    data = rand(300, 1)
    for n in range(301):
        assert _native.hash128(data[:n]) == xxhash.xxh3_128_digest(data[:n]), n


@pytest.mark.parametrize("k", range(4, 23))
def test_hash128_matches_xxhash_around_powers_of_two(k):
    """hash128 equals xxhash.xxh3_128_digest at 2**k - 1, 2**k and 2**k + 1 bytes (stripe and block edges)."""
    data = rand((1 << k) + 1, k)
    for n in ((1 << k) - 1, 1 << k, (1 << k) + 1):
        assert _native.hash128(data[:n]) == xxhash.xxh3_128_digest(data[:n]), n


def test_hash128_accepts_any_buffer_without_changing_the_result():
    """hash128 of a bytearray or an offset memoryview slice equals the hash of the same bytes."""
    data = rand(5000, 7)
    expect = xxhash.xxh3_128_digest(data[3:4099])
    assert _native.hash128(bytearray(data[3:4099])) == expect
    assert _native.hash128(memoryview(data)[3:4099]) == expect


# --- is_zero -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 31, 32, 33, 4095, 4096, 4097])
def test_is_zero_true_for_all_zero_buffers(n):
    """is_zero is true for n zero bytes, including the empty buffer."""
    assert _native.is_zero(bytes(n)) is True


@pytest.mark.parametrize("n", [1, 15, 16, 17, 31, 32, 33, 4096, 4097])
def test_is_zero_false_for_one_nonzero_byte_at_every_position(n):
    """is_zero is false when exactly one byte is non-zero, wherever it sits (prefix and shifted compare)."""
    for pos in range(n):
        buf = bytearray(n)
        buf[pos] = 1 if pos % 2 else 0x80
        assert _native.is_zero(buf) is False, pos


def test_is_zero_looks_only_inside_the_slice():
    """is_zero of an unaligned memoryview slice ignores non-zero bytes just outside it."""
    buf = bytearray(4099)
    buf[0] = buf[-1] = 0xFF
    assert _native.is_zero(memoryview(buf)[1:-1]) is True
    buf[2048] = 1
    assert _native.is_zero(memoryview(buf)[1:-1]) is False


# --- scan: ids, flags, changed ------------------------------------------------------------------------
def layout(tmp_path, cs, tail):
    """Chunks: 0 data, 1 hole, 2 written zeros, 3 one byte amid holes, 4 data, 5 hole,
    6 a data tail of ``tail`` bytes."""
    img = Image(tmp_path / f"img-{cs}-{tail}", 6 * cs + tail)
    img.pwrite(0, rand(cs, cs))
    img.pwrite(2 * cs, bytes(cs))
    img.pwrite(3 * cs + cs // 2, b"\x01")
    img.pwrite(4 * cs, rand(cs, cs + 1))
    img.pwrite(6 * cs, rand(tail, cs + 2))
    return img


@pytest.mark.parametrize("cs", CHUNK_SIZES, ids=lambda c: f"{c // KiB}K")
@pytest.mark.parametrize("tail", ["1", "half+7", "cs-1"])
def test_scan_ids_and_flags_match_independent_hashes(tmp_path, cs, tail):
    """Every chunk's id is XXH3-128 of its exact bytes (the short tail over its real length), zero
    and hole chunks get the zero id with ZERO / HOLE, and without a parent every data chunk is changed."""
    r = {"1": 1, "half+7": cs // 2 + 7, "cs-1": cs - 1}[tail]
    img = layout(tmp_path, cs, r)
    size = 6 * cs + r
    assert is_fs_hole(img.path, cs, 2 * cs) and is_fs_hole(img.path, 5 * cs, 6 * cs)
    assert not is_fs_hole(img.path, 2 * cs, 3 * cs)  # explicit zeros are allocated data
    ids, flags, changed, buf = scan_file(img.path, cs, 0, size)
    assert len(ids) == 7 * 16 and len(flags) == 7
    expect_flags = [DATA | CHANGED, HOLE, ZERO, DATA | CHANGED, DATA | CHANGED, HOLE, DATA | CHANGED]
    assert list(flags) == expect_flags
    for i in range(7):
        assert ids[16 * i:16 * i + 16] == xid(img.chunk(cs, i)), i
    assert ids[16 * 6:] == xxhash.xxh3_128_digest(bytes(img.bytes[6 * cs:]))  # r bytes, not padded
    assert changed == [0, 3, 4, 6]
    for i in (0, 3, 4, 6):  # the data of DATA chunks is left in buf at i * chunk_size
        assert buf[i * cs:(i + 1) * cs] == img.chunk(cs, i), i


@pytest.mark.parametrize("tail_kind", ["hole", "zeros"])
def test_scan_unaligned_tail_that_is_hole_or_zeros(tmp_path, tail_kind):
    """A short tail chunk inside a hole is HOLE, one of written zeros is ZERO; both get the zero id."""
    cs, r = 64 * KiB, 5000
    img = Image(tmp_path / "img", 2 * cs + r)
    img.pwrite(0, rand(cs, 3))
    if tail_kind == "zeros":
        img.pwrite(2 * cs, bytes(r))
    ids, flags, changed, _ = scan_file(img.path, cs, 0, 2 * cs + r)
    assert list(flags) == [DATA | CHANGED, HOLE, HOLE if tail_kind == "hole" else ZERO]
    assert ids[16:] == bytes(32)
    assert changed == [0]


def test_scan_window_at_an_offset_matches_the_whole_file_scan(tmp_path):
    """Scanning a window [offset, offset+length) gives the same ids as the whole-file scan, with
    changed indexes counted from the window's first chunk."""
    cs = 16 * KiB
    img = layout(tmp_path, cs, 100)
    size = 6 * cs + 100
    all_ids, all_flags, _, _ = scan_file(img.path, cs, 0, size)
    ids, flags, changed, _ = scan_file(img.path, cs, 3 * cs, size - 3 * cs)
    assert ids == all_ids[3 * 16:]
    assert flags == all_flags[3:]
    assert changed == [0, 1, 3]  # chunks 3, 4 and 6 of the file


def test_scan_partial_data_chunk_hashes_the_hole_part_as_zeros(tmp_path):
    """A chunk with 4 KiB of data and a hole in the rest is DATA, hashed over data plus zeros."""
    cs = 256 * KiB
    img = Image(tmp_path / "img", 2 * cs)
    img.pwrite(cs + 64 * KiB, rand(4 * KiB, 9))
    assert is_fs_hole(img.path, cs, cs + 64 * KiB)
    ids, flags, changed, _ = scan_file(img.path, cs, 0, 2 * cs)
    assert list(flags) == [HOLE, DATA | CHANGED]
    assert ids[16:] == xxhash.xxh3_128_digest(img.chunk(cs, 1))
    assert changed == [1]


def test_scan_never_reads_holes(tmp_path):
    """An all-hole range scans fine through a write-only fd (any read would fail with EBADF), a
    range with data through that fd raises OSError(EBADF): holes are found by seeking, not reading."""
    cs = 64 * KiB
    img = Image(tmp_path / "img", 64 * cs)
    ids, flags, changed, _ = scan_file(img.path, cs, 0, 64 * cs, flags=os.O_WRONLY)
    assert flags == bytes([HOLE]) * 64 and ids == bytes(64 * 16) and changed == []
    img.pwrite(40 * cs, b"x")
    ids, flags, changed, _ = scan_file(img.path, cs, 0, 40 * cs, flags=os.O_WRONLY)  # data is past the window
    assert flags == bytes([HOLE]) * 40
    with pytest.raises(OSError) as exc:
        scan_file(img.path, cs, 0, 64 * cs, flags=os.O_WRONLY)
    assert exc.value.errno == errno.EBADF


def test_scan_changed_flag_semantics_against_a_parent(tmp_path):
    """CHANGED marks every chunk whose id differs from the parent's (zero and hole chunks too), while
    ``changed`` lists only the data chunks whose id differs."""
    cs = 32 * KiB
    img = Image(tmp_path / "img", 8 * cs)
    a, b, c, d = (rand(cs, s) for s in (11, 12, 13, 14))
    img.pwrite(0, a)
    img.pwrite(cs, b)
    img.pwrite(2 * cs, bytes(cs))  # zero, parent had data
    # 3: hole, parent had data
    img.pwrite(4 * cs, c)  # data, parent had zero
    img.pwrite(5 * cs, d)  # data, parent had the same data
    img.pwrite(6 * cs, bytes(cs))  # zero, parent zero
    # 7: hole, parent zero
    parent = b"".join([xid(a), xid(b"other"), xid(b"was data"), xid(b"was data too"),
                       ZERO_ID, xid(d), ZERO_ID, ZERO_ID])
    ids, flags, changed, _ = scan_file(img.path, cs, 0, 8 * cs, parent_ids=parent)
    assert list(flags) == [DATA, DATA | CHANGED, ZERO | CHANGED, HOLE | CHANGED,
                           DATA | CHANGED, DATA, ZERO, HOLE]
    assert changed == [1, 4]
    assert ids == b"".join([xid(a), xid(b), ZERO_ID, ZERO_ID, xid(c), xid(d), ZERO_ID, ZERO_ID])


def test_scan_short_parent_ids_count_as_absent(tmp_path):
    """Chunks past the end of a short parent_ids compare against the zero id: data there is changed,
    zero and hole chunks there are not."""
    cs = 16 * KiB
    img = Image(tmp_path / "img", 6 * cs)
    for i in (0, 1, 2, 4):
        img.pwrite(i * cs, rand(cs, 20 + i))
    img.pwrite(5 * cs, bytes(cs))
    full, _, _, _ = scan_file(img.path, cs, 0, 6 * cs)
    ids, flags, changed, _ = scan_file(img.path, cs, 0, 6 * cs, parent_ids=full[:2 * 16])
    assert ids == full
    assert list(flags) == [DATA, DATA, DATA | CHANGED, HOLE, DATA | CHANGED, ZERO]
    assert changed == [2, 4]
    # a trailing partial id (not a multiple of 16 bytes) is ignored, not read as a short id
    _, flags2, changed2, _ = scan_file(img.path, cs, 0, 6 * cs, parent_ids=full[:2 * 16 + 7])
    assert flags2 == flags and changed2 == changed


def test_scan_identical_parent_gives_no_changes(tmp_path):
    """Scanning against the file's own ids reports nothing changed and no CHANGED flag."""
    cs = 8 * KiB
    img = layout(tmp_path, cs, 3)
    size = 6 * cs + 3
    full, _, _, _ = scan_file(img.path, cs, 0, size)
    ids, flags, changed, _ = scan_file(img.path, cs, 0, size, parent_ids=full)
    assert changed == [] and not any(f & CHANGED for f in flags) and ids == full


# --- scan: errors ---------------------------------------------------------------------------------------
def test_scan_raises_shortread_when_data_ends_inside_the_range(tmp_path):
    """A file whose data ends mid-chunk before the requested range's end raises ShortRead (an OSError)."""
    cs = 64 * KiB
    img = Image(tmp_path / "img", cs + 1000)
    img.pwrite(0, rand(cs + 1000, 5))
    with pytest.raises(_native.ShortRead) as exc:
        scan_file(img.path, cs, 0, 4 * cs)
    assert isinstance(exc.value, OSError)


@pytest.mark.parametrize("ending", ["data-on-chunk-boundary", "hole", "window-past-eof"])
def test_scan_raises_shortread_whenever_the_file_is_shorter_than_the_range(tmp_path, ending):
    """A file shorter than the requested range raises ShortRead, also when it ends on a chunk boundary,
    in a hole, or before the window even starts (past EOF, SEEK_DATA would report a hole)."""
    cs = 64 * KiB
    img = Image(tmp_path / "img", 2 * cs)
    if ending == "data-on-chunk-boundary":
        img.pwrite(cs, rand(cs, 6))
    else:
        img.pwrite(0, rand(cs, 6))
    offset = 3 * cs if ending == "window-past-eof" else 0
    with pytest.raises(_native.ShortRead):
        scan_file(img.path, cs, offset, 4 * cs - offset)


def test_scan_rejects_bad_arguments(tmp_path):
    """A zero length, a too short buffer or a window larger than the scanner raises ValueError."""
    cs = 4 * KiB
    img = Image(tmp_path / "img", 4 * cs)
    img.pwrite(0, b"x" * cs)
    fd = os.open(img.path, os.O_RDONLY)
    try:
        scanner = _native.Scanner(cs, 4)
        with pytest.raises(ValueError):
            scanner.scan(fd, 0, 0, bytearray(cs))
        with pytest.raises(ValueError):
            scanner.scan(fd, 0, 2 * cs, bytearray(2 * cs - 1))
        with pytest.raises(ValueError):
            scanner.scan(fd, 0, 5 * cs, bytearray(5 * cs))
    finally:
        os.close(fd)


# --- punch_hole -------------------------------------------------------------------------------------------
def test_punch_hole_reads_back_zeros_and_frees_blocks(tmp_path):
    """punch_hole keeps the size, makes the range read as zeros, keeps the rest and lowers st_blocks."""
    path = tmp_path / "f"
    data = rand(MiB, 30)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    before = os.stat(path).st_blocks
    fd = os.open(path, os.O_RDWR)
    try:
        _native.punch_hole(fd, 256 * KiB, 512 * KiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    st = os.stat(path)
    assert st.st_size == MiB
    assert before - st.st_blocks >= (512 * KiB) // 512
    got = path.read_bytes()
    assert got[256 * KiB:768 * KiB] == bytes(512 * KiB)
    assert got[:256 * KiB] == data[:256 * KiB] and got[768 * KiB:] == data[768 * KiB:]
    assert is_fs_hole(str(path), 256 * KiB, 768 * KiB)


def test_punch_hole_zero_length_is_a_no_op(tmp_path):
    """Punching zero bytes succeeds and changes nothing."""
    path = tmp_path / "f"
    path.write_bytes(b"y" * 8192)
    fd = os.open(path, os.O_RDWR)
    try:
        _native.punch_hole(fd, 0, 0)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"y" * 8192


def test_punch_hole_failure_raises_oserror_with_errno(tmp_path):
    """A refused punch (fd not open for writing) raises OSError with the system errno, changing nothing."""
    path = tmp_path / "f"
    path.write_bytes(b"z" * 8192)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as exc:
            _native.punch_hole(fd, 0, 4096)
    finally:
        os.close(fd)
    assert exc.value.errno == errno.EBADF
    assert path.read_bytes() == b"z" * 8192


@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_ids_nonzero_lists_exactly_the_nonzero_ids(n):
    """nonzero_ids returns the ascending indexes of ids that are not 16 zero bytes, whatever byte is set."""
    rng = random.Random(n)
    ids = bytearray(16 * n)
    expected = []
    for i in range(n):
        if rng.random() < 0.3:
            ids[16 * i + rng.randrange(16)] = rng.randrange(1, 256)
            expected.append(i)
    assert _native.nonzero_ids(bytes(ids)) == expected


def test_entropy_probe_separates_random_text_and_zeros():
    """The sampled entropy is near 8 bits for random bytes, far lower for text, 0 for zeros."""
    rnd = random.Random(5).randbytes(256 << 10)
    text = b"".join(b"Nov 26 20:%02d:%02d host%d sshd[%d]: session opened for user root\n"
                    % (i % 60, i % 59, i % 7, 1000 + i) for i in range(5000))[:256 << 10]
    assert _native.entropy_millibits(rnd) >= 7900
    assert 2000 <= _native.entropy_millibits(text) <= 6000
    assert _native.entropy_millibits(bytes(256 << 10)) == 0
    assert _native.entropy_millibits(b"") == 0


def _sample_entropy_millibits(data):
    """Independent reference for bs_entropy_probe (blocksnap.h): Shannon entropy of the byte
    histogram of 32 pieces of 256 bytes spread evenly over data, or of all of data below 8 KiB."""
    if len(data) < 32 * 256:
        sample = data
    else:
        stride = len(data) // 32
        sample = b"".join(data[p * stride:p * stride + 256] for p in range(32))
    if not sample:
        return 0
    counts = collections.Counter(sample)
    bits = -sum(c / len(sample) * math.log2(c / len(sample)) for c in counts.values())
    return round(bits * 1000)


@pytest.mark.parametrize("size", [1, 100, 4095, 8191, 8192, 8193, 64 << 10, (256 << 10) + 777, 4 << 20])
def test_entropy_probe_matches_a_python_reference(size):
    """The probe's sample and formula are the documented ones: within 1 millibit of a Python
    computation, for skewed, uniform and text-like bytes, short buffers and unaligned lengths."""
    rng = random.Random(size)
    kinds = [
        rng.randbytes(size),
        bytes(rng.choice(b"aaaaaaaabbbbccd\n") for _ in range(size)),
        bytes(min(255, int(rng.expovariate(0.05))) for _ in range(size)),
        b"x" * size,
    ]
    for data in kinds:
        assert abs(_native.entropy_millibits(data) - _sample_entropy_millibits(data)) <= 1, (size, data[:16])


def test_codec_hash_log_changes_the_encoder_not_the_format():
    """A codec with a smaller match table writes different, still standard, frames of the same bytes;
    a hash_log zstd cannot take is refused."""
    import zstandard

    cs = 256 << 10
    words = [b"GET", b"POST", b"/api/v1/items", b"200", b"404", b"user=%d", b"session", b"timeout"]
    rng = random.Random(8)
    text = b" ".join(rng.choice(words) for _ in range(cs // 4))[:cs]
    frames = {}
    for hash_log in (0, 13, 10):
        window = bytearray(text)
        codecs, lens = _native.Codec(1, hash_log).encode_chunks(window, cs, cs, [0], 7600)
        assert list(codecs) == [_native.CODEC_ZSTD]
        frames[hash_log] = bytes(window[:lens[0]])
        assert zstandard.ZstdDecompressor().decompress(frames[hash_log], max_output_size=cs) == text
    assert frames[10] != frames[0]
    for bad in (-1, 5, 31):
        with pytest.raises(ValueError):
            _native.Codec(1, bad)


def test_encode_in_place_round_trips_and_matches_zstd():
    """Encoded chunks decode to their bytes with the C codec and with the independent python-zstandard."""
    import zstandard

    cs = 64 << 10
    text = (b"GET /api/v1/items?id=42 HTTP/1.1 200 512 \"-\" \"curl/8.0\"\n" * 2000)[:cs]
    rnd = random.Random(6).randbytes(cs)
    window = bytearray(text + rnd + text[: cs // 2])
    original = bytes(window)
    codec = _native.Codec(1)
    codecs, lens = codec.encode_chunks(window, len(window), cs, [0, 1, 2], 7600)
    assert list(codecs) == [_native.CODEC_ZSTD, _native.CODEC_RAW, _native.CODEC_ZSTD]
    assert lens[1] == cs and lens[0] < cs // 4
    for k, (c, n) in enumerate(zip(codecs, lens)):
        raw = original[k * cs:(k + 1) * cs]
        stored = bytes(window[k * cs:k * cs + n])
        if c == _native.CODEC_ZSTD:
            assert bytes(codec.decode(c, stored, len(raw))) == raw
            assert zstandard.ZstdDecompressor().decompress(stored, max_output_size=len(raw)) == raw
        else:
            assert stored == raw
    with pytest.raises(ValueError):
        codec.decode(_native.CODEC_ZSTD, bytes(window[:lens[0]]), cs + 1)


def test_pack_stager_writes_the_documented_records_across_buffer_boundaries(tmp_path):
    """bs_packw lays out header + records exactly as FORMAT.md says (struct-packed here, independently),
    across staging-buffer boundaries, with zero padding to a whole block and the right offsets."""
    from blocksnap.store import packs as chunks

    rng = random.Random(11)
    window = bytearray(rng.randbytes(64 << 10))
    recs, expected_offsets = [], []
    header = chunks.PACK_HEADER.pack(chunks.PACK_MAGIC, b"\x01" * 8)
    expect = bytearray(header)
    for k, (src, n) in enumerate([(0, 100), (100, 9000), (9100, 1), (9101, 20000), (40000, 4064), (0, 24000)]):
        cid = xxhash.xxh3_128_digest(bytes([k]))
        codec = k % 2
        kind = k % 3 == 2  # some records are map segments (kind 1)
        recs.append((cid, src, n, n + 7, codec, kind))
        expected_offsets.append(len(expect))
        expect += chunks.RECORD.pack(chunks.RECORD_MAGIC, codec, kind, n + 7, n, cid) + window[src:src + n]
    path = tmp_path / "p.pack"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    stager = _native.PackStager(8192, 2)
    try:
        stager.begin(fd, header)
        assert stager.add(window, recs[:3]) == expected_offsets[:3]
        assert stager.add(window, recs[3:]) == expected_offsets[3:]
        stager.append(b"TRAILER")  # raw bytes after the records (a pack's trailer)
        expect += b"TRAILER"
        assert stager.offset == len(expect)
        seq, size = stager.end()
        assert size == len(expect)
        stager.wait(seq)
        stager.wait((1 << 64) - 1)  # "everything so far" returns once all is written
    finally:
        stager.close()
        os.close(fd)
    data = path.read_bytes()
    assert len(data) == -(-len(expect) // 4096) * 4096
    assert data[:len(expect)] == bytes(expect)
    assert data[len(expect):] == bytes(len(data) - len(expect))


def test_pack_stager_reports_a_failed_write_and_refuses_bad_arguments(tmp_path):
    """A write that fails in the I/O thread (here: a read-only descriptor) comes back as OSError with
    its errno from a later call and from wait; bad buffer geometry or records outside the buffer
    are refused before anything is written."""
    path = tmp_path / "ro.pack"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    stager = _native.PackStager(4096, 2)
    window = bytes(64 << 10)
    try:
        stager.begin(fd, b"H" * 16)
        with pytest.raises(OSError) as info:
            for _ in range(16):
                stager.add(window, [(bytes(16), 0, 60000, 60000, 0, 0)])
            seq, _ = stager.end()
            stager.wait(seq)
        assert info.value.errno == errno.EBADF
        with pytest.raises(OSError):
            stager.wait(1)
        with pytest.raises(ValueError):
            stager.add(window, [(bytes(16), 60000, 8000, 8000, 0, 0)])
    finally:
        stager.close()
        os.close(fd)
    assert path.read_bytes() == b""
    for stage_bytes, stages in ((1000, 2), (4096, 1), (0, 2)):
        with pytest.raises(ValueError):
            _native.PackStager(stage_bytes, stages)


def _pack_of(tmp_path, chunk_list, cs):
    """A pack file holding ``chunk_list`` as records (zstd where it shrinks them), and restore items for it."""
    from blocksnap.store import packs as chunks

    window = bytearray(cs * len(chunk_list))
    for k, d in enumerate(chunk_list):
        window[k * cs:k * cs + len(d)] = d
    length = cs * (len(chunk_list) - 1) + len(chunk_list[-1])
    codecs, lens = _native.Codec(1).encode_chunks(window, length, cs, list(range(len(chunk_list))), 8000)
    pack = tmp_path / "p.pack"
    items, pos = [], 16
    with open(pack, "wb") as f:
        f.write(bytes(16))
        for k, d in enumerate(chunk_list):
            cid = xxhash.xxh3_128_digest(d)
            stored = bytes(window[k * cs:k * cs + lens[k]])
            f.write(chunks.RECORD.pack(chunks.RECORD_MAGIC, codecs[k], 0, len(d), lens[k], cid) + stored)
            items.append((None, pos, lens[k], len(d), codecs[k], 0, cid, k * cs))
            pos += 32 + lens[k]
    return pack, items, codecs


def test_restore_chunks_round_trips_raw_and_zstd_records(tmp_path):
    """bs_restore_chunks checks and decodes raw and zstd records (a short tail too) and writes them sparse."""
    cs = 64 << 10
    text = b"".join(b"%08d INFO service started worker=%d\n" % (k, k % 7) for k in range(4000))
    data = [random.Random(0).randbytes(cs), text[:cs], random.Random(1).randbytes(cs),
            text[1000:1000 + cs // 2] + bytes(cs // 2), text[5:5 + 1000]]  # the last one is a short tail
    pack, items, codecs = _pack_of(tmp_path, data, cs)
    assert set(codecs) == {_native.CODEC_RAW, _native.CODEC_ZSTD}
    out = tmp_path / "out.raw"
    with open(pack, "rb") as p, open(out, "wb") as o:
        _native.Restorer(cs).restore([(p.fileno(),) + it[1:] for it in items], o.fileno(), 4096)
    assert out.read_bytes() == b"".join(d + bytes(cs - len(d)) for d in data[:-1]) + data[-1]
    assert os.stat(out).st_blocks * 512 < 4 * cs + 4096  # the zero half of chunk 3 stayed a hole


def test_restore_chunks_names_the_damaged_chunk(tmp_path):
    """A record whose id, length or bytes do not match stops the batch at that chunk, with the problem named;
    checking only (out_fd -1, as verify does) finds the same."""
    cs = 64 << 10
    data = [random.Random(k).randbytes(cs) for k in range(3)]
    pack, items, _ = _pack_of(tmp_path, data, cs)
    r = _native.Restorer(cs)
    out = tmp_path / "out.raw"
    with open(pack, "rb") as p, open(out, "wb") as o:
        good = [(p.fileno(),) + it[1:] for it in items]
        r.restore(good, o.fileno(), 4096)
        o.flush()
        assert out.read_bytes() == b"".join(data)
        bad = list(good)
        bad[1] = bad[1][:6] + (xxhash.xxh3_128_digest(b"other"),) + bad[1][7:]
        for fd in (o.fileno(), -1):
            with pytest.raises(_native.RestoreDamage) as exc:
                r.restore(bad, fd, 0)
            assert exc.value.index == 1 and "record header" in exc.value.problem
        r.restore(bad[2:], -1, 0)  # verify goes on after a damaged chunk
        wrong_kind = list(good)
        wrong_kind[1] = wrong_kind[1][:5] + (1,) + wrong_kind[1][6:]  # a chunk read as a map segment
        with pytest.raises(_native.RestoreDamage) as exc:
            r.restore(wrong_kind, -1, 0)
        assert exc.value.index == 1 and "record header" in exc.value.problem
        huge = list(good)
        huge[1] = huge[1][:2] + (1 << 24,) + huge[1][3:]  # a stored length no chunk can have (a flipped bit)
        for fd in (o.fileno(), -1):
            with pytest.raises(_native.RestoreDamage) as exc:
                r.restore(huge, fd, 0)
            assert exc.value.index == 1 and "index entry" in exc.value.problem
        torn = list(good)
        torn[2] = torn[2][:1] + (torn[2][1] + 40,) + torn[2][2:]  # the record's tail lies past the end
        with pytest.raises(_native.RestoreDamage) as exc:
            r.restore(torn, -1, 0)
        assert exc.value.index == 2 and exc.value.problem in ("the pack ends inside the record",
                                                             "record header does not match the index")
    with open(pack, "r+b") as f:  # one flipped byte inside chunk 0's data
        f.seek(16 + 32 + 100)
        b = f.read(1)
        f.seek(16 + 32 + 100)
        f.write(bytes([b[0] ^ 1]))
    with open(pack, "rb") as p:
        with pytest.raises(_native.RestoreDamage) as exc:
            r.restore([(p.fileno(),) + it[1:] for it in items], -1, 0)
        assert exc.value.index == 0 and "hash" in exc.value.problem


def test_hash64_is_xxh3_64_in_canonical_order():
    """bs_hash64 gives the same 8 bytes as the independent xxhash package's xxh3_64_digest, for any length."""
    rng = random.Random(5)
    for n in (0, 1, 16, 240, 241, 4096, 100000):
        data = rng.randbytes(n)
        assert _native.hash64(data) == xxhash.xxh3_64_digest(data)


def test_id_filter_marks_exactly_the_candidates_that_occur():
    """bs_ids_filter finds every candidate that occurs in the lists fed to it, no other, never the zero id,
    and refuses unsorted candidates."""
    rng = random.Random(9)
    cands = [rng.randbytes(16) for _ in range(500)] + [bytes(16)]
    filt = _native.IdFilter(cands)
    present = cands[:200:3]
    others = [rng.randbytes(16) for _ in range(300)]
    mixed = present + others + [bytes(16)] * 5
    rng.shuffle(mixed)
    filt.feed(b"".join(mixed[:150]))
    filt.feed(b"".join(mixed[150:]))
    assert set(filt.found()) == set(present)
    assert set(filt.missing()) == set(cands) - set(present)
    filt.clear()
    assert filt.found() == [] and not filt.any_found()
    from blocksnap._blocksnap_c import ffi, lib

    unsorted = b"".join(sorted(cands[:10], reverse=True))
    found = bytearray(10)
    assert lib.bs_ids_filter(unsorted, 10, unsorted, 10, ffi.from_buffer(found)) == lib.BS_EINVAL
    assert found == bytearray(10)


def test_restore_checks_the_reserved_bytes_of_a_record_header(tmp_path):
    """A record header whose reserved bytes are not zero is damage (a flipped bit there is caught too)."""
    cs = 64 << 10
    data = [random.Random(3).randbytes(cs)]
    pack, items, _ = _pack_of(tmp_path, data, cs)
    with open(pack, "r+b") as f:
        f.seek(16 + 7)
        f.write(b"\x01")
    with open(pack, "rb") as p:
        with pytest.raises(_native.RestoreDamage) as exc:
            _native.Restorer(cs).restore([(p.fileno(),) + it[1:] for it in items], -1, 0)
        assert "record header" in exc.value.problem
