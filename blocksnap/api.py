"""The control plane: cloud block-snapshot semantics over a local repository.

Request parameters and their validation follow Alibaba Cloud ECS
CreateSnapshot (see docs/API.md): SnapshotName, Description, RetentionDays,
Tag, ClientToken (idempotency), Category. Responses are dicts shaped like
the API's JSON (``SnapshotId``, ``RequestId``, DescribeSnapshots'
``{"Snapshots": {"Snapshot": [...]}, "TotalCount": N}``). The CLI is a thin
layer over :class:`Client`.

Two forms of the same operations: the Python methods (``create_snapshot(disk_id, snapshot_name=...)``) and
the API's own (``client.call("CreateSnapshot", {"DiskId": ...})``, or ``client.CreateSnapshot(DiskId=...)``),
which take the API's parameter names and types from the action table, blocksnap/cloud/actions.py.
"""
import json
import os
import re
import threading
import time
import unicodedata

from . import backup, describe, errors
from . import clock as clocks
from . import image as images
from .cloud import actions
from .image import raw
from .repository import ACCOMPLISHED, DEFAULT_CHUNK_SIZE, PROGRESSING, Repository, default_repo_path

MAX_TAGS = 20
CATEGORIES = ("Standard", "Flash")
STATUSES = describe.STATUSES  # DescribeSnapshots' Status filter
INSTANT_ACCESS_DAYS = (1, 65535)
DEFAULT_REGION = "local"  # the one region a repository is, unless BLOCKSNAP_REGION or Client(region=) says
_REGION_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
_NAME_PUNCT = set(":_.-")


def request_id():
    """A RequestId: a random (version 4) UUID in upper case, as the cloud API returns them.

    Made from os.urandom directly: importing the uuid module costs every command a few ms.
    """
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = b.hex().upper()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _has_url(text):
    return text.startswith(("http://", "https://"))


def _encodable(text):
    """False for a str that is not valid Unicode text: lone surrogates, which is how Python carries
    bytes that are not UTF-8 in command-line arguments. Stored, they would break every JSON reply."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(value, limit=64):
    """``repr(value)`` for an error message, cut to about ``limit`` characters."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f", {len(value)} characters" if isinstance(value, str) else ""
    return f"{text[:limit]}...{size}"


def validate_path(value, what):
    """``value`` as a str path: a str, or an os.PathLike (pathlib.Path) that names a str path.

    Raises:
        InvalidParameter for anything else, bytes paths included: records, messages and JSON replies are text.
    """
    if isinstance(value, (str, os.PathLike)):
        try:
            path = os.fspath(value)
        except TypeError:  # an __fspath__ that returns neither str nor bytes
            path = None
        if isinstance(path, str):
            return path
    raise errors.InvalidParameter(f"({what} must be a str or an os.PathLike path, got {type(value).__name__} "
                                  f"{_shown(value)})")


def validate_chunk_size(size):
    """An int (not a bool, a float or a string of digits: the API is strict about types); the range
    and power-of-two check is Repository.init's.

    Raises:
        InvalidChunkSize.
    """
    if isinstance(size, bool) or not isinstance(size, int):
        raise errors.InvalidChunkSize(f"(got {type(size).__name__} {_shown(size)}, not an int)")
    return size


def validate_snapshot_name(name):
    """2-128 characters; starts with a letter; letters, digits, ``: _ . -``; not http(s):// nor auto*."""
    if name is None:
        return None
    if not isinstance(name, str) or not 2 <= len(name) <= 128 or not _encodable(name):
        raise errors.InvalidSnapshotNameMalformed("(2 to 128 characters of valid text)")
    if _has_url(name) or name.startswith("auto"):
        raise errors.InvalidSnapshotNameMalformed("(must not start with http://, https:// or auto)")
    if not unicodedata.category(name[0]).startswith("L"):
        raise errors.InvalidSnapshotNameMalformed("(must start with a letter)")
    for ch in name:
        cat = unicodedata.category(ch)
        if not (cat.startswith("L") or ch in "0123456789" or ch in _NAME_PUNCT):
            raise errors.InvalidSnapshotNameMalformed(f"(character {_shown(ch)} is not allowed)")
    return name


def validate_description(text):
    if text is None:
        return None
    if not isinstance(text, str) or not 2 <= len(text) <= 256 or _has_url(text) or not _encodable(text):
        raise errors.InvalidDescriptionMalformed("(2 to 256 characters of valid text, not starting with http:// "
                                                 "or https://)")
    return text


def validate_retention_days(days):
    if days is None:
        return None
    if isinstance(days, bool) or not isinstance(days, int):
        text = str(days).strip()
        # Plain ASCII digits only: int() would also take "1_0" and other scripts' digits.
        if not (text.isascii() and text.isdigit()):
            raise errors.InvalidRetentionDaysMalformed(f"({_shown(days)} is not a whole number)")
        days = int(text)
    if not 1 <= days <= 65536:
        raise errors.InvalidRetentionDaysMalformed(f"({days} is outside 1 to 65536)")
    return days


