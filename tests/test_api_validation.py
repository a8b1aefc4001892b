"""CreateSnapshot request validation through blocksnap.api.Client on a real repository and disk.

Rules are those of the cloud API reference (docs/API.md; Alibaba Cloud ECS CreateSnapshot). Every
rejection must leave the repository untouched: no snapshot record, no pack file, no idempotency token.
"""
import json
import os
import pathlib

import pytest
from conftest import run_cli

import blocksnap
from blocksnap import errors
from blocksnap.api import Client
from blocksnap.store.locks import FileLock

KiB = 1 << 10


@pytest.fixture
def disk(client, make_image):
    img = make_image("disk.raw", 256 * KiB, [(0, b"boot" * 5000), (200 * KiB, b"data" * 1000)])
    return client.add_disk(img)["DiskId"]


def pack_files(repo_path):
    root = os.path.join(repo_path, "packs")
    return sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names)


def state(client, repo_path):
    return client.describe_snapshots(sizes=False)["TotalCount"], pack_files(repo_path)


def assert_rejected(client, repo_path, disk_id, code, **params):
    """create_snapshot(**params) raises the error with API ``code`` and stores nothing."""
    before = state(client, repo_path)
    with pytest.raises(errors.BlocksnapError) as exc:
        client.create_snapshot(disk_id, **params)
    assert exc.value.code == code
    assert state(client, repo_path) == before
    return exc.value


def accepted(client, disk_id, **params):
    """create_snapshot(**params) succeeds; returns the new snapshot as DescribeSnapshots shows it."""
    sid = client.create_snapshot(disk_id, **params)["SnapshotId"]
    [snap] = client.describe_snapshots(snapshot_ids=[sid], sizes=False)["Snapshots"]["Snapshot"]
    assert snap["Status"] == "accomplished"
    return snap


