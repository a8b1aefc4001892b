"""Fuzzing the qcow2 reader (issue 8, "Refusing, safely"): hypothesis mutates small real images (made by
qemu-img / qemu-io) in their header, header extensions, L1, L2, refcount table and blocks, and compressed
data, and blocksnap.image.read_guest must either return the guest view or raise a BlocksnapError: never
another exception, a crash of the C extension, or a hang. Where qemu-img convert also reads a mutant, the
bytes must agree.

Bounded time: BLOCKSNAP_FUZZ_EXAMPLES (default 500) examples in process, each guarded by a timeout, plus one
child process that replays the corpus and a batch of seeded mutants, so a C crash is reported with its
input instead of killing the test run. The corpus (tests/fixtures/qcow2-corpus/, gzipped mutants named
``<seed>--<what>.qcow2.gz``, a few KiB each) is replayed on every run; a failing example is saved under the
test's temp directory with the command that reproduces it.
"""
import collections
import gzip
import hashlib
import json
import os
import random
import struct
import subprocess
import sys
import threading

import pytest
import qcow2_images as qi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocksnap import errors

KiB, MiB = 1 << 10, 1 << 20
EXAMPLES = int(os.environ.get("BLOCKSNAP_FUZZ_EXAMPLES", "500"))
CASE_TIMEOUT = 20.0  # seconds for one read; a healthy read of these images takes milliseconds
READ_CAP = 16 * MiB  # larger (mutated) virtual sizes are read in pieces and not compared with qemu
CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "qcow2-corpus")


# --- seeds: tiny real images --------------------------------------------------------------------------------
def _seed_v3_512_zlib(d, s):
    img = qi.create(os.path.join(d, "disk.qcow2"), 64 * KiB, "cluster_size=512")
    w = qi.Writes(s, 1).random(0, 1536).text(4 * KiB, 2 * KiB, compressed=True).pattern(60 * KiB, 1024, 0x5A)
    w.apply(img)
    qi.Writes(s, 2).zero(512, 512).zero(10 * KiB, 1024).random(20 * KiB + 7, 700).apply(img)
    return img


def _seed_v2_512(d, s):
    img = qi.create(os.path.join(d, "disk.qcow2"), 64 * KiB, "cluster_size=512", "compat=0.10")
    qi.Writes(s, 3).random(0, 2 * KiB).text(8 * KiB, 1024, compressed=True).pattern(63 * KiB, 1024, 0x11).apply(img)
    return img


def _seed_zstd_512(d, s):
    img = qi.create(os.path.join(d, "disk.qcow2"), 64 * KiB, "cluster_size=512", "compression_type=zstd")
    qi.Writes(s, 4).text(0, 3 * KiB, compressed=True).random(16 * KiB, 1024).pattern(
        32 * KiB, 2 * KiB, 0x42, compressed=True).apply(img)
    return img


def _seed_extl2_16k(d, s):
    img = qi.create(os.path.join(d, "disk.qcow2"), 128 * KiB, "cluster_size=16k", "extended_l2=on")
    w = qi.Writes(s, 5).random(0, 1536).text(16 * KiB + 2048, 512).zero(32 * KiB + 1024, 1024)
    w.pattern(64 * KiB, 16 * KiB, 0x77, compressed=True).random(100 * KiB + 3, 600)
    w.apply(img)
    return img


def _seed_backing_512(d, s):
    base = qi.create(os.path.join(d, "base.qcow2"), 64 * KiB, "cluster_size=512")
    qi.Writes(s, 6).random(0, 4 * KiB).pattern(32 * KiB, 4 * KiB, 0x21).apply(base)
    img = qi.create(os.path.join(d, "disk.qcow2"), 96 * KiB, "cluster_size=512", backing="base.qcow2")
    qi.Writes(s, 7).random(1024, 1024).zero(33 * KiB, 1024).text(70 * KiB, 1024, compressed=True).apply(img)
    return img


SEEDS = {"v3-512-zlib": _seed_v3_512_zlib, "v2-512": _seed_v2_512, "zstd-512": _seed_zstd_512,
         "extl2-16k": _seed_extl2_16k, "backing-512": _seed_backing_512}


