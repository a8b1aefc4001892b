"""The cloud API's actions: each one's parameters (name, type, required, help) and how it runs locally.

The one table that ``Client.call`` (blocksnap/api.py), ``blocksnap api`` (cli/api_cmd.py), the api-server
(cloud/server.py) and their help all read. Action and parameter names and types are Alibaba Cloud ECS
OpenAPI's, Version 2014-05-26 (the parameters the official SDK ``alibabacloud-ecs20140526`` can send for each
action). Each parameter also says what it does here (``local``):

- ``SUPPORTED``: it has its cloud meaning;
- ``NO_EFFECT``: accepted (and checked for its type), with nothing to do on one local repository (OwnerId,
  AcceptLanguage, ...);
- ``LATER``: its meaning is not built yet; a request that gives it fails with ``InvalidParameter`` instead of
  being answered as if it had not been given.

A parameter the action does not have is ``InvalidParameter`` too (a typo must not pass as a missing filter).
A new action is one :class:`Action` in ``ACTIONS`` with its ``run`` function; a parameter that gets built
moves from ``LATER`` to ``SUPPORTED`` and its run function passes it on.

Values arrive as text (query strings, form bodies, command lines) or, through the Python API, as Python
values; :meth:`Action.parse` turns both into typed values: ``Integer``/``Long`` from ASCII digits,
``Boolean`` from ``true``/``false`` (any case: the SDK sends Python's ``True``), JSON arrays from their text
(``SnapshotIds``), and repeat lists from their flat form (``Tag.1.Key``, ``Tag.1.Value``, ...).
"""
import json
import re

from .. import errors

VERSION = "2014-05-26"

# Types, as the API reference names them.
STRING = "String"
INTEGER = "Integer"
LONG = "Long"
BOOLEAN = "Boolean"
JSON_ARRAY = "JSONArray"  # a JSON array of strings in one text value, e.g. SnapshotIds='["s-1","s-2"]'
REPEAT_LIST = "RepeatList"  # flat Name.N.Field values, e.g. Tag.1.Key, Tag.1.Value

SUPPORTED = "supported"
NO_EFFECT = "no effect"
LATER = "not yet"

_REPEAT = re.compile(r"^([A-Za-z]+)\.([0-9]{1,6})(?:\.([A-Za-z]+))?$")
_WHOLE = re.compile(r"^-?[0-9]+$")


class Param:
    """One request parameter of an action.

    Args:
        name: the API's name (``DiskId``).
        type: one of the type constants above.
        help: one line for ``--help``.
        required: the request fails with MissingParameter without it.
        local: SUPPORTED, NO_EFFECT or LATER (see the module docstring).
        error: the error class for a value of the wrong type (default InvalidParameter).
        fields: for a REPEAT_LIST of objects, the field names of one item (``("Key", "Value")``: Tag.N.Key,
            Tag.N.Value); None for a list of plain values (AdditionalAttributes.N).
    """

    __slots__ = ("error", "fields", "help", "local", "name", "required", "type")

    def __init__(self, name, type, help, required=False, local=SUPPORTED, error=None, fields=None):
        self.name = name
        self.type = type
        self.help = help
        self.required = required
        self.local = local
        self.error = error or errors.InvalidParameter
        self.fields = fields

    def coerce(self, value):
        """``value`` (text from the wire or a Python value) as this parameter's type.

        Raises:
            ``self.error`` for a value that is not of the type.
        """
        kind = self.type
        if kind in (INTEGER, LONG):
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str) and value.isascii() and _WHOLE.match(value):
                return int(value)
            raise self.error(f"({self.name} must be a whole number, got {_shown(value)})")
        if kind == BOOLEAN:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise self.error(f"({self.name} must be true or false, got {_shown(value)})")
        if kind == JSON_ARRAY:
            items = value
            if isinstance(value, str):
                try:
                    items = json.loads(value)
                except ValueError:
                    items = None
            if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
                raise self.error(f"({self.name} must be a JSON array of strings, got {_shown(value)})")
            return list(items)
        if kind == REPEAT_LIST:
            if not isinstance(value, (list, tuple)):
                what = f"{{{', '.join(self.fields)}}}" if self.fields else "values"
                raise self.error(f"({self.name} must be a list of {what}, got {_shown(value)})")
            return list(value)
        return value  # STRING: the action's own validation checks it (its error codes are specific)


