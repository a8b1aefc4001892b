"""Readers are readers: list, describe, restore and verify work on a repository on read-only media, never
write, and are never held up by another process's write transaction."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
from conftest import MiB, child_env, cli, files_equal, write_random

from blocksnap.api import Client
from blocksnap.store import catalog as catalogs

CHUNK = 64 << 10


@pytest.fixture
def repo_with_snapshots(tmp_path):
    repo = str(tmp_path / "repo")
    Client.init(repo, chunk_size=CHUNK)
    img = write_random(tmp_path / "a.raw", 8 * MiB)
    with Client(repo) as c:
        disk = c.add_disk(img)["DiskId"]
        s1 = c.create_snapshot(disk)["SnapshotId"]
        saved = str(tmp_path / "s1.raw")
        with open(img, "rb") as f, open(saved, "wb") as g:
            g.write(f.read())
        write_random(img, MiB, offset=2 * MiB)
        s2 = c.create_snapshot(disk)["SnapshotId"]
    catalogs.close_env(os.path.join(repo, "catalog"))
    return repo, disk, {s1: saved, s2: img}


def tree_state(path):
    """Every file under ``path`` but LMDB's lock file (its reader table, which LMDB itself keeps) with its
    content hash and mtime."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            if name == "lock.mdb":
                continue
            st = os.stat(full)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = (hashlib.sha256(f.read()).hexdigest(), st.st_mtime_ns)
    return out


def read_only_view(tmp_path, repo):
    """``repo`` seen through a read-only bind mount; skips where mounting is not allowed."""
    view = tmp_path / "ro"
    view.mkdir()
    proc = subprocess.run(["mount", "--bind", repo, str(view)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot bind-mount (needs root): {proc.stderr.strip()}")
    subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
    return str(view)


def test_readers_work_on_a_read_only_bind_mount_and_writers_say_why_not(tmp_path, repo_with_snapshots):
    """Through a read-only bind mount, snapshot list, disk list, restore and verify succeed with the right
    bytes; create, delete, gc, disk add and repair each end in one Repository.ReadOnly line (exit 6)."""
    repo, disk, saved = repo_with_snapshots
    view = read_only_view(tmp_path, repo)
    try:
        proc = cli("--repo", view, "snapshot", "list", "--json")
        assert proc.returncode == 0, proc.stderr
        listed = json.loads(proc.stdout)["Snapshots"]["Snapshot"]
        assert sorted(s["SnapshotId"] for s in listed) == sorted(saved)
        assert cli("--repo", view, "disk", "list").returncode == 0
        for sid, img in saved.items():
            out = tmp_path / f"{sid}.out"
            proc = cli("--repo", view, "restore", sid, str(out))
            assert proc.returncode == 0, proc.stderr
            assert files_equal(out, img)
        proc = cli("--repo", view, "verify")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        sid = sorted(saved)[0]
        for args in (["snapshot", "create", disk], ["snapshot", "delete", sid], ["gc"], ["repair"],
                     ["disk", "add", str(tmp_path / "s1.raw")]):
            proc = cli("--repo", view, *args)
            assert proc.returncode == 6, (args, proc.stderr)
            assert proc.stderr.startswith("blocksnap: error: Repository.ReadOnly"), (args, proc.stderr)
            assert len(proc.stderr.splitlines()) == 1, proc.stderr
    finally:
        subprocess.run(["umount", view], check=False)


def test_readers_write_nothing(tmp_path, repo_with_snapshots):
    """list, describe, restore and verify leave every byte and mtime of the repository as it was, and the
    catalog's last transaction id where it was (a listing of a dead create settles nothing either)."""
    repo, disk, saved = repo_with_snapshots
    killed = subprocess.run([sys.executable, "-m", "blocksnap", "--repo", repo, "snapshot", "create", disk],
                            capture_output=True, text=True, check=False,
                            env=child_env(BLOCKSNAP_CRASHPOINT="before-commit"))
    assert killed.returncode == -9
    before = tree_state(repo)
    proc = cli("--repo", repo, "snapshot", "list", "--json")
    assert proc.returncode == 0
    assert [s["Status"] for s in json.loads(proc.stdout)["Snapshots"]["Snapshot"]].count("failed") == 1
    for sid in saved:
        assert cli("--repo", repo, "restore", sid, str(tmp_path / f"{sid}.out")).returncode == 0
    assert cli("--repo", repo, "verify").returncode == 0
    assert cli("--repo", repo, "verify", sorted(saved)[0]).returncode == 0
    assert cli("--repo", repo, "disk", "list").returncode == 0
    assert tree_state(repo) == before


HOLD_WRITE = """
import os, sys, time
from blocksnap.api import Client
c = Client(sys.argv[1])
with c.repo.catalog.write() as txn:
    txn.put_meta_u64(b"held", 1)
    print("holding", flush=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:  # until the test says go
        time.sleep(0.01)
print("released", flush=True)
"""


def test_readers_are_not_held_up_by_a_long_write_transaction(tmp_path, repo_with_snapshots):
    """While another process holds the catalog's write transaction open (until the test lets it go),
    snapshot list, a restore and a verify in other processes all finish, and the writer still holds it when
    they are done."""
    repo, _, saved = repo_with_snapshots
    go = str(tmp_path / "go")
    writer = subprocess.Popen([sys.executable, "-c", HOLD_WRITE, repo, go], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        assert writer.stdout.readline().strip() == "holding"
        assert cli("--repo", repo, "snapshot", "list", timeout=15).returncode == 0
        sid, img = sorted(saved.items())[0]
        out = tmp_path / "held.out"
        assert cli("--repo", repo, "restore", sid, str(out), timeout=15).returncode == 0
        assert files_equal(out, img)
        assert cli("--repo", repo, "verify", timeout=15).returncode == 0
        assert writer.poll() is None  # the write transaction is still open
        open(go, "w").close()
        assert writer.stdout.readline().strip() == "released"
    finally:
        writer.kill()
        writer.wait()


def test_a_reader_remakes_lost_epoch_lock_files_on_a_writable_repository(tmp_path, repo_with_snapshots):
    """The reader-epoch lock files removed from a writable repository: a restore makes them again and holds
    one while it reads (else a writer could remove data under it)."""
    repo, _, saved = repo_with_snapshots
    for name in ("read-0.lock", "read-1.lock"):
        os.unlink(os.path.join(repo, "locks", name))
    with Client(repo) as c:
        hold = c.repo.reader()
        try:
            assert hold is not None
            assert sorted(n for n in os.listdir(os.path.join(repo, "locks")) if n.startswith("read-")) == \
                ["read-0.lock", "read-1.lock"]
        finally:
            hold.release()
        sid, img = sorted(saved.items())[0]
        assert c.restore(sid, str(tmp_path / "r.out"))
        assert files_equal(str(tmp_path / "r.out"), img)
