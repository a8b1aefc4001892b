"""A format-version-1 repository (tests/fixtures/v1-repo.tar.gz, written by blocksnap 26391aa) opens,
upgrades to version 2 and restores every snapshot exactly; an upgrade killed at any step is finished by
the next one."""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tarfile

import pytest
from conftest import child_env, cli

from blocksnap import errors
from blocksnap.api import Client
from blocksnap.store import catalog as catalogs

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "v1-repo.tar.gz")



@pytest.fixture
def v1(tmp_path):
    """The version-1 repository, unpacked: ``(path, manifest)``."""
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    with open(tmp_path / "manifest.json") as f:
        manifest = json.load(f)
    return str(tmp_path / "repo"), manifest


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def assert_all_restore(path, manifest, tmp_path):
    for snap in manifest["Snapshots"]:
        out = tmp_path / f"{snap['SnapshotId']}.raw"
        proc = cli("--repo", path, "restore", snap["SnapshotId"], str(out))
        assert proc.returncode == 0, proc.stderr
        assert os.path.getsize(out) == snap["Size"] and sha256(out) == snap["Sha256"], snap["SnapshotId"]
        out.unlink()


def test_a_version_1_repository_is_told_to_upgrade(v1):
    """Every command on a version-1 repository but upgrade says so in one typed line (exit 6) and writes
    nothing."""
    path, _ = v1
    before = {p: os.stat(os.path.join(dp, p)).st_mtime_ns for dp, _, files in os.walk(path) for p in files}
    for args in (["snapshot", "list"], ["verify"], ["disk", "list"], ["gc"]):
        proc = cli("--repo", path, *args)
        assert proc.returncode == 6, proc.stderr
        assert proc.stderr.startswith("blocksnap: error: Repository.UpgradeRequired") and "upgrade" in proc.stderr
        assert len(proc.stderr.splitlines()) == 1
    after = {p: os.stat(os.path.join(dp, p)).st_mtime_ns for dp, _, files in os.walk(path) for p in files}
    assert after == before
    with pytest.raises(errors.UpgradeRequired):
        Client(path)


def test_upgrade_keeps_every_snapshot_record_and_byte(v1, tmp_path):
    """After 'blocksnap upgrade' the repository is version 2: every accomplished snapshot restores to the
    image it was taken of, its record kept its fields (tags, retention, token), the failed create is still
    listed failed, the deleted snapshot stays deleted, verify is clean, and gc finds the dead create's data."""
    path, manifest = v1
    with open(os.path.join(path, "config")) as f:
        old_config = json.load(f)
    proc = cli("--repo", path, "upgrade")
    assert proc.returncode == 0, proc.stderr
    assert "from format version 1 to 2" in proc.stdout
    with open(os.path.join(path, "config")) as f:
        config = json.load(f)
    assert config["Version"] == 2 and config["RepositoryId"] == old_config["RepositoryId"]
    assert sorted(os.listdir(path)) == ["catalog", "config", "disks", "locks", "packs", "snapshots"]
    assert_all_restore(path, manifest, tmp_path)
    with Client(path) as c:
        recs = {r["SnapshotId"]: r for r in c.describe_snapshots()["Snapshots"]["Snapshot"]}
        first = manifest["Snapshots"][0]
        rec = recs[first["SnapshotId"]]
        assert rec["SnapshotName"] == "a-full" and rec["RetentionDays"] == 30
        assert rec["Tags"] == {"Tag": [{"TagKey": "env", "TagValue": "prod"}]}
        assert rec["Description"] == "first full snapshot"
        assert [recs[s]["Status"] for s in manifest["Failed"]] == ["failed"]
        assert manifest["Deleted"] not in recs
        assert sorted(s for s, r in recs.items() if r["Status"] == "accomplished") == \
            sorted(s["SnapshotId"] for s in manifest["Snapshots"])
        # The token still answers: the same request gets the same snapshot.
        again = c.create_snapshot(first["DiskId"], snapshot_name="a-full", description="first full snapshot",
                                  retention_days=30, tags=[{"Key": "env", "Value": "prod"}],
                                  client_token="fixture-token-1")
        assert again["SnapshotId"] == first["SnapshotId"]
        out = c.verify()
        assert out["Ok"], out
        plan = c.gc(dry_run=True)
        # the killed create's chunks: the rebuilt index names only what snapshots use, so gc finds them
        # through the packs' trailers (a pack of nothing else is an orphan)
        assert plan["DeadChunks"] + plan["UnnamedRecords"] + plan["OrphanPacks"] > 0
        c.gc()
        assert c.verify()["Ok"]
    assert_all_restore(path, manifest, tmp_path)
    proc = cli("--repo", path, "upgrade")
    assert proc.returncode == 0 and "version 2 already" in proc.stdout


