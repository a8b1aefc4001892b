"""DescribeSnapshots and DescribeDisks: every filter, both paging styles with the cloud's defaults and limits, the
cloud's fields, and the catalog's indexes that serve them (kept right by create, delete, gc, repair, and built
for a version-2 catalog when it is opened)."""
import json
import os
import random

import pytest

from blocksnap import describe, errors
from blocksnap.api import SNAPSHOT_DEFAULTS, Client
from blocksnap.store import catalog as catalogs

KiB = 1 << 10


@pytest.fixture
def disk(client, make_image):
    img = make_image("disk.raw", 128 * KiB, [(0, os.urandom(8 * KiB))])
    return client.add_disk(img)["DiskId"]


def ids(out):
    return [s["SnapshotId"] for s in out["Snapshots"]["Snapshot"]]


def call(client, **params):
    return client.call("DescribeSnapshots", dict(params, RegionId="local"))


def raised(fn, *args, **kwargs):
    with pytest.raises(errors.BlocksnapError) as info:
        fn(*args, **kwargs)
    return info.value


@pytest.fixture
def many(client, disk, make_image):
    """25 snapshots of two disks with names, tags and a category: ``(client, [ids], disk, other)``."""
    other = client.add_disk(make_image("other.raw", 64 * KiB, [(0, b"o" * 4096)]))["DiskId"]
    made = []
    for i in range(25):
        kwargs = {"snapshot_name": f"n{i % 4}", "tags": [{"Key": "parity", "Value": str(i % 2)}]}
        if i % 5 == 0:
            kwargs["tags"].append({"Key": "five", "Value": "yes"})
            kwargs["category"] = "Flash"
        made.append(client.create_snapshot(other if i % 3 == 0 else disk, **kwargs)["SnapshotId"])
    return client, made, disk, other


# --- paging ------------------------------------------------------------------------------------------------
def test_page_number_and_page_size_default_to_1_and_10_as_the_cloud(many):
    """Without paging parameters the API answers the first 10 (oldest first), TotalCount all 25; PageNumber 3 is
    the last 5; a page past the end is empty; NextToken is "" in this style."""
    client, made, _, _ = many
    out = call(client)
    assert ids(out) == made[:10] and (out["TotalCount"], out["PageNumber"], out["PageSize"]) == (25, 1, 10)
    assert out["NextToken"] == ""
    assert ids(call(client, PageNumber=3)) == made[20:]
    assert ids(call(client, PageNumber=2, PageSize=7)) == made[7:14]
    assert ids(call(client, PageNumber=9)) == [] and call(client, PageNumber=9)["TotalCount"] == 25


def test_the_python_method_still_answers_everything_on_one_page(many):
    """describe_snapshots() without paging arguments lists every snapshot (its documented behaviour), and takes
    the same paging arguments as the API."""
    client, made, _, _ = many
    out = client.describe_snapshots(sizes=False)
    assert ids(out) == made and out["PageSize"] == 25
    assert ids(client.describe_snapshots(sizes=False, page_number=2, page_size=10)) == made[10:20]


def test_max_results_and_next_token_walk_every_page_once(many):
    """MaxResults/NextToken pages cover every snapshot once, in order; the last page's NextToken is ""; PageNumber
    counts the pages; PageNumber and PageSize given beside a NextToken take no effect."""
    client, made, _, _ = many
    seen, pages, token = [], [], None
    while True:
        params = {"MaxResults": 6, "PageNumber": 4, "PageSize": 1}
        if token:
            params["NextToken"] = token
        out = call(client, **params)
        seen += ids(out)
        pages.append((out["PageNumber"], len(ids(out))))
        token = out["NextToken"]
        if not token:
            break
    assert seen == made and pages == [(1, 6), (2, 6), (3, 6), (4, 6), (5, 1)]