class Action:
    """One API action: its parameters and the function that runs it on a Client."""

    __slots__ = ("by_name", "help", "name", "params", "run")

    def __init__(self, name, help, params, run):
        self.name = name
        self.help = help
        self.params = params
        self.run = run
        self.by_name = {p.name: p for p in params}

    def parse(self, params):
        """The typed parameters of a request: ``{name: value}`` for every parameter given.

        ``params`` maps API names to values; repeat lists come as a list under their name (``Tag``:
        ``[{"Key": "k", "Value": "v"}]``) or flat (``Tag.1.Key``). A value of None counts as not given.

        Raises:
            InvalidParameter (a parameter the action does not have, one not built yet, a value of the wrong
            type, or the error class of the parameter), MissingParameter.
        """
        if not hasattr(params, "items"):
            raise errors.InvalidParameter(f"(the parameters of {self.name} must be a mapping of names to values, "
                                          f"got {type(params).__name__})")
        out, flat = {}, {}
        for name, value in params.items():
            if not isinstance(name, str):
                raise errors.InvalidParameter(f"(parameter names are strings, got {_shown(name)})")
            spec = self.by_name.get(name)
            if spec is None:
                m = _REPEAT.match(name)
                spec = self.by_name.get(m[1]) if m else None
                if spec is None or spec.type != REPEAT_LIST:
                    raise errors.InvalidParameter(f"({_shown(name)} is not a parameter of {self.name}; see "
                                                  f"'blocksnap api {self.name} --help')")
                field = _field_name(spec, m[3])
                if value is not None:
                    items = flat.setdefault(spec.name, {})
                    n = int(m[2])
                    if field is None:  # a list of plain values: Name.N
                        if n in items:
                            raise errors.InvalidParameter(f"({spec.name}.{n} is given twice)")
                        items[n] = value
                    else:
                        item = items.setdefault(n, {})
                        if field in item:
                            raise errors.InvalidParameter(f"({spec.name}.{n}.{field} is given twice)")
                        item[field] = value
                continue
            if value is not None:
                out[name] = spec.coerce(value)
        for name, items in flat.items():
            spec = self.by_name[name]
            if name in out:
                raise errors.InvalidParameter(f"({name} is given both as a list and as {name}.N fields)")
            if 0 in items:
                raise errors.InvalidParameter(f"({name}.0: {name}.N counts from 1)")
            out[name] = [items[n] for n in sorted(items)]
        for spec in self.params:
            if spec.required and spec.name not in out:
                raise errors.MissingParameter(name=spec.name)
            if spec.local == LATER and spec.name in out:
                raise errors.InvalidParameter(f"({spec.name} of {self.name} is not supported by this blocksnap yet)")
        return out


def _field_name(spec, given):
    """The field of a repeat-list item that ``given`` names (None for a list of plain values, ``Name.N``); the
    API also takes the lower-case ``Tag.N.key`` and ``Tag.N.value`` (the CreateSnapshot reference lists both).

    Raises:
        InvalidParameter for a field the item does not have, or a missing or extra field part.
    """
    if spec.fields is None and given is None:
        return None
    for field in spec.fields or ():
        if given in (field, field[0].lower() + field[1:]):
            return field
    shape = f"{spec.name}.N.{{{', '.join(spec.fields)}}}" if spec.fields else f"{spec.name}.N"
    raise errors.InvalidParameter(f"({spec.name}.N{'.' + given if given else ''}: the items of {spec.name} are "
                                  f"given as {shape})")


