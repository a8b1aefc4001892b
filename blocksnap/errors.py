"""The whole blocksnap exception tree, and the one table that turns other failures into it.

Every error carries, as class attributes, the API error code (the cloud
API's own code where one exists, e.g. ``InvalidSnapshotName.Malformed``),
the HTTP status that API would answer with, the CLI exit code and a message
template. Codes are unique across the tree (tests/test_errors.py checks).

:func:`translate` is the only place where an ``OSError``, an LMDB error or
a C-core status becomes one of these classes (py-lmdb's ``_error_map`` is
the model): ``ERRNO_TABLE``, ``LMDB_TABLE`` and ``_native``'s status table
name the class and a remediation hint for each.
"""
import errno as _errno
import os as _os
import string

# CLI exit codes, by family. 1 is kept for "verify found damage".
EXIT_DAMAGED = 1
EXIT_INVALID = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_FAILED = 5
EXIT_REPOSITORY = 6


class BlocksnapError(Exception):
    """Root of all blocksnap errors."""

    code = "InternalError"
    http_status = 500
    exit_code = EXIT_FAILED
    message = "The request processing has failed due to some unknown error."
    request_id = None  # the RequestId of the API request that failed (Client.call and the api-server set it)

    def __init__(self, detail=None, **fields):
        self.detail = detail
        self.fields = fields
        if _template_fields(self.message) <= fields.keys():
            text = self.message.format(**fields)
        else:
            # Raised without the fields its template names: never print the template raw
            # ("ABI {found}, ..."); say what the nearest class with a plain message says.
            text = next(cls.__dict__["message"] for cls in type(self).__mro__
                        if "message" in cls.__dict__ and not _template_fields(cls.__dict__["message"]))
        if detail:
            text = f"{text} {detail}"
        self.message = text  # the instance's whole message; the class attribute stays the template
        super().__init__(text)

    def to_dict(self, request_id=None):
        """The error as the cloud API's JSON error body (with ``request_id``, else the error's own if set)."""
        out = {"Code": self.code, "Message": str(self), "HttpStatus": self.http_status}
        request_id = request_id or self.request_id
        if request_id:
            out["RequestId"] = request_id
        return out


def _template_fields(template):
    """The names of the fields a message template refers to (``{found}``, ``{a.b}`` -> ``a``)."""
    names = set()
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None:
            names.add(name.split(".", 1)[0].split("[", 1)[0])
    return names


class InternalError(BlocksnapError):
    pass


# --- request validation (400) ---------------------------------------------------------------------
class InvalidParameter(BlocksnapError, ValueError):
    code = "InvalidParameter"
    http_status = 400
    exit_code = EXIT_INVALID
    message = "The specified parameter is not valid."


class InvalidSnapshotNameMalformed(InvalidParameter):
    code = "InvalidSnapshotName.Malformed"
    message = "The specified SnapshotName is wrongly formed."


class InvalidDescriptionMalformed(InvalidParameter):
    code = "InvalidDescription.Malformed"
    http_status = 404  # sic: the cloud API documents 404 for this code
    message = "The specified description is wrongly formed."


class InvalidRetentionDaysMalformed(InvalidParameter):
    code = "InvalidRetentionDays.Malformed"
    message = "The specified RetentionDays is not valid."


class InvalidTagKeyMalformed(InvalidParameter):
    code = "InvalidTagKey.Malformed"
    message = "The specified Tag.n.Key is not valid."


class InvalidTagValueMalformed(InvalidParameter):
    code = "InvalidTagValue.Malformed"
    message = "The specified Tag.n.Value is not valid."


class DuplicateTagKey(InvalidParameter):
    code = "Duplicate.TagKey"
    message = "The Tag.N.Key contain duplicate key."


class InvalidTagCount(InvalidParameter):
    code = "InvalidTagCount"
    message = "The maximum number of tags is 20."


class InvalidClientTokenMalformed(InvalidParameter):
    code = "InvalidClientToken.Malformed"
    http_status = 403
    message = ("The specified clientToken is improperly formatted. It must contain only ASCII "
               "characters and must not exceed 64 characters in length.")


class InvalidSnapshotCategoryMalformed(InvalidParameter):
    code = "InvalidSnapshotCategory.Malformed"
    http_status = 403
    message = "The specified Category is not valid."


class InvalidCategoryAndInstantAccessMalformed(InvalidParameter):
    code = "InvalidCategoryAndInstantAccess.Malformed"
    http_status = 403
    message = "The snapshot Category and InstantAccess can't be used together."


