"""The api-server (blocksnap/cloud/server.py) driven as the cloud is driven: by the official SDK
(alibabacloud-ecs20140526, pointed at the local endpoint with protocol="http"), and by hand-built requests
signed with the SDK's own signing code (alibabacloud_tea_openapi.utils.Utils), never with blocksnap's; raw
sockets for what no client should send. The keys file (blocksnap api-key create) and the api-server command.
"""
import hashlib
import inspect
import json
import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request

import pytest

# The official SDK (pip install alibabacloud-ecs20140526; .ci/setup installs it): the client no one here wrote.
from alibabacloud_ecs20140526 import client as ecs_client
from alibabacloud_ecs20140526 import models as ecs
from alibabacloud_tea_openapi.models import Config
from alibabacloud_tea_openapi.utils import Utils as SdkUtils
from conftest import child_env, cli
from Tea.exceptions import TeaException

from blocksnap import clock as clocks
from blocksnap import errors
from blocksnap.api import Client
from blocksnap.cloud import actions
from blocksnap.cloud import keys as keyfile
from blocksnap.cloud.server import ApiServer, Nonces, parse_bind

KiB = 1 << 10
REQUEST_ID = re.compile(r"^[0-9A-F]{8}-[0-9A-F]{4}-4[0-9A-F]{3}-[89AB][0-9A-F]{3}-[0-9A-F]{12}$")
PROXY_VARS = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch):
    """Requests go straight to the loopback server, whatever proxy the environment names."""
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost,::1")


@pytest.fixture
def keys_path(tmp_path):
    return str(tmp_path / "home" / "config" / "blocksnap" / "api-keys.json")


@pytest.fixture
def pair(keys_path):
    return keyfile.create(keys_path)


class Served:
    """A running ApiServer on 127.0.0.1 and what tests need of it."""

    def __init__(self, client, pair):
        self.client, self.pair = client, pair
        self.server = self.endpoint = self.host = self.port = self.thread = None
        self.offset = 0.0  # seconds the server's clock is ahead of the system clock

    def sdk(self, secret=None, key_id=None, **config):
        """An official SDK client for this server (ACS3-HMAC-SHA256 unless signature_algorithm="v2")."""
        return ecs_client.Client(Config(access_key_id=key_id or self.pair["AccessKeyId"],
                                        access_key_secret=secret or self.pair["AccessKeySecret"],
                                        endpoint=self.endpoint, protocol="http", region_id="local",
                                        read_timeout=60000, connect_timeout=5000, **config))


def serve(repo_path, keys_path, pair, **options):
    client = Client(repo_path)
    served = Served(client, pair)
    client.clock = lambda: clocks.system() + served.offset
    served.server = ApiServer(client, keyfile.KeyStore(keys_path), ("127.0.0.1", 0), **options)
    served.endpoint = served.server.endpoint
    served.host, served.port = served.server.server_address[:2]
    served.thread = served.server.serve_in_thread()
    return served


def stop(served):
    served.server.shutdown()
    served.server.server_close()
    served.thread.join(10)
    served.client.close()


@pytest.fixture
def srv(repo_path, keys_path, pair):
    served = serve(repo_path, keys_path, pair)
    yield served
    stop(served)


@pytest.fixture
def disk(repo_path, make_image):
    img = make_image("disk.raw", 256 * KiB, [(0, b"boot" * 5000), (200 * KiB, b"data" * 1000)])
    with Client(repo_path) as c:
        return c.add_disk(img)["DiskId"]


def count_snapshots(srv):
    return srv.client.describe_snapshots(sizes=False)["TotalCount"]


def sdk_error(fn, *args):
    """The TeaException the SDK raises for a call; asserts it carries the cloud's error shape."""
    with pytest.raises(TeaException) as info:
        fn(*args)
    exc = info.value
    assert REQUEST_ID.match(exc.data["RequestId"]) and exc.data["HostId"]
    assert exc.data["Code"] == exc.code and exc.data["Message"]
    return exc


# --- the official SDK: round trips ---------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(actions.ACTIONS))
def test_the_table_has_every_parameter_the_sdk_sends(name):
    """Each action of the table has exactly the parameters the official SDK's <action>_with_options can put in a
    request (read from the SDK's source), so no SDK request is refused for a name the table lacks."""
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
    source = inspect.getsource(getattr(ecs_client.Client, f"{snake}_with_options"))
    sent = set(re.findall(r"query\['(\w+)'\]", source))
    assert sent and sent == set(actions.ACTIONS[name].by_name)



