"""The API's own form in Python: Client.call(action, params) and Client.<Action>(**params), driven by the action
table (blocksnap/cloud/actions.py); the injectable clock (Client(clock=...), BLOCKSNAP_NOW); the region."""
import re

import pytest
from conftest import cli

from blocksnap import clock as clocks
from blocksnap import errors
from blocksnap.api import Client
from blocksnap.cloud import actions

KiB = 1 << 10
REQUEST_ID = re.compile(r"^[0-9A-F]{8}-[0-9A-F]{4}-4[0-9A-F]{3}-[89AB][0-9A-F]{3}-[0-9A-F]{12}$")


@pytest.fixture
def disk(client, make_image):
    img = make_image("disk.raw", 256 * KiB, [(0, b"boot" * 5000), (200 * KiB, b"data" * 1000)])
    return client.add_disk(img)["DiskId"]


def snapshots(client):
    return client.describe_snapshots(sizes=False)["Snapshots"]["Snapshot"]


def raised(fn, *args, **kwargs):
    with pytest.raises(errors.BlocksnapError) as info:
        fn(*args, **kwargs)
    return info.value


# --- success ----------------------------------------------------------------------------------------------
def test_call_create_snapshot_takes_flat_tags_and_text_values(client, disk):
    """call("CreateSnapshot") with the wire's flat Tag.N.Key/Value and RetentionDays as text creates the snapshot
    with those fields and answers {SnapshotId, RequestId}."""
    out = client.call("CreateSnapshot", {"DiskId": disk, "SnapshotName": "nightly", "RetentionDays": "7",
                                         "Tag.2.Key": "tier", "Tag.2.Value": "gold", "Tag.1.Key": "env",
                                         "Tag.1.Value": "prod"})
    assert set(out) == {"SnapshotId", "RequestId"} and REQUEST_ID.match(out["RequestId"])
    [snap] = snapshots(client)
    assert (snap["SnapshotId"], snap["SnapshotName"], snap["RetentionDays"]) == (out["SnapshotId"], "nightly", 7)
    assert snap["Tags"] == {"Tag": [{"TagKey": "env", "TagValue": "prod"}, {"TagKey": "tier", "TagValue": "gold"}]}


def test_action_methods_take_the_api_names_as_keywords(client, disk):
    """Client.CreateSnapshot(DiskId=..., Tag=[...]) is call("CreateSnapshot", ...) under the action's name, and
    every action of the table has its method."""
    out = client.CreateSnapshot(DiskId=disk, Description="before upgrade", Tag=[{"Key": "k", "Value": "v"}])
    [snap] = snapshots(client)
    assert snap["SnapshotId"] == out["SnapshotId"] and snap["Description"] == "before upgrade"
    assert snap["Tags"]["Tag"] == [{"TagKey": "k", "TagValue": "v"}]
    for name in actions.ACTIONS:
        assert getattr(Client, name).__name__ == name and "Keyword arguments" in getattr(Client, name).__doc__


def test_lower_case_tag_fields_are_taken_as_the_reference_lists_them(client, disk):
    """Tag.N.key and Tag.N.value (the reference lists them beside Tag.N.Key) name the same tag fields."""
    client.call("CreateSnapshot", {"DiskId": disk, "Tag.1.key": "a", "Tag.1.value": "b"})
    assert snapshots(client)[0]["Tags"]["Tag"] == [{"TagKey": "a", "TagValue": "b"}]


def test_describe_snapshots_filters_by_json_text_ids_disk_and_status(client, disk):
    """DescribeSnapshots takes SnapshotIds as JSON text, DiskId and Status, and needs the repository's RegionId."""
    a = client.CreateSnapshot(DiskId=disk)["SnapshotId"]
    b = client.CreateSnapshot(DiskId=disk)["SnapshotId"]
    out = client.call("DescribeSnapshots", {"RegionId": "local", "SnapshotIds": f'["{b}"]'})
    assert [s["SnapshotId"] for s in out["Snapshots"]["Snapshot"]] == [b] and out["TotalCount"] == 1
    out = client.DescribeSnapshots(RegionId="local", DiskId=disk, Status="accomplished")
    assert [s["SnapshotId"] for s in out["Snapshots"]["Snapshot"]] == [a, b]
    assert client.DescribeSnapshots(RegionId="local", Status="failed")["TotalCount"] == 0


