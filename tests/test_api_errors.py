"""Every CreateSnapshot error code of the cloud's reference that can happen locally (docs/API.md, "CreateSnapshot
errors"), raised through the three interfaces: the Python API (Client.call), `blocksnap api` (a child process)
and the official SDK against the api-server. Each case checks the code, its HTTP status (and the CLI's exit
code), and that the failed request created nothing."""
import json
import os
import threading

import pytest
from alibabacloud_ecs20140526 import client as ecs_client
from alibabacloud_ecs20140526 import models as ecs
from alibabacloud_tea_openapi.models import Config
from conftest import cli
from Tea.exceptions import TeaException

from blocksnap import backup, errors
from blocksnap.cloud import keys as keyfile
from blocksnap.cloud.server import ApiServer
from blocksnap.store.locks import FileLock

KiB = 1 << 10
INTERFACES = ["python", "cli", "sdk"]


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch):
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost,::1")


@pytest.fixture
def disk(client, make_image):
    img = make_image("disk.raw", 256 * KiB, [(0, b"boot" * 5000), (200 * KiB, b"data" * 1000)])
    return client.add_disk(img)["DiskId"]


class Interface:
    """One way of calling the API: ``create(params)`` returns the response, or ``(code, HTTP status, exit
    code or None)`` of the error."""

    def __init__(self, kind, client, repo_path, tmp_path):
        self.kind, self.client, self.repo_path = kind, client, repo_path
        self.server = self.thread = None
        if kind == "sdk":
            keys = str(tmp_path / "home" / "config" / "blocksnap" / "api-keys.json")
            pair = keyfile.create(keys)
            self.server = ApiServer(client, keyfile.KeyStore(keys), ("127.0.0.1", 0))
            self.thread = self.server.serve_in_thread()
            self.sdk = ecs_client.Client(Config(access_key_id=pair["AccessKeyId"],
                                                access_key_secret=pair["AccessKeySecret"],
                                                endpoint=self.server.endpoint, protocol="http", region_id="local",
                                                read_timeout=60000, connect_timeout=5000))

    def call(self, action, params):
        if self.kind == "python":
            try:
                return self.client.call(action, params)
            except errors.BlocksnapError as exc:
                return exc.code, exc.http_status, None
        if self.kind == "cli":
            words = []
            for name, value in params.items():
                if name == "Tag":
                    for i, tag in enumerate(value, 1):
                        words += [f"--Tag.{i}.Key", tag["Key"], f"--Tag.{i}.Value", tag["Value"]]
                else:
                    words += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
            proc = cli("--repo", self.repo_path, "api", action, *words)
            if proc.returncode == 0:
                return json.loads(proc.stdout)
            body = json.loads(proc.stderr)
            return body["Code"], body["HttpStatusCode"], proc.returncode
        method = getattr(self.sdk, "".join("_" + c.lower() if c.isupper() else c for c in action).lstrip("_"))
        request = getattr(ecs, f"{action}Request")().from_map(params)
        try:
            return method(request).body.to_map()
        except TeaException as exc:
            return exc.code, exc.statusCode, None

    def close(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(10)


@pytest.fixture(params=INTERFACES)
def via(request, client, repo_path, tmp_path):
    iface = Interface(request.param, client, repo_path, tmp_path)
    yield iface
    iface.close()


def snapshot_count(client):
    return client.describe_snapshots(sizes=False)["TotalCount"]


class Running:
    """A create of ``disk`` held in the middle (its progress callback waits) in a thread of this process."""

    def __init__(self, client, disk, **kwargs):
        self.holding, self.release = threading.Event(), threading.Event()
        self.error = None

        def progress(done, total):
            self.holding.set()
            self.release.wait(60)

        def run():
            try:
                client.create_snapshot(disk, progress=progress, **kwargs)
            except errors.BlocksnapError as exc:
                self.error = exc

        self.thread = threading.Thread(target=run)

    def __enter__(self):
        self.thread.start()
        assert self.holding.wait(60)
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.thread.join(60)


def expect(got, cls, exit_check=True):
    assert isinstance(got, tuple), got
    code, status, exit_code = got
    assert (code, status) == (cls.code, cls.http_status)
    if exit_check and exit_code is not None:
        assert exit_code == cls.exit_code


# --- the request's own parameters -----------------------------------------------------------------------
MALFORMED = [
    ({"SnapshotName": "1starts-with-a-digit"}, errors.InvalidSnapshotNameMalformed),
    ({"SnapshotName": "auto-named"}, errors.InvalidSnapshotNameMalformed),
    ({"Description": "x"}, errors.InvalidDescriptionMalformed),
    ({"RetentionDays": 0}, errors.InvalidRetentionDaysMalformed),
    ({"RetentionDays": 65537}, errors.InvalidRetentionDaysMalformed),
    ({"Tag": [{"Key": "aliyun-owned", "Value": "v"}]}, errors.InvalidTagKeyMalformed),
    ({"Tag": [{"Key": "k", "Value": "http://x"}]}, errors.InvalidTagValueMalformed),
    ({"Tag": [{"Key": "k", "Value": "a"}, {"Key": "k", "Value": "b"}]}, errors.DuplicateTagKey),
    ({"Tag": [{"Key": f"k{i}", "Value": "v"} for i in range(21)]}, errors.InvalidTagCount),
    ({"ClientToken": "x" * 65}, errors.InvalidClientTokenMalformed),
    ({"Category": "Premium"}, errors.InvalidSnapshotCategoryMalformed),
    ({"Category": "Standard", "InstantAccess": True}, errors.InvalidCategoryAndInstantAccessMalformed),
    ({"Category": "Flash", "InstantAccess": False}, errors.InvalidCategoryAndInstantAccessMalformed),
    ({"InstantAccess": True, "InstantAccessRetentionDays": 0}, errors.InvalidInstantAccessRetentionDaysMalformed),
    ({"InstantAccess": True, "InstantAccessRetentionDays": 65536}, errors.InvalidInstantAccessRetentionDaysMalformed),
    ({"InstantAccessRetentionDays": 7}, errors.InvalidInstantAccessRetentionDaysMalformed),
    ({"InstantAccess": False, "InstantAccessRetentionDays": 7}, errors.InvalidInstantAccessRetentionDaysMalformed),
    ({"StorageLocationArn": "acs:ecs:local:1:storage/loc-1"}, errors.InvalidStorageLocationArnMalformed),
    ({"ResourceGroupId": "rg-nosuchgroup00000000"}, errors.InvalidResourceGroupNotFound),
]


@pytest.mark.parametrize("params,cls", MALFORMED, ids=[f"{c.code}:{min(p)}{i}" for i, (p, c) in
                                                      enumerate(MALFORMED)])
def test_a_malformed_parameter_is_its_code_and_creates_nothing(via, client, disk, params, cls):
    """Each parameter the reference's table names a code for, given a value its rule refuses, is that code with its
    HTTP status (and exit code), and no snapshot is made."""
    expect(via.call("CreateSnapshot", dict(params, DiskId=disk)), cls)
    assert snapshot_count(client) == 0


def test_an_unknown_disk_is_invalid_disk_id_not_found(via, client, disk):
    """A DiskId that names no registered disk is InvalidDiskId.NotFound (404)."""
    expect(via.call("CreateSnapshot", {"DiskId": "d-" + "q" * 20}), errors.InvalidDiskIdNotFound)
    assert snapshot_count(client) == 0


# --- the disk's state ----------------------------------------------------------------------------------------
def test_a_disk_being_snapshotted_is_incorrect_disk_status_creating_snapshot(via, client, disk):
    """While another create holds the disk, a create without a token is IncorrectDiskStatus.CreatingSnapshot."""
    lock = FileLock(client.repo.disk_lock_path(disk))
    assert lock.acquire(exclusive=True, blocking=False)
    try:
        expect(via.call("CreateSnapshot", {"DiskId": disk}), errors.IncorrectDiskStatusCreatingSnapshot)
    finally:
        lock.release()
    assert snapshot_count(client) == 0


def test_a_locked_disk_is_instance_locked_for_security_until_unlocked(via, client, disk):
    """`disk lock` marks the disk (OperationLocks security): every create of it is InstanceLockedForSecurity, also
    with a ClientToken, and DescribeDisks shows the lock; after `disk unlock` the create works."""
    client.lock_disk(disk)
    expect(via.call("CreateSnapshot", {"DiskId": disk}), errors.InstanceLockedForSecurity)
    expect(via.call("CreateSnapshot", {"DiskId": disk, "ClientToken": "t-locked"}), errors.InstanceLockedForSecurity)
    [shown] = client.describe_disks()["Disks"]["Disk"]
    assert shown["OperationLocks"] == {"OperationLock": [{"LockReason": "security"}]}
    assert snapshot_count(client) == 0
    client.unlock_disk(disk)
    assert "SnapshotId" in via.call("CreateSnapshot", {"DiskId": disk, "ClientToken": "t-locked"})


def test_past_the_snapshot_quota_of_a_disk_is_quota_exceed_snapshot(via, client, disk):
    """With the repository's SnapshotsPerDisk quota at 2, a disk's third manual snapshot is QuotaExceed.Snapshot;
    a failed snapshot does not count, and deleting one makes room again."""
    client.set_quotas(snapshots_per_disk=2)
    path = client.describe_disks()["Disks"]["Disk"][0]["Path"]

    def change(done, total):
        with open(path, "r+b") as f:
            f.write(b"changed while read")

    with pytest.raises(errors.ImageChanged):
        client.create_snapshot(disk, progress=change)  # a failed snapshot: it holds nothing, so it does not count
    first = client.create_snapshot(disk)["SnapshotId"]
    client.create_snapshot(disk)
    expect(via.call("CreateSnapshot", {"DiskId": disk}), errors.QuotaExceedSnapshot)
    assert snapshot_count(client) == 3  # the failed one and the two
    client.delete_snapshot(first)
    assert "SnapshotId" in via.call("CreateSnapshot", {"DiskId": disk})


def test_past_the_concurrent_quota_is_quota_exceed_concurrent_snapshot_quota(via, client, disk, make_image):
    """With the ConcurrentSnapshots quota at 1, a create of another disk while one runs is
    QuotaExceed.ConcurrentSnapshotQuota, its message naming the disk and the quota; once it ends, it works."""
    other = client.add_disk(make_image("other.raw", 64 * KiB, [(0, b"o" * 4096)]))["DiskId"]
    client.set_quotas(concurrent_snapshots=1)
    with Running(client, disk):
        got = via.call("CreateSnapshot", {"DiskId": other})
        expect(got, errors.QuotaExceedConcurrentSnapshot)
        assert [s["SourceDiskId"] for s in client.describe_snapshots(sizes=False)["Snapshots"]["Snapshot"]] == [disk]
    assert "SnapshotId" in via.call("CreateSnapshot", {"DiskId": other})


# --- ClientToken ---------------------------------------------------------------------------------------------
def test_a_token_reused_with_other_parameters_is_idempotent_parameter_mismatch(via, client, disk):
    """The ClientToken of an accomplished snapshot with another SnapshotName is IdempotentParameterMismatch; with
    the same parameters it answers the first SnapshotId with a new RequestId."""
    first = client.call("CreateSnapshot", {"DiskId": disk, "SnapshotName": "a1", "ClientToken": "t-1"})
    expect(via.call("CreateSnapshot", {"DiskId": disk, "SnapshotName": "b1", "ClientToken": "t-1"}),
           errors.IdempotentParameterMismatch)
    again = via.call("CreateSnapshot", {"DiskId": disk, "SnapshotName": "a1", "ClientToken": "t-1"})
    assert again["SnapshotId"] == first["SnapshotId"] and again["RequestId"] != first["RequestId"]
    assert snapshot_count(client) == 1


def test_a_token_whose_first_request_runs_is_idempotent_processing(via, client, disk):
    """While the first request with a ClientToken runs, the same request is IdempotentProcessing and one with
    other parameters IdempotentParameterMismatch, decided from state (not the busy disk's
    IncorrectDiskStatus); afterwards the retry gets the first SnapshotId."""
    with Running(client, disk, snapshot_name="a1", client_token="t-2") as first:
        expect(via.call("CreateSnapshot", {"DiskId": disk, "SnapshotName": "a1", "ClientToken": "t-2"}),
               errors.IdempotentProcessing)
        expect(via.call("CreateSnapshot", {"DiskId": disk, "SnapshotName": "b1", "ClientToken": "t-2"}),
               errors.IdempotentParameterMismatch)
    assert first.error is None
    [snap] = client.describe_snapshots(sizes=False)["Snapshots"]["Snapshot"]
    assert via.call("CreateSnapshot", {"DiskId": disk, "SnapshotName": "a1", "ClientToken": "t-2"})["SnapshotId"] \
        == snap["SnapshotId"]


# --- the image during the create ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["python", "sdk"])
def test_an_image_removed_during_the_create_is_create_snapshot_failed_and_leaves_nothing(
        kind, client, repo_path, tmp_path, disk, monkeypatch):
    """The image unlinked while it is read: CreateSnapshot.Failed, and nothing is left of the snapshot: no record
    (not even a failed one), no pack, no chunk entry, no token (the retry after the image is back creates a
    snapshot). In-process only: the test removes the file from inside the create."""
    path = client.describe_disks()["Disks"]["Disk"][0]["Path"]
    with open(path, "rb") as f:
        saved = f.read()
    real = backup._Create._scan_and_store

    def scan_then_remove(self, img):
        out = real(self, img)
        os.unlink(path)
        return out

    monkeypatch.setattr(backup._Create, "_scan_and_store", scan_then_remove)
    via = Interface(kind, client, repo_path, tmp_path)
    try:
        expect(via.call("CreateSnapshot", {"DiskId": disk, "ClientToken": "t-gone"}), errors.CreateSnapshotFailed)
        assert snapshot_count(client) == 0
        with client.repo.catalog.read() as txn:
            assert [txn.count(t) for t in ("snapshots", "chunks", "packs", "tokens", "maps")] == [0, 0, 0, 0, 0]
        assert os.listdir(os.path.join(repo_path, "snapshots")) == []
        monkeypatch.undo()
        with open(path, "wb") as f:
            f.write(saved)
        assert "SnapshotId" in via.call("CreateSnapshot", {"DiskId": disk, "ClientToken": "t-gone"})
    finally:
        via.close()


def test_the_default_snapshot_quota_is_the_clouds_256_manual_snapshots_of_a_disk(client, make_image):
    """Without a quota set, a disk takes 256 manual snapshots and the 257th is QuotaExceed.Snapshot (403), as the
    cloud's quota; another disk is not affected."""
    one = client.add_disk(make_image("one.raw", 4 * KiB, [(0, b"1" * 4096)]))["DiskId"]
    two = client.add_disk(make_image("two.raw", 4 * KiB, [(0, b"2" * 4096)]))["DiskId"]
    assert client.quotas()["Quotas"]["SnapshotsPerDisk"] == 256
    for _ in range(256):
        client.create_snapshot(one)
    with pytest.raises(errors.QuotaExceedSnapshot) as info:
        client.call("CreateSnapshot", {"DiskId": one})
    assert (info.value.code, info.value.http_status) == ("QuotaExceed.Snapshot", 403)
    assert client.describe_snapshots(disk_id=one, sizes=False)["TotalCount"] == 256
    assert "SnapshotId" in client.call("CreateSnapshot", {"DiskId": two})


def test_a_claim_whose_creator_died_before_recording_is_taken_over_and_cleared_by_gc(client, disk):
    """A ClientToken claimed by a request that died before it recorded its snapshot (its lock gone with it)
    does not make the token used: a request with other parameters takes it over and creates; a claim left
    behind is removed by gc."""
    from blocksnap.store.catalog import TokenEntry

    with client.repo.catalog.write() as txn:
        txn.put_token("t-dead", TokenEntry("0" * 64, "s-" + "d" * 20))
        txn.put_token("t-left", TokenEntry("0" * 64, "s-" + "e" * 20))
    sid = client.call("CreateSnapshot", {"DiskId": disk, "ClientToken": "t-dead"})["SnapshotId"]
    assert client.call("CreateSnapshot", {"DiskId": disk, "ClientToken": "t-dead"})["SnapshotId"] == sid
    client.gc()
    with client.repo.catalog.read() as txn:
        assert sorted(t for t, _ in txn.tokens()) == ["t-dead"]


def test_the_same_token_from_many_clients_at_once_makes_one_snapshot_and_no_busy_disk_error(client, disk):
    """Eight threads send the same CreateSnapshot with one ClientToken at the same moment: one snapshot is made,
    every other answer is its SnapshotId or IdempotentProcessing, never IncorrectDiskStatus.CreatingSnapshot."""
    start, answers = threading.Barrier(8), []

    def send():
        start.wait(30)
        try:
            answers.append(client.call("CreateSnapshot", {"DiskId": disk, "ClientToken": "t-many"})["SnapshotId"])
        except errors.BlocksnapError as exc:
            answers.append(exc.code)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    [snap] = client.describe_snapshots(sizes=False)["Snapshots"]["Snapshot"]
    assert len(answers) == 8 and set(answers) <= {snap["SnapshotId"], "IdempotentProcessing"}, answers
    assert snap["SnapshotId"] in answers
