"""The whole blocksnap exception tree.

Every error carries, as class attributes, the API error code (the cloud
API's own code where one exists, e.g. ``InvalidSnapshotName.Malformed``),
the HTTP status that API would answer with, the CLI exit code and a message
template. Codes are unique across the tree (tests/test_errors.py checks).
"""

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

    def __init__(self, detail=None, **fields):
        self.detail = detail
        self.fields = fields
        text = self.message.format(**fields) if fields else self.message
        if detail:
            text = f"{text} {detail}"
        super().__init__(text)

    def to_dict(self, request_id=None):
        """The error as the cloud API's JSON error body."""
        out = {"Code": self.code, "Message": str(self), "HttpStatus": self.http_status}
        if request_id:
            out["RequestId"] = request_id
        return out


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


class InvalidDiskNameMalformed(InvalidParameter):
    code = "InvalidDiskName.Malformed"
    message = "The specified DiskName is wrongly formed."


class InvalidChunkSize(InvalidParameter):
    code = "InvalidChunkSize"
    message = "The chunk size must be a power of two from 4 KiB to 4 MiB."


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
    message = "The image is not a regular file or block device."


class RestoreFailed(BlocksnapError):
    code = "RestoreSnapshot.Failed"
    http_status = 500
    exit_code = EXIT_FAILED
    message = "The restore failed."


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


class RepositoryFull(RepositoryError):
    code = "Repository.MapFull"
    message = "The repository catalog reached its map size; raise BLOCKSNAP_MAP_SIZE."


class StaleBuild(BlocksnapError, ImportError):
    code = "Native.StaleBuild"
    message = "The C extension is stale (ABI {found}, expected {expected}): reinstall blocksnap (pip install .)."


def all_error_classes():
    """Every class in the tree, root included, in a stable order."""
    seen, todo = [], [BlocksnapError]
    while todo:
        cls = todo.pop(0)
        if cls not in seen:
            seen.append(cls)
            todo.extend(cls.__subclasses__())
    return seen