def _shown(value, limit=64):
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def get(name):
    """The Action called ``name``.

    Raises:
        InvalidActionNotFound.
    """
    action = ACTIONS.get(name) if isinstance(name, str) else None
    if action is None:
        raise errors.InvalidActionNotFound(f"({_shown(name)}; the actions are {', '.join(ACTIONS)})")
    return action


# --- the parameters every ECS action takes (the account model of the cloud; one local owner) ---------------
def _account_params():
    return [
        Param("OwnerId", LONG, "the account that owns the resources (one local owner)", local=NO_EFFECT),
        Param("OwnerAccount", STRING, "the owner's account name", local=NO_EFFECT),
        Param("ResourceOwnerId", LONG, "the resource owner's account id", local=NO_EFFECT),
        Param("ResourceOwnerAccount", STRING, "the resource owner's account name", local=NO_EFFECT),
    ]


def _tags(help_text, local=SUPPORTED):
    return Param("Tag", REPEAT_LIST, help_text, local=local, fields=("Key", "Value"))


# --- CreateSnapshot -----------------------------------------------------------------------------------------
def _create_snapshot(client, p):
    return client.create_snapshot(p["DiskId"], snapshot_name=p.get("SnapshotName"),
                                  description=p.get("Description"), retention_days=p.get("RetentionDays"),
                                  tags=p.get("Tag"), client_token=p.get("ClientToken"), category=p.get("Category"),
                                  resource_group_id=p.get("ResourceGroupId"), instant_access=p.get("InstantAccess"),
                                  instant_access_retention_days=p.get("InstantAccessRetentionDays"),
                                  storage_location_arn=p.get("StorageLocationArn"))


CREATE_SNAPSHOT = Action("CreateSnapshot", "Snapshot a disk; answers once the snapshot is accomplished.", [
    Param("DiskId", STRING, "the disk to snapshot (d-...)", required=True),
    Param("SnapshotName", STRING, "2-128 characters, starting with a letter; not http(s):// nor auto..."),
    Param("Description", STRING, "2-256 characters, not starting with http:// or https://"),
    Param("RetentionDays", INTEGER, "1-65536: the snapshot is deleted after that many days (default: kept)",
          error=errors.InvalidRetentionDaysMalformed),
    Param("Category", STRING, "Standard or Flash (deprecated in the cloud; recorded, no effect)"),
    Param("ClientToken", STRING, "idempotency token: ASCII, at most 64 characters"),
    _tags("up to 20 tags: Tag.N.Key (1-128 characters), Tag.N.Value (0-128)"),
    Param("ResourceGroupId", STRING, "the resource group of the snapshot (blocksnap resource-group list; default: "
                                     "the default group)"),
    Param("InstantAccess", BOOLEAN, "deprecated instant access switch: recorded; every local snapshot is "
                                    "available once accomplished; not with Category"),
    Param("InstantAccessRetentionDays", INTEGER, "1-65535 days of instant access (only with InstantAccess=true)",
          error=errors.InvalidInstantAccessRetentionDaysMalformed),
    Param("StorageLocationArn", STRING, "where to store the snapshot: the repository knows no location, so "
                                        "any value is refused"),
] + _account_params(), _create_snapshot)


# --- DescribeSnapshots --------------------------------------------------------------------------------------
def _paging(p):
    """The paging parameters as the Describe methods take them; the API's default is one page of 10."""
    return {"page_number": p.get("PageNumber"), "page_size": p.get("PageSize"), "max_results": p.get("MaxResults"),
            "next_token": p.get("NextToken"), "everything": False}