def child_env():
    """PYTHONPATH for run_cli children: the directory this process imported blocksnap from."""
    return {"PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(blocksnap.__file__)))}


# --- SnapshotName ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ab", "快照1", "a" * 128, "snap:1_2.3-4", "Été", "x0", "快照"])
def test_snapshot_name_accepted(client, disk, name):
    """Names of 2..128 characters starting with a letter (Chinese too), with digits and : _ . -, are kept."""
    assert accepted(client, disk, snapshot_name=name)["SnapshotName"] == name


@pytest.mark.parametrize("name", ["a", "a" * 129, "1snap", "http://x", "https://x", "autoSnap", "my snap",
                                  "a/b", "_ab", "-ab", ":ab", "", "ab!", "ab\n", "ab\udcff"])
def test_snapshot_name_rejected(client, repo_path, disk, name):
    """Names too short or long, not starting with a letter, starting with http(s):// or auto, or with
    other characters are InvalidSnapshotName.Malformed (HTTP 400) and store nothing."""
    exc = assert_rejected(client, repo_path, disk, "InvalidSnapshotName.Malformed", snapshot_name=name)
    assert exc.http_status == 400 and isinstance(exc, ValueError)


# --- Description -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["ab", "d" * 256, "before the upgrade, see http://x", "描述"])
def test_description_accepted(client, disk, text):
    """Descriptions of 2..256 characters not starting with http(s):// are stored."""
    assert accepted(client, disk, description=text)["Description"] == text


@pytest.mark.parametrize("text", ["a", "d" * 257, "http://example.com", "https://example.com", "",
                                  "bad\udcff\udcfe"])  # bytes that are not UTF-8, as argv carries them
def test_description_rejected(client, repo_path, disk, text):
    """A description of 1 or 257 characters or starting with http(s):// is InvalidDescription.Malformed."""
    assert_rejected(client, repo_path, disk, "InvalidDescription.Malformed", description=text)


# --- RetentionDays ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("days", [1, 65536, "30"])
def test_retention_days_accepted(client, disk, days):
    """RetentionDays 1..65536 (also as a decimal string) is stored with an ExpiredTime."""
    snap = accepted(client, disk, retention_days=days)
    assert snap["RetentionDays"] == int(days)
    assert snap["ExpiredTime"] > snap["CreationTime"]


@pytest.mark.parametrize("days", [0, 65537, "abc", -1, "1.5", True, 2.0, "1_0", "\u0663", "+5", "0x10"])
def test_retention_days_rejected(client, repo_path, disk, days):
    """RetentionDays outside 1..65536 or not a whole number is InvalidRetentionDays.Malformed."""
    assert_rejected(client, repo_path, disk, "InvalidRetentionDays.Malformed", retention_days=days)


# --- Tags ------------------------------------------------------------------------------------------------
def test_twenty_tags_accepted(client, disk):
    """Twenty tags, an empty value, a 128-character key and value are all stored in order."""
    tags = [{"Key": f"k{i}", "Value": f"v{i}"} for i in range(17)]
    tags += [{"Key": "empty", "Value": ""}, {"Key": "K" * 128, "Value": "V" * 128}, ("pair", "tuple")]
    snap = accepted(client, disk, tags=tags)
    got = snap["Tags"]["Tag"]
    assert len(got) == 20
    assert got[17] == {"TagKey": "empty", "TagValue": ""}
    assert got[18] == {"TagKey": "K" * 128, "TagValue": "V" * 128}
    assert got[19] == {"TagKey": "pair", "TagValue": "tuple"}


def test_twenty_one_tags_rejected(client, repo_path, disk):
    """More than 20 tags is rejected (InvalidTagCount) and stores nothing."""
    tags = [{"Key": f"k{i}", "Value": "v"} for i in range(21)]
    exc = assert_rejected(client, repo_path, disk, "InvalidTagCount", tags=tags)
    assert isinstance(exc, errors.InvalidParameter)


def test_duplicate_tag_key_rejected(client, repo_path, disk):
    """Two tags with the same key are Duplicate.TagKey."""
    tags = [{"Key": "env", "Value": "a"}, {"Key": "other", "Value": "b"}, {"Key": "env", "Value": "c"}]
    assert_rejected(client, repo_path, disk, "Duplicate.TagKey", tags=tags)


@pytest.mark.parametrize("key", ["", "k" * 129, "aliyun", "aliyunX", "acs:x", "http://x", "https://x", None,
                                 "k\udcff"])
def test_tag_key_rejected(client, repo_path, disk, key):
    """Empty, 129-character, aliyun*, acs:* and http(s)://* tag keys are InvalidTagKey.Malformed."""
    assert_rejected(client, repo_path, disk, "InvalidTagKey.Malformed", tags=[{"Key": key, "Value": "v"}])


@pytest.mark.parametrize("key", ["see-http://x", "a https://b"])
def test_tag_key_containing_url_rejected(client, repo_path, disk, key):
    """A tag key containing http:// or https:// anywhere is InvalidTagKey.Malformed."""
    assert_rejected(client, repo_path, disk, "InvalidTagKey.Malformed", tags=[{"Key": key, "Value": "v"}])


@pytest.mark.parametrize("value", ["v" * 129, "http://x", "go to https://x", 5, "v\udcff"])
def test_tag_value_rejected(client, repo_path, disk, value):
    """A tag value of 129 characters or containing http(s):// is InvalidTagValue.Malformed."""
    assert_rejected(client, repo_path, disk, "InvalidTagValue.Malformed", tags=[{"Key": "k", "Value": value}])


# --- ClientToken -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("token", ["t", "x" * 64, "123e4567-e89b-12d3-a456-426655440000", "a b~!"])
def test_client_token_accepted(client, disk, token):
    """ASCII tokens of up to 64 characters are accepted."""
    accepted(client, disk, client_token=token)


@pytest.mark.parametrize("token", ["x" * 65, "tökén", "令牌", 12])
def test_client_token_rejected(client, repo_path, disk, token):
    """A token over 64 characters or not ASCII is InvalidClientToken.Malformed (HTTP 403)."""
    exc = assert_rejected(client, repo_path, disk, "InvalidClientToken.Malformed", client_token=token)
    assert exc.http_status == 403


# --- Category --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("category", ["Standard", "Flash"])
def test_category_accepted(client, disk, category):
    """Category Standard and Flash are accepted and stored."""
    assert accepted(client, disk, category=category)["Category"] == category


@pytest.mark.parametrize("category", ["standard", "Premium", "", "flash"])
def test_category_rejected(client, repo_path, disk, category):
    """Any other Category is InvalidSnapshotCategory.Malformed."""
    assert_rejected(client, repo_path, disk, "InvalidSnapshotCategory.Malformed", category=category)


# --- idempotency -----------------------------------------------------------------------------------------
def test_same_token_same_params_returns_the_same_snapshot(client, repo_path, disk):
    """The same ClientToken and parameters again return the first SnapshotId and store nothing new."""
    params = {"snapshot_name": "nightly", "description": "before upgrade", "retention_days": 7,
              "tags": [{"Key": "env", "Value": "prod"}], "client_token": "tok-1", "category": "Standard"}
    first = client.create_snapshot(disk, **params)
    before = state(client, repo_path)
    again = client.create_snapshot(disk, **params)
    assert again["SnapshotId"] == first["SnapshotId"]
    assert again["RequestId"] != first["RequestId"]
    assert state(client, repo_path) == before and before[0] == 1


@pytest.mark.parametrize("change", [
    {"snapshot_name": "other"}, {"description": "changed"}, {"retention_days": 8},
    {"tags": [{"Key": "env", "Value": "dev"}]}, {"category": "Flash"}, {"snapshot_name": None},
])
def test_same_token_different_params_is_mismatch(client, repo_path, disk, change):
    """A ClientToken reused with any other parameter is IdempotentParameterMismatch and stores nothing."""
    params = {"snapshot_name": "nightly", "description": "before upgrade", "retention_days": 7,
              "tags": [{"Key": "env", "Value": "prod"}], "client_token": "tok-2", "category": "Standard"}
    client.create_snapshot(disk, **params)
    exc = assert_rejected(client, repo_path, disk, "IdempotentParameterMismatch", **dict(params, **change))
    assert exc.http_status == 403


def test_same_token_other_disk_is_mismatch(client, repo_path, disk, make_image):
    """Reusing a ClientToken for another disk is IdempotentParameterMismatch."""
    other = client.add_disk(make_image("other.raw", 64 * KiB, [(0, b"o" * 100)]))["DiskId"]
    client.create_snapshot(disk, client_token="tok-3")
    assert_rejected(client, repo_path, other, "IdempotentParameterMismatch", client_token="tok-3")


def test_rejected_request_does_not_consume_its_token(client, repo_path, disk):
    """A request rejected by validation leaves its ClientToken unused: a later valid one with it succeeds."""
    assert_rejected(client, repo_path, disk, "InvalidSnapshotName.Malformed", snapshot_name="1bad",
                    client_token="tok-4")
    snap = accepted(client, disk, snapshot_name="good", client_token="tok-4")
    assert snap["SnapshotName"] == "good"


def test_retry_after_failed_create_tries_again(client, disk):
    """A retry with the ClientToken of a failed create is not answered with the failed snapshot: it creates
    an accomplished one, which later retries with that token return."""
    image = client.describe_disks()["Disks"]["Disk"][0]["Path"]

    def change_image(done, total):
        with open(image, "r+b") as f:
            f.write(b"changed while read")

    with pytest.raises(errors.BlocksnapError) as exc:
        client.create_snapshot(disk, client_token="tok-fail", progress=change_image)
    assert exc.value.code == "CreateSnapshot.ImageChanged"
    [failed] = client.describe_snapshots(sizes=False)["Snapshots"]["Snapshot"]
    assert failed["Status"] == "failed"
    sid = client.create_snapshot(disk, client_token="tok-fail")["SnapshotId"]
    assert sid != failed["SnapshotId"]
    [snap] = client.describe_snapshots(snapshot_ids=[sid], sizes=False)["Snapshots"]["Snapshot"]
    assert snap["Status"] == "accomplished"
    assert client.create_snapshot(disk, client_token="tok-fail")["SnapshotId"] == sid
    assert client.describe_snapshots(sizes=False)["TotalCount"] == 2
    # Deleting the failed attempt leaves the token with the snapshot that took it over.
    client.delete_snapshot(failed["SnapshotId"])
    assert client.create_snapshot(disk, client_token="tok-fail")["SnapshotId"] == sid
    assert client.describe_snapshots(sizes=False)["TotalCount"] == 1
    # Deleting that one frees the token: the next request with it creates a new snapshot.
    client.delete_snapshot(sid)
    assert client.create_snapshot(disk, client_token="tok-fail")["SnapshotId"] not in (sid, failed["SnapshotId"])


def test_concurrent_requests_on_a_creating_disk(client, disk):
    """While a create runs: the same token and parameters get IdempotentProcessing, the same token with other
    parameters IdempotentParameterMismatch, another request IncorrectDiskStatus.CreatingSnapshot."""
    seen = {}

    def during(done, total):
        if seen:
            return
        for label, kwargs in (("same", {"snapshot_name": "s1", "client_token": "tok-5"}),
                              ("changed", {"snapshot_name": "s2", "client_token": "tok-5"}),
                              ("other", {"snapshot_name": "s3"})):
            try:
                client.create_snapshot(disk, **kwargs)
                seen[label] = "created"
            except errors.BlocksnapError as exc:
                seen[label] = exc.code

    client.create_snapshot(disk, snapshot_name="s1", client_token="tok-5", progress=during)
    assert seen == {"same": "IdempotentProcessing", "changed": "IdempotentParameterMismatch",
                    "other": "IncorrectDiskStatus.CreatingSnapshot"}
    assert client.describe_snapshots(sizes=False)["TotalCount"] == 1


def test_a_retry_arriving_before_the_first_request_recorded_its_token(client, disk, monkeypatch):
    """The same token twice at once: the retry finds the disk busy before the first request has recorded
    its token. It is still IdempotentProcessing (a changed retry IdempotentParameterMismatch), as the
    cloud API answers, not the busy disk's IncorrectDiskStatus.CreatingSnapshot."""
    import threading
    import time

    from blocksnap import backup

    real_register = backup._Create._register
    holding = threading.Event()

    def slow_register(self, img):
        holding.set()  # the disk lock is held, the token not yet recorded
        time.sleep(0.4)
        return real_register(self, img)

    monkeypatch.setattr(backup._Create, "_register", slow_register)
    retries_done = threading.Event()
    first = threading.Thread(target=client.create_snapshot, args=(disk,),
                             kwargs={"snapshot_name": "s1", "client_token": "tok-race",
                                     "progress": lambda done, total: retries_done.wait(30)})
    first.start()
    try:
        assert holding.wait(30)
        seen = []
        for name in ("s1", "s2"):
            try:
                client.create_snapshot(disk, snapshot_name=name, client_token="tok-race")
                seen.append("created")
            except errors.BlocksnapError as exc:
                seen.append(exc.code)
    finally:
        retries_done.set()  # the first request stays in progress until the retries are answered
        first.join()
    assert seen == ["IdempotentProcessing", "IdempotentParameterMismatch"]
    assert client.describe_snapshots(sizes=False)["TotalCount"] == 1


def test_disk_locked_by_another_creator(client, repo_path, disk):
    """A create while another holder has the disk lock is IncorrectDiskStatus.CreatingSnapshot (403),
    storing nothing."""
    lock = FileLock(client.repo.disk_lock_path(disk))
    assert lock.acquire(exclusive=True, blocking=False)
    try:
        exc = assert_rejected(client, repo_path, disk, "IncorrectDiskStatus.CreatingSnapshot")
    finally:
        lock.release()
    assert exc.http_status == 403
    accepted(client, disk)


# --- DiskId ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("disk_id", ["d-" + "a" * 20, "d-" + "z9" * 10, "d-short", "D-" + "a" * 20,
                                     "bogus", "", "../../etc/passwd", None, 42])