def test_next_token_paging_with_a_filter_keeps_to_the_filter(many):
    """Token paging of a filtered query returns only its snapshots; the token of one query given to another is
    InvalidParameter."""
    client, made, disk, _ = many
    mine = [s for i, s in enumerate(made) if i % 3 != 0]
    first = call(client, DiskId=disk, MaxResults=10)
    second = call(client, DiskId=disk, MaxResults=10, NextToken=first["NextToken"])
    assert len(mine) == 16 and ids(first) + ids(second) == mine and second["NextToken"] == ""
    exc = raised(call, client, MaxResults=10, NextToken=first["NextToken"])
    assert exc.code == "InvalidParameter" and "NextToken" in exc.message


@pytest.mark.parametrize("params", [{"PageSize": 0}, {"PageSize": 101}, {"PageNumber": 0}, {"MaxResults": 0},
                                    {"MaxResults": 101}, {"NextToken": "not-a-token"}, {"NextToken": "00"},
                                    {"SnapshotIds": json.dumps([f"s-{i:020d}" for i in range(101)])},
                                    {"Status": "done"}, {"SnapshotType": "manual"}])
def test_paging_and_filter_values_out_of_range_are_invalid_parameter(client, params):
    """PageSize outside 1-100, PageNumber below 1, MaxResults outside 1-100, a NextToken this repository did not
    give, more than 100 SnapshotIds, an unknown Status or SnapshotType: InvalidParameter."""
    assert raised(call, client, **params).code == "InvalidParameter"


# --- filters ----------------------------------------------------------------------------------------------
def test_each_filter_selects_exactly_its_snapshots(many):
    """DiskId, SnapshotName, Category, Tag.N (key and value; key alone), SnapshotIds, SnapshotType, Status and
    ResourceGroupId each select what they say, together by AND; TotalCount counts the matches."""
    client, made, disk, other = many
    everything = {"PageSize": 100}
    def by(pred):
        return [s for i, s in enumerate(made) if pred(i)]

    assert ids(call(client, DiskId=other, **everything)) == by(lambda i: i % 3 == 0)
    assert ids(call(client, SnapshotName="n1", **everything)) == by(lambda i: i % 4 == 1)
    assert ids(call(client, Category="Flash", **everything)) == by(lambda i: i % 5 == 0)
    assert ids(call(client, Category="Standard", **everything)) == by(lambda i: i % 5 != 0)
    assert ids(call(client, **{"Tag.1.Key": "parity", "Tag.1.Value": "1"}, **everything)) == by(lambda i: i % 2)
    assert ids(call(client, **{"Tag.1.Key": "five"}, **everything)) == by(lambda i: i % 5 == 0)
    both = call(client, DiskId=disk, SnapshotName="n2", **{"Tag.1.Key": "parity", "Tag.1.Value": "0"}, **everything)
    assert ids(both) == by(lambda i: i % 3 != 0 and i % 4 == 2 and i % 2 == 0) and both["TotalCount"] == len(ids(both))
    picked = [made[3], made[17], made[0]]
    assert ids(call(client, SnapshotIds=json.dumps(picked + ["s-" + "0" * 20, "junk"]))) == sorted(
        picked, key=made.index)
    assert ids(call(client, SnapshotIds="[]")) == []
    assert call(client, SnapshotType="user")["TotalCount"] == 25 and call(client, SnapshotType="auto")["TotalCount"] == 0
    assert call(client, Status="accomplished")["TotalCount"] == 25 and call(client, Status="progressing")["TotalCount"] == 0
    group = client.repo.default_group
    assert call(client, ResourceGroupId=group)["TotalCount"] == 25
    assert ids(call(client, SnapshotName="nope")) == [] and call(client, SnapshotName="nope")["TotalCount"] == 0