def test_sdk_create_describe_delete_round_trip(srv, disk):
    """CreateSnapshot (name, description, tags, retention), DescribeSnapshots by SnapshotIds and DeleteSnapshot
    through the official SDK: the SDK's response models carry the local snapshot's cloud fields."""
    sdk = srv.sdk()
    created = sdk.create_snapshot(ecs.CreateSnapshotRequest(
        disk_id=disk, snapshot_name="sdk-made", description="through the SDK", retention_days=5,
        tag=[ecs.CreateSnapshotRequestTag(key="env", value="prod"), ecs.CreateSnapshotRequestTag(key="t", value="")]))
    sid = created.body.snapshot_id
    assert created.status_code == 200 and REQUEST_ID.match(created.body.request_id) and sid.startswith("s-")
    listed = sdk.describe_snapshots(ecs.DescribeSnapshotsRequest(region_id="local", snapshot_ids=json.dumps([sid])))
    [snap] = listed.body.snapshots.snapshot
    assert (snap.snapshot_id, snap.snapshot_name, snap.description, snap.status, snap.retention_days,
            snap.source_disk_id, snap.available) == (sid, "sdk-made", "through the SDK", "accomplished", 5, disk, True)
    assert [(t.tag_key, t.tag_value) for t in snap.tags.tag] == [("env", "prod"), ("t", "")]
    assert listed.body.total_count == 1
    deleted = sdk.delete_snapshot(ecs.DeleteSnapshotRequest(snapshot_id=sid))
    assert REQUEST_ID.match(deleted.body.request_id) and count_snapshots(srv) == 0


def test_sdk_twelve_tags_are_signed_in_the_order_of_their_names(srv, disk):
    """With Tag.1 ... Tag.12 the canonical query orders the names as given (Tag.1.Key before Tag.10.Key), as the
    SDK signs them: the request is taken and all twelve tags are kept in order."""
    tags = [ecs.CreateSnapshotRequestTag(key=f"k{i}", value=f"v {i}") for i in range(1, 13)]
    srv.sdk().create_snapshot(ecs.CreateSnapshotRequest(disk_id=disk, tag=tags))
    [snap] = srv.client.describe_snapshots(sizes=False)["Snapshots"]["Snapshot"]
    assert [t["TagKey"] for t in snap["Tags"]["Tag"]] == [f"k{i}" for i in range(1, 13)]


@pytest.mark.parametrize("algorithm", [None, "v2"])
def test_sdk_list_names_past_nine_are_signed_in_name_order(srv, algorithm):
    """AdditionalAttributes.1 ... .11 (a list whose names are prefixes of each other) pass the signature check in
    both signature versions, as the SDK orders them; the request then fails on the parameter not being built
    yet, not on its signature."""
    request = ecs.DescribeDisksRequest(region_id="local", additional_attributes=[f"a{i}" for i in range(11)])
    exc = sdk_error(srv.sdk(signature_algorithm=algorithm).describe_disks, request)
    assert exc.code == "InvalidParameter" and "not supported by this blocksnap yet" in exc.data["Message"]


def test_sdk_describe_disks_and_regions(srv, disk):
    """DescribeDisks lists the registered disk; DescribeRegions lists the one region with the server's address."""
    sdk = srv.sdk()
    disks = sdk.describe_disks(ecs.DescribeDisksRequest(region_id="local")).body
    assert [d.disk_id for d in disks.disks.disk] == [disk] and disks.total_count == 1
    [region] = sdk.describe_regions(ecs.DescribeRegionsRequest()).body.regions.region
    assert (region.region_id, region.region_endpoint, region.status) == ("local", srv.endpoint, "available")


def test_sdk_client_token_returns_the_first_snapshot(srv, disk):
    """The same ClientToken and parameters return the first SnapshotId with a new RequestId; nothing new is
    made."""
    sdk = srv.sdk()
    req = ecs.CreateSnapshotRequest(disk_id=disk, client_token="tok-1", snapshot_name="once")
    a, b = sdk.create_snapshot(req).body, sdk.create_snapshot(req).body
    assert a.snapshot_id == b.snapshot_id and a.request_id != b.request_id and count_snapshots(srv) == 1


def test_sdk_signature_v1_mode_is_answered(srv, disk):
    """The SDK's HMAC-SHA1 signature v1 mode (signature_algorithm="v2": Signature, SignatureNonce, Timestamp
    in the query) creates and lists snapshots as ACS3 does."""
    sdk = srv.sdk(signature_algorithm="v2")
    sid = sdk.create_snapshot(ecs.CreateSnapshotRequest(disk_id=disk, description="v1 a+b c*")).body.snapshot_id
    [snap] = sdk.describe_snapshots(ecs.DescribeSnapshotsRequest(region_id="local")).body.snapshots.snapshot
    assert (snap.snapshot_id, snap.description) == (sid, "v1 a+b c*")


# --- the official SDK: errors ----------------------------------------------------------------------------
ERRORS = [
    ("create_snapshot", {"disk_id": "d-" + "0" * 20}, "InvalidDiskId.NotFound", 404),
    ("create_snapshot", {"disk_id": "DISK", "snapshot_name": "1bad"}, "InvalidSnapshotName.Malformed", 400),
    ("create_snapshot", {"disk_id": "DISK", "description": "x"}, "InvalidDescription.Malformed", 404),
    ("create_snapshot", {"disk_id": "DISK", "category": "Premium"}, "InvalidSnapshotCategory.Malformed", 403),
    ("create_snapshot", {"disk_id": "DISK", "client_token": "é"}, "InvalidClientToken.Malformed", 403),
    ("create_snapshot", {"disk_id": "DISK", "resource_group_id": "rg-1"}, "InvalidResourceGroup.NotFound", 404),
    ("describe_snapshots", {"region_id": "local", "instance_id": "i-1"}, "InvalidParameter", 400),  # not yet
    ("create_snapshot", {}, "MissingParameter", 400),
    ("describe_snapshots", {}, "MissingParameter", 400),
    ("describe_snapshots", {"region_id": "cn-hangzhou"}, "InvalidRegionId.NotFound", 404),
    ("describe_snapshots", {"region_id": "local", "status": "done"}, "InvalidParameter", 400),
    ("delete_snapshot", {"snapshot_id": "s-" + "0" * 20}, "InvalidSnapshotId.NotFound", 404),
    ("describe_disks", {"region_id": "local", "zone_id": "z-1"}, "InvalidParameter", 400),  # not yet
    ("describe_disks", {"region_id": "local", "page_size": 101}, "InvalidParameter", 400),
]