class InvalidInstantAccessRetentionDaysMalformed(InvalidParameter):
    code = "InvalidInstantAccessRetentionDays.Malformed"
    http_status = 403
    message = "The specified InstantAccessRetentionDays is not valid."


class InvalidStorageLocationArnMalformed(InvalidParameter):
    code = "InvalidStorageLocationArn.Malformed"
    http_status = 403
    message = "The specified parameter StorageLocationArn is wrongly formed."


class DryRunOperation(InvalidParameter):
    code = "DryRunOperation"
    message = "Request validation has been passed with DryRun flag set."


class InvalidDiskNameMalformed(InvalidParameter):
    code = "InvalidDiskName.Malformed"
    message = "The specified DiskName is wrongly formed."


class InvalidChunkSize(InvalidParameter):
    code = "InvalidChunkSize"
    message = "The chunk size must be a power of two from 4 KiB to 4 MiB."


class MissingParameter(InvalidParameter):
    code = "MissingParameter"
    message = 'The input parameter "{name}" that is mandatory for processing this request is not supplied.'


# --- missing things (404) ---------------------------------------------------------------------------
class NotFound(BlocksnapError, LookupError):
    code = "NotFound"
    http_status = 404
    exit_code = EXIT_NOT_FOUND
    message = "The specified resource does not exist."


class InvalidDiskIdNotFound(NotFound):
    code = "InvalidDiskId.NotFound"
    message = "The specified DiskId does not exist."


class InvalidSnapshotIdNotFound(NotFound):
    code = "InvalidSnapshotId.NotFound"
    message = "The specified SnapshotId does not exist."


class ImageNotFound(NotFound):
    code = "InvalidImage.NotFound"
    message = "The image file does not exist."


class InvalidActionNotFound(NotFound):
    code = "InvalidAction.NotFound"
    message = "Specified api is not found, please check your url and method."


class InvalidResourceGroupNotFound(NotFound):
    code = "InvalidResourceGroup.NotFound"
    message = "The ResourceGroup provided does not exist in our records."


class InvalidRegionIdNotFound(NotFound):
    code = "InvalidRegionId.NotFound"
    message = "The specified RegionId does not exist."


# --- state conflicts (403) --------------------------------------------------------------------------
class Conflict(BlocksnapError):
    code = "IncorrectStatus"
    http_status = 403
    exit_code = EXIT_CONFLICT
    message = "The current status of the resource does not support this operation."


class IncorrectDiskStatusCreatingSnapshot(Conflict):
    code = "IncorrectDiskStatus.CreatingSnapshot"
    message = "A previous snapshot creation is in process."


class IncorrectSnapshotStatus(Conflict):
    code = "IncorrectSnapshotStatus"
    message = "The current status of the snapshot does not support this operation."


class IdempotentParameterMismatch(Conflict):
    code = "IdempotentParameterMismatch"
    message = "The specified clientToken is used."


class IdempotentProcessing(Conflict):
    code = "IdempotentProcessing"
    message = "The previous idempotent request(s) is still processing."


class InstanceLockedForSecurity(Conflict):
    code = "InstanceLockedForSecurity"
    message = "The disk attached instance is locked due to security."


class QuotaExceedSnapshot(Conflict):
    code = "QuotaExceed.Snapshot"
    message = "The snapshot quota exceeds."


class QuotaExceedConcurrentSnapshot(Conflict):
    code = "QuotaExceed.ConcurrentSnapshotQuota"
    message = ("The number of snapshots being created for the disk {disk} has exceeded the concurrent quota "
               "({quota}). Please wait for the previous snapshots to complete before trying again.")


class ResourceGroupInUse(Conflict):
    code = "DeleteConflict.ResourceGroup.Resource"
    message = "The resource group still holds resources; delete them or move them to another group first."


class DiskAlreadyRegistered(Conflict):
    code = "InvalidDisk.Duplicate"
    message = "The image is already registered as a disk."


class DiskHasSnapshots(Conflict):
    code = "DiskHasSnapshots"
    message = "The disk still has snapshots; delete them first."


class OutputExists(Conflict):
    code = "InvalidOutput.Exists"
    message = "The restore target exists; pass --in-place to write into it, or choose a new path."


# --- operations that failed (500/403) ---------------------------------------------------------------
class CreateSnapshotFailed(BlocksnapError):
    code = "CreateSnapshot.Failed"
    http_status = 403
    exit_code = EXIT_FAILED
    message = "The process of creating snapshot is failed."


class ImageChanged(CreateSnapshotFailed):
    code = "CreateSnapshot.ImageChanged"
    message = "The image changed while it was read; no torn snapshot was recorded."


