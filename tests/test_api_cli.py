"""`blocksnap api ACTION --Param value ...`: the cloud API's own form on the command line (as the aliyun CLI takes
it), its JSON success and error output, exit codes and help."""
import json
import re

import pytest
from conftest import cli

from blocksnap import errors
from blocksnap.cloud import actions

KiB = 1 << 10
REQUEST_ID = re.compile(r"^[0-9A-F]{8}-[0-9A-F]{4}-4[0-9A-F]{3}-[89AB][0-9A-F]{3}-[0-9A-F]{12}$")


@pytest.fixture
def disk(client, make_image):
    img = make_image("disk.raw", 256 * KiB, [(0, b"boot" * 5000)])
    disk_id = client.add_disk(img)["DiskId"]
    client.close()  # the children open the repository themselves
    return disk_id


def api(repo_path, *words, **env):
    return cli("--repo", repo_path, "api", *words, **env)


def ok(proc):
    """The response JSON of a successful ``blocksnap api``: exit 0, JSON on stdout, nothing on stderr."""
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    out = json.loads(proc.stdout)
    assert REQUEST_ID.match(out["RequestId"])
    return out


def failed(proc, code, exit_code):
    """The error JSON of a failed ``blocksnap api``: exactly {Code, Message, HttpStatusCode, RequestId} on
    stderr, nothing on stdout, the error's exit code."""
    assert proc.returncode == exit_code, (proc.returncode, proc.stderr)
    assert proc.stdout == ""
    body = json.loads(proc.stderr)
    assert set(body) == {"Code", "Message", "HttpStatusCode", "RequestId"}
    assert body["Code"] == code and REQUEST_ID.match(body["RequestId"]) and body["Message"]
    return body


def test_create_snapshot_prints_the_response_json(repo_path, disk):
    """CreateSnapshot with flat --Tag.N.Key/--Tag.N.Value and --RetentionDays prints {SnapshotId, RequestId};
    DescribeSnapshots (its RegionId filled in with the repository's region) shows the fields."""
    out = ok(api(repo_path, "CreateSnapshot", "--DiskId", disk, "--SnapshotName", "nightly", "--RetentionDays", "7",
                 "--Tag.1.Key", "env", "--Tag.1.Value", "prod"))
    assert set(out) == {"SnapshotId", "RequestId"}
    listed = ok(api(repo_path, "DescribeSnapshots", "--SnapshotIds", json.dumps([out["SnapshotId"]])))
    [snap] = listed["Snapshots"]["Snapshot"]
    assert (snap["SnapshotName"], snap["RetentionDays"]) == ("nightly", 7)
    assert snap["Tags"] == {"Tag": [{"TagKey": "env", "TagValue": "prod"}]}


def test_name_equals_value_and_repo_inside_the_api_words(repo_path, disk):
    """--Name=VALUE gives a parameter as --Name VALUE does, and --repo may come after the action."""
    proc = cli("api", "CreateSnapshot", f"--DiskId={disk}", "--Description=two words", "--repo", repo_path)
    sid = ok(proc)["SnapshotId"]
    [snap] = ok(api(repo_path, "DescribeSnapshots", "--DiskId", disk))["Snapshots"]["Snapshot"]
    assert (snap["SnapshotId"], snap["Description"]) == (sid, "two words")


def test_the_human_command_and_the_api_form_make_the_same_snapshot(repo_path, disk):
    """`snapshot create --retention-days 7 --tag env=prod` and `api CreateSnapshot --RetentionDays 7 --Tag.1...`
    record the same fields: the human command maps onto the same action."""
    assert cli("--repo", repo_path, "snapshot", "create", disk, "--snapshot-name", "same", "--retention-days", "7",
               "--tag", "env=prod").returncode == 0
    ok(api(repo_path, "CreateSnapshot", "--DiskId", disk, "--SnapshotName", "same", "--RetentionDays", "7",
           "--Tag.1.Key", "env", "--Tag.1.Value", "prod"))
    a, b = ok(api(repo_path, "DescribeSnapshots"))["Snapshots"]["Snapshot"]
    fields = ("SnapshotName", "RetentionDays", "Tags", "Category", "Status", "SourceDiskId", "SourceDiskSize")
    assert [a[f] for f in fields] == [b[f] for f in fields]


def test_delete_describe_disks_and_regions(repo_path, disk):
    """DeleteSnapshot, DescribeDisks and DescribeRegions answer their response JSON."""
    sid = ok(api(repo_path, "CreateSnapshot", "--DiskId", disk))["SnapshotId"]
    ok(api(repo_path, "DeleteSnapshot", "--SnapshotId", sid))
    assert ok(api(repo_path, "DescribeSnapshots"))["TotalCount"] == 0
    assert [d["DiskId"] for d in ok(api(repo_path, "DescribeDisks"))["Disks"]["Disk"]] == [disk]
    regions = ok(api(repo_path, "DescribeRegions", BLOCKSNAP_REGION="lab-1"))["Regions"]["Region"]
    assert [r["RegionId"] for r in regions] == ["lab-1"]