@pytest.mark.parametrize("method,fields,code,status", ERRORS, ids=[f"{m}-{c}" for m, _, c, _ in ERRORS])
def test_sdk_raises_the_clouds_error_code(srv, disk, method, fields, code, status):
    """Each failure reaches the SDK as a TeaException whose .code is the cloud's code, with its HTTP status and
    the error body's RequestId and HostId; nothing is created."""
    fields = {k: disk if v == "DISK" else v for k, v in fields.items()}
    request = getattr(ecs, "".join(w.title() for w in method.split("_")) + "Request")(**fields)
    exc = sdk_error(getattr(srv.sdk(), method), request)
    assert (exc.code, exc.statusCode) == (code, status)
    assert count_snapshots(srv) == 0


def test_sdk_wrong_secret_is_signature_does_not_match_and_does_nothing(srv, disk):
    """A request signed with a wrong secret is SignatureDoesNotMatch (400) and creates nothing."""
    exc = sdk_error(srv.sdk(secret="not-the-secret").create_snapshot, ecs.CreateSnapshotRequest(disk_id=disk))
    assert (exc.code, exc.statusCode) == ("SignatureDoesNotMatch", 400) and count_snapshots(srv) == 0


def test_sdk_unknown_access_key_is_not_found(srv, disk):
    """A request signed with an AccessKeyId the keys file does not hold is InvalidAccessKeyId.NotFound (404)."""
    exc = sdk_error(srv.sdk(key_id="BSAKnobodyhasthiskey0000").create_snapshot, ecs.CreateSnapshotRequest(disk_id=disk))
    assert (exc.code, exc.statusCode) == ("InvalidAccessKeyId.NotFound", 404) and count_snapshots(srv) == 0


@pytest.mark.parametrize("offset", [16 * 60, -16 * 60])
def test_sdk_request_outside_15_minutes_is_expired(srv, disk, offset):
    """A server clock 16 minutes ahead of or behind the SDK's makes its request InvalidTimeStamp.Expired; nothing
    is created."""
    srv.offset = offset
    exc = sdk_error(srv.sdk().create_snapshot, ecs.CreateSnapshotRequest(disk_id=disk))
    assert (exc.code, exc.statusCode) == ("InvalidTimeStamp.Expired", 400) and count_snapshots(srv) == 0


def test_sdk_request_within_15_minutes_is_answered(srv, disk):
    """A server clock 14 minutes ahead still takes the SDK's request."""
    srv.offset = 14 * 60
    srv.sdk().create_snapshot(ecs.CreateSnapshotRequest(disk_id=disk))
    assert count_snapshots(srv) == 1


def test_a_key_made_while_the_server_runs_works_at_once(srv, keys_path):
    """A key added to the keys file by `api-key create` while the server runs is taken by the next request."""
    assert srv.sdk().describe_regions(ecs.DescribeRegionsRequest()).body.regions.region  # the file is read
    pair = keyfile.create(keys_path)
    out = srv.sdk(key_id=pair["AccessKeyId"], secret=pair["AccessKeySecret"]).describe_regions(
        ecs.DescribeRegionsRequest())
    assert out.body.regions.region[0].region_id == "local"


def test_a_keys_file_others_can_read_is_refused(srv, keys_path):
    """Once the keys file is readable by others, requests fail with ApiKeys.Unusable (500) instead of being
    checked against it; chmod 600 makes it work again."""
    assert srv.sdk().describe_regions(ecs.DescribeRegionsRequest()).body.regions.region  # the file is read
    os.chmod(keys_path, 0o644)
    exc = sdk_error(srv.sdk().describe_regions, ecs.DescribeRegionsRequest())
    assert (exc.code, exc.statusCode) == ("ApiKeys.Unusable", 500)
    os.chmod(keys_path, 0o600)
    assert srv.sdk().describe_regions(ecs.DescribeRegionsRequest()).body.regions.region


# --- hand-built requests, signed by the SDK's own code ---------------------------------------------------
def now_iso(offset=0):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + offset))