class NoSpace(CreateSnapshotFailed):
    code = "CreateSnapshot.NoSpace"
    message = "The repository's file system is full; nothing of this snapshot was kept."


class ImageUnreadable(BlocksnapError):
    code = "InvalidImage.Unreadable"
    http_status = 403
    exit_code = EXIT_FAILED
    message = "The image cannot be read."


class ImageUnsupported(BlocksnapError):
    code = "InvalidImage.Unsupported"
    http_status = 400
    exit_code = EXIT_INVALID
    message = ("The image is not something blocksnap can read: not a regular file or block device, or in a format "
               "or with a feature it does not support.")


class ImageMalformed(InvalidParameter):
    code = "InvalidImage.Malformed"
    message = "The image's metadata is damaged or inconsistent; nothing was read from it."


class ImageInUse(Conflict):
    code = "InvalidImage.InUse"
    message = ("The image is in use or was not closed cleanly (qcow2 dirty bit, or QEMU holds its write lock); "
               "stop the VM, or register the disk with --allow-dirty to snapshot it as it is.")


class BackingFileDenied(BlocksnapError):
    code = "InvalidImage.BackingFileDenied"
    http_status = 403
    exit_code = EXIT_INVALID
    message = ("A backing or data file of the image lies outside the image's own directory tree; register the "
               "disk with --backing-dir naming the directory it may be read from.")


class ImageFormatChanged(CreateSnapshotFailed):
    code = "InvalidImage.FormatChanged"
    message = "The image is no longer in the format it was registered with."


class RestoreFailed(BlocksnapError):
    code = "RestoreSnapshot.Failed"
    http_status = 500
    exit_code = EXIT_FAILED
    message = "The restore failed."


# --- the api-server's protocol: requests, signatures, keys (docs/API.md, "api-server") ----------------------
class MalformedRequest(InvalidParameter):
    code = "InvalidRequest.Malformed"
    message = "The request is not a well-formed HTTP request of this API."


class RequestTooLarge(InvalidParameter):
    code = "RequestEntityTooLarge"
    http_status = 413
    message = "The request is larger than this API accepts."


class UnsupportedHTTPMethod(InvalidParameter):
    code = "UnsupportedHTTPMethod"
    message = "Specified HTTP method is not supported; use GET or POST."


class InvalidVersion(InvalidParameter):
    code = "InvalidVersion"
    message = "Specified parameter Version is not valid."


class SignatureError(BlocksnapError):
    """The request's signature cannot be checked: a family whose own code is the cloud's for an incomplete one."""
    code = "IncompleteSignature"
    http_status = 400
    exit_code = EXIT_INVALID
    message = "The request signature does not conform to Aliyun standards."


class SignatureDoesNotMatch(SignatureError):
    code = "SignatureDoesNotMatch"
    message = "Specified signature is not matched with our calculation."


class MissingAccessKeyId(SignatureError):
    code = "MissingAccessKeyId"
    message = "AccessKeyId is mandatory for this action."


class InvalidTimeStampExpired(SignatureError):
    code = "InvalidTimeStamp.Expired"
    message = "Specified time stamp or date value is expired."


class InvalidTimeStampFormat(SignatureError):
    code = "InvalidTimeStamp.Format"
    message = "Specified time stamp or date value is not well formatted."


class SignatureNonceUsed(SignatureError):
    code = "SignatureNonceUsed"
    message = "Specified signature nonce was used already."


class InvalidAccessKeyIdNotFound(NotFound):
    code = "InvalidAccessKeyId.NotFound"
    message = "Specified access key is not found."


class Throttling(BlocksnapError):
    code = "Throttling"
    http_status = 403
    exit_code = EXIT_CONFLICT
    message = "Request was denied due to user flow control."


class ApiKeysUnusable(BlocksnapError):
    code = "ApiKeys.Unusable"
    http_status = 500
    exit_code = EXIT_FAILED
    message = "The API keys file cannot be used."


# --- the repository itself --------------------------------------------------------------------------
class RepositoryError(BlocksnapError):
    code = "Repository.Error"
    http_status = 500
    exit_code = EXIT_REPOSITORY
    message = "The repository cannot be used."


class RepositoryNotFound(RepositoryError):
    code = "Repository.NotFound"
    message = "No blocksnap repository at this path (run 'blocksnap init')."


class RepositoryExists(RepositoryError):
    code = "Repository.Exists"
    message = "A repository already exists at this path."