def _describe_snapshots(client, p):
    client.check_region(p["RegionId"])
    kwargs = dict(disk_id=p.get("DiskId"), snapshot_ids=p.get("SnapshotIds"), status=p.get("Status"),
                  snapshot_name=p.get("SnapshotName"), snapshot_type=p.get("SnapshotType"),
                  category=p.get("Category"), tags=p.get("Tag"), resource_group_id=p.get("ResourceGroupId"),
                  **_paging(p))
    if p.get("DryRun"):  # every check a real request makes, then the cloud's answer to a dry run
        client.describe_snapshots(sizes=False, **kwargs)
        raise errors.DryRunOperation()
    return client.describe_snapshots(**kwargs)


DESCRIBE_SNAPSHOTS = Action("DescribeSnapshots", "List snapshots, oldest first, with their cloud fields and sizes.", [
    Param("RegionId", STRING, "the repository's region (DescribeRegions)", required=True),
    Param("DiskId", STRING, "only the snapshots of this disk"),
    Param("SnapshotIds", JSON_ARRAY, 'only these snapshots: a JSON array of up to 100, \'["s-...", "s-..."]\''),
    Param("Status", STRING, "progressing, accomplished, failed or all (default all)"),
    Param("InstanceId", STRING, "only the snapshots of this instance's disks", local=LATER),
    Param("SnapshotName", STRING, "only the snapshots of this name"),
    Param("SnapshotType", STRING, "auto, user or all (default all; every snapshot is user until automatic "
                                  "policies exist)"),
    Param("Category", STRING, "only the snapshots of this category (Standard unless given at create)"),
    Param("SnapshotLinkId", STRING, "only the snapshots of this chain", local=LATER),
    Param("SourceDiskType", STRING, "System or Data", local=LATER),
    Param("Usage", STRING, "image, disk, image_disk or none", local=LATER),
    Param("Encrypted", BOOLEAN, "only encrypted snapshots", local=LATER),
    Param("KMSKeyId", STRING, "only snapshots encrypted with this key", local=LATER),
    Param("ResourceGroupId", STRING, "only the snapshots of this resource group"),
    _tags("only the snapshots with all these tags (Tag.N.Key; Tag.N.Value, if given, must match too)"),
    Param("Filter", REPEAT_LIST, "Filter.N.Key / Filter.N.Value creation-time filters", local=LATER,
          fields=("Key", "Value")),
    Param("PageNumber", INTEGER, "page number, from 1 (default 1)"),
    Param("PageSize", INTEGER, "snapshots per page, 1-100 (default 10)"),
    Param("MaxResults", INTEGER, "snapshots per page with NextToken paging, 1-100 (default 10)"),
    Param("NextToken", STRING, "the NextToken of the previous page (PageNumber and PageSize then take no effect)"),
    Param("DryRun", BOOLEAN, "check the request only: DryRunOperation if it would pass"),
] + _account_params(), _describe_snapshots)


# --- DeleteSnapshot -----------------------------------------------------------------------------------------
def _delete_snapshot(client, p):
    return client.delete_snapshot(p["SnapshotId"])


DELETE_SNAPSHOT = Action("DeleteSnapshot", "Delete a snapshot and give back the data only it referenced.", [
    Param("SnapshotId", STRING, "the snapshot to delete (s-...)", required=True),
    Param("Force", BOOLEAN, "also when a disk was created from it (no disk is made from a snapshot here yet)", local=NO_EFFECT),
] + _account_params(), _delete_snapshot)


# --- DescribeDisks ------------------------------------------------------------------------------------------
def _describe_disks(client, p):
    client.check_region(p["RegionId"])
    kwargs = dict(disk_ids=p.get("DiskIds"), disk_name=p.get("DiskName"), status=p.get("Status"),
                  disk_type=p.get("DiskType"), lock_reason=p.get("LockReason"),
                  resource_group_id=p.get("ResourceGroupId"), **_paging(p))
    if p.get("DryRun"):
        client.describe_disks(**kwargs)
        raise errors.DryRunOperation()
    return client.describe_disks(**kwargs)