def send(srv, method, query="", body=None, headers=None):
    """(status, JSON body) of one HTTP request through urllib (no proxy)."""
    url = f"http://{srv.endpoint}/" + (f"?{query}" if query else "")
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def v1_params(srv, params, timestamp=None, nonce=None, key_id=None):
    out = {"Format": "JSON", "Version": "2014-05-26", "AccessKeyId": key_id or srv.pair["AccessKeyId"],
           "SignatureMethod": "HMAC-SHA1", "SignatureVersion": "1.0", "Timestamp": timestamp or now_iso(),
           "SignatureNonce": nonce or os.urandom(16).hex()}
    out.update(params)
    return out


def v1(srv, params, method="GET", secret=None, form=False, **common):
    """Send ``params`` as a signature v1 request (signed with the SDK's get_rpcsignature); (status, body)."""
    full = v1_params(srv, params, **common)
    full["Signature"] = SdkUtils.get_rpcsignature(full, method, secret or srv.pair["AccessKeySecret"])
    encoded = urllib.parse.urlencode(full, quote_via=urllib.parse.quote)
    if form:
        return send(srv, method, body=encoded.encode(), headers={"Content-Type": "application/x-www-form-urlencoded"})
    return send(srv, method, query=encoded)


def test_v1_get_request_is_answered(srv):
    """A hand-built GET with signature v1 parameters in the query gets DescribeRegions' JSON."""
    status, body = v1(srv, {"Action": "DescribeRegions"})
    assert status == 200 and body["Regions"]["Region"][0]["RegionId"] == "local"


def test_v1_post_form_body_is_answered(srv, disk):
    """A hand-built POST with every parameter in a form body (signature v1) creates the snapshot."""
    status, body = v1(srv, {"Action": "CreateSnapshot", "DiskId": disk, "Tag.1.Key": "k k", "Tag.1.Value": "ü*~"},
                      method="POST", form=True)
    assert status == 200 and body["SnapshotId"].startswith("s-")
    [snap] = srv.client.describe_snapshots(sizes=False)["Snapshots"]["Snapshot"]
    assert snap["Tags"]["Tag"] == [{"TagKey": "k k", "TagValue": "ü*~"}]


def test_v1_bad_signature_does_nothing(srv, disk):
    """A v1 request signed with another secret is SignatureDoesNotMatch (400) and creates nothing."""
    status, body = v1(srv, {"Action": "CreateSnapshot", "DiskId": disk}, secret="wrong")
    assert (status, body["Code"]) == (400, "SignatureDoesNotMatch") and count_snapshots(srv) == 0
    assert set(body) == {"RequestId", "HostId", "Code", "Message"} and body["HostId"] == srv.endpoint


def test_v1_changed_after_signing_does_nothing(srv, disk):
    """A parameter changed after the request was signed (here DiskId) is SignatureDoesNotMatch."""
    full = v1_params(srv, {"Action": "CreateSnapshot", "DiskId": disk + "x"})
    full["Signature"] = SdkUtils.get_rpcsignature(full, "GET", srv.pair["AccessKeySecret"])
    full["DiskId"] = disk
    status, body = send(srv, "GET", urllib.parse.urlencode(full))
    assert (status, body["Code"]) == (400, "SignatureDoesNotMatch") and count_snapshots(srv) == 0


def test_v1_unknown_key_is_not_found(srv, disk):
    """A v1 request with an AccessKeyId the server does not know is InvalidAccessKeyId.NotFound (404)."""
    status, body = v1(srv, {"Action": "CreateSnapshot", "DiskId": disk}, key_id="BSAKnobody")
    assert (status, body["Code"]) == (404, "InvalidAccessKeyId.NotFound") and count_snapshots(srv) == 0


@pytest.mark.parametrize("offset,code", [(-16 * 60, "InvalidTimeStamp.Expired"), (16 * 60, "InvalidTimeStamp.Expired"),
                                         (-14 * 60, None)])
def test_v1_timestamp_must_be_within_15_minutes(srv, disk, offset, code):
    """A v1 Timestamp 16 minutes old or ahead is InvalidTimeStamp.Expired and creates nothing; 14 minutes old
    is taken."""
    status, body = v1(srv, {"Action": "CreateSnapshot", "DiskId": disk}, timestamp=now_iso(offset))
    if code is None:
        assert status == 200 and count_snapshots(srv) == 1
    else:
        assert (status, body["Code"]) == (400, code) and count_snapshots(srv) == 0


def test_v1_reused_nonce_does_nothing_the_second_time(srv, disk):
    """The same SignatureNonce twice within the window: the first creates, the second is SignatureNonceUsed and
    creates nothing; once the window has passed (the server's clock 16 minutes on) the nonce may come again."""
    params = {"Action": "CreateSnapshot", "DiskId": disk}
    assert v1(srv, params, nonce="n-1")[0] == 200
    status, body = v1(srv, params, nonce="n-1")
    assert (status, body["Code"]) == (400, "SignatureNonceUsed") and count_snapshots(srv) == 1
    srv.offset = 16 * 60
    assert v1(srv, params, nonce="n-1", timestamp=now_iso(16 * 60))[0] == 200 and count_snapshots(srv) == 2


@pytest.mark.parametrize("drop,code", [("AccessKeyId", "MissingAccessKeyId"), ("Signature", "MissingParameter"),
                                       ("SignatureNonce", "MissingParameter"), ("Timestamp", "MissingParameter"),
                                       ("SignatureMethod", "MissingParameter"), ("Version", "MissingParameter"),
                                       ("Action", "MissingParameter")])