def validate_client_token(token):
    if token is None:
        return None
    if not isinstance(token, str) or not token or len(token) > 64 or not token.isascii():
        raise errors.InvalidClientTokenMalformed()
    return token


def validate_tags(tags):
    """A list of ``{"Key", "Value"}`` (or ``(key, value)`` pairs); returns the API's Tag list."""
    if not tags:
        return []
    if not isinstance(tags, (list, tuple)):
        raise errors.InvalidTagKeyMalformed(f"(Tags must be a list of {{'Key', 'Value'}}, got {type(tags).__name__})")
    out, seen = [], set()
    for item in tags:
        if isinstance(item, dict):
            key, value = item.get("Key"), item.get("Value", "")
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            key, value = item
        else:
            raise errors.InvalidTagKeyMalformed(f"(a tag must be {{'Key', 'Value'}} or a pair, got {_shown(item)})")
        if (not isinstance(key, str) or not 1 <= len(key) <= 128 or "http://" in key or "https://" in key
                or key.startswith(("aliyun", "acs:")) or not _encodable(key)):
            raise errors.InvalidTagKeyMalformed(f"({_shown(key)})")
        value = "" if value is None else value
        if (not isinstance(value, str) or len(value) > 128 or "http://" in value or "https://" in value
                or not _encodable(value)):
            raise errors.InvalidTagValueMalformed(f"({_shown(value)})")
        if key in seen:
            raise errors.DuplicateTagKey(f"({_shown(key)})")
        seen.add(key)
        out.append({"TagKey": key, "TagValue": value})
    if len(out) > MAX_TAGS:
        raise errors.InvalidTagCount(f"({len(out)} given)")
    return out


def validate_instant_access(instant_access, days, category):
    """InstantAccess (a bool) and InstantAccessRetentionDays (1-65535, only with InstantAccess true); neither
    goes with Category. Returns the record fields they make.

    Raises:
        InvalidParameter (InstantAccess not a bool), InvalidCategoryAndInstantAccessMalformed,
        InvalidInstantAccessRetentionDaysMalformed.
    """
    if instant_access is not None and not isinstance(instant_access, bool):
        raise errors.InvalidParameter(f"(InstantAccess must be true or false, got {_shown(instant_access)})")
    if category is not None and instant_access is not None:
        raise errors.InvalidCategoryAndInstantAccessMalformed()
    if days is not None:
        if isinstance(days, bool) or not isinstance(days, int):
            text = str(days).strip()
            if not (text.isascii() and text.isdigit()):
                raise errors.InvalidInstantAccessRetentionDaysMalformed(f"({_shown(days)} is not a whole number)")
            days = int(text)
        lo, hi = INSTANT_ACCESS_DAYS
        if not lo <= days <= hi:
            raise errors.InvalidInstantAccessRetentionDaysMalformed(f"({days} is outside {lo} to {hi})")
        if instant_access is not True:
            raise errors.InvalidInstantAccessRetentionDaysMalformed("(it applies only with InstantAccess=true)")
    if not instant_access:
        return {}
    return {"InstantAccess": True, **({"InstantAccessRetentionDays": days} if days is not None else {})}


# What DescribeSnapshots shows for a field a record does not set: what the cloud's responses show for it.
SNAPSHOT_DEFAULTS = {
    "SnapshotName": "", "Description": "", "Category": "Standard", "RetentionDays": 0, "ExpiredTime": "",
    "RemainTime": 0, "SnapshotType": "user", "Usage": "none", "InstantAccess": False,
    "InstantAccessRetentionDays": 0, "Encrypted": False, "KMSKeyId": "", "ProductCode": "", "SnapshotSN": "",
    "SnapshotLinkId": "", "SourceRegionId": "", "SourceSnapshotId": "", "SourceStorageType": "disk",
    "LogicalBytes": 0, "ChangedBytes": 0, "ChangedChunks": 0, "AddedBytes": 0, "AddedChunks": 0,
}
_HIDDEN = ("Seq", "Pid", "ClientToken", "ParamsHash", "Deleting")


def _remain_time(rec, now):
    """Seconds a progressing create still needs, from its progress so far (0 once it ended)."""
    if rec["Status"] != PROGRESSING:
        return 0
    try:
        done = int(rec["Progress"].rstrip("%"))
        import calendar

        started = calendar.timegm(time.strptime(rec["CreationTime"], "%Y-%m-%dT%H:%M:%SZ"))
    except (ValueError, AttributeError):
        return 0
    if done <= 0:
        return 0
    return max(0, int((now - started) * (100 - done) / done))