_DISK_FILTERS = [
    ("DiskIds", JSON_ARRAY, "only these disks: a JSON array of up to 100"),
    ("DiskType", STRING, "all, system or data (a local image is a data disk)"),
    ("Status", STRING, "only disks in this status (a local image is Available; All)"),
    ("DiskName", STRING, "only disks of this name"),
    ("LockReason", STRING, "security (disks locked with 'blocksnap disk lock') or financial (none here)"),
    ("ResourceGroupId", STRING, "only disks of this resource group (every disk is in the default group)"),
    ("PageNumber", INTEGER, "page number, from 1 (default 1)"), ("PageSize", INTEGER, "disks per page, 1-100 (default 10)"),
    ("MaxResults", INTEGER, "disks per page with NextToken paging, 10-500 (outside: the nearest; default 10)"),
    ("NextToken", STRING, "the NextToken of the previous page"),
    ("DryRun", BOOLEAN, "check the request only: DryRunOperation if it would pass"),
]
_DISK_FILTERS_LATER = [
    ("ZoneId", STRING, "only disks of this zone"),
    ("InstanceId", STRING, "only the disks of this instance"),
    ("Category", STRING, "only disks of this category"),
    ("SnapshotId", STRING, "only disks made from this snapshot"),
    ("Portable", BOOLEAN, "only portable disks"), ("DeleteWithInstance", BOOLEAN, "filter on DeleteWithInstance"),
    ("DeleteAutoSnapshot", BOOLEAN, "filter on DeleteAutoSnapshot"), ("EnableShared", BOOLEAN, "only shared disks"),
    ("EnableAutoSnapshot", BOOLEAN, "filter on EnableAutoSnapshot"),
    ("EnableAutomatedSnapshotPolicy", BOOLEAN, "only disks with an automatic snapshot policy"),
    ("AutoSnapshotPolicyId", STRING, "only disks with this automatic snapshot policy"),
    ("DiskChargeType", STRING, "PrePaid or PostPaid"),
    ("Encrypted", BOOLEAN, "only encrypted disks"), ("KMSKeyId", STRING, "only disks encrypted with this key"),
    ("MultiAttach", STRING, "Disabled, Enabled or All"),
    ("PerformanceLevel", STRING, "only ESSDs of this level"),
    ("AdditionalAttributes", REPEAT_LIST, "extra attributes to return"),
]

DESCRIBE_DISKS = Action("DescribeDisks", "List the registered disk images.", [
    Param("RegionId", STRING, "the repository's region (DescribeRegions)", required=True),
] + [Param(name, kind, text) for name, kind, text in _DISK_FILTERS]
  + [Param(name, kind, text, local=LATER) for name, kind, text in _DISK_FILTERS_LATER]
  + [_tags("only disks with these tags", local=LATER),
     Param("Filter", REPEAT_LIST, "Filter.N.Key / Filter.N.Value filters", local=LATER, fields=("Key", "Value"))]
  + _account_params(), _describe_disks)


# --- DescribeRegions ----------------------------------------------------------------------------------------
def _describe_regions(client, p):
    return client.describe_regions()


DESCRIBE_REGIONS = Action("DescribeRegions", "List the regions: the repository is one region ('local' unless "
                                             "configured).", [
    Param("AcceptLanguage", STRING, "zh-CN, en-US or ja (the local region's name is the same in each)",
          local=NO_EFFECT),
    Param("InstanceChargeType", STRING, "PrePaid or PostPaid (no billing here)", local=NO_EFFECT),
    Param("ResourceType", STRING, "instance, disk, reservedinstance or scu (all are local)",
          local=NO_EFFECT),
] + _account_params(), _describe_regions)


ACTIONS = {a.name: a for a in (CREATE_SNAPSHOT, DESCRIBE_SNAPSHOTS, DELETE_SNAPSHOT, DESCRIBE_DISKS,
                               DESCRIBE_REGIONS)}
