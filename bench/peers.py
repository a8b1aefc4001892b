"""blocksnap against its peers (restic, borg) and the hardware limits, on one image in one run.

Sequence (the same bytes for every tool):
  1. make the workload image (bench/workload.py) and keep a sparse pristine copy;
  2. init every repository (untimed in the table);
  3. full backups of the pristine image: blocksnap, restic, borg; xxhsum of it as the read limit;
  4. apply the "1 % change" once (20 x 1 MiB of new random data);
  5. incremental backups of the changed image: blocksnap, restic, borg; ``xxhsum -H128`` as the limit;
  6. restores of the newest snapshot, each compared with the image (cmp);
     ``qemu-img convert -O raw`` from a qcow2 copy (made untimed) as the restore reference.
Every timed step is one child process: wall time from spawn to reap, peak RSS from ``os.wait4``.
``sync`` runs before each timed step; ``--cold`` also drops the page cache.

    python3 bench/peers.py [--size 2G] [--workdir DIR] [--keep] [--cold]
    python3 bench/peers.py --chunk-sizes 64K,256K,1M      # blocksnap only, one repo per chunk size

Writes bench/out/peers-<timestamp>.md and .json (chunks-<timestamp>.* for --chunk-sizes).
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
sys.path.insert(0, BENCH_DIR)

import workload

MiB = 1 << 20
TOOLS = ("blocksnap", "restic", "borg", "ref")

# Targets from the issue: (key, description, kind, arguments). See check_targets().
TARGETS_TEXT = """\
full >= 8x faster than restic backup, >= 5x faster than borg create
incremental >= 10x faster than restic's second backup, <= 1.5x xxhsum -H128
restore >= 6x faster than restic restore, <= 1.5x qemu-img convert qcow2->raw
repo after full+incr <= restic's; incremental adds <= 1.15x the changed bytes
peak RSS <= 80 MiB"""


class StepFailed(Exception):
    """A timed command exited non-zero, was killed, or printed something unusable."""

    def __init__(self, tool, step, message, stderr=""):
        super().__init__(f"{tool} {step}: {message}")
        self.tool = tool
        self.step = step
        self.message = message
        self.stderr = stderr


def gnu_time():
    """Path of GNU time if installed, else None.

    A child forked from this Python process inherits its high-water RSS: Linux carries the old
    mm's peak into ``ru_maxrss`` across exec (fs/exec.c, exec_mmap: setmax_mm_hiwater_rss), so
    ``os.wait4`` alone reports at least this script's own ~20 MiB even for ``true``. GNU time is a
    small C program that forks the command itself and reports the command's own peak (%M).
    """
    path = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    if not path:
        return None
    try:
        p = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return path if "GNU" in (p.stdout + p.stderr) else None


REPORTED_KIB = "/sys/module/page_reporting/parameters/reported_kib"


def reported_kib():
    """KiB of free memory the guest has handed back to the hypervisor so far (free page reporting), or None.

    Memory handed back is slow to write into again (bench/README.md, "Why memory ..."), so the
    report keeps how much went back while each step was prepared and while it ran.
    """
    try:
        with open(REPORTED_KIB) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _mib_between(before, after):
    return None if before is None or after is None else round((after - before) / 1024, 1)


def warm_read(path):
    """Read every file under ``path`` once (untimed), so a warm-cache step really finds it cached.

    On this kind of VM the first read of a file written a few seconds earlier can be several times
    slower than the next one; whichever tool came first would pay for it.
    """
    buf = bytearray(8 * MiB)
    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for name in files:
        try:
            with open(name, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
        except OSError:
            pass


class Bench:
    """Runs timed child processes and keeps every measurement."""

    def __init__(self, workdir, cold=False, timeout=1800, verbose=True):
        self.workdir = workdir
        self.cold = cold
        self.timeout = timeout
        self.verbose = verbose
        self.steps = []
        self.errors = []
        self._cold_warned = False
        self.repeat = 0
        self.time_cmd = gnu_time()
        self.rss_floor_kib = None
        self.rss_method = ("GNU time %M (the command's own peak)" if self.time_cmd
                           else "os.wait4 ru_maxrss (includes the launcher's ~20 MiB floor)")

    def log(self, msg):
        if self.verbose:
            print(msg, file=sys.stderr, flush=True)

    def _prepare(self, warm):
        if not self.cold:
            # Same memory state for every tool whatever ran before it: write back, drop the clean
            # page cache (otherwise the first tool to write after others filled memory pays for the
            # kernel's reclaim, which made the run order decide restore times), then read this
            # step's inputs so that they are cached.
            os.sync()
            self._drop_caches()
            for path in warm or ():
                warm_read(path)
        os.sync()
        if not self.cold:
            return
        self._drop_caches()

    @staticmethod
    def _warm_program(argv, env):
        """Start the program once, untimed, so its own files (a Go binary, or an interpreter and its
        modules) are cached like the step's inputs: dropping the cache must not cost the Python tools
        their imports while a static binary pays one read."""
        prog = os.path.basename(argv[0])
        probe = [argv[0], "version"] if prog == "restic" else [argv[0], "--version"]
        if prog.startswith("python"):
            probe = argv[:3] + ["--version"] if argv[1:2] == ["-c"] else [argv[0], "--version"]
        subprocess.run(probe, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       stdin=subprocess.DEVNULL, check=False)

    def _drop_caches(self):
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError as exc:
            if not self._cold_warned:
                self.log(f"WARNING: cannot drop the page cache ({exc}); run order may skew times")
                self._cold_warned = True

    def measure_floor(self):
        """Peak RSS reported for ``true``: what the method adds to every measurement."""
        rec = self.run("ref", "true (RSS floor)", ["true"], timed=False, quiet=True)
        self.rss_floor_kib = rec["maxrss_kib"]
        self.steps.pop()
        return self.rss_floor_kib

    def run(self, tool, step, argv, env=None, cwd=None, timed=True, warm=(), quiet=False):
        """Run ``argv`` as one child; return its record. Raise StepFailed on a non-zero exit.

        Args:
            warm: paths read once before a timed step when the cache is warm (not with --cold).
        The record has wall_s (spawn to reap), maxrss_kib (the command's own peak from GNU time,
        else ``ru_maxrss`` from ``os.wait4``), user_s and sys_s, reported_mib_prep and
        reported_mib_step (memory handed back to the hypervisor while the step was prepared and
        while it ran, None without the counter), rc, stdout and stderr.
        """
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        argv = [str(a) for a in argv]
        prep_start = reported_kib()
        if timed:
            self._prepare(warm)
            if not self.cold:
                self._warm_program(argv, full_env)
        step_start = reported_kib()
        rss_file = None
        launch = argv
        if self.time_cmd:
            fd, rss_file = tempfile.mkstemp(dir=self.workdir, prefix=".rss-")
            os.close(fd)
            launch = [self.time_cmd, "-f", "%M", "-o", rss_file] + argv
        with tempfile.TemporaryFile(dir=self.workdir) as out, tempfile.TemporaryFile(dir=self.workdir) as err:
            t0 = time.perf_counter()
            try:
                proc = subprocess.Popen(launch, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                        env=full_env, cwd=cwd)
            except OSError:
                if rss_file:
                    os.unlink(rss_file)
                raise
            killer = threading.Timer(self.timeout, proc.kill)
            killer.start()
            try:
                _pid, status, usage = os.wait4(proc.pid, 0)
            finally:
                killer.cancel()
            wall = time.perf_counter() - t0
            rc = os.waitstatus_to_exitcode(status)
            proc.returncode = rc  # reaped by wait4 above; tell Popen so it does not wait again
            out.seek(0)
            err.seek(0)
            stdout = out.read().decode(errors="replace")
            stderr = err.read().decode(errors="replace")
        maxrss = usage.ru_maxrss
        if rss_file:
            with open(rss_file) as f:
                lines = [line.strip() for line in f if line.strip()]
            os.unlink(rss_file)
            # GNU time writes "Command exited with non-zero status N" before the format line.
            if lines and lines[-1].isdigit():
                maxrss = int(lines[-1])
            if rc == 127 and not stdout and "time:" in stderr:
                stderr += f"\n(GNU time could not start {argv[0]})"
        rec = {"tool": tool, "step": step, "argv": argv, "timed": timed,
               "wall_s": wall, "maxrss_kib": maxrss, "rc": rc,
               "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "repeat": self.repeat,
               "reported_mib_prep": _mib_between(prep_start, step_start),
               "reported_mib_step": _mib_between(step_start, reported_kib())}
        self.steps.append(rec)
        if not quiet:
            back = ""
            if rec["reported_mib_prep"] is not None:
                back = (f", memory handed back to the host: {rec['reported_mib_prep']:.0f} MiB before, "
                        f"{rec['reported_mib_step']:.0f} MiB during")
            self.log(f"  [{tool}] {step}: {wall:.2f} s (CPU {usage.ru_utime + usage.ru_stime:.2f} s), "
                     f"peak RSS {maxrss / 1024:.1f} MiB, rc {rc}{back}")
        rec["stdout"] = stdout
        rec["stderr"] = stderr
        if rc != 0:
            why = f"killed after {self.timeout} s" if rc == -9 else f"exit code {rc}"
            raise StepFailed(tool, step, f"{why}: {shlex.join(rec['argv'])}", stderr or stdout)
        return rec

    def fail(self, exc):
        """Record and print a failed step loudly, stderr included."""
        self.errors.append({"tool": exc.tool, "step": exc.step, "message": exc.message,
                            "stderr": exc.stderr[-4000:]})
        bar = "!" * 78
        print(f"\n{bar}\n{exc.tool.upper()} FAILED at '{exc.step}': {exc.message}", file=sys.stderr)
        if exc.stderr.strip():
            print("--- output (tail) ---", file=sys.stderr)
            print(exc.stderr[-4000:].rstrip(), file=sys.stderr)
        print(bar + "\n", file=sys.stderr, flush=True)


def du(path):
    """``(apparent, allocated)`` bytes of a path, from ``du -sb`` and ``du -sk``."""
    apparent = int(subprocess.run(["du", "-sb", path], check=True, capture_output=True, text=True)
                   .stdout.split()[0])
    allocated = int(subprocess.run(["du", "-sk", path], check=True, capture_output=True, text=True)
                    .stdout.split()[0]) * 1024
    return apparent, allocated


def same_bytes(a, b):
    """True if the two files hold the same bytes (holes read as zeros)."""
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


def sparse_copy(src, dst):
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)


def parse_json_field(text, key):
    """Find ``key`` in the JSON object a command printed (the whole output or its last JSON line)."""
    candidates = [text.strip()] + [line.strip() for line in reversed(text.splitlines())
                                   if line.strip().startswith("{")]
    for cand in candidates:
        try:
            obj = json.loads(cand)
        except ValueError:
            continue
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k.lower().replace("_", "") == key.lower():
                    return v
    return None


def blocksnap_command(override=None):
    """argv prefix that runs the blocksnap CLI.

    In order: --blocksnap; the console script ``pip install`` put beside the Python running this
    bench; ``blocksnap`` on PATH; the package's ``cli.main``. The console script comes before PATH because
    PATH may hold a version manager's wrapper instead: pyenv's shim is a bash script that runs
    ~10 processes (pyenv, readlink, pyenv-version, ...) before the real script, 50-60 ms per call
    on the reference machine, which no installed copy of blocksnap pays (and borg, Debian's
    /usr/bin/borg, does not either).

    Every one of them runs the installed package (``pip install .``, byte-compiled and with its compiled
    core), never this source tree, which has no compiled core: the last one drops the current directory
    from ``sys.path`` (``python -c`` puts it first), in case that is the repository root.
    """
    if override:
        return shlex.split(override), f"--blocksnap {override!r}"
    script = os.path.join(sysconfig.get_path("scripts"), "blocksnap")
    if os.access(script, os.X_OK):
        return [script], script
    found = shutil.which("blocksnap")
    if found:
        return [found], found
    return ([sys.executable, "-c", "import sys; del sys.path[0]; from blocksnap.cli.main import main; "
             "sys.exit(main())"], f"blocksnap.cli.main:main() of the package {sys.executable} imports")


def installed_blocksnap():
    """``(package directory, same_as_tree)`` of the blocksnap this Python imports, found without importing
    it; ``(None, False)`` if there is none. ``same_as_tree`` is true when its Python files are this tree's:
    otherwise a report's commit (``git describe`` of the tree) is not what was measured."""
    import filecmp
    import importlib.util

    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != REPO_ROOT]
    try:
        spec = importlib.util.find_spec("blocksnap")
    finally:
        sys.path[:] = saved
    if spec is None or not spec.submodule_search_locations:
        return None, False
    installed = list(spec.submodule_search_locations)[0]
    tree = os.path.join(REPO_ROOT, "blocksnap")
    same = True
    for root, _dirs, files in os.walk(tree):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, name), tree)
                there = os.path.join(installed, rel)
                if not (os.path.exists(there) and filecmp.cmp(os.path.join(tree, rel), there, shallow=False)):
                    same = False
    return installed, same