class RepositoryVersionUnsupported(RepositoryError):
    code = "Repository.VersionUnsupported"
    message = "The repository was written by a newer blocksnap (format version {found}, this one reads {supported})."


class RepositoryDamaged(RepositoryError):
    code = "Repository.Damaged"
    exit_code = EXIT_DAMAGED
    message = "The repository is damaged."


class CatalogDamaged(RepositoryDamaged):
    code = "Repository.CatalogDamaged"
    message = ("The repository's catalog is damaged; 'blocksnap verify' names what it affects and "
               "'blocksnap repair' rebuilds it from the store.")


class CatalogMissing(RepositoryDamaged):
    code = "Repository.CatalogMissing"
    message = "The repository's catalog is missing; 'blocksnap repair' rebuilds it from the store."


class CatalogStale(RepositoryDamaged):
    code = "Repository.CatalogStale"
    message = ("The catalog is not an index of this repository (an interrupted repair or upgrade, or a "
               "catalog copied from elsewhere); 'blocksnap repair' rebuilds it from the store.")


class StoreDamaged(RepositoryDamaged):
    code = "Repository.StoreDamaged"
    message = "An object of the repository's store is damaged."


class RepositoryFull(RepositoryError):
    code = "Repository.MapFull"
    message = "The repository catalog reached its map size; raise BLOCKSNAP_MAP_SIZE."


class RepositoryReadOnly(RepositoryError):
    code = "Repository.ReadOnly"
    message = ("The repository cannot be written here (read-only media or no write permission): only list, "
               "describe, restore and verify work.")


class RepositoryNoSpace(RepositoryError):
    code = "Repository.NoSpace"
    message = "The repository's file system is full."


class RepositoryIOError(RepositoryError):
    code = "Repository.IOError"
    message = "The repository's storage failed a read or a write."


class DataDamaged(RepositoryDamaged, ValueError):
    code = "Repository.DataDamaged"
    message = "Stored bytes do not decode to the length their record gives."


class NativeArgument(InternalError, ValueError):
    code = "Native.InvalidArgument"
    message = "The C core refused its arguments (a bug in blocksnap)."


class NativeOutOfMemory(BlocksnapError, MemoryError):
    code = "Native.OutOfMemory"
    message = "The C core ran out of memory."


class UpgradeRequired(RepositoryError):
    code = "Repository.UpgradeRequired"
    message = ("The repository is in format version {found}; run 'blocksnap upgrade' to bring it to "
               "version {current} (it keeps every snapshot and chunk).")


class StaleBuild(BlocksnapError, ImportError):
    code = "Native.StaleBuild"
    message = "The C extension is stale (ABI {found}, expected {expected}): reinstall blocksnap (pip install .)."


class NativeMissing(StaleBuild):
    code = "Native.Missing"
    message = ("The C extension is missing: build and install blocksnap with 'pip install .' (needs libxxhash-dev, "
               "libzstd-dev and a C compiler).")