def test_v1_missing_protocol_parameter(srv, drop, code):
    """A v1 request without one of its protocol parameters fails with MissingAccessKeyId or MissingParameter
    naming it (400)."""
    full = v1_params(srv, {"Action": "DescribeRegions"})
    full["Signature"] = SdkUtils.get_rpcsignature(full, "GET", srv.pair["AccessKeySecret"])
    del full[drop]
    status, body = send(srv, "GET", urllib.parse.urlencode(full))
    assert (status, body["Code"]) == (400, code)
    assert code != "MissingParameter" or f'"{drop}"' in body["Message"]


@pytest.mark.parametrize("params,status,code", [
    ({"Action": "DescribeRegions", "Timestamp": "2026-01-02 03:04:05"}, 400, "InvalidTimeStamp.Format"),
    ({"Action": "DescribeRegions", "SignatureNonce": ""}, 400, "MissingParameter"),
    ({"Action": "DescribeRegions", "SignatureMethod": "HMAC-SHA256"}, 400, "IncompleteSignature"),
    ({"Action": "DescribeRegions", "SecurityToken": "sts"}, 400, "IncompleteSignature"),
    ({"Action": "DescribeRegions", "Version": "2016-03-14"}, 400, "InvalidVersion"),
    ({"Action": "DescribeRegions", "Format": "XML"}, 400, "InvalidParameter"),
    ({"Action": "RunInstances"}, 404, "InvalidAction.NotFound"),
    ({"Action": "DescribeRegions", "Colour": "red"}, 400, "InvalidParameter"),
])
def test_v1_protocol_errors(srv, params, status, code):
    """A well-signed v1 request with a malformed timestamp, an empty nonce, another signature method, an STS
    token, another API version, XML output, an action this API does not have or a parameter its action does not
    have gets the cloud's code for it."""
    got, body = v1(srv, params)
    assert (got, body["Code"]) == (status, code)


def test_no_credentials_is_missing_access_key_id(srv):
    """A request with neither Authorization nor AccessKeyId is MissingAccessKeyId (400)."""
    status, body = send(srv, "GET", "Action=DescribeRegions&Version=2014-05-26")
    assert (status, body["Code"]) == (400, "MissingAccessKeyId")


def acs3_request(srv, action, query=None, body=b"", extra_headers=None, nonce=None, secret=None, date=None,
                 form=False):
    """(method, query string, headers) of an ACS3-HMAC-SHA256 request signed by the SDK's get_authorization."""
    query = dict(query or {})
    headers = {"host": srv.endpoint, "x-acs-action": action, "x-acs-version": "2014-05-26",
               "x-acs-date": date or now_iso(), "x-acs-signature-nonce": nonce or os.urandom(16).hex(),
               "x-acs-content-sha256": hashlib.sha256(body).hexdigest()}
    if form:
        headers["content-type"] = "application/x-www-form-urlencoded"
    headers.update(extra_headers or {})
    request = types.SimpleNamespace(method="POST", pathname="/", query=query, headers=headers)
    headers["Authorization"] = SdkUtils.get_authorization(request, "ACS3-HMAC-SHA256", headers["x-acs-content-sha256"],
                                                          srv.pair["AccessKeyId"], secret or srv.pair["AccessKeySecret"])
    return urllib.parse.urlencode(query), headers


def test_acs3_hand_built_request_with_a_form_body_is_answered(srv, disk):
    """An ACS3 request whose parameters are in a form body (hashed into x-acs-content-sha256) is answered."""
    body = urllib.parse.urlencode({"DiskId": disk, "SnapshotName": "formed"}).encode()
    query, headers = acs3_request(srv, "CreateSnapshot", body=body, form=True)
    status, _out = send(srv, "POST", query, body, headers)
    assert status == 200 and srv.client.describe_snapshots()["Snapshots"]["Snapshot"][0]["SnapshotName"] == "formed"


def test_acs3_body_changed_after_signing_does_nothing(srv, disk):
    """A form body other than the one signed (its hash no longer matches) is SignatureDoesNotMatch."""
    signed = urllib.parse.urlencode({"DiskId": disk, "SnapshotName": "signed"}).encode()
    query, headers = acs3_request(srv, "CreateSnapshot", body=signed, form=True)
    status, out = send(srv, "POST", query, signed.replace(b"signed", b"sent00"), headers)
    assert (status, out["Code"]) == (400, "SignatureDoesNotMatch") and count_snapshots(srv) == 0
    assert "x-acs-content-sha256" in out["Message"]  # says which part does not match


def test_acs3_unsigned_acs_header_is_incomplete_signature(srv, disk):
    """An x-acs-* header added after signing (not in SignedHeaders) is IncompleteSignature; nothing is done."""
    query, headers = acs3_request(srv, "CreateSnapshot", {"DiskId": disk})
    headers["x-acs-extra"] = "1"
    status, out = send(srv, "POST", query, None, headers)
    assert (status, out["Code"]) == (400, "IncompleteSignature") and count_snapshots(srv) == 0