def package_text():
    """Which blocksnap the numbers are of, for the report and the log."""
    where, same = installed_blocksnap()
    if where is None:
        return "no installed blocksnap package found (pip install .)"
    if same:
        return f"the installed package at {where} (its Python files are this tree's)"
    return f"the installed package at {where}, which is NOT this tree (its Python files differ: pip install .)"


# --- tools ------------------------------------------------------------------------------------------------

class Blocksnap:
    name = "blocksnap"

    def __init__(self, bench, workdir, image, cmd, chunk_size=None, tag=""):
        self.b = bench
        self.cmd = cmd
        self.repo = os.path.join(workdir, f"blocksnap-repo{tag}")
        self.out = os.path.join(workdir, f"restore-blocksnap{tag}.raw")
        self.image = image
        self.chunk_size = chunk_size
        self.env = None  # the installed package (blocksnap_command), whatever directory this runs in
        self.disk_id = None
        self.snapshots = []

    def _run(self, step, args, timed=True, warm=()):
        return self.b.run(self.name, step, self.cmd + ["--repo", self.repo] + args, env=self.env, timed=timed,
                          warm=warm)

    def init(self):
        args = ["init"] + (["--chunk-size", str(self.chunk_size)] if self.chunk_size else [])
        self._run("init", args, timed=False)
        rec = self._run("disk add", ["disk", "add", self.image, "--json"], timed=False)
        self.disk_id = parse_json_field(rec["stdout"], "DiskId")
        if not self.disk_id:
            raise StepFailed(self.name, "disk add", "no DiskId in the JSON output",
                             rec["stdout"] + rec["stderr"])

    def _snapshot(self, step):
        rec = self._run(step, ["snapshot", "create", str(self.disk_id), "--json"],
                        warm=[self.image, self.repo])
        sid = parse_json_field(rec["stdout"], "SnapshotId")
        if not sid:
            raise StepFailed(self.name, step, "no SnapshotId in the JSON output",
                             rec["stdout"] + rec["stderr"])
        self.snapshots.append(sid)
        return rec

    def full(self):
        return self._snapshot("full")

    def incr(self):
        return self._snapshot("incr")

    def restore(self):
        if os.path.exists(self.out):
            os.unlink(self.out)
        rec = self._run("restore", ["restore", str(self.snapshots[-1]), self.out], warm=[self.repo])
        return rec, self.out