def test_unknown_or_malformed_disk_id_not_found(client, repo_path, disk, disk_id):
    """An unknown or malformed DiskId is InvalidDiskId.NotFound (404); no lock file, nothing stored."""
    locks = sorted(os.listdir(os.path.join(repo_path, "locks")))
    exc = assert_rejected(client, repo_path, disk_id, "InvalidDiskId.NotFound")
    assert exc.http_status == 404 and isinstance(exc, LookupError)
    assert sorted(os.listdir(os.path.join(repo_path, "locks"))) == locks


# --- the CLI ---------------------------------------------------------------------------------------------
def test_cli_bad_name_is_one_line_and_exit_2(repo_path, disk):
    """The CLI reports a malformed name as one stderr line 'blocksnap: error: <Code>: ...', exit 2."""
    proc = run_cli("snapshot", "create", disk, "--snapshot-name", "1bad", "--repo", repo_path,
                   env=child_env())
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("blocksnap: error: InvalidSnapshotName.Malformed")
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == ""


def test_cli_json_error_body(repo_path, disk):
    """With --json the CLI prints the API error body {"Error": {Code, Message, HttpStatus}}, exit 2."""
    proc = run_cli("snapshot", "create", disk, "--snapshot-name", "1bad", "--repo", repo_path, "--json",
                   env=child_env())
    assert proc.returncode == 2, proc.stderr
    body = json.loads(proc.stdout)
    assert body == {"Error": {"Code": "InvalidSnapshotName.Malformed",
                              "Message": body["Error"]["Message"], "HttpStatus": 400}}
    assert body["Error"]["Message"].startswith("The specified SnapshotName is wrongly formed.")
    assert "Traceback" not in proc.stderr