def test_resource_group_filter_and_field(client, disk):
    """A snapshot made in a resource group carries its id and is what the group's filter lists; one made without
    is in the default group; an unknown group is InvalidResourceGroup.NotFound; a group in use cannot be
    deleted, an empty one can."""
    group = client.create_resource_group("backups")["ResourceGroup"]["ResourceGroupId"]
    a = client.CreateSnapshot(DiskId=disk, ResourceGroupId=group)["SnapshotId"]
    b = client.CreateSnapshot(DiskId=disk)["SnapshotId"]
    assert ids(call(client, ResourceGroupId=group)) == [a]
    assert ids(call(client, ResourceGroupId=client.repo.default_group)) == [b]
    shown = {s["SnapshotId"]: s["ResourceGroupId"] for s in call(client)["Snapshots"]["Snapshot"]}
    assert shown == {a: group, b: client.repo.default_group}
    assert raised(call, client, ResourceGroupId="rg-" + "x" * 20).code == "InvalidResourceGroup.NotFound"
    assert raised(client.delete_resource_group, group).code == "DeleteConflict.ResourceGroup.Resource"
    client.delete_snapshot(a)
    client.delete_resource_group(group)
    assert [g["Name"] for g in client.list_resource_groups()["ResourceGroups"]["ResourceGroup"]] == ["default"]


@pytest.mark.parametrize("lose_catalog", [False, True])
def test_resource_groups_and_disk_locks_survive_repair(client, disk, repo_path, lose_catalog):
    """Resource groups and a disk's security lock are in the store: repair, also of a catalog that is gone,
    brings back the group (listed, usable, still in use by its snapshot) and the lock."""
    import shutil

    group = client.create_resource_group("kept-group", "Kept")["ResourceGroup"]
    sid = client.create_snapshot(disk, resource_group_id=group["ResourceGroupId"])["SnapshotId"]
    client.lock_disk(disk)
    client.close()
    if lose_catalog:
        shutil.rmtree(os.path.join(repo_path, "catalog"))
    with Client(repo_path, maintenance=True) as m:
        assert m.repair()["ResourceGroups"] == 1
    with Client(repo_path) as c:
        listed = c.list_resource_groups()["ResourceGroups"]["ResourceGroup"]
        assert [(g["ResourceGroupId"], g["Name"], g["DisplayName"]) for g in listed][1:] == [
            (group["ResourceGroupId"], "kept-group", "Kept")]
        assert ids(call(c, ResourceGroupId=group["ResourceGroupId"])) == [sid]
        assert raised(c.create_snapshot, disk).code == "InstanceLockedForSecurity"
        assert raised(c.delete_resource_group, group["ResourceGroupId"]).code == "DeleteConflict.ResourceGroup.Resource"


def test_a_dead_create_is_shown_failed_by_the_status_filter(client, disk):
    """A record left progressing by a process that died before it stored its object is failed to readers:
    Status=failed lists it and Status=progressing does not, without anything written."""
    client.create_snapshot(disk)
    with client.repo.catalog.write() as txn:
        [sid] = txn.snapshot_ids()
        rec = txn.snapshot(sid)
        rec.update(Status="progressing", Progress="40%", Pid=999999999)
        txn.put_snapshot(rec)
    client.repo.backend.delete_object("snapshots", sid)  # it died before it stored its object
    assert ids(call(client, Status="failed")) == [sid]
    assert call(client, Status="progressing")["TotalCount"] == 0
    assert call(client, Status="accomplished")["TotalCount"] == 0


def test_dry_run_checks_and_answers_dry_run_operation(client, disk):
    """DryRun=true is DryRunOperation when the request would pass, its own error when not, and lists nothing."""
    client.create_snapshot(disk)
    assert raised(call, client, DryRun=True).code == "DryRunOperation"
    assert raised(call, client, DryRun=True, PageSize=500).code == "InvalidParameter"
    exc = raised(client.call, "DescribeDisks", {"RegionId": "local", "DryRun": "true"})
    assert (exc.code, exc.http_status) == ("DryRunOperation", 400)