def test_acs3_replayed_request_is_signature_nonce_used(srv, disk):
    """The same signed ACS3 request sent twice: the second is SignatureNonceUsed and creates nothing."""
    query, headers = acs3_request(srv, "CreateSnapshot", {"DiskId": disk})
    assert send(srv, "POST", query, None, headers)[0] == 200
    status, out = send(srv, "POST", query, None, headers)
    assert (status, out["Code"]) == (400, "SignatureNonceUsed") and count_snapshots(srv) == 1


UNKNOWN_KEY_AUTH = ("ACS3-HMAC-SHA256 Credential=BSAKnobody,SignedHeaders=host;x-acs-action;x-acs-content-sha256;"
                    "x-acs-date;x-acs-signature-nonce;x-acs-version,Signature=00")


@pytest.mark.parametrize("auth,code", [("ACS3-HMAC-SHA256", "IncompleteSignature"),
                                       ("ACS3-HMAC-SM3 Credential=a,SignedHeaders=host,Signature=00",
                                        "IncompleteSignature"),
                                       (UNKNOWN_KEY_AUTH, "InvalidAccessKeyId.NotFound")])
def test_acs3_malformed_or_foreign_authorization(srv, auth, code):
    """An Authorization header without its fields, with another algorithm or naming an unknown key gets the
    cloud's code."""
    query, headers = acs3_request(srv, "DescribeRegions")
    headers["Authorization"] = auth
    status, out = send(srv, "POST", query, None, headers)
    assert out["Code"] == code and status == (404 if code.endswith("NotFound") else 400)


def test_acs3_stale_date_is_expired(srv):
    """An ACS3 request whose x-acs-date is 20 minutes old is InvalidTimeStamp.Expired."""
    query, headers = acs3_request(srv, "DescribeRegions", date=now_iso(-20 * 60))
    assert send(srv, "POST", query, None, headers)[1]["Code"] == "InvalidTimeStamp.Expired"


def test_nonce_memory_is_bounded():
    """Past its limit of remembered nonces, the nonce store forgets expired ones, and refuses (Throttling)
    rather than grow while all are live."""
    nonces = Nonces(limit=2)
    nonces.use("k", "a", 1000.0, 1000.0)
    nonces.use("k", "b", 1000.0, 1000.0)
    with pytest.raises(errors.Throttling):
        nonces.use("k", "c", 1000.0, 1000.0)
    with pytest.raises(errors.SignatureNonceUsed):
        nonces.use("k", "a", 1000.0, 1001.0)
    nonces.use("k", "c", 3000.0, 3000.0)  # a and b have expired: forgotten
    nonces.use("other", "c", 3000.0, 3000.0)  # nonces are per AccessKeyId


# --- concurrency and malformed requests ------------------------------------------------------------------
def test_twenty_sdk_clients_at_once(srv, make_image):
    """20 threads, each with its own SDK client and disk, create, list and describe at the same time: every
    request is answered and every snapshot is made once."""
    disks = [srv.client.add_disk(make_image(f"d{i}.raw", 64 * KiB, [(0, os.urandom(4096))]))["DiskId"]
             for i in range(20)]
    made, failures = {}, []
    start = threading.Barrier(20)

    def worker(disk_id):
        try:
            sdk = srv.sdk()
            start.wait(30)
            sid = sdk.create_snapshot(ecs.CreateSnapshotRequest(disk_id=disk_id)).body.snapshot_id
            listed = sdk.describe_snapshots(ecs.DescribeSnapshotsRequest(region_id="local", disk_id=disk_id)).body
            assert [s.snapshot_id for s in listed.snapshots.snapshot] == [sid]
            sdk.describe_regions(ecs.DescribeRegionsRequest())
            made[disk_id] = sid
        except Exception as exc:  # reported below, with the others
            failures.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(d,)) for d in disks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert failures == [] and len(set(made.values())) == 20 and count_snapshots(srv) == 20


def raw(srv, data, read=True, timeout=10):
    """Send raw bytes on a new connection; returns what the server answers before it closes (or timeout)."""
    with socket.create_connection((srv.host, srv.port), timeout=timeout) as s:
        s.sendall(data)
        if not read:
            return b""
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
            if b"\r\n\r\n" in out:
                head, _, rest = out.partition(b"\r\n\r\n")
                m = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
                if m and len(rest) >= int(m[1]):
                    break
        return out


def status_and_code(answer):
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)["Code"]