def test_cli_rejection_stores_nothing(client, repo_path, disk):
    """A CLI create rejected by validation leaves the repository as it was."""
    before = state(client, repo_path)
    proc = run_cli("snapshot", "create", disk, "--retention-days", "0", "--repo", repo_path, env=child_env())
    assert proc.returncode == 2 and "InvalidRetentionDays.Malformed" in proc.stderr
    assert state(client, repo_path) == before



def test_request_ids_are_random_uppercase_uuid4():
    """RequestIds parse as RFC 4122 version-4 UUIDs (checked with the uuid module), are upper case
    like the cloud API's, and do not repeat."""
    import uuid

    from blocksnap.api import request_id

    seen = set()
    for _ in range(2000):
        rid = request_id()
        parsed = uuid.UUID(rid)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert rid == str(parsed).upper()
        seen.add(rid)
    assert len(seen) == 2000


def test_new_ids_are_well_formed_and_uniform():
    """DiskId/SnapshotId bodies are 20 characters of [a-z0-9]; every character is equally likely (a
    plain modulo of random bytes would favour the first four by 14 %, which this bound catches)."""
    import collections
    import re

    from blocksnap.repository import ID_ALPHABET, new_id

    counts = collections.Counter()
    for _ in range(20000):
        sid = new_id("s-")
        assert re.fullmatch(r"s-[a-z0-9]{20}", sid)
        counts.update(sid[2:])
    expected = 20000 * 20 / len(ID_ALPHABET)  # 11111; one standard deviation is about 104
    assert set(counts) == set(ID_ALPHABET)
    assert all(abs(c - expected) < 700 for c in counts.values()), counts