def test_delete_snapshot_removes_it_and_answers_a_request_id(client, disk):
    """DeleteSnapshot by SnapshotId removes the snapshot and answers its RequestId; Force is accepted."""
    sid = client.CreateSnapshot(DiskId=disk)["SnapshotId"]
    out = client.call("DeleteSnapshot", {"SnapshotId": sid, "Force": "true"})
    assert REQUEST_ID.match(out["RequestId"]) and snapshots(client) == []


def test_describe_disks_and_regions(client, disk):
    """DescribeDisks lists the registered disk in the repository's region; DescribeRegions lists that region."""
    out = client.call("DescribeDisks", {"RegionId": "local"})
    assert [d["DiskId"] for d in out["Disks"]["Disk"]] == [disk] and out["TotalCount"] == 1
    assert out["PageNumber"] == 1 and REQUEST_ID.match(out["RequestId"])
    regions = client.call("DescribeRegions")["Regions"]["Region"]
    assert regions == [{"RegionId": "local", "LocalName": "local", "RegionEndpoint": "", "Status": "available"}]


def test_the_region_is_configurable(repo_path, monkeypatch):
    """Client(region=...) and else $BLOCKSNAP_REGION name the one region; the old name is then not found."""
    with Client(repo_path, region="lab-1") as c:
        assert c.DescribeRegions()["Regions"]["Region"][0]["RegionId"] == "lab-1"
        assert raised(c.DescribeDisks, RegionId="local").code == "InvalidRegionId.NotFound"
    monkeypatch.setenv("BLOCKSNAP_REGION", "env-2")
    with Client(repo_path) as c:
        assert c.DescribeDisks(RegionId="env-2")["TotalCount"] == 0
    assert raised(Client, repo_path, region="Not A Region").code == "InvalidParameter"


# --- errors -----------------------------------------------------------------------------------------------
def test_errors_carry_code_status_message_and_request_id(client):
    """A failed call raises the errors.py class with .code, .http_status, .message (its whole text) and the
    failed request's .request_id, which to_dict() also carries."""
    exc = raised(client.call, "CreateSnapshot", {"DiskId": "d-" + "x" * 20})
    assert isinstance(exc, errors.InvalidDiskIdNotFound)
    assert (exc.code, exc.http_status) == ("InvalidDiskId.NotFound", 404)
    assert exc.message == str(exc) and exc.message.startswith("The specified DiskId does not exist.")
    assert REQUEST_ID.match(exc.request_id) and exc.to_dict()["RequestId"] == exc.request_id


def test_a_missing_required_parameter_is_missing_parameter(client):
    """A request without a required parameter fails with MissingParameter naming it (HTTP 400)."""
    exc = raised(client.call, "DeleteSnapshot", {})
    assert (exc.code, exc.http_status) == ("MissingParameter", 400) and '"SnapshotId"' in exc.message
    assert raised(client.DescribeSnapshots).code == "MissingParameter"


def test_an_unknown_action_is_invalid_action_not_found(client):
    """An action the table does not have is InvalidAction.NotFound (HTTP 404), with a RequestId."""
    exc = raised(client.call, "CreateSnapshots", {})
    assert (exc.code, exc.http_status) == ("InvalidAction.NotFound", 404) and exc.request_id


@pytest.mark.parametrize("params", [{"DiskID": "d-1"}, {"Tag.1.Colour": "red"}, {"Tag.x.Key": "k"},
                                    {"Tag.1": "k"}, {"Tag.0.Key": "k"}, {3: "x"}])