class Seed:
    """A seed image made in ``directory``: its bytes and the regions the mutations aim at."""

    def __init__(self, name, directory):
        self.name = name
        self.directory = os.path.join(directory, name)
        os.makedirs(self.directory)
        self.path = SEEDS[name](self.directory, os.path.join(directory, f".scratch-{name}"))
        with open(self.path, "rb") as f:
            self.data = f.read()
        lay = qi.Layout(self.path)
        self.layout = lay
        cs = lay.cluster_size
        hl = lay.header["header_length"]
        ext_end = max([off + (n + 7) // 8 * 8 for _, off, n in lay.extensions] + [hl + 8])
        regions = [("header", 0, hl), ("extensions", hl, ext_end)]
        l1_off = lay.header["l1_table_offset"]
        regions.append(("l1", l1_off, l1_off + 8 * lay.header["l1_size"]))
        regions += [("l2", t, t + cs) for t in lay.l2_tables()]
        rt, rt_len = lay.refcount_table
        regions.append(("refcount-table", rt, rt + min(rt_len, 64)))
        regions += [("refcount-block", b, b + cs) for b in lay.refcount_blocks]
        for e in lay.compressed():
            host, n = lay.compressed_extent(e)
            regions.append(("compressed", host, min(host + n, len(self.data))))
        regions.append(("anywhere", 0, len(self.data)))
        self.regions = [r for r in regions if r[2] > r[1] and r[2] <= len(self.data)]
        # values worth writing into 64-bit slots: offsets of this file's own structures, its end, edges
        ends = [len(self.data), (len(self.data) + cs - 1) // cs * cs, (len(self.data) // cs + 4) * cs]
        self.offsets = sorted({0, 1, 512, cs, l1_off, rt, *lay.l2_tables(), *lay.refcount_blocks, *ends,
                               (1 << 56) - cs, (1 << 63) - 1})


# --- mutations ----------------------------------------------------------------------------------------------
# (region, position, kind, value); kinds: flip (a bit), byte, u32/u64 (big-endian, position aligned to the
# width), entry (an L1/L2/refcount slot set to flags | one of the seed's offsets), bytes (a short overwrite)
def apply_mutations(seed, mutations):
    data = bytearray(seed.data)
    for _region, pos, kind, value in mutations:
        if kind == "flip":
            data[pos] ^= 1 << value
        elif kind == "byte":
            data[pos] = value
        elif kind in ("u32", "u64", "entry"):
            width = 4 if kind == "u32" else 8
            pos = pos // width * width
            if pos + width <= len(data):
                struct.pack_into(">I" if width == 4 else ">Q", data, pos, value)
        elif kind == "bytes":
            data[pos:pos + len(value)] = value[:len(data) - pos]
    return bytes(data)


HEADER_VALUES32 = [0, 1, 2, 3, 4, 7, 8, 9, 12, 16, 21, 22, 63, 64, 72, 96, 100, 104, 105, 112, 1023, 1024,
                   0x7FFFFFFF, 0xFFFFFFFF]
HEADER_VALUES64 = [0, 1, 0x200, 1 << 16, 1 << 30, 1 << 40, 1 << 62, 1 << 63, (1 << 64) - 1, 0x1F, 1 << 4]


@st.composite
def mutants(draw):
    name = draw(st.sampled_from(sorted(SEEDS)))
    seed = SEED_CACHE.get(name)
    out = []
    for _ in range(draw(st.integers(1, 4))):
        region, start, end = draw(st.sampled_from(seed.regions))
        if region == "header" and draw(st.booleans()):
            _name, off, fmt = draw(st.sampled_from([f for f in qi.HEADER_FIELDS if f[1] + 1 <= end]))
            if fmt == ">B":
                out.append((region, off, "byte", draw(st.integers(0, 255))))
            elif fmt == ">I":
                out.append((region, off, "u32", draw(st.sampled_from(HEADER_VALUES32) | st.integers(0, 2**32 - 1))))
            else:
                out.append((region, off, "u64", draw(st.sampled_from(HEADER_VALUES64 + seed.offsets)
                                                     | st.integers(0, 2**64 - 1))))
            continue
        pos = draw(st.integers(start, end - 1))
        kind = draw(st.sampled_from(["flip", "byte", "u64", "entry", "bytes"]))
        if kind == "flip":
            value = draw(st.integers(0, 7))
        elif kind == "byte":
            value = draw(st.integers(0, 255))
        elif kind == "u64":
            value = draw(st.integers(0, 2**64 - 1))
        elif kind == "entry":
            flags = draw(st.sampled_from([0, qi.OFLAG_COPIED, qi.OFLAG_COMPRESSED, qi.OFLAG_ZERO,
                                          qi.OFLAG_COPIED | qi.OFLAG_ZERO]))
            value = (flags | draw(st.sampled_from(seed.offsets))) & ((1 << 64) - 1)
        else:
            value = draw(st.binary(min_size=1, max_size=16))
        out.append((region, pos, kind, value))
    return name, out


def random_mutants(rng, seed, n):
    """Mutations without hypothesis, for the child-process batch (same kinds)."""
    out = []
    for _ in range(n):
        muts = []
        for _ in range(rng.randint(1, 4)):
            region, start, end = rng.choice(seed.regions)
            pos = rng.randrange(start, end)
            kind = rng.choice(["flip", "byte", "u64", "entry", "bytes"])
            value = {"flip": lambda: rng.randrange(8), "byte": lambda: rng.randrange(256),
                     "u64": lambda: rng.choice([rng.getrandbits(64)] + seed.offsets),
                     "entry": lambda: rng.choice([0, qi.OFLAG_COPIED, qi.OFLAG_COMPRESSED]) | rng.choice(seed.offsets),
                     "bytes": lambda: rng.randbytes(rng.randint(1, 16))}[kind]()
            muts.append((region, pos, kind, value))
        out.append(muts)
    return out


class SeedCache:
    def __init__(self):
        self.root = None
        self.seeds = {}

    def get(self, name):
        if name not in self.seeds:
            self.seeds[name] = Seed(name, self.root)
        return self.seeds[name]


SEED_CACHE = SeedCache()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    SEED_CACHE.root = str(tmp_path_factory.mktemp("qcow2-fuzz-seeds"))
    SEED_CACHE.seeds = {}
    for name in SEEDS:
        SEED_CACHE.get(name)
    return SEED_CACHE


def place(seed, data, directory):
    """Write a mutant as the top image of a copy of its seed's directory (so its backing file is there)."""
    if not os.path.isdir(directory):
        import shutil

        shutil.copytree(seed.directory, directory)
    path = os.path.join(directory, os.path.basename(seed.path))
    with open(path, "wb") as f:
        f.write(data)
    return path


# --- one case -----------------------------------------------------------------------------------------------
def read_all(path):
    """The whole guest view through blocksnap.image.read_guest (pieces of it for absurd virtual sizes)."""
    from blocksnap import image

    with image.open_source(path) as src:
        size = src.size
    if size <= READ_CAP:
        return size, image.read_guest(path)
    return size, image.read_guest(path, 0, MiB) + image.read_guest(path, size - MiB, MiB)


def guarded(fn, *args, timeout=CASE_TIMEOUT):
    """``("ok", value)`` / ``("raised", exception)`` of ``fn(*args)`` run in a thread, ``("hang", None)`` if it
    has not returned after ``timeout`` seconds (the thread is left behind: the test fails anyway)."""
    box = {}

    def target():
        try:
            box["ok"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - classified by the caller
            box["raised"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        return "hang", None
    return ("ok", box["ok"]) if "ok" in box else ("raised", box["raised"])


def qemu_view(path, out):
    """qemu-img convert's guest view of ``path`` read as qcow2, or None if QEMU cannot read it (or takes over 20 s)."""
    try:
        proc = subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", path, out], capture_output=True,
                              timeout=20, cwd=os.path.dirname(path), check=False)
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        return None
    with open(out, "rb") as f:
        return f.read()


def check_case(path, label, stats, keep_dir):
    """The property for one mutant at ``path``. Returns the outcome's name; raises AssertionError (saving the
    input under ``keep_dir``) when it does not hold."""
    status, value = guarded(read_all, path)

    def fail(why):
        os.makedirs(keep_dir, exist_ok=True)
        kept = os.path.join(keep_dir, f"failing-{hashlib.sha1(label.encode()).hexdigest()[:10]}.qcow2")
        with open(path, "rb") as src, open(kept, "wb") as dst:
            dst.write(src.read())
        raise AssertionError(
            f"{why}\n  input: {label}\n  kept as {kept} (its backing file, if any, next to {path})\n"
            f"  reproduce: python3 -c \"from blocksnap import image; image.read_guest('{kept}')\"")

    if status == "hang":
        fail(f"read_guest did not return within {CASE_TIMEOUT} s (a hang)")
    if status == "raised":
        if isinstance(value, errors.BlocksnapError):
            stats[f"refused {value.code}"] += 1
            return value.code
        fail(f"read_guest raised {type(value).__name__}, not a BlocksnapError: {value!r}")
    size, got = value
    if size > READ_CAP:
        stats["read (huge virtual size, not compared)"] += 1
        return "read"
    from blocksnap import image

    if image.detect_format(path) != "qcow2":  # the mutant lost its magic: a raw image, its bytes are the disk
        with open(path, "rb") as f:
            if got != f.read():
                fail("read as raw, but not the file's bytes")
        stats["read as raw (magic gone)"] += 1
        return "raw"
    want = qemu_view(path, path + ".qemu.raw")
    if want is None:
        stats["read; qemu-img convert fails"] += 1
        return "read-qemu-fails"
    if got != want:
        n = min(len(got), len(want))
        i = next((k for k in range(n) if got[k] != want[k]), n)
        fail(f"blocksnap and qemu-img convert both read the mutant but disagree: sizes {len(got)} / {len(want)}, "
             f"first difference at byte {i}")
    stats["read; same as qemu-img convert"] += 1
    return "same"


# --- the corpus ---------------------------------------------------------------------------------------------
def corpus_entries():
    if not os.path.isdir(CORPUS):
        return []
    return sorted(n for n in os.listdir(CORPUS) if n.endswith(".qcow2.gz"))


@pytest.mark.parametrize("entry", corpus_entries())
def test_corpus_input_is_read_or_refused_with_a_typed_error(entry, seeds, tmp_path):
    """Every kept corpus input: read_guest returns qemu-img convert's bytes or raises a BlocksnapError, in time."""
    seed = seeds.get(entry.split("--", 1)[0])
    with gzip.open(os.path.join(CORPUS, entry)) as f:
        data = f.read()
    path = place(seed, data, str(tmp_path / "case"))
    check_case(path, f"corpus {entry}", collections.Counter(), str(tmp_path / "kept"))


def test_the_corpus_is_small_and_names_its_seeds():
    """The corpus stays a handful of small files, each naming a seed this module builds."""
    entries = corpus_entries()
    assert 1 <= len(entries) <= 24, entries
    for e in entries:
        assert e.split("--", 1)[0] in SEEDS, e
        assert os.path.getsize(os.path.join(CORPUS, e)) <= 8 * KiB, e


# --- hypothesis, in process ---------------------------------------------------------------------------------
def test_mutated_images_are_read_as_qemu_reads_them_or_refused_with_a_typed_error(seeds, tmp_path):
    """Hypothesis over mutated seed images: read_guest returns bytes (equal to qemu-img convert's where QEMU
    reads the mutant too) or raises a BlocksnapError; never another exception or a hang."""
    stats = collections.Counter()
    counter = [0]

    @settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
    @given(mutants())
    def prop(case):
        name, muts = case
        seed = seeds.get(name)
        counter[0] += 1
        path = place(seed, apply_mutations(seed, muts), str(tmp_path / f"case-{name}"))
        check_case(path, f"seed {name}, mutations {muts!r}", stats, str(tmp_path / "kept"))

    prop()
    print(f"\nqcow2 fuzz: {counter[0]} cases: " + ", ".join(f"{k}: {v}" for k, v in sorted(stats.items())))
    assert sum(v for k, v in stats.items() if k.startswith("read")) > 0, stats  # some mutants are still images
    assert sum(v for k, v in stats.items() if k.startswith("refused")) > 0, stats


# --- a child process, for crashes of the C extension --------------------------------------------------------
CHILD = r"""
import json, sys, hashlib
from blocksnap import errors
from blocksnap.image import read_guest, open_source
for i, path in enumerate(json.load(open(sys.argv[1]))):
    print("start", i, flush=True)
    try:
        with open_source(path) as src:
            size = src.size
        data = read_guest(path) if size <= (16 << 20) else read_guest(path, 0, 1 << 20)
        print("ok", i, len(data), hashlib.sha1(data).hexdigest(), flush=True)
    except errors.BlocksnapError as exc:
        print("refused", i, exc.code, flush=True)
    except BaseException as exc:
        print("raised", i, type(exc).__name__, repr(str(exc))[:200], flush=True)
"""


def test_a_child_process_reading_the_corpus_and_seeded_mutants_never_crashes(seeds, tmp_path):
    """In a separate process (a crash of the C extension kills only it): the corpus and 10 seeded mutants of
    every seed are read or refused with BlocksnapErrors, and the process exits normally within 120 s."""
    from conftest import child_env

    paths, labels = [], []
    rng = random.Random(20240801)
    for k, entry in enumerate(corpus_entries()):
        seed = seeds.get(entry.split("--", 1)[0])
        with gzip.open(os.path.join(CORPUS, entry)) as f:
            paths.append(place(seed, f.read(), str(tmp_path / f"corpus-{k}")))
        labels.append(f"corpus {entry}")
    for name in sorted(SEEDS):
        seed = seeds.get(name)
        for j, muts in enumerate(random_mutants(rng, seed, 10)):
            paths.append(place(seed, apply_mutations(seed, muts), str(tmp_path / f"m-{name}-{j}")))
            labels.append(f"seed {name}, mutations {muts!r}")
    listing = tmp_path / "paths.json"
    listing.write_text(json.dumps(paths))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(listing)], capture_output=True, text=True,
                          env=child_env(), timeout=120, check=False)
    lines = proc.stdout.splitlines()
    started = [int(line.split()[1]) for line in lines if line.startswith("start")]
    if proc.returncode != 0:
        last = started[-1] if started else None
        raise AssertionError(f"the child exited {proc.returncode} (a signal if negative) while reading "
                             f"{labels[last] if last is not None else '?'} ({paths[last] if last is not None else ''})"
                             f"\n{proc.stderr[-2000:]}")
    bad = [line for line in lines if line.startswith("raised")]
    assert not bad, "\n".join(f"{labels[int(b.split()[1])]}: {b}" for b in bad)
    done = [line for line in lines if line.startswith(("ok", "refused"))]
    assert len(done) == len(paths), (len(done), len(paths), proc.stderr[-2000:])
