"""SIGTERM, SIGHUP and SIGINT end every command cleanly: a create's snapshot is failed and its data given
back at once, a restore leaves no output, gc leaves a repository that verifies; gc later removes the
failed records (after the grace period) and the pack folders left empty."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import MiB, allocated, child_env, restores_identical, write_random

from blocksnap.api import Client
from blocksnap.store import gc as gcmod

CHUNK = 64 << 10

# The child's packs seal every 4 MiB; after N windows its scanners wait until the test, having signalled it, says go.
HELD_CREATE = """
import os, sys, time
from blocksnap import _native
from blocksnap.store import packs
packs.PACK_TARGET = 4 << 20
ready, free = sys.argv[1], int(sys.argv[2])
_orig = _native.ExtentScanner.scan_extents
_calls = []
def scan(self, *a, **k):
    _calls.append(1)
    if len(_calls) == free:
        open(ready, "w").close()
    if len(_calls) > free:  # held until the test says go (after its signal), at most 60 s
        deadline = time.monotonic() + 60
        while not os.path.exists(ready + ".go") and time.monotonic() < deadline:
            time.sleep(0.01)
    return _orig(self, *a, **k)
_native.ExtentScanner.scan_extents = scan
from blocksnap.cli.main import main
sys.exit(main(sys.argv[3:]))
"""


def wait_for(path, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the child never got there"
        time.sleep(0.01)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_a_signalled_create_fails_cleanly_and_gives_its_data_back(tmp_path, sig, code):
    """A create signalled after it sealed and indexed packs exits 128+signal with one line saying so; its
    snapshot is failed ('interrupted by ...'), the packs it wrote are gone at once (the repository is as
    small as before), the disk is free for the next create, and verify is clean."""
    repo = str(tmp_path / "repo")
    Client.init(repo, chunk_size=CHUNK)
    img = write_random(tmp_path / "a.raw", 48 * MiB)
    with Client(repo) as c:
        disk = c.add_disk(img)["DiskId"]
    before = allocated(os.path.join(repo, "packs"))
    ready = str(tmp_path / "ready")
    proc = subprocess.Popen([sys.executable, "-c", HELD_CREATE, ready, "8", "--repo", repo, "snapshot", "create",
                             disk], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    wait_for(ready, proc)
    time.sleep(0.5)  # the sealer indexes the first packs
    assert allocated(os.path.join(repo, "packs")) > before + 8 * MiB  # it wrote data
    proc.send_signal(sig)
    time.sleep(0.3)
    open(ready + ".go", "w").close()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == f"blocksnap: interrupted by {signal.Signals(sig).name}", err
    assert "Traceback" not in err
    with Client(repo) as c:
        [rec] = c.describe_snapshots()["Snapshots"]["Snapshot"]
        assert rec["Status"] == "failed" and rec["Error"]["Code"] == "CreateSnapshot.Failed"
        assert signal.Signals(sig).name in rec["Error"]["Message"]
        assert allocated(os.path.join(repo, "packs")) == before  # given back at once, not at the next gc
        plan = c.gc(dry_run=True)
        assert (plan["DeadChunks"], plan["DeadSegments"], plan["OrphanPacks"], plan["UnnamedRecords"]) == (0, 0, 0, 0)
        sid = c.create_snapshot(disk)["SnapshotId"]
        assert restores_identical(c, tmp_path, sid, img)
        assert c.verify()["Ok"]


# The sealer's first pack fsync is held until the test says go (or until someone removed that pack: what a
# cleanup that did not wait would do). The process lives on after the failed create, as a program using the
# library does, with the CLI's signal handling installed.
SLOW_SEAL_CREATE = """
import os, sys, time
from blocksnap import interrupts
from blocksnap.api import Client
from blocksnap.store import backend, packs
packs.PACK_TARGET = 4 << 20
ready, repo, disk = sys.argv[1:]
_orig = backend.LocalBackend.sync_pack
def sync_pack(self, pack_id, fd):
    if not os.path.exists(ready):
        open(ready, "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(ready + ".go") and os.path.exists(self.pack_path(pack_id)) \\
                and time.monotonic() < deadline:
            time.sleep(0.01)
    return _orig(self, pack_id, fd)
backend.LocalBackend.sync_pack = sync_pack
interrupts.install()
c = Client(repo)
try:
    c.create_snapshot(disk)
except BaseException as exc:
    print(type(exc).__name__, exc, flush=True)
    time.sleep(1.5)  # the process goes on
    sys.exit(3)
"""


def test_a_second_signal_during_a_creates_cleanup_waits_for_its_packs_to_settle(tmp_path):
    """SIGINT twice while the sealer makes a pack durable: the cleanup still waits for the sealer before it
    removes the packs it did not index (else the sealer indexes chunks of a removed pack, and a later create
    that deduplicates against them records a snapshot that does not restore). Verify is clean afterwards and
    the next create restores exactly."""
    repo = str(tmp_path / "repo")
    Client.init(repo, chunk_size=CHUNK)
    img = write_random(tmp_path / "a.raw", 24 * MiB)
    with Client(repo) as c:
        disk = c.add_disk(img)["DiskId"]
    ready = str(tmp_path / "ready")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SEAL_CREATE, ready, repo, disk],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    wait_for(ready, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    open(ready + ".go", "w").close()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3 and out.startswith("KeyboardInterrupt") and "Traceback" not in err, (out, err)
    with Client(repo) as c:
        out = c.verify()
        assert out["Ok"] and out["Problems"] == [] and out["Damaged"] == [], out
        sid = c.create_snapshot(disk)["SnapshotId"]
        assert restores_identical(c, tmp_path, sid, img)


HELD_RESTORE = """
import os, sys, time
from blocksnap import _native
ready = sys.argv[1]
_orig = _native.Restorer.restore
_calls = []
def restore(self, *a, **k):
    _calls.append(1)
    if len(_calls) == 3:  # a batch in flight when the signal comes; it ends once the test says go
        open(ready, "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(ready + ".go") and time.monotonic() < deadline:
            time.sleep(0.01)
    return _orig(self, *a, **k)
_native.Restorer.restore = restore
from blocksnap.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signalled_restore_leaves_no_output(tmp_path, sig):
    """A restore signalled half-way exits 128+signal and leaves no file at the output path."""
    repo = str(tmp_path / "repo")
    Client.init(repo, chunk_size=CHUNK)
    img = write_random(tmp_path / "a.raw", 16 * MiB)
    with Client(repo) as c:
        sid = c.create_snapshot(c.add_disk(img)["DiskId"])["SnapshotId"]
    ready = str(tmp_path / "ready")
    out_path = str(tmp_path / "out.raw")
    proc = subprocess.Popen([sys.executable, "-c", HELD_RESTORE, ready, "--repo", repo, "restore", sid, out_path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    wait_for(ready, proc)
    proc.send_signal(sig)
    time.sleep(0.3)
    open(ready + ".go", "w").close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig and "Traceback" not in err, err
    assert not os.path.exists(out_path)
    assert sorted(os.listdir(tmp_path)) == sorted(["repo", "a.raw", "ready", "ready.go"])


def test_gc_removes_failed_records_after_their_grace_period_and_empty_pack_folders(tmp_path):
    """A failed record stays listed for the grace period (so an admin sees why a create failed), then gc
    removes it; gc also removes the packs/XX folders that deletes left empty."""
    repo = str(tmp_path / "repo")
    Client.init(repo, chunk_size=CHUNK)
    img = write_random(tmp_path / "a.raw", 4 * MiB)
    with Client(repo) as c:
        disk = c.add_disk(img)["DiskId"]
        sid = c.create_snapshot(disk)["SnapshotId"]
    killed = subprocess.run([sys.executable, "-m", "blocksnap", "--repo", repo, "snapshot", "create", disk],
                            capture_output=True, text=True, check=False,
                            env=dict(child_env(), BLOCKSNAP_CRASHPOINT="before-commit"))
    assert killed.returncode == -signal.SIGKILL
    with Client(repo) as c:
        failed = [s["SnapshotId"] for s in c.describe_snapshots()["Snapshots"]["Snapshot"] if s["Status"] == "failed"]
        assert len(failed) == 1
        now = time.time()
        out = c.gc(now=now)
        assert out["FailedRecords"] == []
        assert failed[0] in [s["SnapshotId"] for s in c.describe_snapshots()["Snapshots"]["Snapshot"]]
        assert c.gc(dry_run=True, now=now + gcmod.FAILED_GRACE + 60)["FailedRecords"] == failed
        out = c.gc(now=now + gcmod.FAILED_GRACE + 60)
        assert out["FailedRecords"] == failed
        assert [s["SnapshotId"] for s in c.describe_snapshots()["Snapshots"]["Snapshot"]] == [sid]
        c.delete_snapshot(sid)
        folders = os.listdir(os.path.join(repo, "packs"))
        assert folders  # the delete gave the pack back but left its folder
        assert all(not os.listdir(os.path.join(repo, "packs", f)) for f in folders)
        out = c.gc()
        assert out["EmptyDirsRemoved"] == len(folders) and os.listdir(os.path.join(repo, "packs")) == []
        assert c.verify()["Ok"]
    listed = subprocess.run([sys.executable, "-m", "blocksnap", "--repo", repo, "snapshot", "list", "--json"],
                            capture_output=True, text=True, check=True, env=child_env())
    assert json.loads(listed.stdout)["TotalCount"] == 0