def test_a_parameter_the_action_does_not_have_is_refused(client, disk, params):
    """A misspelt name, a field a tag does not have, a malformed Tag.N or a non-string name is InvalidParameter,
    and nothing is created."""
    exc = raised(client.call, "CreateSnapshot", dict(params, DiskId=disk))
    assert exc.code == "InvalidParameter" and snapshots(client) == []


def test_tags_given_both_as_a_list_and_flat_are_refused(client, disk):
    """Tag as a list and Tag.N.Key in one request is InvalidParameter: which one counts would be a guess."""
    exc = raised(client.call, "CreateSnapshot", {"DiskId": disk, "Tag": [{"Key": "a"}], "Tag.1.Key": "b"})
    assert exc.code == "InvalidParameter" and snapshots(client) == []


@pytest.mark.parametrize("name,value,code", [
    ("RetentionDays", "7x", "InvalidRetentionDays.Malformed"),
    ("RetentionDays", True, "InvalidRetentionDays.Malformed"),
    ("RetentionDays", "0", "InvalidRetentionDays.Malformed"),
    ("SnapshotName", "1bad", "InvalidSnapshotName.Malformed"),
    ("Tag", "env=prod", "InvalidParameter"),
])
def test_a_value_of_the_wrong_type_is_the_parameters_error(client, disk, name, value, code):
    """A value that is not of its parameter's type (or breaks its rule) fails with that parameter's code."""
    assert raised(client.call, "CreateSnapshot", {"DiskId": disk, name: value}).code == code
    assert snapshots(client) == []


@pytest.mark.parametrize("value,ok", [("true", True), ("True", True), ("FALSE", True), (False, True),
                                      ("yes", False), ("1", False), (1, False)])
def test_booleans_are_true_or_false_in_any_case(client, disk, value, ok):
    """A Boolean is true/false in any case (the SDK sends Python's True) or a bool; anything else is refused."""
    sid = client.CreateSnapshot(DiskId=disk)["SnapshotId"]
    if ok:
        client.DeleteSnapshot(SnapshotId=sid, Force=value)
        assert snapshots(client) == []
    else:
        assert raised(client.DeleteSnapshot, SnapshotId=sid, Force=value).code == "InvalidParameter"
        assert len(snapshots(client)) == 1


def _sample(param):
    """A value of ``param``'s type, as the wire sends it: {name: value} (repeat lists flat)."""
    if param.type == actions.REPEAT_LIST:
        key = f"{param.name}.1.{param.fields[0]}" if param.fields else f"{param.name}.1"
        return {key: "x"}
    text = {actions.INTEGER: "1", actions.LONG: "1", actions.BOOLEAN: "true", actions.JSON_ARRAY: '["x"]'}
    return {param.name: text.get(param.type, "x")}


def _required(client, action, disk):
    values = {"DiskId": disk, "RegionId": "local"}
    if action.name == "DeleteSnapshot":
        values["SnapshotId"] = client.create_snapshot(disk)["SnapshotId"]
    return {p.name: values[p.name] for p in action.params if p.required}


LATER = [(a, p) for a in actions.ACTIONS.values() for p in a.params if p.local == actions.LATER]
NO_EFFECT = [(a, p) for a in actions.ACTIONS.values() for p in a.params if p.local == actions.NO_EFFECT]


@pytest.mark.parametrize("action,param", LATER, ids=[f"{a.name}.{p.name}" for a, p in LATER])
def test_a_parameter_not_built_yet_is_refused_not_ignored(client, disk, action, param):
    """Every parameter the table marks 'not yet' fails the request with InvalidParameter saying so, instead of
    being answered as if it had not been given."""
    before = len(snapshots(client))
    params = dict(_required(client, action, disk), **_sample(param))
    exc = raised(client.call, action.name, params)
    assert exc.code == "InvalidParameter" and "not supported by this blocksnap yet" in exc.message
    assert len(snapshots(client)) == before + (action.name == "DeleteSnapshot")