class Restic:
    name = "restic"

    def __init__(self, bench, workdir, image):
        self.b = bench
        self.repo = os.path.join(workdir, "restic-repo")
        self.target = os.path.join(workdir, "restore-restic")
        self.image = image
        self.env = {"RESTIC_PASSWORD": "bench", "RESTIC_REPOSITORY": self.repo,
                    "RESTIC_CACHE_DIR": os.path.join(workdir, "restic-cache")}

    def _run(self, step, args, timed=True, warm=()):
        return self.b.run(self.name, step, ["restic"] + args, env=self.env, timed=timed, warm=warm)

    def init(self):
        self._run("init", ["init"], timed=False)

    def full(self):
        return self._run("full", ["backup", self.image], warm=[self.image])

    def incr(self):
        return self._run("incr", ["backup", self.image],
                         warm=[self.image, self.repo, self.env["RESTIC_CACHE_DIR"]])

    def restore(self):
        shutil.rmtree(self.target, ignore_errors=True)
        rec = self._run("restore", ["restore", "latest", "--target", self.target],
                        warm=[self.repo, self.env["RESTIC_CACHE_DIR"]])
        return rec, os.path.join(self.target, self.image.lstrip("/"))


class Borg:
    name = "borg"

    def __init__(self, bench, workdir, image):
        self.b = bench
        self.repo = os.path.join(workdir, "borg-repo")
        self.target = os.path.join(workdir, "restore-borg")
        self.image = image
        self.env = {"BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                    "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
                    "BORG_BASE_DIR": os.path.join(workdir, "borg-base")}

    def _run(self, step, args, timed=True, cwd=None, warm=()):
        return self.b.run(self.name, step, ["borg"] + args, env=self.env, timed=timed, cwd=cwd, warm=warm)

    def init(self):
        self._run("init", ["init", "--encryption=none", self.repo], timed=False)

    def full(self):
        return self._run("full", ["create", f"{self.repo}::full", self.image], warm=[self.image])

    def incr(self):
        return self._run("incr", ["create", f"{self.repo}::incr", self.image],
                         warm=[self.image, self.repo, self.env["BORG_BASE_DIR"]])

    def restore(self):
        shutil.rmtree(self.target, ignore_errors=True)
        os.makedirs(self.target)
        rec = self._run("restore", ["extract", "--sparse", f"{self.repo}::incr"], cwd=self.target,
                        warm=[self.repo, self.env["BORG_BASE_DIR"]])
        return rec, os.path.join(self.target, self.image.lstrip("/"))