@pytest.mark.parametrize("tags", [{"os": "linux"}, ["env"], [("a", "b", "c")], "env=prod"])
def test_tags_of_the_wrong_shape_are_rejected(client, repo_path, disk, tags):
    """Tags must be a list of {Key, Value} (or pairs): a dict, bare strings or triples are refused, never
    read as something else (a dict's keys as two-character pairs, say)."""
    exc = assert_rejected(client, repo_path, disk, "InvalidTagKey.Malformed", tags=tags)
    assert isinstance(exc, errors.InvalidParameter)


def test_error_messages_do_not_repeat_huge_values(client, repo_path, disk):
    exc = assert_rejected(client, repo_path, disk, "InvalidTagValue.Malformed",
                          tags=[{"Key": "k", "Value": "v" * 100000}])
    assert len(str(exc)) < 300 and "100000 characters" in str(exc)


def test_describe_snapshots_checks_its_filters(client, disk):
    """SnapshotIds is a list (or, as in the cloud API, a JSON array in a string); Status one of progressing,
    accomplished, failed, all. Anything else is InvalidParameter, not an empty answer."""
    sid = client.create_snapshot(disk)["SnapshotId"]
    assert client.describe_snapshots(snapshot_ids=[sid])["TotalCount"] == 1
    assert client.describe_snapshots(snapshot_ids=json.dumps([sid]))["TotalCount"] == 1
    assert client.describe_snapshots(status="all")["TotalCount"] == 1
    assert client.describe_snapshots(status="failed")["TotalCount"] == 0
    for bad in ({"snapshot_ids": sid}, {"snapshot_ids": [1]}, {"status": "Accomplished"}, {"status": "bogus"}):
        with pytest.raises(errors.InvalidParameter):
            client.describe_snapshots(**bad)