# --- the fields ---------------------------------------------------------------------------------------------
def test_every_snapshot_carries_the_cloud_fields_with_the_clouds_unset_values(client, disk):
    """A snapshot made with nothing but its DiskId shows every cloud field: unset ones as the cloud's responses
    show them ("" / 0 / false / "none" / "user"), CreationTime in UTC ISO 8601, Available true, and the sizes."""
    client.create_snapshot(disk)
    [snap] = call(client)["Snapshots"]["Snapshot"]
    for key, value in SNAPSHOT_DEFAULTS.items():
        if key not in ("LogicalBytes", "ChangedBytes", "ChangedChunks", "AddedBytes", "AddedChunks"):
            assert snap[key] == value, key
    for key in ("SnapshotId", "Status", "Progress", "SourceDiskId", "SourceDiskSize", "CreationTime",
                "LastModifiedTime", "Tags", "ResourceGroupId", "Available", "RegionId", "ExclusiveBytes"):
        assert key in snap, key
    assert snap["CreationTime"].endswith("Z") and len(snap["CreationTime"]) == 20
    assert (snap["Status"], snap["Progress"], snap["Available"], snap["Tags"]) == ("accomplished", "100%", True,
                                                                                    {"Tag": []})
    assert snap["LogicalBytes"] > 0 and snap["FullSnapshotSizeInBytes"] == snap["LogicalBytes"]


def test_instant_access_is_recorded_and_every_snapshot_is_available(client, disk):
    """InstantAccess=true with InstantAccessRetentionDays is shown as given; a snapshot without it is
    InstantAccess false; both are Available once accomplished."""
    a = client.CreateSnapshot(DiskId=disk, InstantAccess=True, InstantAccessRetentionDays=3)["SnapshotId"]
    b = client.CreateSnapshot(DiskId=disk)["SnapshotId"]
    shown = {s["SnapshotId"]: s for s in call(client)["Snapshots"]["Snapshot"]}
    assert (shown[a]["InstantAccess"], shown[a]["InstantAccessRetentionDays"], shown[a]["Available"]) == (True, 3, True)
    assert (shown[b]["InstantAccess"], shown[b]["InstantAccessRetentionDays"], shown[b]["Available"]) == (False, 0, True)


# --- disks ---------------------------------------------------------------------------------------------------
def test_describe_disks_filters_and_pages(client, make_image):
    """DescribeDisks: 12 disks in registration order, 10 a page by default; DiskIds, DiskName, LockReason, Status,
    DiskType filter; MaxResults below 10 counts as 10 and above 500 as 500; token paging covers them all."""
    made = [client.add_disk(make_image(f"d{i}.raw", 4 * KiB, [(0, b"x")]), disk_name=f"name{i % 3}")["DiskId"]
            for i in range(12)]
    client.lock_disk(made[4])

    def disks(**params):
        out = client.call("DescribeDisks", dict(params, RegionId="local"))
        return [d["DiskId"] for d in out["Disks"]["Disk"]], out

    got, out = disks()
    assert got == made[:10] and (out["TotalCount"], out["PageSize"], out["NextToken"]) == (12, 10, "")
    assert disks(PageNumber=2)[0] == made[10:]
    assert disks(DiskIds=json.dumps([made[7], made[2]]))[0] == [made[2], made[7]]
    assert disks(DiskName="name1", PageSize=100)[0] == made[1::3]
    assert disks(LockReason="security")[0] == [made[4]] and disks(LockReason="security")[1]["TotalCount"] == 1
    assert disks(LockReason="financial")[0] == []
    assert disks(Status="Available", PageSize=100)[0] == made and disks(Status="In_use")[0] == []
    assert disks(DiskType="data", PageSize=100)[0] == made and disks(DiskType="system")[0] == []
    first, out = disks(MaxResults=3)
    assert len(first) == 10 and out["PageSize"] == 10 and out["NextToken"]
    rest, out = disks(MaxResults=900, NextToken=out["NextToken"])
    assert first + rest == made and out["NextToken"] == "" and out["PageSize"] == 500
    assert raised(client.call, "DescribeDisks", {"RegionId": "local", "Status": "Lost"}).code == "InvalidParameter"