# --- machine info -----------------------------------------------------------------------------------------

def _first_line(argv):
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (p.stdout.strip() or p.stderr.strip()).splitlines()
    if p.returncode != 0:
        return f"unavailable (rc {p.returncode})"
    return text[0] if text else "(no output)"


def machine_info(workdir, bs_cmd):
    mem = "?"
    cpu = platform.processor() or "?"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    fs = subprocess.run(["df", "-T", workdir], capture_output=True, text=True).stdout.splitlines()
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram": mem,
        "kernel": platform.release(),
        "workdir_fs": fs[-1].split()[1] if len(fs) > 1 else "?",
        "python": sys.version.split()[0],
        "restic": _first_line(["restic", "version"]),
        "borg": _first_line(["borg", "--version"]),
        "xxhsum": _first_line(["xxhsum", "--version"]),
        "qemu-img": _first_line(["qemu-img", "--version"]),
        "blocksnap": _first_line(bs_cmd + ["--version"]),
        "blocksnap_git": _first_line(["git", "-C", REPO_ROOT, "describe", "--always", "--dirty"]),
        "blocksnap_package": package_text(),
    }


# --- the peers run ----------------------------------------------------------------------------------------

def _mib(n):
    return None if n is None else n / MiB


def _fmt(v, digits=2):
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    return f"{v:.{digits}f}"


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def run_peers(args, bench, workdir):
    image = os.path.join(workdir, "disk.img")
    pristine = os.path.join(workdir, "pristine.img")
    size = workload.parse_size(args.size)
    want = set(args.tools.split(","))
    bs_cmd, bs_how = blocksnap_command(args.blocksnap)

    bench.log(f"making a {size / MiB:.0f} MiB workload image (seed {args.seed}) in {workdir}")
    t0 = time.perf_counter()
    stats = workload.make_image(image, size, args.seed)
    make_s = time.perf_counter() - t0
    sparse_copy(image, pristine)
    img_apparent, img_alloc = du(image)
    bench.log(f"  {make_s:.1f} s; random {stats['random'] / MiB:.0f} MiB, "
              f"text {stats['text'] / MiB:.0f} MiB, "
              f"holes {stats['hole'] / MiB:.0f} MiB; allocated {img_alloc / MiB:.0f} MiB")
    bench.log(f"blocksnap runs as: {bs_how}, {package_text()}")
    bench.log(f"peak RSS via {bench.rss_method}; floor (RSS reported for `true`) "
              f"{bench.measure_floor() / 1024:.1f} MiB")

    runs = []
    failed = {}
    offsets = []
    for i in range(args.repeat):
        if i:
            for name in os.listdir(workdir):
                if name.startswith(("blocksnap-repo", "restic-", "borg-", "restore-", "ref")):
                    shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
            sparse_copy(pristine, image)
        bench.repeat = i
        if args.repeat > 1:
            bench.log(f"=== repeat {i + 1} of {args.repeat}")
        res, ref, offsets, failed_i = run_once(args, bench, workdir, image, bs_cmd, want)
        runs.append((res, ref))
        for k, v in failed_i.items():
            failed.setdefault(k, v)
    res, ref = aggregate(runs)
    return build_report(args, bench, size, stats, make_s, img_apparent, img_alloc, offsets, res, ref,
                        bs_how, failed, runs)


