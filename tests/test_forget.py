"""blocksnap forget: keep policies as restic applies them, and deletions that never touch what is kept."""
import datetime
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocksnap import errors, retention

from conftest import MiB, run_cli

T0 = datetime.datetime(2026, 1, 1)


def _rec(i, t, disk="d-1", tags=(), status="accomplished"):
    return {"SnapshotId": f"s-{i:04d}", "SourceDiskId": disk, "Seq": i, "Status": status,
            "CreationTime": t.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "Tags": {"Tag": [{"TagKey": k, "TagValue": v} for k, v in tags]}}


def _reference(recs, policy, keep_tags):
    """The kept ids, computed another way: per rule, the buckets in the order of their newest snapshot, the
    first N of them, each bucket's newest snapshot."""
    keys = {"hourly": "%Y-%m-%d %H", "daily": "%Y-%m-%d", "monthly": "%Y-%m", "yearly": "%Y"}
    kept = set()
    for disk in {r["SourceDiskId"] for r in recs}:
        mine = sorted((r for r in recs if r["SourceDiskId"] == disk and r["Status"] == "accomplished"),
                      key=lambda r: (r["CreationTime"], r["Seq"]), reverse=True)
        kept |= {r["SnapshotId"] for r in mine[:policy.get("last", 0)]}
        for rule in retention.BUCKET_RULES:
            n = policy.get(rule, 0)
            seen = {}
            for r in mine:
                t = datetime.datetime.strptime(r["CreationTime"], "%Y-%m-%dT%H:%M:%SZ")
                b = "%d-W%02d" % t.isocalendar()[:2] if rule == "weekly" else t.strftime(keys[rule])
                seen.setdefault(b, r["SnapshotId"])
            kept |= set(list(seen.values())[:n])
        kept |= {r["SnapshotId"] for r in mine
                 if any(t["TagKey"] == k.partition("=")[0] and ("=" not in k or t["TagValue"] == k.partition("=")[2])
                        for t in r["Tags"]["Tag"] for k in keep_tags)}
    return kept


policies = st.fixed_dictionaries({rule: st.integers(0, 5) for rule in retention.RULES})


@settings(max_examples=300, deadline=None)
@given(hours=st.lists(st.integers(0, 24 * 800), min_size=0, max_size=40), disks=st.lists(st.sampled_from("ab"),
       min_size=40, max_size=40), statuses=st.lists(st.sampled_from(["accomplished"] * 4 + ["failed", "progressing"]),
       min_size=40, max_size=40), policy=policies, tagged=st.sets(st.integers(0, 39), max_size=5),
       keep_tag=st.sampled_from([[], ["env"], ["env=prod"], ["env=dev"]]))
def test_the_plan_keeps_exactly_what_the_rules_keep_and_removes_only_the_rest(hours, disks, statuses, policy, tagged,
                                                                              keep_tag):
    """Any snapshots and any policy: kept and removed split the accomplished snapshots, and the kept set is the
    one an independent reading of restic's rules gives; progressing and failed snapshots are in neither."""
    recs = [_rec(i, T0 + datetime.timedelta(hours=h), disk=f"d-{disks[i]}", status=statuses[i],
                 tags=[("env", "prod")] if i in tagged else []) for i, h in enumerate(hours)]
    if not any(policy.values()) and not keep_tag:
        with pytest.raises(errors.InvalidParameter):
            retention.plan(recs, policy, keep_tag)
        return
    keep, remove = retention.plan(recs, policy, keep_tag)
    kept = {r["SnapshotId"] for r, _ in keep}
    removed = {r["SnapshotId"] for r, _ in remove}
    accomplished = {r["SnapshotId"] for r in recs if r["Status"] == "accomplished"}
    assert kept | removed == accomplished and not kept & removed
    assert kept == _reference(recs, policy, keep_tag)
    assert all(reasons for _, reasons in keep)


