"""A repository whose catalog is version 2 (tests/fixtures/v2-repo.tar.gz, written by blocksnap 92a932d, before
the DescribeSnapshots indexes of catalog version 3) opens with today's code: every snapshot lists with its
fields, restores byte for byte and verifies; filters and pages work on it."""
import hashlib
import json
import os
import tarfile

import pytest
from conftest import cli

from blocksnap.api import Client

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "v2-repo.tar.gz")


@pytest.fixture
def v2(tmp_path):
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    with open(tmp_path / "manifest.json") as f:
        manifest = json.load(f)
    return str(tmp_path / "repo"), manifest


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_every_snapshot_of_a_version_2_catalog_lists_restores_and_verifies(v2, tmp_path):
    """The three accomplished snapshots (raw and qcow2 disks) are listed, restore to their recorded SHA-256 and
    verify exits 0; the qcow2 disk keeps its Format."""
    path, manifest = v2
    listed = json.loads(cli("--repo", path, "--json", "snapshot", "list").stdout)["Snapshots"]["Snapshot"]
    assert {s["SnapshotId"] for s in listed} >= {s["SnapshotId"] for s in manifest["Snapshots"]}
    for snap in manifest["Snapshots"]:
        out = tmp_path / f"{snap['SnapshotId']}.raw"
        proc = cli("--repo", path, "restore", snap["SnapshotId"], str(out))
        assert proc.returncode == 0, proc.stderr
        assert os.path.getsize(out) == snap["Size"] and _sha(out) == snap["Sha256"]
    disks = json.loads(cli("--repo", path, "--json", "disk", "list").stdout)["Disks"]["Disk"]
    assert {d["DiskId"]: d["Format"] for d in disks} == {manifest["Disks"]["raw"]: "raw",
                                                         manifest["Disks"]["qcow2"]: "qcow2"}
    assert cli("--repo", path, "verify").returncode == 0


def test_a_version_2_catalog_answers_filters_and_pages_once_it_is_indexed(v2):
    """Opened with write access the version-2 catalog is indexed; the tag filter and paging then answer from
    the indexes exactly what the records say, and verify is still clean."""
    path, manifest = v2
    second = manifest["Snapshots"][2]["SnapshotId"]
    with Client(path) as c:
        tagged = c.call("DescribeSnapshots", {"RegionId": "local", "Tag.1.Key": "env", "Tag.1.Value": "prod"})
        assert [s["SnapshotId"] for s in tagged["Snapshots"]["Snapshot"]] == [second]
        page = c.call("DescribeSnapshots", {"RegionId": "local", "PageSize": 2, "PageNumber": 2})
        assert page["TotalCount"] == 3 and len(page["Snapshots"]["Snapshot"]) == 1
        named = c.call("DescribeSnapshots", {"RegionId": "local", "SnapshotName": "second"})
        assert [s["SnapshotId"] for s in named["Snapshots"]["Snapshot"]] == [second]
        assert c.verify()["Ok"]
