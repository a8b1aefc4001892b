"""Synthetic raw VM disk image for the benchmarks, and its "1 % change".

The image is cut into extents of 1-4 MiB (1 MiB aligned). The extents are
given a kind in shuffled order until the byte shares are met: 40 % random
data (incompressible, never repeating), 20 % log-like text (syslog, nginx,
kernel and application lines; zstd compresses it about 3-4x) and 40 % holes
that are never written, so the file stays sparse (check with ``du``).

Everything derives from the seed: the same seed gives the same bytes.
Random bytes come from SHAKE-128 keyed by (seed, extent index), which is the
fastest seeded generator in the standard library; extents are written by a
few forked workers in parallel. Text extents are slices of one text pool,
each with its own permutation of the digits, so no two are alike (a
deduplicating peer cannot cheat) while the text stays as compressible.

    python3 bench/workload.py make PATH [--size 2G] [--seed N]
    python3 bench/workload.py change PATH [--seed N] [--count 20]
"""
import argparse
import hashlib
import multiprocessing
import os
import random
import sys
import time

MiB = 1 << 20
RANDOM_SHARE = 0.40
TEXT_SHARE = 0.20
CHANGE_COUNT = 20
CHANGE_SIZE = MiB
TEXT_POOL_SIZE = 8 * MiB
# The data extents are split round-robin over this many forked writers.
MAX_WORKERS = 4

HOLE, RANDOM, TEXT = "hole", "random", "text"

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text):
    """Parse a byte count such as ``2G``, ``256M``, ``64K``, ``1MiB`` or ``4096``.

    Args:
        text: the size; binary units (K = 1024).
    Returns:
        The size in bytes as an int.
    Raises:
        ValueError if the text is not a size.
    """
    s = text.strip().upper()
    for suffix in ("IB", "B"):
        if s.endswith(suffix) and len(s) > len(suffix):
            s = s[: -len(suffix)]
            break
    unit = s[-1:] if s[-1:] in ("K", "M", "G", "T") else ""
    number = s[: len(s) - len(unit)]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a size: {text!r}") from None
    if value < 0:
        raise ValueError(f"negative size: {text!r}")
    return int(value * _UNITS[unit])


def plan_extents(size, seed):
    """Cut ``size`` bytes into extents and give each one a kind.

    Args:
        size: image size in bytes.
        seed: the workload seed.
    Returns:
        A list of ``(offset, length, kind)`` in offset order; kind is
        ``"random"``, ``"text"`` or ``"hole"``.
    """
    rng = random.Random(seed)
    extents = []
    offset = 0
    while offset < size:
        length = min(rng.randint(1, 4) * MiB, size - offset)
        extents.append([offset, length, HOLE])
        offset += length
    order = list(range(len(extents)))
    rng.shuffle(order)
    want_random = RANDOM_SHARE * size
    want_text = TEXT_SHARE * size
    got_random = got_text = 0
    for i in order:
        length = extents[i][1]
        if got_random < want_random:
            extents[i][2] = RANDOM
            got_random += length
        elif got_text < want_text:
            extents[i][2] = TEXT
            got_text += length
        else:
            break
    return [tuple(e) for e in extents]


def random_bytes(seed, tag, length):
    """``length`` pseudo-random bytes determined by ``(seed, tag)``."""
    return hashlib.shake_128(f"blocksnap-bench/{seed}/{tag}".encode()).digest(length)


# --- log-like text -------------------------------------------------------------------------------------

_MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
_DAEMONS = ["sshd", "systemd", "cron", "kernel", "dockerd", "containerd", "postfix/smtpd", "nginx",
            "CRON", "systemd-logind", "rsyslogd", "kubelet", "chronyd", "dbus-daemon"]
_USERS = ["root", "ubuntu", "deploy", "admin", "git", "www-data", "postgres", "backup", "jenkins"]
_PATHS = ["/api/v1/items", "/api/v1/users", "/api/v2/orders", "/static/js/app.js", "/static/css/main.css",
          "/healthz", "/metrics", "/login", "/logout", "/search", "/images/logo.png", "/favicon.ico",
          "/api/v1/cart", "/api/v1/session", "/wp-login.php", "/robots.txt"]
_METHODS = ["GET"] * 8 + ["POST"] * 3 + ["PUT", "DELETE", "HEAD"]
_STATUS = [200] * 20 + [201, 204, 301, 302, 304, 304, 400, 401, 403, 404, 404, 404, 499, 500, 502, 503]
_AGENTS = [
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/119.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:120.0) Gecko/20100101 Firefox/120.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "curl/7.88.1", "Go-http-client/1.1", "python-requests/2.31.0", "kube-probe/1.28",
    "Prometheus/2.48.0", "Googlebot/2.1 (+http://www.google.com/bot.html)",
]
_LEVELS = ["INFO"] * 10 + ["DEBUG"] * 4 + ["WARN"] * 2 + ["ERROR"]
_KMSGS = ["EXT4-fs (vda1): mounted filesystem with ordered data mode",
          "TCP: request_sock_TCP: Possible SYN flooding", "virtio_net virtio0 eth0: link up",
          "audit: type=1400 audit: apparmor=\"STATUS\" operation=\"profile_load\"",
          "nf_conntrack: table full, dropping packet", "Out of memory: Killed process"]