def request_bytes(srv, line, headers=(), body=b""):
    head = [line, f"Host: {srv.endpoint}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


MALFORMED = [
    ("garbage", lambda s: b"\x00\x01\x02 garbage\r\n\r\n", 400, "InvalidRequest.Malformed"),
    ("no-version", lambda s: b"GET /\r\n\r\n", None, None),
    ("bad-utf8-query", lambda s: request_bytes(s, "GET /?Action=%ff%fe HTTP/1.1"), 400, "InvalidRequest.Malformed"),
    ("huge-header", lambda s: request_bytes(s, "GET / HTTP/1.1", ["X-Big: " + "a" * 70000]), 431,
     "InvalidRequest.Malformed"),
    ("too-many-headers", lambda s: request_bytes(s, "GET / HTTP/1.1", [f"X-{i}: {i}" for i in range(150)]), 431,
     "InvalidRequest.Malformed"),
    ("huge-body", lambda s: request_bytes(s, "POST / HTTP/1.1", ["Content-Length: 2097152"]), 413,
     "RequestEntityTooLarge"),
    ("bad-length", lambda s: request_bytes(s, "POST / HTTP/1.1", ["Content-Length: abc"]), 400,
     "InvalidRequest.Malformed"),
    ("two-lengths", lambda s: request_bytes(s, "POST / HTTP/1.1", ["Content-Length: 1", "Content-Length: 2"],
                                            b"xx"), 400, "InvalidRequest.Malformed"),
    ("chunked", lambda s: request_bytes(s, "POST / HTTP/1.1", ["Transfer-Encoding: chunked"], b"5\r\nhello\r\n0\r\n\r\n"),
     400, "InvalidRequest.Malformed"),
    ("json-body", lambda s: request_bytes(s, "POST / HTTP/1.1", ["Content-Type: application/json", "Content-Length: 2"],
                                          b"{}"), 400, "InvalidRequest.Malformed"),
    ("binary-form", lambda s: request_bytes(s, "POST / HTTP/1.1", ["Content-Type: application/x-www-form-urlencoded",
                                                                   "Content-Length: 4"], b"\xff\xfe=1"), 400,
     "InvalidRequest.Malformed"),
    ("duplicate-param", lambda s: request_bytes(s, "GET /?Action=A&Action=B HTTP/1.1"), 400, "InvalidRequest.Malformed"),
    ("nameless-param", lambda s: request_bytes(s, "GET /?=x HTTP/1.1"), 400, "InvalidRequest.Malformed"),
    ("put", lambda s: request_bytes(s, "PUT / HTTP/1.1", ["Content-Length: 0"]), 400, "UnsupportedHTTPMethod"),
    ("unknown-method", lambda s: request_bytes(s, "BREW / HTTP/1.1"), 501, "InvalidRequest.Malformed"),
    ("other-path", lambda s: request_bytes(s, "GET /v1/snapshots HTTP/1.1"), 404, "InvalidAction.NotFound"),
    ("bad-header-utf8", lambda s: request_bytes(s, "GET / HTTP/1.1", ["X-Acs-Date: \xe9t\xe9"]), 400,
     "InvalidRequest.Malformed"),
    ("http-0.9-ish", lambda s: b"GET / HTTP/9.9\r\n\r\n", 505, "InvalidRequest.Malformed"),
]


@pytest.mark.parametrize("name,make,status,code", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_an_error_and_the_server_goes_on(srv, name, make, status, code):
    """Garbage, bad encodings, oversized headers and bodies, chunked or JSON bodies, duplicate parameters, other
    methods and paths: each gets the JSON error body with its status (or the connection closed), and the server
    then answers a well-formed request as before."""
    answer = raw(srv, make(srv))
    if status is not None:
        assert status_and_code(answer) == (status, code)
    assert srv.sdk().describe_regions(ecs.DescribeRegionsRequest()).body.regions.region


def test_a_body_cut_short_does_not_hold_the_server(repo_path, keys_path, pair):
    """A client that announces a body and sends part of it, then goes silent, is dropped after the idle timeout;
    the server answers others meanwhile and afterwards."""
    served = serve(repo_path, keys_path, pair, idle_timeout=0.5)
    try:
        with socket.create_connection((served.host, served.port), timeout=10) as s:
            s.sendall(request_bytes(served, "POST / HTTP/1.1", ["Content-Length: 100"], b"x" * 10))
            assert served.sdk().describe_regions(ecs.DescribeRegionsRequest()).body.regions.region
            ready, _, _ = select.select([s], [], [], 5)
            assert ready and s.recv(65536) == b""  # closed by the server
        assert served.sdk().describe_regions(ecs.DescribeRegionsRequest()).body.regions.region
    finally:
        stop(served)


def test_connections_beyond_the_limit_are_throttled(repo_path, keys_path, pair):
    """With every connection slot held by silent clients, one more connection is answered Throttling (403) at
    once; when they are gone, requests are answered again."""
    served = serve(repo_path, keys_path, pair, max_connections=2, idle_timeout=30)
    try:
        held = [socket.create_connection((served.host, served.port), timeout=10) for _ in range(2)]
        time.sleep(0.3)  # both accepted and in their handler threads
        assert status_and_code(raw(served, request_bytes(served, "GET / HTTP/1.1"))) == (403, "Throttling")
        for s in held:
            s.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                assert served.sdk().describe_regions(ecs.DescribeRegionsRequest()).body.regions.region
                break
            except TeaException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        stop(served)


# --- loopback policy, keys, the commands -----------------------------------------------------------------
def test_a_non_loopback_address_needs_allow_remote(repo_path, keys_path, pair):
    """Binding 0.0.0.0 is refused with InvalidParameter unless allow_remote; loopback names and ::1 are served."""
    with Client(repo_path) as c:
        store = keyfile.KeyStore(keys_path)
        with pytest.raises(errors.InvalidParameter, match="loopback"):
            ApiServer(c, store, ("0.0.0.0", 0))
        for host in ("0.0.0.0", "127.0.0.1", "localhost"):
            server = ApiServer(c, store, (host, 0), allow_remote=(host == "0.0.0.0"))
            server.server_close()
        try:
            server = ApiServer(c, store, ("::1", 0))
        except errors.InvalidParameter:
            pytest.skip("no IPv6 loopback here")
        assert server.endpoint.startswith("[::1]:")
        server.server_close()


@pytest.mark.parametrize("text,expected", [("127.0.0.1:8080", ("127.0.0.1", 8080)), ("[::1]:0", ("::1", 0)),
                                           ("localhost:65535", ("localhost", 65535))])
def test_parse_bind(text, expected):
    """--bind takes HOST:PORT and [IPv6]:PORT."""
    assert parse_bind(text) == expected


@pytest.mark.parametrize("text", ["8080", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000", ":8080"])
def test_parse_bind_refuses_what_is_no_address(text):
    """--bind without a host, without a numeric port, or with a port past 65535 is InvalidParameter."""
    with pytest.raises(errors.InvalidParameter):
        parse_bind(text)


def test_api_key_create_prints_the_pair_and_keeps_it_private(tmp_path):
    """`blocksnap api-key create` prints exactly {AccessKeyId, AccessKeySecret}, keeps every key made in the
    per-user keys file with mode 0600 in a 0700 directory, and a server takes the key."""
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    first, second = (cli("api-key", "create", **env) for _ in range(2))
    assert first.returncode == second.returncode == 0
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert set(a) == {"AccessKeyId", "AccessKeySecret"} and a["AccessKeyId"] != b["AccessKeyId"]
    path = tmp_path / "cfg" / "blocksnap" / "api-keys.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    store = keyfile.KeyStore(str(path))
    assert store.secret(a["AccessKeyId"]) == a["AccessKeySecret"] and store.secret(b["AccessKeyId"])
    third = cli("api-key", "create", "--keys-file", str(tmp_path / "other.json"))
    assert json.loads(third.stdout)["AccessKeyId"] and (tmp_path / "other.json").exists()


def test_a_keys_file_that_is_not_private_is_refused(tmp_path, keys_path, pair):
    """A keys file readable by others makes api-key create and the key store refuse it (ApiKeys.Unusable)."""
    os.chmod(keys_path, 0o640)
    with pytest.raises(errors.ApiKeysUnusable):
        keyfile.KeyStore(keys_path).check()
    proc = cli("api-key", "create", "--keys-file", keys_path)
    assert proc.returncode != 0 and "ApiKeys.Unusable" in proc.stderr


def start_server_command(repo_path, keys_path, *extra, **env):
    proc = subprocess.Popen([sys.executable, "-m", "blocksnap", "--repo", repo_path, "api-server", "--bind",
                             "127.0.0.1:0", "--keys-file", keys_path, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(**env))
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(f"api-server did not start: {proc.communicate()[1]}")
    return proc, json.loads(line)


def test_the_api_server_command_serves_the_sdk_and_stops_on_sigterm(repo_path, keys_path, pair, disk):
    """`blocksnap api-server --bind 127.0.0.1:0` prints its endpoint as JSON, answers the SDK, logs a line per
    request on stderr and exits 0 on SIGTERM."""
    proc, info = start_server_command(repo_path, keys_path)
    try:
        assert info["RegionId"] == "local" and info["Keys"] == 1
        served = types.SimpleNamespace(endpoint=info["Endpoint"], pair=pair)
        sdk = Served.sdk(served)
        sid = sdk.create_snapshot(ecs.CreateSnapshotRequest(disk_id=disk)).body.snapshot_id
        assert sdk.describe_snapshots(ecs.DescribeSnapshotsRequest(region_id="local")).body.snapshots.snapshot[0] \
            .snapshot_id == sid
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert re.search(r"POST CreateSnapshot 200 OK [0-9A-F-]{36}", err)


def test_the_api_server_command_takes_its_clock_from_blocksnap_now(repo_path, keys_path, pair):
    """`api-server` with BLOCKSNAP_NOW=+1200 (its clock 20 minutes ahead) answers the SDK's requests with
    InvalidTimeStamp.Expired."""
    proc, info = start_server_command(repo_path, keys_path, "--quiet", BLOCKSNAP_NOW="+1200")
    try:
        sdk = Served.sdk(types.SimpleNamespace(endpoint=info["Endpoint"], pair=pair))
        assert sdk_error(sdk.describe_regions, ecs.DescribeRegionsRequest()).code == "InvalidTimeStamp.Expired"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_the_api_server_command_refuses_a_remote_address(repo_path, keys_path, pair):
    """`api-server --bind 0.0.0.0:0` without --allow-remote exits with InvalidParameter and serves nothing."""
    proc = cli("--repo", repo_path, "api-server", "--bind", "0.0.0.0:0", "--keys-file", keys_path)
    assert proc.returncode == errors.EXIT_INVALID and "InvalidParameter" in proc.stderr and proc.stdout == ""