def _median(values):
    if not values or any(v is None for v in values):
        return None
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def aggregate(runs):
    """Median times over the repeats; the largest RSS; sizes of the last repeat; restores all equal."""
    if len(runs) == 1:
        return runs[0]
    res = {}
    for tool in runs[0][0]:
        rs = [r[0][tool] for r in runs]
        res[tool] = {k: _median([r[k] for r in rs]) for k in ("full", "incr", "restore")}
        res[tool]["rss_kib"] = max(r["rss_kib"] for r in rs)
        res[tool]["size_full"] = rs[-1]["size_full"]
        res[tool]["size_incr"] = rs[-1]["size_incr"]
        oks = [r["restore_ok"] for r in rs]
        res[tool]["restore_ok"] = None if any(o is None for o in oks) else all(oks)
    refs = [r[1] for r in runs]
    ref = {k: _median([r[k] for r in refs]) for k in ("xxhsum_pristine", "xxhsum", "qemu_restore")}
    ref["rss_kib"] = max(r["rss_kib"] for r in refs)
    return res, ref


def run_once(args, bench, workdir, image, bs_cmd, want):
    """One full, change, incremental, restore sequence for every tool.

    Returns:
        ``(res, ref, offsets, failed)``: per-tool results, reference results, the changed offsets,
        and the first failed step per tool.
    """
    tools = []
    if "blocksnap" in want:
        tools.append(Blocksnap(bench, workdir, image, bs_cmd))
    if "restic" in want:
        tools.append(Restic(bench, workdir, image))
    if "borg" in want:
        tools.append(Borg(bench, workdir, image))
    failed = {}  # tool name -> first failed step; later steps of that tool are skipped
    res = {t.name: {"full": None, "incr": None, "restore": None, "rss_kib": 0, "size_full": None,
                    "size_incr": None, "restore_ok": None} for t in tools}
    ref = {"xxhsum_pristine": None, "xxhsum": None, "qemu_restore": None, "rss_kib": 0}

    def step(tool, fn):
        if tool.name in failed:
            return None
        try:
            return fn()
        except StepFailed as exc:
            failed[tool.name] = exc.step
            bench.fail(exc)
        except OSError as exc:
            failed[tool.name] = "?"
            bench.fail(StepFailed(tool.name, "?", f"could not run: {exc}"))
        return None

    def keep(tool, phase, rec):
        if rec is not None:
            res[tool.name][phase] = rec["wall_s"]
            res[tool.name]["rss_kib"] = max(res[tool.name]["rss_kib"], rec["maxrss_kib"])

    def ref_run(key, step, argv, warm):
        try:
            rec = bench.run("ref", step, argv, warm=warm)
        except (StepFailed, OSError) as exc:
            bench.fail(exc if isinstance(exc, StepFailed) else StepFailed("ref", step, str(exc)))
            return
        ref[key] = rec["wall_s"]
        ref["rss_kib"] = max(ref["rss_kib"], rec["maxrss_kib"])

    bench.log("init (untimed)")
    for t in tools:
        step(t, t.init)

    bench.log("full backups of the pristine image")
    if "ref" in want:
        ref_run("xxhsum_pristine", "xxhsum -H128 (pristine)", ["xxhsum", "-H128", image], [image])
    for t in tools:
        keep(t, "full", step(t, t.full))
        if t.name not in failed:
            res[t.name]["size_full"] = du(t.repo)

    offsets = workload.change_image(image, args.change_seed)
    bench.log(f"changed {len(offsets)} x 1 MiB at offsets {offsets}")

    bench.log("incremental backups of the changed image")
    for t in tools:
        keep(t, "incr", step(t, t.incr))
        if t.name not in failed:
            res[t.name]["size_incr"] = du(t.repo)
    if "ref" in want:
        ref_run("xxhsum", "xxhsum -H128", ["xxhsum", "-H128", image], [image])

    bench.log("restores of the newest snapshot")
    for t in tools:
        out = step(t, t.restore)
        if out is None:
            continue
        rec, path = out
        keep(t, "restore", rec)
        ok = os.path.exists(path) and same_bytes(path, image)
        res[t.name]["restore_ok"] = ok
        if not ok:
            bench.fail(StepFailed(t.name, "restore compare",
                                  f"RESTORED FILE DIFFERS FROM THE IMAGE: cmp {path} {image}"))
            res[t.name]["restore"] = None
        if os.path.isdir(getattr(t, "target", "")):
            shutil.rmtree(t.target, ignore_errors=True)
        elif os.path.exists(path):
            os.unlink(path)
    if "ref" in want:
        qcow = os.path.join(workdir, "ref.qcow2")
        raw = os.path.join(workdir, "ref-restore.raw")
        try:
            bench.run("ref", "qemu-img convert raw->qcow2 (prep)", ["qemu-img", "convert", "-O", "qcow2",
                                                                      image, qcow], timed=False)
            ref_run("qemu_restore", "qemu-img convert qcow2->raw", ["qemu-img", "convert", "-O", "raw",
                                                                    qcow, raw], [qcow])
        except StepFailed as exc:
            bench.fail(exc)
        except OSError as exc:
            bench.fail(StepFailed("ref", "qemu-img", f"could not run: {exc}"))
        for p in (qcow, raw):
            if os.path.exists(p):
                os.unlink(p)
    return res, ref, offsets, failed