@pytest.mark.parametrize("words,code,exit_code", [
    (["CreateSnapshot", "--DiskId", "d-" + "0" * 20], "InvalidDiskId.NotFound", errors.EXIT_NOT_FOUND),
    (["CreateSnapshot", "--DiskId", "DISK", "--SnapshotName", "1bad"], "InvalidSnapshotName.Malformed",
     errors.EXIT_INVALID),
    (["CreateSnapshot", "--DiskId", "DISK", "--RetentionDays", "week"], "InvalidRetentionDays.Malformed",
     errors.EXIT_INVALID),
    (["CreateSnapshot"], "MissingParameter", errors.EXIT_INVALID),
    (["CreateSnapshot", "--DiskId", "DISK", "--ResourceGroupId", "rg-1"], "InvalidResourceGroup.NotFound",
     errors.EXIT_NOT_FOUND),
    (["DescribeSnapshots", "--InstanceId", "i-1"], "InvalidParameter", errors.EXIT_INVALID),  # not built yet
    (["DescribeSnapshots", "--RegionId", "cn-hangzhou"], "InvalidRegionId.NotFound", errors.EXIT_NOT_FOUND),
    (["DeleteSnapshot", "--SnapshotId", "s-" + "0" * 20], "InvalidSnapshotId.NotFound", errors.EXIT_NOT_FOUND),
    (["DescribeSnapshot"], "InvalidAction.NotFound", errors.EXIT_NOT_FOUND),
    ([], "InvalidParameter", errors.EXIT_INVALID),
    (["DescribeDisks", "--verbose"], "InvalidParameter", errors.EXIT_INVALID),
    (["DescribeDisks", "--PageSize"], "InvalidParameter", errors.EXIT_INVALID),
    (["DescribeDisks", "--OwnerId", "1", "--OwnerId", "2"], "InvalidParameter", errors.EXIT_INVALID),
    (["DescribeDisks", "stray"], "InvalidParameter", errors.EXIT_INVALID),
    (["DescribeDisks", "--Colour", "red"], "InvalidParameter", errors.EXIT_INVALID),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_failure_prints_the_error_json_on_stderr(repo_path, disk, words, code, exit_code):
    """Each failure (an API error, a missing or unknown parameter, a bad command line) prints {Code, Message,
    HttpStatusCode, RequestId} on stderr with the error's HTTP status and exits with its exit code; nothing
    is created."""
    words = [disk if w == "DISK" else w for w in words]
    body = failed(api(repo_path, *words), code, exit_code)
    assert body["HttpStatusCode"] == next(c for c in errors.all_error_classes() if c.code == code).http_status
    assert ok(api(repo_path, "DescribeSnapshots"))["TotalCount"] == 0


def test_blocksnap_now_that_is_no_time_is_the_error_json(repo_path):
    """`blocksnap api` reads its clock from BLOCKSNAP_NOW: a value that is no time fails as InvalidParameter."""
    body = failed(api(repo_path, "DescribeRegions", BLOCKSNAP_NOW="soon"), "InvalidParameter", errors.EXIT_INVALID)
    assert "BLOCKSNAP_NOW" in body["Message"]


def test_a_repository_that_is_not_there_is_the_error_json(tmp_path):
    """`blocksnap api` on a path that holds no repository fails with Repository.NotFound as JSON (exit 6)."""
    failed(api(str(tmp_path / "nowhere"), "DescribeRegions"), "Repository.NotFound", errors.EXIT_REPOSITORY)


def test_api_help_lists_every_action():
    """`blocksnap api --help` prints every action of the table with its one-line help, exit 0."""
    proc = cli("api", "--help")
    assert proc.returncode == 0 and proc.stderr == ""
    for action in actions.ACTIONS.values():
        assert re.search(rf"^  {action.name} +{re.escape(action.help)}$", proc.stdout, re.MULTILINE), action.name


@pytest.mark.parametrize("name", sorted(actions.ACTIONS))
def test_action_help_lists_every_parameter(name):
    """`blocksnap api ACTION --help` lists each parameter with its type, `required` where it is, and the state
    of the ones not supported (not yet / no effect)."""
    proc = cli("api", name, "--help")
    assert proc.returncode == 0 and proc.stderr == ""
    for p in actions.ACTIONS[name].params:
        flag = f"--{p.name}.N" if p.type == actions.REPEAT_LIST else f"--{p.name}"
        [line] = [ln for ln in proc.stdout.splitlines() if ln.startswith(f"  {flag}")
                  and ln[2:].split()[0].rstrip(",") in (flag, f"{flag}.Key")]
        assert p.type in line and ("required" in line) == p.required
        assert (f"[{p.local}]" in line) == (p.local != actions.SUPPORTED)


def test_help_for_an_unknown_action_is_invalid_action():
    """`blocksnap api Nope --help` fails with InvalidAction.NotFound as JSON, not with empty help."""
    failed(cli("api", "Nope", "--help"), "InvalidAction.NotFound", errors.EXIT_NOT_FOUND)


def test_blocksnap_help_names_the_api_command():
    """`blocksnap --help` lists the api command."""
    proc = cli("--help")
    assert proc.returncode == 0 and re.search(r"^    api +the cloud API's own form", proc.stdout, re.MULTILINE)