def test_describe_disks_shows_the_cloud_fields(client, make_image):
    """Each disk shows the cloud's fields (Status Available, OperationLocks, Tags, ResourceGroupId, RegionId, ...)
    beside its local ones (Path, Type, Size, Format)."""
    client.add_disk(make_image("d.raw", 4 * KiB, [(0, b"x")]))
    [d] = client.call("DescribeDisks", {"RegionId": "local"})["Disks"]["Disk"]
    assert (d["Status"], d["RegionId"], d["ResourceGroupId"], d["Format"]) == ("Available", "local",
                                                                             client.repo.default_group, "raw")
    assert d["OperationLocks"] == {"OperationLock": []} and d["Tags"] == {"Tag": []} and d["Encrypted"] is False


# --- the indexes -----------------------------------------------------------------------------------------------
def index_state(client):
    with client.repo.catalog.read() as txn:
        return sorted(txn.index_items()), sorted(txn.index_count_items())


def test_indexes_follow_create_delete_and_repair(many, repo_path):
    """After deletes the indexes hold exactly what the remaining records make (verify finds no problem), and
    repair, which rebuilds the catalog from the store, rebuilds the same indexes."""
    client, made, _, _ = many
    for sid in made[::4]:
        client.delete_snapshot(sid)
    before = index_state(client)
    assert client.verify()["Problems"] == []
    assert call(client, PageSize=100)["TotalCount"] == 25 - len(made[::4])
    client.close()
    with Client(repo_path, maintenance=True) as m:
        m.repair()
    with Client(repo_path) as c:
        assert index_state(c) == before
        assert ids(call(c, PageSize=100)) == [s for s in made if s not in made[::4]]


def test_gc_removing_an_old_failed_record_drops_its_index_entries(client, disk):
    """A failed record is listed by Status=failed; gc past the grace period removes it, and with it its index
    entries: no list names it any more, and verify finds the indexes right."""
    path = client.describe_disks()["Disks"]["Disk"][0]["Path"]

    def change(done, total):
        with open(path, "r+b") as f:
            f.write(b"changed while read")

    with pytest.raises(errors.ImageChanged):
        client.create_snapshot(disk, snapshot_name="doomed", tags=[{"Key": "k", "Value": "v"}], progress=change)
    assert call(client, Status="failed")["TotalCount"] == 1 and call(client, SnapshotName="doomed")["TotalCount"] == 1
    client.gc(now=client.clock() + 8 * 86400)
    assert [call(client, **f)["TotalCount"] for f in ({}, {"Status": "failed"}, {"SnapshotName": "doomed"},
                                                       {"Tag.1.Key": "k"})] == [0, 0, 0, 0]
    entries, counts = index_state(client)
    assert [k for k, _ in entries + counts if k[:1] == catalogs.KIND_SNAPSHOT] == []
    assert client.verify()["Problems"] == []


def test_verify_reports_an_index_that_disagrees_with_the_records(client, disk):
    """An index entry removed behind the catalog's back is a verify Problem naming the indexes."""
    client.create_snapshot(disk, snapshot_name="named")
    with client.repo.catalog.write() as txn:
        key = next(k for k, _ in txn.index_items() if k[1:2] == catalogs.F_NAME)
        txn._delete(b"I" + key)
    problems = client.verify()["Problems"]
    assert [p["What"] for p in problems] == ["catalog indexes"]


def test_a_version_2_catalog_is_indexed_when_opened(client, disk, repo_path):
    """A catalog written before the indexes (version 2: no index entries) gets them when a writer opens it, and
    says version 3; the answers are the same as before."""
    sids = [client.create_snapshot(disk, snapshot_name=f"v{i}")["SnapshotId"] for i in range(3)]
    want = index_state(client)
    with client.repo.catalog.write() as txn:
        for table in ("index", "index_counts"):
            for key in [bytes(k) for k, _ in txn._scan(catalogs.TABLES[table])]:
                txn._delete(key)
        info = txn.meta_json(catalogs.META_CATALOG)
        txn.put_meta_json(catalogs.META_CATALOG, dict(info, Version=2))
    client.close()
    with Client(repo_path) as c:
        assert c.repo.catalog.indexed and index_state(c) == want
        assert ids(call(c, SnapshotName="v1")) == [sids[1]]
        with c.repo.catalog.read() as txn:
            assert txn.meta_json(catalogs.META_CATALOG)["Version"] == 3