@pytest.mark.parametrize("action,param", NO_EFFECT, ids=[f"{a.name}.{p.name}" for a, p in NO_EFFECT])
def test_a_parameter_with_no_local_effect_is_accepted(client, disk, action, param):
    """Every parameter the table marks 'no effect' (OwnerId, AcceptLanguage, ...) is accepted with a value of
    its type, and the action does its work."""
    params = dict(_required(client, action, disk), **_sample(param))
    assert REQUEST_ID.match(client.call(action.name, params)["RequestId"])


def test_the_table_is_consistent():
    """Each action's parameter names are unique, their types and local states are known ones, and each
    repeat list of objects names its fields."""
    types = {actions.STRING, actions.INTEGER, actions.LONG, actions.BOOLEAN, actions.JSON_ARRAY,
             actions.REPEAT_LIST}
    for action in actions.ACTIONS.values():
        names = [p.name for p in action.params]
        assert len(names) == len(set(names)), action.name
        for p in action.params:
            assert p.type in types and p.local in (actions.SUPPORTED, actions.NO_EFFECT, actions.LATER), p.name
            assert p.help and (p.fields is None or p.type == actions.REPEAT_LIST)


# --- the clock --------------------------------------------------------------------------------------------
def test_the_clients_clock_drives_retention(client, disk, repo_path):
    """gc takes the Client's clock as now: a RetentionDays=1 snapshot stays under today's clock and is expired
    by a Client whose clock is two days ahead."""
    client.CreateSnapshot(DiskId=disk, RetentionDays=1)
    assert client.gc()["ExpiredSnapshots"] == [] and len(snapshots(client)) == 1
    client.clock = lambda: clocks.system() + 2 * 86400
    assert len(client.gc()["ExpiredSnapshots"]) == 1 and snapshots(client) == []


@pytest.mark.parametrize("text,expected", [
    ("2026-01-02T03:04:05Z", 1767323045.0), ("2026-01-02T03:04:05.5Z", 1767323045.5),
    ("1767323045", 1767323045.0), ("  12.25 ", 12.25)])
def test_blocksnap_now_fixed_instants(text, expected):
    """BLOCKSNAP_NOW as ISO 8601 UTC or as seconds since the epoch is a clock frozen at that instant."""
    assert clocks.parse(text)() == expected


def test_blocksnap_now_offsets_move_the_system_clock():
    """BLOCKSNAP_NOW=+N / -N is the system clock moved by N seconds."""
    now = clocks.system()
    assert abs(clocks.parse("+3600")() - (now + 3600)) < 5 and abs(clocks.parse("-60.5")() - (now - 60.5)) < 5
    assert clocks.from_env({}) is clocks.system and clocks.from_env({"BLOCKSNAP_NOW": ""}) is clocks.system


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01T00:00:00Z", "2026-01-02 03:04:05", "+1h", "0x10"])
def test_blocksnap_now_that_is_no_time_is_invalid_parameter(text):
    """A BLOCKSNAP_NOW that is none of the forms is InvalidParameter naming the variable."""
    exc = raised(clocks.parse, text)
    assert exc.code == "InvalidParameter" and "BLOCKSNAP_NOW" in exc.message


def test_the_cli_takes_its_clock_from_blocksnap_now(client, disk, repo_path):
    """`blocksnap gc` with BLOCKSNAP_NOW two days ahead expires a RetentionDays=1 snapshot; without it, not;
    a BLOCKSNAP_NOW that is no time fails the command with InvalidParameter."""
    client.CreateSnapshot(DiskId=disk, RetentionDays=1)
    client.close()
    assert cli("--repo", repo_path, "gc").returncode == 0
    with Client(repo_path) as c:
        assert len(snapshots(c)) == 1
    bad = cli("--repo", repo_path, "gc", BLOCKSNAP_NOW="soon")
    assert bad.returncode == errors.EXIT_INVALID and "InvalidParameter" in bad.stderr
    assert cli("--repo", repo_path, "gc", BLOCKSNAP_NOW="+172800").returncode == 0
    with Client(repo_path) as c:
        assert snapshots(c) == []