def test_an_upgraded_repository_loses_its_catalog_and_is_repaired(v1, tmp_path):
    """What the upgrade wrote to the store (objects, segment records, the version-1 packs' trailers) is
    enough to rebuild the catalog: after deleting it and 'blocksnap repair', every snapshot restores."""
    path, manifest = v1
    assert cli("--repo", path, "upgrade").returncode == 0
    catalogs.close_env(os.path.join(path, "catalog"))
    import shutil

    shutil.rmtree(os.path.join(path, "catalog"))
    proc = cli("--repo", path, "repair")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert_all_restore(path, manifest, tmp_path)
    proc = cli("--repo", path, "verify")
    assert proc.returncode == 0, proc.stdout


UPGRADE_KILLED = """
import os, signal, sys
from blocksnap.store import backend, upgrade
n = int(sys.argv[2])
count = [0]
def counting(orig):
    def run(*args, **kw):
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(*args, **kw)
    return run
for name in ("put_object", "append_pack", "truncate_pack", "sync_pack", "remove_pack"):
    setattr(backend.LocalBackend, name, counting(getattr(backend.LocalBackend, name)))
os.rename = counting(os.rename)
from blocksnap.api import Client
Client(sys.argv[1], maintenance=True).upgrade()
print("finished")
"""


def test_an_upgrade_killed_at_any_step_is_finished_by_the_next(v1, tmp_path):
    """kill -9 at the n-th store write or rename of an upgrade (objects, trailers, the catalog swap, the
    config) leaves a repository that the next 'blocksnap upgrade' brings to version 2 with every snapshot."""
    path, manifest = v1
    import shutil

    pristine = str(tmp_path / "pristine")
    shutil.copytree(path, pristine)
    steps = list(range(1, 8)) + random.Random(3).sample(range(8, 40), 4)
    finished = 0
    for n in steps:
        shutil.rmtree(path)
        shutil.copytree(pristine, path)
        proc = subprocess.run([sys.executable, "-c", UPGRADE_KILLED, path, str(n)], capture_output=True, text=True,
                              env=child_env(), timeout=300, check=False)
        if proc.returncode == 0:
            finished += 1
            assert "finished" in proc.stdout
        else:
            assert proc.returncode == -signal.SIGKILL, proc.stderr
        again = cli("--repo", path, "upgrade")
        assert again.returncode == 0, (n, again.stderr)
        assert_all_restore(path, manifest, tmp_path)
        proc = cli("--repo", path, "verify")
        assert proc.returncode == 0, (n, proc.stdout)
    assert finished < len(steps)  # the kills landed inside the upgrade


def _files(path):
    """Every file but the lock files (which the upgrade makes before it reads) with its mtime."""
    return {os.path.join(dp, f): os.stat(os.path.join(dp, f)).st_mtime_ns for dp, _, fs in os.walk(path) for f in fs
            if os.path.basename(dp) != "locks"}


def test_an_upgrade_of_a_cut_short_format_1_catalog_is_a_typed_error_and_changes_nothing(v1):
    """data.mdb of the format-1 catalog cut to half: upgrade says CatalogDamaged in one line (it must not map
    the file: a read past its end is SIGBUS) and changes nothing."""
    path, _ = v1
    data = os.path.join(path, "catalog", "data.mdb")
    os.truncate(data, os.path.getsize(data) // 2)
    before = _files(path)
    proc = cli("--repo", path, "upgrade")
    assert proc.returncode > 0 and proc.stderr.startswith("blocksnap: error: Repository.CatalogDamaged"), proc
    assert len(proc.stderr.splitlines()) == 1
    assert _files(path) == before


def test_an_upgrade_of_a_malformed_format_1_record_is_a_typed_error_and_changes_nothing(v1, tmp_path):
    """A format-1 disk record without its Type: upgrade stops with CatalogDamaged before it changes anything."""
    import lmdb

    path, _ = v1
    env = lmdb.open(os.path.join(path, "catalog"), max_dbs=16)
    db = env.open_db(b"disks")
    with env.begin(write=True, db=db) as txn:
        key, raw = next(iter(txn.cursor()))
        rec = json.loads(bytes(raw))
        del rec["Type"]
        txn.put(key, json.dumps(rec).encode())
    env.close()
    before = _files(path)
    proc = cli("--repo", path, "upgrade")
    assert proc.returncode > 0 and proc.stderr.startswith("blocksnap: error: Repository.CatalogDamaged"), proc
    assert "Type" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert _files(path) == before