def _public(rec, exclusive=None, region=DEFAULT_REGION, default_group="", now=None):
    """A snapshot record as DescribeSnapshots shows it: every cloud field, the unset ones as the cloud shows
    them, and the core's sizes."""
    out = {k: v for k, v in rec.items() if k not in _HIDDEN}
    for key, value in SNAPSHOT_DEFAULTS.items():
        out.setdefault(key, value)
    accomplished = rec["Status"] == ACCOMPLISHED
    out["Tags"] = {"Tag": rec.get("Tags", [])}
    out["Available"] = accomplished  # restorable now: every accomplished local snapshot is (instant access)
    out["ResourceGroupId"] = rec.get("ResourceGroupId") or default_group
    out["RegionId"] = region
    out["RemainTime"] = _remain_time(rec, time.time() if now is None else now)
    out["FullSnapshotSizeInBytes"] = rec.get("LogicalBytes", 0) if accomplished else 0
    if exclusive is not None:
        out["ExclusiveBytes"] = exclusive
    return out


DISK_DEFAULTS = {
    "Description": "", "Status": describe.DISK_STATUS, "Category": "", "Encrypted": False, "KMSKeyId": "",
    "Portable": False, "DeleteWithInstance": False, "DeleteAutoSnapshot": False, "EnableAutoSnapshot": False,
    "EnableAutomatedSnapshotPolicy": False, "AutoSnapshotPolicyId": "", "InstanceId": "", "Device": "",
    "ZoneId": "", "SourceSnapshotId": "", "ImageId": "", "DiskChargeType": "PostPaid", "ExpiredTime": "",
    "AttachedTime": "", "DetachedTime": "", "MultiAttach": "Disabled", "ProductCode": "", "SerialNumber": "",
}


def _public_disk(rec, region=DEFAULT_REGION, default_group=""):
    """A disk record as DescribeDisks shows it: the cloud's fields (a local image is an unattached data disk
    in the default zone) beside the local ones (Path, Type file/block, Size in bytes, Format)."""
    out = {k: v for k, v in rec.items() if k != "Seq"}
    for key, value in DISK_DEFAULTS.items():
        out.setdefault(key, value)
    out["Format"] = rec.get("Format", "raw")
    out["RegionId"] = region
    out["ResourceGroupId"] = rec.get("ResourceGroupId") or default_group
    out["OperationLocks"] = {"OperationLock": rec.get("OperationLocks", [])}
    out["Tags"] = {"Tag": rec.get("Tags", [])}
    return out


def validate_region(region):
    """A region name: 1-64 lower-case letters, digits and hyphens, starting with a letter or digit.

    Raises:
        InvalidParameter.
    """
    if not isinstance(region, str) or not _REGION_RE.match(region):
        raise errors.InvalidParameter(f"(a region is 1-64 lower-case letters, digits and -, got {_shown(region)})")
    return region