def test_daily_keeps_the_newest_snapshot_of_each_of_the_newest_days_that_have_one():
    """Three snapshots on Jan 1, none on Jan 2, two on Jan 3: daily 2 keeps Jan 3's newest and Jan 1's newest."""
    times = [T0.replace(hour=h) for h in (1, 5, 9)] + [T0.replace(day=3, hour=h) for h in (2, 7)]
    recs = [_rec(i, t) for i, t in enumerate(times)]
    keep, remove = retention.plan(recs, {"daily": 2})
    assert [r["SnapshotId"] for r, _ in keep] == ["s-0004", "s-0002"]
    assert [reasons for _, reasons in keep] == [["daily"], ["daily"]]
    assert len(remove) == 3


@pytest.mark.parametrize("policy", [{}, {"last": -1}, {"daily": True}, {"daily": 1.5}, {"fortnightly": 1}])
def test_a_policy_that_keeps_nothing_or_is_malformed_is_refused(policy):
    """No rule (it would remove everything), a negative, boolean or fractional count, an unknown rule."""
    with pytest.raises(errors.InvalidParameter):
        retention.plan([_rec(0, T0)], policy)


def _snapshots(client, path, n, tags_of=lambda i: None):
    disk = client.add_disk(path)["DiskId"]
    sids = []
    for i in range(n):
        with open(path, "r+b") as f:
            f.seek(i * 65536)
            f.write(os.urandom(65536))
        sids.append(client.create_snapshot(disk, tags=tags_of(i))["SnapshotId"])
    return disk, sids


def test_forget_removes_what_the_policy_does_not_keep_and_the_rest_restores_exactly(client, make_image, tmp_path):
    """Five snapshots, keep-last 2 plus a tag: a dry run removes nothing; the real run removes the other two, the
    kept ones restore byte for byte as they were, and verify is clean."""
    img = make_image("f.raw", 2 * MiB, [(0, os.urandom(MiB))])
    images = []

    def tags_of(i):
        return [{"Key": "keep", "Value": "yes"}] if i == 0 else None

    disk = client.add_disk(img)["DiskId"]
    sids = []
    for i in range(5):
        with open(img, "r+b") as f:
            f.seek(i * 65536)
            f.write(os.urandom(65536))
        with open(img, "rb") as f:
            images.append(f.read())
        sids.append(client.create_snapshot(disk, tags=tags_of(i))["SnapshotId"])
    dry = client.forget(disk_id=disk, keep_last=2, keep_tags=["keep=yes"], dry_run=True)
    assert dry["Removed"] == 0 and {r["SnapshotId"] for r in dry["Remove"]} == {sids[1], sids[2]}
    assert len(client.describe_snapshots(disk_id=disk)["Snapshots"]["Snapshot"]) == 5
    out = client.forget(disk_id=disk, keep_last=2, keep_tags=["keep=yes"])
    assert out["Removed"] == 2
    left = {s["SnapshotId"] for s in client.describe_snapshots(disk_id=disk)["Snapshots"]["Snapshot"]}
    assert left == {sids[0], sids[3], sids[4]}
    for i in (0, 3, 4):
        dst = tmp_path / f"r{i}.raw"
        client.restore(sids[i], str(dst))
        assert dst.read_bytes() == images[i]
    assert client.verify()["Ok"]
    assert client.forget(disk_id=disk, keep_last=2, keep_tags=["keep=yes"])["Removed"] == 0  # nothing more


def test_forget_on_the_command_line_refuses_a_policy_that_keeps_nothing(repo_path, make_image):
    """`blocksnap forget` without a --keep-* option is InvalidParameter (exit 2), one line, and removes nothing;
    --dry-run lists what it would remove."""
    from blocksnap.api import Client

    img = make_image("c.raw", MiB, [(0, os.urandom(65536))])
    with Client(repo_path) as c:
        _snapshots(c, img, 3)
    p = run_cli("--repo", repo_path, "forget")
    assert p.returncode == 2 and "error: InvalidParameter:" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = run_cli("--repo", repo_path, "forget", "--keep-last", "1", "--dry-run")
    assert p.returncode == 0 and p.stdout.count("would remove") == 2, p.stdout
    with Client(repo_path) as c:
        assert len(c.describe_snapshots()["Snapshots"]["Snapshot"]) == 3