def test_a_disk_path_that_is_not_utf8_is_refused_cleanly(client, tmp_path):
    """Records are JSON: an image whose path is not valid UTF-8 is InvalidImage.Unsupported, one line."""
    name = os.fsdecode(b"img\xff.raw")
    (tmp_path / name).write_bytes(b"x" * 4096)
    with pytest.raises(errors.ImageUnsupported) as exc:
        client.add_disk(str(tmp_path / name))
    assert "UTF-8" in str(exc.value)
    assert client.describe_disks()["TotalCount"] == 0



# --- parameter types: paths and the chunk size -----------------------------------------------------------
NOT_A_PATH = [5, 0, 3.5, b"/tmp/repo", bytearray(b"/tmp/repo"), ["repo"], object()]


@pytest.mark.parametrize("repo", NOT_A_PATH, ids=lambda v: type(v).__name__ + repr(v)[:12])
def test_repository_path_that_is_not_str_or_pathlike_is_invalid_parameter(tmp_path, repo):
    """Client(repo) and Client.init(repo) with a repository path that is not a str or os.PathLike (bytes
    included) raise InvalidParameter (exit 2, a ValueError) naming the type, not a raw TypeError."""
    for call in (lambda: Client(repo), lambda: Client.init(repo)):
        with pytest.raises(errors.InvalidParameter) as exc:
            call()
        assert type(exc.value) is errors.InvalidParameter and exc.value.exit_code == errors.EXIT_INVALID
        assert type(repo).__name__ in str(exc.value)
    assert os.listdir(tmp_path) == []  # nothing made anywhere, the per-user default included


def test_init_with_a_bytes_path_makes_nothing_there(tmp_path):
    """Client.init(b"/existing/dir/repo") is refused before anything is created at that path."""
    target = tmp_path / "bytes-repo"
    with pytest.raises(errors.InvalidParameter):
        Client.init(os.fsencode(str(target)), chunk_size=64 * KiB)
    assert not target.exists()


@pytest.mark.parametrize("size", ["4096", "65536", " 65536", b"65536", 65536.0, 4096.5, True, False, None,
                                  [65536], 1j], ids=repr)
def test_chunk_size_that_is_not_an_int_is_invalid_chunk_size(tmp_path, size):
    """Client.init's chunk size must be an int: a str (ASCII digits too), bytes, float, bool or None is
    InvalidChunkSize (exit 2), and no repository is made."""
    target = tmp_path / "repo"
    with pytest.raises(errors.InvalidChunkSize) as exc:
        Client.init(str(target), chunk_size=size)
    assert exc.value.exit_code == errors.EXIT_INVALID and isinstance(exc.value, ValueError)
    assert "not an int" in str(exc.value)
    assert not target.exists()


@pytest.mark.parametrize("image", [None, 5, 3.5, b"/dev/null", ["disk.raw"]], ids=repr)
def test_image_path_that_is_not_str_or_pathlike_is_invalid_parameter(client, image):
    """add_disk(image) with an image path that is not a str or os.PathLike is InvalidParameter and
    registers nothing."""
    with pytest.raises(errors.InvalidParameter) as exc:
        client.add_disk(image)
    assert type(exc.value) is errors.InvalidParameter
    assert client.describe_disks()["TotalCount"] == 0


def test_pathlike_paths_work_like_str(tmp_path, make_image):
    """pathlib.Path works for the repository path (init and open) and the image path, which is recorded
    as a str; a Path whose name is not UTF-8 is refused like such a str."""
    repo = tmp_path / "path-repo"
    cfg = Client.init(repo, chunk_size=64 * KiB)
    assert cfg["Path"] == str(repo) and cfg["ChunkSize"] == 64 * KiB
    img = make_image("p.raw", 128 * KiB, [(0, b"x" * 4096)])
    with Client(repo) as c:
        rec = c.add_disk(pathlib.Path(img), disk_name="p")
        assert rec["Path"] == os.path.realpath(img)
        assert c.describe_disks()["Disks"]["Disk"][0]["Path"] == os.path.realpath(img)
        bad = tmp_path / os.fsdecode(b"img\xff.raw")
        bad.write_bytes(b"x" * 4096)
        with pytest.raises(errors.ImageUnsupported):
            c.add_disk(bad)
        assert c.describe_disks()["TotalCount"] == 1