# --- the translation table ---------------------------------------------------------------------------
# errno -> (class, hint), for the repository's own storage.
ERRNO_TABLE = {
    _errno.ENOSPC: (RepositoryNoSpace, "free space on the repository's file system"),
    _errno.EDQUOT: (RepositoryNoSpace, "the disk quota is exhausted"),
    _errno.EROFS: (RepositoryReadOnly, None),
    _errno.EACCES: (RepositoryError, "permission denied"),
    _errno.EPERM: (RepositoryError, "operation not permitted (an immutable file?)"),
    _errno.EIO: (RepositoryIOError, "the device reported an I/O error"),
    _errno.EMFILE: (RepositoryError, "the process is out of file descriptors"),
    _errno.ENFILE: (RepositoryError, "the system is out of file descriptors"),
    _errno.ENOMEM: (RepositoryError, "out of memory"),
}
# What an errno means depends on what was being read or written: op -> {errno, or None for any other: class}.
OP_TABLE = {
    # CreateSnapshot has a code of its own for a full disk.
    "create": {_errno.ENOSPC: NoSpace, _errno.EDQUOT: NoSpace},
    # Reading the image being snapshotted: not the repository's fault.
    "read-image": {_errno.ENOENT: ImageNotFound, None: ImageUnreadable},
    "scan-image": {None: CreateSnapshotFailed},
    # A pack the index names that is gone or unreadable is damage; running out of descriptors is not.
    "read-pack": {_errno.ENOENT: StoreDamaged, _errno.EIO: StoreDamaged, _errno.EISDIR: StoreDamaged,
                  _errno.EACCES: StoreDamaged},
}
# C core status -> (class, hint); BS_EIO and BS_ESHORT stay OSErrors carrying their errno (the caller's op
# decides what they mean), BS_EDAMAGED is reported per chunk with NATIVE_DAMAGE.
NATIVE_STATUS = {
    "BS_EINVAL": (NativeArgument, None),
    "BS_EDATA": (DataDamaged, None),
    "BS_ENOMEM": (NativeOutOfMemory, None),
}
NATIVE_DAMAGE = {
    "BS_DAMAGE_SHORT": "the pack ends inside the record",
    "BS_DAMAGE_HEADER": "record header does not match the index",
    "BS_DAMAGE_DECODE": "stored bytes do not decode",
    "BS_DAMAGE_HASH": "content does not hash to its id",
    "BS_DAMAGE_INDEX": "its index entry gives lengths larger than a chunk",
}
# py-lmdb exception class name -> (class, hint)
LMDB_TABLE = {
    "MapFullError": (RepositoryFull, "raise BLOCKSNAP_MAP_SIZE"),
    "CorruptedError": (CatalogDamaged, None),
    "PageNotFoundError": (CatalogDamaged, None),
    "InvalidError": (CatalogDamaged, "data.mdb is not an LMDB file"),
    "VersionMismatchError": (CatalogDamaged, "data.mdb was written by another LMDB version"),
    "IncompatibleError": (CatalogDamaged, None),
    "BadValsizeError": (InternalError, None),
    "ReadonlyError": (RepositoryReadOnly, None),
    "ReadersFullError": (RepositoryError, "too many processes read the catalog at once"),
    "DiskError": (RepositoryIOError, None),
    "MemoryError": (RepositoryError, "out of memory"),
}
# py-lmdb reports system errors as plain lmdb.Error with strerror's text: find the errno back.
_STRERROR = {_os.strerror(e): e for e in sorted(_errno.errorcode, reverse=True)}


def _lmdb_errno(exc):
    text = str(exc)
    return _STRERROR.get(text.rsplit(": ", 1)[-1].strip())


def _nearly_full(path):
    """True if the file system of ``path`` has (almost) no room left: LMDB turns a short write into EIO."""
    try:
        st = _os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20) or st.f_bavail < max(16, st.f_blocks // 1000)


def translate(exc, context="", op=None, path=None):
    """The BlocksnapError for ``exc`` (an OSError, an lmdb.Error, or a BlocksnapError, returned as it is).

    Args:
        context: what was being done, for the message ("catalog commit", "pack 3fa9...").
        op: the API operation ("create", ...), where the API has a code of its own (CreateSnapshot.NoSpace).
        path: a path on the file system involved, to tell a full disk from an I/O error.
    """
    if isinstance(exc, BlocksnapError):
        if op == "create" and type(exc) is RepositoryNoSpace:
            return NoSpace(exc.detail)
        return exc
    where = f"{context}: " if context else ""
    if isinstance(exc, OSError):
        err = exc.errno
        text = exc.strerror or str(exc)
        if exc.filename:
            text = f"{text}: {exc.filename}"
        by_op = OP_TABLE.get(op, {})
        if err in by_op or None in by_op:
            return by_op.get(err, by_op.get(None))(f"({where}{text})")
        cls, hint = ERRNO_TABLE.get(err, (RepositoryError, None))
    else:
        # A system error LMDB passed on (its text is strerror's) decides; else the LMDB error's class.
        err = _lmdb_errno(exc)
        text = str(exc)
        if err == _errno.EIO and path is not None and _nearly_full(path):
            err = _errno.ENOSPC  # LMDB reports a write the full disk cut short as EIO
        if err in ERRNO_TABLE:
            cls, hint = ERRNO_TABLE[err]
        else:
            cls, hint = LMDB_TABLE.get(type(exc).__name__, (RepositoryError, None))
    if op == "create" and cls is RepositoryNoSpace:
        cls = NoSpace
    detail = f"({where}{text}{'; ' + hint if hint else ''})"
    return cls(detail)


def from_native(status_name, detail=None):
    """The error for a C core status (``NATIVE_STATUS``)."""
    cls, hint = NATIVE_STATUS.get(status_name, (InternalError, None))
    text = "; ".join(t for t in (detail, hint) if t)
    return cls(f"({text})" if text else None)


def all_error_classes():
    """Every class in the tree, root included, in a stable order."""
    seen, todo = [], [BlocksnapError]
    while todo:
        cls = todo.pop(0)
        if cls not in seen:
            seen.append(cls)
            todo.extend(cls.__subclasses__())
    return seen