def build_report(args, bench, size, stats, make_s, img_apparent, img_alloc, offsets, res, ref, bs_how, failed,
                 runs):
    changed = len(offsets) * workload.CHANGE_SIZE
    cols = ["blocksnap", "restic", "borg"]

    def get(tool, key):
        return res.get(tool, {}).get(key)

    def size_incr(tool, which=1):
        s = get(tool, "size_incr")
        return None if s is None else s[which]

    def added(tool):
        a, b = get(tool, "size_full"), get(tool, "size_incr")
        return None if a is None or b is None else b[1] - a[1]

    def rss(tool):
        r = get(tool, "rss_kib")
        return r / 1024 if r else None

    rows = [
        ("full snapshot (s)", {c: get(c, "full") for c in cols}, ref["xxhsum_pristine"],
         "xxhsum -H128 of the pristine image"),
        ("incremental (s)", {c: get(c, "incr") for c in cols}, ref["xxhsum"],
         "xxhsum -H128 of the changed image"),
        ("restore (s)", {c: get(c, "restore") for c in cols}, ref["qemu_restore"],
         "qemu-img convert -O raw x.qcow2 out.raw"),
        ("repo size after full+incr (MiB, allocated)", {c: _mib(size_incr(c)) for c in cols}, _mib(img_alloc),
         "allocated bytes of the image itself"),
        ("incremental added (MiB, allocated)", {c: _mib(added(c)) for c in cols}, _mib(changed),
         "bytes changed in the image"),
        ("peak RSS (MiB)", {c: rss(c) for c in cols}, ref["rss_kib"] / 1024 if ref["rss_kib"] else None,
         "max of xxhsum and qemu-img"),
    ]
    table = []
    lines = ["| metric | blocksnap | restic | borg | reference | restic/blocksnap | borg/blocksnap "
             "| blocksnap/reference |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, vals, refv, refdesc in rows:
        bs = vals["blocksnap"]
        r1, r2, r3 = _ratio(vals["restic"], bs), _ratio(vals["borg"], bs), _ratio(bs, refv)
        table.append({"metric": name, **vals, "reference": refv, "reference_is": refdesc,
                      "restic/blocksnap": r1, "borg/blocksnap": r2, "blocksnap/reference": r3})
        lines.append(f"| {name} | {_fmt(bs)} | {_fmt(vals['restic'])} | {_fmt(vals['borg'])} | {_fmt(refv)} "
                     f"| {_fmt(r1)} | {_fmt(r2)} | {_fmt(r3)} |")
    apparent_line = ("repo apparent size (du -sb) after full / after full+incr, MiB: " + "; ".join(
        f"{c} {_fmt(_mib((get(c, 'size_full') or (None,))[0]), 1)} / {_fmt(_mib(size_incr(c, 0)), 1)}"
        for c in cols))

    targets = check_targets(res, ref, changed, size_incr, added, rss)
    restore_cmp = {c: get(c, "restore_ok") for c in cols}
    md = []
    md.append(f"# blocksnap vs peers, {datetime.datetime.now().isoformat(timespec='seconds')}\n")
    md.append(f"Image: {size / MiB:.0f} MiB raw, seed {args.seed}: random {stats['random'] / MiB:.0f} MiB, "
              f"log text {stats['text'] / MiB:.0f} MiB, holes {stats['hole'] / MiB:.0f} MiB "
              f"(allocated {img_alloc / MiB:.0f} MiB; made in {make_s:.1f} s). "
              f"Change: {len(offsets)} x 1 MiB (seed {args.change_seed}) = {changed / MiB:.0f} MiB.  ")
    cache = "COLD (dropped before each timed step)" if args.cold else "WARM (not dropped)"
    md.append(f"Page cache: {cache}; "
              f"`sync` before each timed step{'' if args.cold else ', its inputs read once untimed before'}. "
              f"blocksnap ran as: {bs_how}, {package_text()}.  ")
    if args.repeat > 1:
        md.append(f"Times are the median of {args.repeat} repeats (each on fresh repositories and a fresh "
                  f"copy of the pristine image; every repeat's numbers are in the JSON); "
                  f"RSS is the largest.  ")
    md.append(f"Peak RSS: {bench.rss_method}; floor (what `true` reports) "
              f"{(bench.rss_floor_kib or 0) / 1024:.1f} MiB.\n")
    md.extend(lines)
    md.append("")
    md.append(apparent_line + "  ")
    md.append("Restored bytes equal to the image (cmp): " + ", ".join(
        f"{c} {'yes' if v else ('NO' if v is False else '—')}" for c, v in restore_cmp.items()) + "\n")
    md.append("Targets:\n")
    md.append("```")
    for t in targets:
        md.append(f"{t['status']:<4}  {t['name']}: {t['detail']}")
    md.append("```")
    if bench.errors:
        md.append("\nErrors:\n")
        for e in bench.errors:
            md.append(f"- **{e['tool']} {e['step']}**: {e['message']}")
            if e["stderr"].strip():
                md.append("  ```\n  " + "\n  ".join(e["stderr"].strip().splitlines()[-15:]) + "\n  ```")
    report = {"table": table, "targets": targets, "restore_equal": restore_cmp, "changed_offsets": offsets,
              "changed_bytes": changed,
              "image": {"size": size, "apparent": img_apparent, "allocated": img_alloc, "make_s": make_s,
                        **stats},
              "sizes": {c: {"after_full": get(c, "size_full"), "after_incr": get(c, "size_incr")}
                        for c in cols if c in res},
              "cold": args.cold, "failed": failed, "rss_method": bench.rss_method,
              "rss_floor_kib": bench.rss_floor_kib, "repeats": [{"res": r, "ref": f} for r, f in runs]}
    return "\n".join(md), report


def _missing(*pairs):
    return "no result from " + ", ".join(name for name, value in pairs if value is None)


def check_targets(res, ref, changed, size_incr, added, rss):
    def g(tool, key):
        return res.get(tool, {}).get(key)

    out = []

    def faster(name, tool, phase, factor):
        bs, other = g("blocksnap", phase), g(tool, phase)
        if bs is None or other is None:
            out.append({"name": name, "status": "N/A", "detail": _missing(("blocksnap", bs), (tool, other))})
            return
        r = other / bs
        out.append({"name": name, "status": "PASS" if r >= factor else "FAIL", "value": r, "limit": factor,
                    "detail": f"{tool} {other:.2f} s / blocksnap {bs:.2f} s = {r:.1f}x (need >= {factor}x)"})

    def within(name, phase, refkey, refname, factor):
        bs, rv = g("blocksnap", phase), ref.get(refkey)
        if bs is None or rv is None:
            out.append({"name": name, "status": "N/A", "detail": _missing(("blocksnap", bs), (refname, rv))})
            return
        r = bs / rv
        out.append({"name": name, "status": "PASS" if r <= factor else "FAIL", "value": r, "limit": factor,
                    "detail": f"blocksnap {bs:.2f} s / {refname} {rv:.2f} s = {r:.2f}x (need <= {factor}x)"})

    faster("full >= 8x faster than restic backup", "restic", "full", 8)
    faster("full >= 5x faster than borg create", "borg", "full", 5)
    faster("incremental >= 10x faster than restic's second backup", "restic", "incr", 10)
    within("incremental <= 1.5x xxhsum -H128", "incr", "xxhsum", "xxhsum -H128", 1.5)
    faster("restore >= 6x faster than restic restore", "restic", "restore", 6)
    within("restore <= 1.5x qemu-img convert qcow2->raw", "restore", "qemu_restore", "qemu-img convert", 1.5)

    bs, rs = size_incr("blocksnap"), size_incr("restic")
    name = "repo after full+incr <= restic's (allocated)"
    if bs is None or rs is None:
        out.append({"name": name, "status": "N/A", "detail": _missing(("blocksnap", bs), ("restic", rs))})
    else:
        out.append({"name": name, "status": "PASS" if bs <= rs else "FAIL", "value": bs, "limit": rs,
                    "detail": f"blocksnap {bs / MiB:.1f} MiB vs restic {rs / MiB:.1f} MiB"})
    a = added("blocksnap")
    name = "incremental adds <= 1.15x the changed bytes"
    if a is None:
        out.append({"name": name, "status": "N/A", "detail": "missing: blocksnap sizes"})
    else:
        out.append({"name": name, "status": "PASS" if a <= 1.15 * changed else "FAIL", "value": a,
                    "limit": 1.15 * changed,
                    "detail": f"{a / MiB:.1f} MiB added for {changed / MiB:.0f} MiB changed "
                              f"= {a / changed:.2f}x"})
    r = rss("blocksnap")
    name = "blocksnap peak RSS <= 80 MiB"
    if r is None:
        out.append({"name": name, "status": "N/A", "detail": "missing: blocksnap RSS"})
    else:
        out.append({"name": name, "status": "PASS" if r <= 80 else "FAIL", "value": r, "limit": 80,
                    "detail": f"{r:.1f} MiB (max over full, incr, restore)"})
    return out


# --- chunk-size sweep -------------------------------------------------------------------------------------

def run_chunk_sizes(args, bench, workdir):
    image = os.path.join(workdir, "disk.img")
    pristine = os.path.join(workdir, "pristine.img")
    size = workload.parse_size(args.size)
    bs_cmd, bs_how = blocksnap_command(args.blocksnap)
    bench.log(f"making a {size / MiB:.0f} MiB workload image (seed {args.seed}) in {workdir}")
    workload.make_image(pristine, size, args.seed)
    bench.log(f"blocksnap runs as: {bs_how}, {package_text()}")
    rows = []
    for text in args.chunk_sizes.split(","):
        cs = workload.parse_size(text)
        bench.log(f"chunk size {text} = {cs} bytes")
        sparse_copy(pristine, image)
        t = Blocksnap(bench, workdir, image, bs_cmd, chunk_size=cs, tag=f"-{cs}")
        row = {"chunk_size": cs, "label": text.strip(), "full": None, "incr": None, "restore": None,
               "size_full": None, "size_incr": None, "rss_kib": 0, "restore_ok": None, "error": None}
        try:
            t.init()
            rec = t.full()
            row["full"], row["rss_kib"] = rec["wall_s"], max(row["rss_kib"], rec["maxrss_kib"])
            row["size_full"] = du(t.repo)
            workload.change_image(image, args.change_seed)
            rec = t.incr()
            row["incr"], row["rss_kib"] = rec["wall_s"], max(row["rss_kib"], rec["maxrss_kib"])
            row["size_incr"] = du(t.repo)
            rec, path = t.restore()
            row["rss_kib"] = max(row["rss_kib"], rec["maxrss_kib"])
            row["restore_ok"] = os.path.exists(path) and same_bytes(path, image)
            if row["restore_ok"]:
                row["restore"] = rec["wall_s"]
            else:
                bench.fail(StepFailed("blocksnap", "restore compare",
                                      f"RESTORED FILE DIFFERS FROM THE IMAGE (chunk size {cs})"))
        except StepFailed as exc:
            row["error"] = str(exc)
            bench.fail(exc)
        except OSError as exc:
            row["error"] = str(exc)
            bench.fail(StepFailed("blocksnap", "?", f"could not run: {exc}"))
        finally:
            if os.path.exists(t.out):
                os.unlink(t.out)
            if not args.keep:
                shutil.rmtree(t.repo, ignore_errors=True)
        rows.append(row)

    md = [f"# blocksnap chunk-size sweep, {datetime.datetime.now().isoformat(timespec='seconds')}\n",
          f"Image: {size / MiB:.0f} MiB, seed {args.seed}; change seed {args.change_seed} (20 x 1 MiB). "
          f"Page cache: {'COLD' if args.cold else 'WARM'}. blocksnap ran as: {bs_how}, "
          f"{package_text()}.\n",
          "| chunk size | full (s) | incr (s) | restore (s) | repo after full (MiB) "
          "| repo after full+incr (MiB) "
          "| incr added (MiB) | peak RSS (MiB) | restore equal |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        sf = r["size_full"][1] if r["size_full"] else None
        si = r["size_incr"][1] if r["size_incr"] else None
        add = si - sf if sf is not None and si is not None else None
        md.append(f"| {r['label']} | {_fmt(r['full'])} | {_fmt(r['incr'])} | {_fmt(r['restore'])} "
                  f"| {_fmt(_mib(sf), 1)} | {_fmt(_mib(si), 1)} | {_fmt(_mib(add), 1)} "
                  f"| {_fmt(r['rss_kib'] / 1024 if r['rss_kib'] else None, 1)} "
                  f"| {'yes' if r['restore_ok'] else ('NO' if r['restore_ok'] is False else '—')} |")
    if bench.errors:
        md.append("\nErrors:\n")
        for e in bench.errors:
            md.append(f"- **{e['tool']} {e['step']}**: {e['message']}")
    return "\n".join(md), {"rows": rows}


# --- main -------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="2G", help="workload image size (default 2G)")
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    parser.add_argument("--change-seed", type=int, default=1, help="seed of the 1 %% change (default 1)")
    parser.add_argument("--workdir", help="where images and repositories go (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (repositories, image)")
    parser.add_argument("--cold", action="store_true",
                        help="drop the page cache before each timed step (needs root)")
    parser.add_argument("--tools", default=",".join(TOOLS),
                        help="subset of blocksnap,restic,borg,ref (default: all)")
    parser.add_argument("--blocksnap",
                        help="command that runs the blocksnap CLI (default: PATH, else in-tree)")
    parser.add_argument("--chunk-sizes", help="e.g. 64K,256K,1M: run only blocksnap, once per chunk size")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the whole sequence N times and report median times (default 1)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per step before it is killed")
    parser.add_argument("--out", default=os.path.join(BENCH_DIR, "out"), help="report directory")
    args = parser.parse_args(argv)
    unknown = set(args.tools.split(",")) - set(TOOLS)
    if unknown:
        parser.error(f"unknown tools: {', '.join(sorted(unknown))}")

    if args.workdir:
        workdir = os.path.abspath(args.workdir)
        os.makedirs(workdir, exist_ok=True)
        made_workdir = False
        for name in os.listdir(workdir):  # leftovers of an earlier --keep run
            if name.startswith(("blocksnap-repo", "restic-", "borg-", "restore-", "disk.img", "pristine.img",
                                "ref")):
                p = os.path.join(workdir, name)
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
    else:
        workdir = tempfile.mkdtemp(prefix="blocksnap-peers-")
        made_workdir = True

    bench = Bench(workdir, cold=args.cold, timeout=args.timeout)
    t0 = time.perf_counter()
    try:
        if args.chunk_sizes:
            md, report = run_chunk_sizes(args, bench, workdir)
            kind = "chunks"
        else:
            md, report = run_peers(args, bench, workdir)
            kind = "peers"
        total = time.perf_counter() - t0
        info = machine_info(workdir, blocksnap_command(args.blocksnap)[0])
        md += (f"\n\nWhole run: {total:.0f} s.\n\nMachine: " + "; ".join(f"{k}: {v}" for k, v in info.items())
               + "\n")
        print(md)
        os.makedirs(args.out, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = os.path.join(args.out, f"{kind}-{stamp}")
        with open(base + ".md", "w") as f:
            f.write(md)
        steps = [{k: v for k, v in s.items() if k not in ("stdout", "stderr")} for s in bench.steps]
        with open(base + ".json", "w") as f:
            json.dump({"kind": kind, "args": vars(args), "machine": info, "total_s": total, "steps": steps,
                       "errors": bench.errors, **report}, f, indent=2, default=str)
        print(f"wrote {base}.md and {base}.json", file=sys.stderr)
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        elif made_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            for name in os.listdir(workdir):
                if name.startswith(("blocksnap-repo", "restic-", "borg-", "restore-", "disk.img",
                                    "pristine.img", "ref")):
                    p = os.path.join(workdir, name)
                    shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.unlink(p)
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