def test_an_unindexed_catalog_is_answered_by_reading_every_record(client, disk, monkeypatch):
    """Where a version-2 catalog cannot be indexed (read-only media), the same filters and pages are served by
    reading every record."""
    sids = [client.create_snapshot(disk, snapshot_name=f"u{i % 2}")["SnapshotId"] for i in range(5)]
    monkeypatch.setattr(client.repo.catalog, "version", 2)
    assert not client.repo.catalog.indexed
    assert ids(call(client, SnapshotName="u1")) == sids[1::2]
    out = call(client, MaxResults=2)
    assert ids(out) == sids[:2] and ids(call(client, MaxResults=2, NextToken=out["NextToken"])) == sids[2:4]


def test_random_filters_and_pages_agree_with_reading_every_record(client, disk, make_image):
    """For random snapshots, filters and pages, the indexed answer equals the one made by reading every record
    and filtering them (the unindexed path), TotalCount included."""
    rnd = random.Random(7)
    other = client.add_disk(make_image("o.raw", 4 * KiB, [(0, b"o")]))["DiskId"]
    made = []
    for i in range(30):
        tags = [{"Key": k, "Value": rnd.choice("ab")} for k in rnd.sample(["x", "y", "z"], rnd.randint(0, 3))]
        made.append(client.create_snapshot(rnd.choice([disk, other]), snapshot_name=rnd.choice(["pp", "qq"]),
                                           tags=tags, category=rnd.choice([None, "Flash"]))["SnapshotId"])
    for sid in rnd.sample(made, 6):
        client.delete_snapshot(sid)
    for _ in range(60):
        params = {}
        if rnd.random() < 0.4:
            params["DiskId"] = rnd.choice([disk, other])
        if rnd.random() < 0.4:
            params["SnapshotName"] = rnd.choice(["pp", "qq", "rr"])
        if rnd.random() < 0.3:
            params["Category"] = rnd.choice(["Standard", "Flash"])
        if rnd.random() < 0.5:
            params["Tag.1.Key"] = rnd.choice(["x", "y", "z"])
            if rnd.random() < 0.5:
                params["Tag.1.Value"] = rnd.choice("ab")
        if rnd.random() < 0.2:
            params["SnapshotIds"] = json.dumps(rnd.sample(made, 8))
        paging = rnd.choice([{"PageNumber": rnd.randint(1, 4), "PageSize": rnd.randint(1, 9)},
                             {"MaxResults": rnd.randint(1, 9)}])
        indexed = call(client, **params, **paging)
        client.repo.catalog.version = 2
        try:
            scanned = call(client, **params, **paging)
        finally:
            client.repo.catalog.version = catalogs.CATALOG_VERSION
        assert (ids(indexed), indexed["TotalCount"]) == (ids(scanned), scanned["TotalCount"]), params


def test_leapfrog_intersection_matches_a_set_intersection():
    """describe.intersect (and its keys-only form, and count) over in-memory lists yields exactly the common
    entries, in order."""
    rnd = random.Random(3)
    for _ in range(200):
        lists = [sorted(rnd.sample(range(60), rnd.randint(0, 40))) for _ in range(rnd.randint(1, 4))]
        postings = [describe.ListPosting([(n.to_bytes(8, "big"), str(n)) for n in lst]) for lst in lists]
        want = sorted(set(lists[0]).intersection(*lists[1:]))
        assert [int(h[1]) for h in describe.intersect(postings)] == want
        assert [int.from_bytes(k, "big") for k in describe.intersect_keys(postings)] == want
        assert describe.count(postings) == len(want)