_APPMSGS = ["request completed", "cache miss", "cache hit", "user authenticated", "query executed",
            "retrying upstream", "connection reset by peer", "job scheduled", "job finished", "slow query"]


def _ip(rng):
    return f"{rng.choice((10, 172, 192))}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def _text_pool(seed, size=TEXT_POOL_SIZE):
    """About ``size`` bytes of log lines with increasing timestamps (built once per process)."""
    rng = random.Random(f"text/{seed}")
    hosts = [f"web-{i:02d}" for i in range(12)] + [f"db-{i}" for i in range(4)] + ["lb-1", "build-3"]
    t = 1_700_000_000.0 + rng.randrange(10_000_000)
    lines = []
    total = 0
    while total < size:
        t += rng.expovariate(50.0)
        tm = time.gmtime(t)
        ms = int((t % 1) * 1000)
        kind = rng.random()
        if kind < 0.45:
            path = rng.choice(_PATHS)
            if rng.random() < 0.5:
                path += f"/{rng.randrange(100000)}"
            if rng.random() < 0.3:
                path += f"?page={rng.randrange(50)}&limit={rng.choice((10, 20, 50, 100))}"
            line = (f'{_ip(rng)} - - [{tm.tm_mday:02d}/{_MONTHS[tm.tm_mon - 1]}/{tm.tm_year}:'
                    f'{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} +0000] "{rng.choice(_METHODS)} {path} '
                    f'HTTP/1.1" {rng.choice(_STATUS)} {int(rng.lognormvariate(7, 2))} "-" '
                    f'"{rng.choice(_AGENTS)}" rt={rng.random() * 0.5:.3f} uct={rng.random() * 0.01:.4f} '
                    f'upstream={_ip(rng)}:{rng.choice((8080, 8000, 9000))} req_id={rng.getrandbits(96):024x}')
        elif kind < 0.75:
            daemon = rng.choice(_DAEMONS)
            host = rng.choice(hosts)
            if daemon == "sshd":
                msg = (f"Accepted publickey for {rng.choice(_USERS)} from {_ip(rng)} port "
                       f"{rng.randrange(1024, 65535)} ssh2: ED25519 SHA256:"
                       f"{random_bytes(seed, rng.randrange(1 << 30), 8).hex()}")
            elif daemon == "kernel":
                msg = f"[{t % 100000:12.6f}] {rng.choice(_KMSGS)}"
            elif daemon in ("cron", "CRON"):
                msg = (f"({rng.choice(_USERS)}) CMD "
                       f"(/usr/local/bin/job-{rng.randrange(40)}.sh >/dev/null 2>&1)")
            else:
                msg = (f"{rng.choice(_APPMSGS)}: unit={daemon}.service pid={rng.randrange(100, 99999)} "
                       f"mem={rng.randrange(1, 4096)}M cpu={rng.random() * 100:.1f}%")
            line = (f"{_MONTHS[tm.tm_mon - 1]} {tm.tm_mday:2d} "
                    f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} "
                    f"{host} {daemon}[{rng.randrange(100, 65535)}]: {msg}")
        else:
            line = (f'{{"ts":"{tm.tm_year}-{tm.tm_mon:02d}-{tm.tm_mday:02d}T{tm.tm_hour:02d}:{tm.tm_min:02d}:'
                    f'{tm.tm_sec:02d}.{ms:03d}Z","level":"{rng.choice(_LEVELS)}",'
                    f'"host":"{rng.choice(hosts)}",'
                    f'"msg":"{rng.choice(_APPMSGS)}","trace_id":"{rng.getrandbits(128):032x}",'
                    f'"span_id":"{rng.getrandbits(64):016x}",'
                    f'"user_id":{rng.randrange(1, 500000)},"duration_ms":{rng.randrange(1, 3000)}}}')
        lines.append(line)
        total += len(line) + 1
    pool = ("\n".join(lines) + "\n").encode()
    return pool[:size]