class Client:
    """The Python API. One Client per repository; methods return cloud-shaped dicts.

    Args:
        repo: repository path; default ``$BLOCKSNAP_REPO`` or the per-user default
            (``~/.local/share/blocksnap/repo``), which is created on first use.
        clock: a callable returning seconds since the epoch, the time this Client takes as now (gc's
            retention, the api-server's timestamp checks); default the system clock. The CLI passes the
            clock of ``$BLOCKSNAP_NOW`` (blocksnap/clock.py).
        region: the RegionId the repository answers to; default ``$BLOCKSNAP_REGION``, else ``local``.
    Raises:
        InvalidParameter (a path that is not a str or os.PathLike, a region that is no region name),
        RepositoryNotFound (an explicit path that is no repository), RepositoryVersionUnsupported.
    """

    def __init__(self, repo=None, maintenance=False, clock=None, region=None):
        if repo is not None:
            repo = validate_path(repo, "the repository path")
        if clock is not None and not callable(clock):
            raise errors.InvalidParameter(f"(clock must be a callable returning seconds, got {_shown(clock)})")
        self.clock = clock or clocks.system
        self.region = validate_region(region or os.environ.get("BLOCKSNAP_REGION") or DEFAULT_REGION)
        self.endpoint = None  # the api-server's address, for DescribeRegions' RegionEndpoint
        self._delete_lock = threading.Lock()  # one delete at a time reads the repository's last_problems
        path = repo or default_repo_path()
        self.repo = None
        if maintenance:  # repair and upgrade: no usable catalog needed
            self.repo = Repository.open(path, need_catalog=False)
            return
        # Only the per-user default is made on first use: an explicit path or $BLOCKSNAP_REPO that
        # is no repository (a typo, an unmounted disk) must say so, not start an empty one.
        per_user_default = repo is None and not os.environ.get("BLOCKSNAP_REPO")
        if per_user_default and not os.path.exists(os.path.join(path, "config")):
            try:
                self.repo = Repository.init(path)
            except errors.RepositoryExists:
                pass  # another process made it first
        if self.repo is None:
            self.repo = Repository.open(path)

    @staticmethod
    def init(path, chunk_size=DEFAULT_CHUNK_SIZE):
        """Create a repository; returns its config.

        Raises:
            InvalidParameter (a path that is not a str or os.PathLike), InvalidChunkSize (not an int, or
            not a power of two from 4 KiB to 4 MiB), RepositoryExists.
        """
        path = validate_path(path, "the repository path")
        chunk_size = validate_chunk_size(chunk_size)
        with Repository.init(path, chunk_size) as repo:
            return dict(repo.config, Path=os.path.abspath(path), RequestId=request_id())

    def close(self):
        self.repo.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- disks ---------------------------------------------------------------------------------------
    def add_disk(self, image_path, disk_name=None, on_wait=None, format="auto", backing_dirs=(),
                 allow_dirty=False):
        """Register a disk image (raw or qcow2) or block device. Returns ``{"DiskId", "RequestId", ...}``.

        Args:
            format: "auto" (from the file's header, never its name), "raw" (the file's bytes are the disk,
                whatever its header says) or "qcow2". Recorded in the disk: a disk registered raw is
                always read raw.
            backing_dirs: directories outside the image's own directory tree that its backing files and
                external data file may be in (qcow2); by default only that tree is followed.
            allow_dirty: snapshot a qcow2 even when its dirty bit is set or a QEMU process holds it open
                for writing (the snapshot is then only as consistent as a crash).
            on_wait: called once if a running gc makes it wait (it holds the repository lock shared,
                as a create does).
        Raises:
            InvalidParameter (an image path that is not a str or os.PathLike, an unknown format),
            InvalidDiskNameMalformed, ImageUnsupported, ImageMalformed, BackingFileDenied, ImageNotFound,
            ImageUnreadable, DiskAlreadyRegistered.
        """
        image_path = validate_path(image_path, "the image path")
        if disk_name is not None and (not isinstance(disk_name, str) or not 1 <= len(disk_name) <= 128
                                      or not _encodable(disk_name)):
            raise errors.InvalidDiskNameMalformed()
        if format not in ("auto",) + images.FORMATS:
            raise errors.InvalidParameter(f"(format {_shown(str(format))}: one of auto, {', '.join(images.FORMATS)})")
        if isinstance(backing_dirs, (str, bytes)) or not all(isinstance(d, str) for d in backing_dirs):
            raise errors.InvalidParameter("(backing_dirs: a list of directory paths)")
        dirs = []
        for d in backing_dirs:
            d = validate_path(d, "a backing directory")
            if not os.path.isdir(d):
                raise errors.InvalidParameter(f"(backing directory {_shown(d)} is not a directory)")
            dirs.append(os.path.realpath(d))
        if not _encodable(os.path.realpath(image_path)) or not all(_encodable(d) for d in dirs):
            # Records are JSON text: a path whose bytes are not UTF-8 cannot be stored in one.
            raise errors.ImageUnsupported(f"({_shown(image_path)}: the path is not valid UTF-8; rename the image "
                                          "or register it through a symlink with a UTF-8 name)")
        kind, _ = raw.probe(image_path)
        # The whole chain is opened now, so a malformed image or a backing file outside the allowed
        # directories is refused before it is registered. Being in use is checked at each create.
        # A qcow2 is opened by the path it was registered by, as QEMU opens it: its relative backing file
        # names resolve next to that path (a symlink's directory, not its target's).
        given = os.path.abspath(image_path)
        with images.open_source(given, format, dirs, allow_dirty=True, deny=(self.repo.path,)) as src:
            images.check_mappable(src, self.repo.chunk_size)
            fmt, size = src.format, src.size
        extra = {}
        if fmt != "raw":
            extra["Format"] = fmt
            if given != os.path.realpath(image_path):
                extra["ImagePath"] = given
        if dirs:
            extra["BackingDirs"] = dirs
        if allow_dirty:
            extra["AllowDirty"] = True
        rec = self.repo.add_disk(image_path, disk_name, kind, size, on_wait=on_wait, extra=extra)
        return dict({k: v for k, v in rec.items() if k != "Seq"}, Format=fmt, RequestId=request_id())

    def describe_disks(self, disk_ids=None, disk_name=None, status=None, disk_type=None, lock_reason=None,
                       resource_group_id=None, page_number=None, page_size=None, max_results=None, next_token=None,
                       everything=True):
        """DescribeDisks: the registered disks that pass every filter, in registration order, one page.

        Args:
            disk_ids: a list of DiskIds (or its JSON text), at most 100; disk_name; status (``Available``: a
                local image is never attached; ``All``); disk_type (``all``, ``data``; ``system`` matches none);
                lock_reason (``security``: disks locked with :meth:`lock_disk`; ``financial`` matches none);
                resource_group_id (the default group holds every disk).
            page_number, page_size: PageNumber (from 1) and PageSize (1-100, default 10); or max_results (10-500,
                outside counts as the nearest end) and next_token. With none of them and ``everything``, every
                disk on one page (the Python method's own default; the API's is one page of 10).
        Returns:
            ``{"Disks": {"Disk": [...]}, "TotalCount", "PageNumber", "PageSize", "NextToken", "RequestId"}``.
        Raises:
            InvalidParameter, InvalidResourceGroupNotFound.
        """
        group = self._group_filter(resource_group_id)
        query = describe.DiskQuery(disk_ids, disk_name, status, disk_type, lock_reason, group)
        paging = describe.Paging(page_number, page_size, max_results, next_token, everything,
                                 describe.DISK_MAX_RESULTS, clamp=True)
        recs, total, number, size, token = describe.find_disks(self.repo, query, paging)
        default = self.repo.default_group
        disks = [_public_disk(r, self.region, default) for r in recs]
        return {"Disks": {"Disk": disks}, "TotalCount": total, "PageNumber": number, "PageSize": size,
                "NextToken": token, "RequestId": request_id()}

    def _group_filter(self, group_id):
        """A ResourceGroupId filter as the indexes hold it ("" for the default group); None for none."""
        if group_id is None:
            return None
        if not isinstance(group_id, str):
            raise errors.InvalidParameter(f"(ResourceGroupId must be a string, got {_shown(group_id)})")
        self.repo.get_group(group_id)
        return "" if group_id == self.repo.default_group else group_id

    # --- disk locks, resource groups, quotas: local administration ----------------------------------
    def lock_disk(self, disk_id):
        """Mark a disk locked for security (OperationLocks ``[{"LockReason": "security"}]``): every CreateSnapshot
        of it is InstanceLockedForSecurity until :meth:`unlock_disk`. Returns the disk as DescribeDisks shows it."""
        rec = self.repo.set_disk_lock(disk_id, "security", True)
        return dict(_public_disk(rec, self.region, self.repo.default_group), RequestId=request_id())

    def unlock_disk(self, disk_id):
        """Lift the security lock of :meth:`lock_disk`."""
        rec = self.repo.set_disk_lock(disk_id, "security", False)
        return dict(_public_disk(rec, self.region, self.repo.default_group), RequestId=request_id())

    def create_resource_group(self, name, display_name=None):
        """Add a resource group (3-50 letters, digits and hyphens; unique). Returns ``{"ResourceGroup": {...},
        "RequestId"}``; its ``ResourceGroupId`` is what CreateSnapshot's ResourceGroupId names."""
        return {"ResourceGroup": self.repo.create_group(name, display_name), "RequestId": request_id()}

    def list_resource_groups(self):
        """Every resource group, the default one first: ``{"ResourceGroups": {"ResourceGroup": [...]}, "TotalCount",
        "RequestId"}``."""
        groups = self.repo.list_groups()
        return {"ResourceGroups": {"ResourceGroup": groups}, "TotalCount": len(groups), "RequestId": request_id()}

    def delete_resource_group(self, group_id):
        """Remove an empty resource group (not the default one).

        Raises:
            InvalidResourceGroupNotFound, InvalidParameter, ResourceGroupInUse.
        """
        self.repo.delete_group(group_id)
        return {"RequestId": request_id()}

    def quotas(self):
        """The repository's quotas: ``{"Quotas": {"SnapshotsPerDisk", "ConcurrentSnapshots"}, "RequestId"}``."""
        return {"Quotas": self.repo.quotas(), "RequestId": request_id()}

    def set_quotas(self, snapshots_per_disk=None, concurrent_snapshots=None, reset=()):
        """Set quotas (1 to 2**20); names in ``reset`` go back to the defaults (256; no concurrency limit)."""
        values = {}
        for name, value in (("SnapshotsPerDisk", snapshots_per_disk), ("ConcurrentSnapshots", concurrent_snapshots)):
            if value is not None:
                values[name] = value
        for name in reset:
            values[name] = None
        return {"Quotas": self.repo.set_quotas(**values), "RequestId": request_id()}

    # --- regions and the API's own form ------------------------------------------------------------
    def check_region(self, region_id):
        """Raises InvalidRegionIdNotFound unless ``region_id`` is this repository's region."""
        if region_id != self.region:
            raise errors.InvalidRegionIdNotFound(f"({_shown(region_id)}: this repository is the region "
                                                 f"{self.region!r})")

    def describe_regions(self):
        """DescribeRegions: the one region this repository is."""
        region = {"RegionId": self.region, "LocalName": self.region, "RegionEndpoint": self.endpoint or "",
                  "Status": "available"}
        return {"Regions": {"Region": [region]}, "RequestId": request_id()}

    def call(self, action, params=None):
        """Run an API action by its name with the API's parameters, as the cloud API takes them.

        Args:
            action: the action's name (``"CreateSnapshot"``); ``blocksnap api --help`` lists them.
            params: ``{name: value}`` with the API's names (``{"DiskId": "d-...", "Tag": [{"Key": "k",
                "Value": "v"}]}``, or flat ``"Tag.1.Key"``); values as Python values or as their text
                (``"RetentionDays": "7"``, ``"SnapshotIds": '["s-..."]'``).
        Returns:
            The API's response dict, ``RequestId`` included.
        Raises:
            the action's errors (each a BlocksnapError carrying ``code``, ``http_status``, ``message`` and
            the failed request's ``request_id``); InvalidActionNotFound, InvalidParameter (a parameter the
            action does not have, or not built yet), MissingParameter.
        """
        try:
            spec = actions.get(action)
            return spec.run(self, spec.parse({} if params is None else params))
        except errors.BlocksnapError as exc:
            if exc.request_id is None:
                exc.request_id = request_id()
            raise

    # --- snapshots -----------------------------------------------------------------------------------
    def create_snapshot(self, disk_id, snapshot_name=None, description=None, retention_days=None,
                        tags=None, client_token=None, category=None, progress=None, on_wait=None,
                        resource_group_id=None, instant_access=None, instant_access_retention_days=None,
                        storage_location_arn=None):
        """CreateSnapshot. Returns ``{"SnapshotId", "RequestId"}`` once the snapshot is accomplished.

        ``on_wait`` (as for restore and verify) is called once if a running gc makes it wait.
        ``resource_group_id``: a group of :meth:`list_resource_groups` (default: the default group).
        ``instant_access`` / ``instant_access_retention_days``: recorded, as the cloud's deprecated switch; every
        accomplished local snapshot is restorable at once (``Available``). ``storage_location_arn``: the
        repository knows no storage location, so any value is refused.

        Raises:
            InvalidSnapshotNameMalformed, InvalidDescriptionMalformed, InvalidRetentionDaysMalformed,
            InvalidTagKeyMalformed, InvalidTagValueMalformed, DuplicateTagKey, InvalidTagCount,
            InvalidClientTokenMalformed, InvalidSnapshotCategoryMalformed, InvalidCategoryAndInstantAccessMalformed,
            InvalidInstantAccessRetentionDaysMalformed, InvalidStorageLocationArnMalformed,
            InvalidResourceGroupNotFound, InvalidDiskIdNotFound, InstanceLockedForSecurity,
            IncorrectDiskStatusCreatingSnapshot, QuotaExceedSnapshot, QuotaExceedConcurrentSnapshot,
            IdempotentParameterMismatch, IdempotentProcessing, ImageNotFound, ImageUnreadable,
            ImageChanged, NoSpace, CreateSnapshotFailed (also when the image is removed while it is read).
        """
        fields = {
            "SnapshotName": validate_snapshot_name(snapshot_name),
            "Description": validate_description(description),
            "RetentionDays": validate_retention_days(retention_days),
            "Tags": validate_tags(tags),
        }
        if category is not None:
            if category not in CATEGORIES:
                raise errors.InvalidSnapshotCategoryMalformed(f"({_shown(category)})")
            fields["Category"] = category
        token = validate_client_token(client_token)
        fields.update(validate_instant_access(instant_access, instant_access_retention_days, category))
        if storage_location_arn is not None:
            raise errors.InvalidStorageLocationArnMalformed(f"({_shown(storage_location_arn)}: this repository knows "
                                                            "no storage location; leave StorageLocationArn out)")
        if resource_group_id is not None and not isinstance(resource_group_id, str):
            raise errors.InvalidResourceGroupNotFound(f"({_shown(resource_group_id)})")
        fields["ResourceGroupId"] = self.repo.group_field(resource_group_id)
        fields = {k: v for k, v in fields.items() if v not in (None, [])}
        params_hash = None
        if token:
            import hashlib  # only for ClientToken requests; its import costs every command otherwise

            params_hash = hashlib.sha256(json.dumps([disk_id, fields], sort_keys=True).encode()).hexdigest()
            answer = self._token_answer(token, params_hash)
            if answer is not None:
                return answer
        rec = backup.create_snapshot(self.repo, disk_id, fields, token, params_hash, progress, on_wait)
        return {"SnapshotId": rec["SnapshotId"], "RequestId": request_id()}

    def _token_answer(self, token, params_hash):
        """A retry whose snapshot is accomplished is answered from a read (no lock: also while gc runs);
        reusing the token of an existing snapshot with other parameters is IdempotentParameterMismatch. Every
        other case is decided, from state, where the token is claimed (backup.claim_token). None: go on."""
        with self.repo.catalog.read() as txn:
            prev = txn.token(token)
            rec = txn.snapshot(prev.snapshot_id) if prev is not None else None
        if rec is None or rec.get("Deleting"):
            return None
        if prev.params_hash != params_hash:
            raise errors.IdempotentParameterMismatch()
        rec = self.repo.view(rec)
        if rec["Status"] == ACCOMPLISHED:
            return {"SnapshotId": rec["SnapshotId"], "RequestId": request_id()}
        return None

    def describe_snapshots(self, disk_id=None, snapshot_ids=None, status=None, sizes=True, snapshot_name=None,
                           snapshot_type=None, category=None, tags=None, resource_group_id=None, page_number=None,
                           page_size=None, max_results=None, next_token=None, everything=True):
        """DescribeSnapshots: the snapshots that pass every filter, oldest first, one page.

        Args:
            disk_id: the snapshots of one disk (InvalidDiskIdNotFound if it is not registered); snapshot_ids: a
                list (or its JSON text) of up to 100 SnapshotIds; snapshot_name; status (``progressing``,
                ``accomplished``, ``failed``, ``all``); snapshot_type (``auto``, ``user``, ``all``); category;
                tags (``[{"Key", "Value"}]``: a snapshot carries each; a tag without Value matches any value);
                resource_group_id.
            page_number, page_size: PageNumber (from 1) and PageSize (1-100, default 10); or max_results (1-100,
                default 10) and next_token (from the previous page's NextToken; "" after the last page). With
                none of them and ``everything``, every snapshot on one page (the Python method's own default;
                the API's is one page of 10).
            sizes: each snapshot carries LogicalBytes, AddedBytes, ..., and ExclusiveBytes (what deleting it
                would free) when true.
        Returns:
            ``{"Snapshots": {"Snapshot": [...]}, "TotalCount", "PageNumber", "PageSize", "NextToken", "RequestId"}``.
        Raises:
            InvalidParameter, InvalidDiskIdNotFound, InvalidResourceGroupNotFound.
        """
        group = self._group_filter(resource_group_id)
        query = describe.SnapshotQuery(disk_id, snapshot_ids, snapshot_name, status, snapshot_type, category, tags,
                                       group)
        paging = describe.Paging(page_number, page_size, max_results, next_token, everything)
        if query.disk_id is not None:
            self.repo.get_disk(query.disk_id)
        recs, total, number, size, token = describe.find_snapshots(self.repo, query, paging)
        out = []
        now = time.time()
        default = self.repo.default_group
        with self.repo.catalog.read() as txn:
            for rec in recs:
                excl = self.repo.exclusive_bytes(txn, rec) if sizes else None
                out.append(_public(rec, excl, self.region, default, now))
        return {"Snapshots": {"Snapshot": out}, "TotalCount": total, "PageNumber": number, "PageSize": size,
                "NextToken": token, "RequestId": request_id()}

    def delete_snapshot(self, snapshot_id):
        """DeleteSnapshot. Returns ``{"RequestId", "FreedChunks", "ReclaimedBytes"}``, and ``Problems`` when the
        check before removing data found a count that was wrong (that data was kept)."""
        with self._delete_lock:
            freed, reclaimed = self.repo.delete_snapshot(snapshot_id)
            problems = self.repo.last_problems
        out = {"RequestId": request_id(), "FreedChunks": freed, "ReclaimedBytes": reclaimed}
        if problems:  # the mark kept data a wrong count would have removed
            out["Problems"] = problems
        return out

    def forget(self, disk_id=None, keep_last=0, keep_hourly=0, keep_daily=0, keep_weekly=0, keep_monthly=0,
               keep_yearly=0, keep_tags=(), dry_run=False):
        """Delete the accomplished snapshots a keep policy does not keep (restic's ``forget --keep-*``; the rules
        are blocksnap.retention's), per disk, or of one disk.

        Returns:
            ``{"Keep": [{"SnapshotId", "SourceDiskId", "CreationTime", "Reasons"}], "Remove": [...], "Removed",
            "FreedChunks", "ReclaimedBytes", "DryRun", "RequestId"}``; with ``dry_run`` nothing is deleted.
        Raises:
            InvalidParameter (a bad count, or no rule at all: that would remove everything),
            InvalidDiskIdNotFound; what DeleteSnapshot raises.
        """
        from . import retention

        policy = {"last": keep_last, "hourly": keep_hourly, "daily": keep_daily, "weekly": keep_weekly,
                  "monthly": keep_monthly, "yearly": keep_yearly}
        keep_tags = list(keep_tags or ())
        retention.validate(policy, keep_tags)
        if disk_id is not None:
            self.repo.get_disk(disk_id)
        # The records themselves (with Seq: snapshots made within one second keep their order).
        snaps = [dict(r, Tags={"Tag": r.get("Tags", [])}) for r in self.repo.list_snapshots(disk_id)]
        keep, remove = retention.plan(snaps, policy, keep_tags)

        def row(rec, reasons):
            return {"SnapshotId": rec["SnapshotId"], "SourceDiskId": rec["SourceDiskId"],
                    "CreationTime": rec["CreationTime"], "Reasons": reasons}

        out = {"Keep": [row(*k) for k in keep], "Remove": [row(*r) for r in remove], "Removed": 0,
               "FreedChunks": 0, "ReclaimedBytes": 0, "DryRun": bool(dry_run)}
        if not dry_run:
            for rec, _ in remove:
                try:
                    done = self.delete_snapshot(rec["SnapshotId"])
                except errors.InvalidSnapshotIdNotFound:
                    continue  # deleted meanwhile by someone else
                out["Removed"] += 1
                out["FreedChunks"] += done["FreedChunks"]
                out["ReclaimedBytes"] += done["ReclaimedBytes"]
        out["RequestId"] = request_id()
        return out

    def restore(self, snapshot_id, output, in_place=False, progress=None, sync=False, on_wait=None, format="raw",
                compress=False):
        """Write a snapshot to ``output`` (see :func:`blocksnap.restore.restore_snapshot`): ``format`` "raw" or
        "qcow2", ``compress`` (qcow2 only) for zstd-compressed clusters.

        Raises:
            InvalidParameter for an unknown format or compress without qcow2; what restore_snapshot raises.
        """
        from . import restore as restoring  # imported on use: the CLI's other commands start faster

        if format not in images.FORMATS:
            raise errors.InvalidParameter(f"(format {_shown(str(format))}: one of {', '.join(images.FORMATS)})")
        if compress and format != "qcow2":
            raise errors.InvalidParameter("(compress needs format qcow2: a raw image has no compressed form)")
        out = restoring.restore_snapshot(self.repo, snapshot_id, output, in_place, progress, sync, on_wait,
                                         format=format, compress=bool(compress))
        return dict(out, RequestId=request_id())

    def verify(self, snapshot_id=None, progress=None, on_wait=None):
        """Re-read and check everything stored (see :func:`blocksnap.verify.verify`). ``Ok`` is false on any
        damage or inconsistency."""
        from . import verify as verifying

        if self.repo.catalog is None:  # a Client opened for maintenance: the catalog is unusable
            problem = getattr(self, "catalog_problem", None) or "the catalog is not open"
            out = verifying.without_catalog(self.repo, str(problem), snapshot_id)
        else:
            if snapshot_id is not None:
                self.repo.get_snapshot(snapshot_id)
            out = verifying.verify(self.repo, snapshot_id, progress, on_wait)
        out["Ok"] = not out["Damaged"] and not out["Problems"]
        return dict(out, RequestId=request_id())

    def gc(self, dry_run=False, on_wait=None, max_unused=None, on_readers=None, now=None):
        """Expire snapshots past RetentionDays, remove old failed records, reclaim unreferenced data.

        Args:
            max_unused: also repack packs whose unused share is above this fraction (0 to 1): their live
                records are copied into new packs and the old packs removed whole.
            on_wait: called if gc must first wait for running creates.
            on_readers: called if restores or verifies that started before gc hold data it removes.
            now: the time gc takes as now (seconds since the epoch), for retention; default the Client's clock.
        """
        from .store import gc

        if now is None:
            now = self.clock()
        if max_unused is not None and (isinstance(max_unused, bool) or not isinstance(max_unused, (int, float))
                                       or not 0 <= max_unused <= 1):
            raise errors.InvalidParameter(f"(max_unused must be a fraction from 0 to 1, got {_shown(max_unused)})")
        if dry_run:
            p = gc.dry_run(self.repo, on_wait, now=now, max_unused=max_unused)
        else:
            p = gc.execute(self.repo, on_wait, on_readers, now=now, max_unused=max_unused)
        return {
            "DryRun": dry_run,
            "ExpiredSnapshots": p["ExpiredSnapshots"],
            "FailedRecords": p["FailedRecords"],
            "DeadChunks": len(p["DeadChunks"]),
            "DeadSegments": len(p["DeadSegments"]),
            "DeadBytes": p["DeadBytes"],
            "UnnamedRecords": len(p["UnnamedRecords"]),
            "UnnamedBytes": p["UnnamedBytes"],
            "OrphanPacks": len(p["OrphanPacks"]),
            "OrphanBytes": p["OrphanBytes"],
            "RepackPacks": len(p["RepackPacks"]),
            "RepackBytes": p["RepackBytes"],
            "PendingReclaim": p["PendingReclaim"],
            "Repacked": p.get("Repacked", {"Packs": 0, "Records": 0, "Bytes": 0}),
            "DiskObjectsRemoved": p.get("DiskObjectsRemoved", 0),
            "EmptyDirsRemoved": p.get("EmptyDirsRemoved", 0),
            "Problems": p.get("Problems", []),
            "FreedBytes": p.get("FreedBytes", 0),
            "RequestId": request_id(),
        }

    def repair(self, progress=None, on_wait=None):
        """Rebuild the catalog from the store (see :func:`blocksnap.store.rebuild.repair`); needs a Client
        made with ``maintenance=True`` when the catalog is missing or unreadable."""
        from .store import rebuild

        if self.repo.version < 2:
            raise errors.UpgradeRequired(found=self.repo.version, current=2)
        return dict(rebuild.repair(self.repo, progress, on_wait), RequestId=request_id())

    def upgrade(self, on_wait=None):
        """Bring the repository to the current format version (see :mod:`blocksnap.store.upgrade`)."""
        from .store import upgrade

        return dict(upgrade.upgrade(self.repo, on_wait), RequestId=request_id())


def _action_method(spec):
    """``Client.<Action>(**params)``: ``call(<Action>, params)`` under the action's own name."""
    def method(self, **params):
        return self.call(spec.name, params)

    method.__name__ = spec.name
    method.__qualname__ = f"Client.{spec.name}"
    lines = [f"{spec.name}: {spec.help}", "", "Keyword arguments are the API's parameters (see Client.call):"]
    for p in spec.params:
        flags = ", required" if p.required else ""
        local = "" if p.local == actions.SUPPORTED else f" [{p.local}]"
        lines.append(f"    {p.name} ({p.type}{flags}): {p.help}{local}")
    method.__doc__ = "\n".join(lines)
    return method


for _spec in actions.ACTIONS.values():  # one method per action of the table
    setattr(Client, _spec.name, _action_method(_spec))
del _spec