def text_bytes(pool, seed, tag, length):
    """``length`` bytes of log text: a slice of ``pool`` with its own digit permutation.

    Args:
        pool: the text pool from ``_text_pool``.
        seed, tag: determine the slice start and the permutation.
        length: bytes wanted.
    Returns:
        bytes of the given length.
    """
    rng = random.Random(f"text-extent/{seed}/{tag}")
    digits = list(b"0123456789")
    rng.shuffle(digits)
    table = bytes.maketrans(b"0123456789", bytes(digits))
    out = bytearray()
    start = rng.randrange(len(pool))
    while len(out) < length:
        piece = pool[start:start + (length - len(out))]
        out += piece
        start = 0
    return bytes(out).translate(table)


def _write_extents(path, seed, extents):
    pool = None
    fd = os.open(path, os.O_WRONLY)
    try:
        for index, offset, length, kind in extents:
            if kind == RANDOM:
                data = random_bytes(seed, f"extent/{index}", length)
            else:
                if pool is None:
                    pool = _text_pool(seed)
                data = text_bytes(pool, seed, f"extent/{index}", length)
            view = memoryview(data)
            done = 0
            while done < length:
                done += os.pwrite(fd, view[done:], offset + done)
    finally:
        os.close(fd)


def make_image(path, size=2 << 30, seed=0, workers=None):
    """Write a sparse workload image.

    Args:
        path: the image file; replaced if it exists.
        size: image size in bytes (default 2 GiB).
        seed: workload seed; the same seed gives the same bytes.
        workers: forked writer processes (default: CPUs, at most 4).
    Returns:
        A dict with the byte counts per kind: ``{"random": n, "text": n, "hole": n, "extents": n}``.
    Raises:
        OSError if the file cannot be written; RuntimeError if a writer failed.
    """
    plan = plan_extents(size, seed)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    data = [(i, off, length, kind) for i, (off, length, kind) in enumerate(plan) if kind != HOLE]
    if workers is None:
        workers = max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    workers = max(1, min(workers, len(data)))
    if workers == 1 or "fork" not in multiprocessing.get_all_start_methods():
        _write_extents(path, seed, data)
    else:
        ctx = multiprocessing.get_context("fork")
        procs = [ctx.Process(target=_write_extents, args=(path, seed, data[w::workers]))
                 for w in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [p.exitcode for p in procs if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"workload writer failed with exit codes {failed}")
    stats = {RANDOM: 0, TEXT: 0, HOLE: 0, "extents": len(plan)}
    for _off, length, kind in plan:
        stats[kind] += length
    return stats


def change_image(path, seed=1, count=CHANGE_COUNT, region=CHANGE_SIZE):
    """Overwrite ``count`` distinct aligned regions of ``region`` bytes with new random data.

    The default (20 regions of 1 MiB) is the benchmarks' "1 % change" of a 2 GiB image.

    Args:
        path: an existing image.
        seed: picks the regions and their new bytes.
        count, region: how many regions, and their size (also their alignment).
    Returns:
        The sorted list of changed byte offsets.
    Raises:
        ValueError if the image has fewer than ``count`` regions.
    """
    size = os.path.getsize(path)
    slots = size // region
    if slots < count:
        raise ValueError(f"{path}: {size} bytes hold fewer than {count} regions of {region}")
    rng = random.Random(f"change/{seed}")
    offsets = sorted(i * region for i in rng.sample(range(slots), count))
    fd = os.open(path, os.O_WRONLY)
    try:
        for off in offsets:
            data = memoryview(random_bytes(seed, f"change/{off}", region))
            done = 0
            while done < region:
                done += os.pwrite(fd, data[done:], off + done)
    finally:
        os.close(fd)
    return offsets


def _main(argv=None):
    parser = argparse.ArgumentParser(prog="workload.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_make = sub.add_parser("make", help="write a sparse workload image")
    p_make.add_argument("path")
    p_make.add_argument("--size", default="2G", help="image size, e.g. 2G, 256M (default 2G)")
    p_make.add_argument("--seed", type=int, default=0)
    p_make.add_argument("--workers", type=int, default=None)
    p_change = sub.add_parser("change", help="overwrite 20 random 1 MiB regions with new data")
    p_change.add_argument("path")
    p_change.add_argument("--seed", type=int, default=1)
    p_change.add_argument("--count", type=int, default=CHANGE_COUNT)
    args = parser.parse_args(argv)

    if args.command == "make":
        size = parse_size(args.size)
        t0 = time.perf_counter()
        stats = make_image(args.path, size, args.seed, args.workers)
        elapsed = time.perf_counter() - t0
        print(f"{args.path}: {size / MiB:.0f} MiB in {stats['extents']} extents, "
              f"random {stats[RANDOM] / MiB:.0f} MiB, text {stats[TEXT] / MiB:.0f} MiB, "
              f"holes {stats[HOLE] / MiB:.0f} MiB, {elapsed:.2f} s")
    else:
        offsets = change_image(args.path, args.seed, args.count)
        for off in offsets:
            print(off)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
