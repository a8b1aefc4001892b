"""The exception tree (blocksnap/errors.py): unique API codes, HTTP statuses and exit codes, and the
codes and statuses of the cloud CreateSnapshot API reference."""
import glob
import os
import re
import subprocess
import sys

import pytest

from blocksnap import errors

ALL = errors.all_error_classes()

# The CreateSnapshot error table of the cloud API reference (Alibaba Cloud ECS, "Kode kesalahan"),
# copied from /work/shared/reference/000_20e25ac529617fb2.txt: code -> (HTTP statuses it is listed
# with, message). Some codes are listed twice, with 400 and 403; either is accepted.
REFERENCE = {
    "InvalidSnapshotName.Malformed": ({400}, "The specified SnapshotName is wrongly formed."),
    "InvalidDescription.Malformed": ({404}, "The specified description is wrongly formed."),
    "InvalidRetentionDays.Malformed": ({400}, "The specified RetentionDays is not valid."),
    "InvalidTagKey.Malformed": ({400}, "The specified Tag.n.Key is not valid."),
    "InvalidTagValue.Malformed": ({400}, "The specified Tag.n.Value is not valid."),
    "Duplicate.TagKey": ({400}, "The Tag.N.Key contain duplicate key."),
    "IncorrectDiskStatus.CreatingSnapshot": ({403}, "A previous snapshot creation is in process."),
    "IdempotentParameterMismatch": ({403}, "The specified clientToken is used."),
    "IdempotentProcessing": ({403}, "The previous idempotent request(s) is still processing."),
    "InvalidClientToken.Malformed": ({403}, ("The specified clientToken is improperly formatted. It must "
                                             "contain only ASCII characters and must not exceed 64 "
                                             "characters in length.")),
    "InvalidDiskId.NotFound": ({404}, "The specified DiskId does not exist."),
    "CreateSnapshot.Failed": ({400, 403}, "The process of creating snapshot is failed."),
    "InvalidSnapshotCategory.Malformed": ({403}, "The specified Category is not valid."),
    "InstanceLockedForSecurity": ({403}, "The disk attached instance is locked due to security."),
    "QuotaExceed.Snapshot": ({403}, "The snapshot quota exceeds."),
    "InvalidCategoryAndInstantAccess.Malformed": ({403}, ("The snapshot Category and InstantAccess can't be used "
                                                          "together.")),
    "InvalidInstantAccessRetentionDays.Malformed": ({403}, "The specified InstantAccessRetentionDays is not valid."),
    "InvalidStorageLocationArn.Malformed": ({403}, "The specified parameter StorageLocationArn is wrongly formed."),
    "InvalidResourceGroup.NotFound": ({404}, "The ResourceGroup provided does not exist in our records."),
}
# Codes whose reference message has printf fields (%s): the class's template has named fields in their place.
REFERENCE_TEMPLATES = {
    "QuotaExceed.ConcurrentSnapshotQuota": ({403}, ("The number of snapshots being created for the disk %s has "
                                                    "exceeded the concurrent quota (%s). Please wait for the previous "
                                                    "snapshots to complete before trying again.")),
}
# shared/ lies beside the checkout (as for a developer, and for CI beside its clone).
REFERENCE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "shared", "reference")


def by_code(code):
    found = [cls for cls in ALL if cls.code == code]
    assert len(found) == 1, f"{code}: {found}"
    return found[0]


def test_tree_is_rooted_and_walk_is_complete():
    """all_error_classes starts at BlocksnapError and lists every error class defined in the module."""
    assert ALL[0] is errors.BlocksnapError
    defined = {obj for obj in vars(errors).values()
               if isinstance(obj, type) and issubclass(obj, errors.BlocksnapError)}
    assert set(ALL) == defined
    assert len(ALL) == len(set(ALL))


def test_api_codes_are_unique():
    """No two raisable error classes share an API code; the abstract root only lends its defaults
    (InternalError's code, 500) to classes that do not set their own."""
    concrete = [cls for cls in ALL if cls is not errors.BlocksnapError]
    codes = [cls.code for cls in concrete]
    dups = sorted({c for c in codes if codes.count(c) > 1})
    assert dups == []
    assert errors.BlocksnapError.code == errors.InternalError.code == "InternalError"
    assert errors.BlocksnapError.http_status == errors.InternalError.http_status == 500


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_class_has_status_exit_code_and_message(cls):
    """Each class has a dotted-word API code, an HTTP status of 400/403/404/500 (413 for a request body larger
    than the api-server takes), a non-zero int exit code and a non-empty message."""
    assert isinstance(cls.code, str) and re.fullmatch(r"[A-Za-z_]+(\.[A-Za-z_]+)*", cls.code)
    assert cls.http_status in {400, 403, 404, 500} or (cls is errors.RequestTooLarge and cls.http_status == 413)
    assert type(cls.exit_code) is int and 1 <= cls.exit_code <= 125
    assert isinstance(cls.message, str) and cls.message.strip()


def test_invalid_parameter_family_is_value_error():
    """Every InvalidParameter subclass is a ValueError with the 'invalid' exit code, and every
    ``*.Malformed`` code belongs to that family."""
    for cls in ALL:
        if issubclass(cls, errors.InvalidParameter):
            assert issubclass(cls, ValueError), cls
            assert cls.exit_code == errors.EXIT_INVALID, cls
        if cls.code.endswith(".Malformed"):
            assert issubclass(cls, errors.InvalidParameter), cls


def test_not_found_family_is_lookup_error():
    """Every NotFound subclass is a LookupError with the 'not found' exit code and HTTP 404, and every
    ``*.NotFound`` code belongs to that family."""
    for cls in ALL:
        if issubclass(cls, errors.NotFound):
            assert issubclass(cls, LookupError), cls
            assert cls.exit_code == errors.EXIT_NOT_FOUND and cls.http_status == 404, cls
        if cls.code.endswith(".NotFound") and not cls.code.startswith("Repository."):
            assert issubclass(cls, errors.NotFound), cls


def test_repository_family_exits_6_except_damage():
    """Repository errors exit 6, except a damaged repository, which exits 1 like verify finding damage."""
    for cls in ALL:
        if issubclass(cls, errors.RepositoryError):
            damaged = issubclass(cls, errors.RepositoryDamaged)
            want = errors.EXIT_DAMAGED if damaged else errors.EXIT_REPOSITORY
            assert cls.exit_code == want, cls


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_to_dict_shape(cls):
    """to_dict() is exactly {Code, Message, HttpStatus} (plus RequestId when given) of the class."""
    fields = dict.fromkeys(re.findall(r"{(\w+)}", cls.message), 7)
    exc = cls(**fields)
    d = exc.to_dict()
    assert d == {"Code": cls.code, "Message": str(exc), "HttpStatus": cls.http_status}
    assert "{" not in d["Message"]  # templates are filled in
    assert exc.to_dict(request_id="RID-1") == dict(d, RequestId="RID-1")


def test_message_template_and_detail():
    """Fields fill the message template and a detail is appended after it."""
    exc = errors.RepositoryVersionUnsupported("(at /r)", found=2, supported=1)
    assert str(exc) == ("The repository was written by a newer blocksnap (format version 2, this one "
                        "reads 1). (at /r)")
    assert str(errors.InvalidDiskIdNotFound()) == "The specified DiskId does not exist."


@pytest.mark.parametrize("code", sorted(REFERENCE))
def test_cloud_api_codes_and_statuses(code):
    """The cloud API's error codes exist with exactly the reference's spelling, HTTP status and message."""
    statuses, message = REFERENCE[code]
    cls = by_code(code)
    assert cls.http_status in statuses
    assert cls.message == message


@pytest.mark.parametrize("code", sorted(REFERENCE_TEMPLATES))
def test_cloud_api_codes_with_fields_and_statuses(code):
    """A code whose reference message has %s fields exists with its status, and its message is the reference's
    with named fields in their places."""
    statuses, message = REFERENCE_TEMPLATES[code]
    cls = by_code(code)
    assert cls.http_status in statuses
    assert re.sub(r"{\w+}", "%s", cls.message) == message


def test_reference_table_matches_the_copy_in_this_file():
    """The codes, statuses and messages frozen above are the ones in the cloud API reference text."""
    files = glob.glob(os.path.join(REFERENCE_DIR, "*.txt"))
    if not files:
        pytest.skip(f"the API reference is not available at {REFERENCE_DIR}")
    table = {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                m = re.match(r"^(400|403|404|500) (\S+) (.+)$", line.strip())
                if m:
                    status, code, msg = int(m[1]), m[2], m[3]
                    table.setdefault(code, (set(), msg))[0].add(status)
    for code, (statuses, message) in {**REFERENCE, **REFERENCE_TEMPLATES}.items():
        assert code in table, code
        assert table[code] == (statuses, message), code


TEMPLATED = [cls for cls in ALL if re.search(r"{\w+}", cls.message)]


def test_some_classes_have_templates():
    """The tree has message templates with fields (so the tests below check something)."""
    assert errors.StaleBuild in TEMPLATED and errors.RepositoryVersionUnsupported in TEMPLATED


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_a_template_is_never_printed_with_its_fields_missing(cls):
    """Raised with none or only some of its template's fields, with or without a detail, an error's message
    has no unfilled ``{field}`` and is still a sentence: its nearest field-less family message."""
    names = re.findall(r"{(\w+)}", cls.message)
    partial = dict.fromkeys(names[:1], 7) if len(names) > 1 else {}
    for exc in (cls(), cls("(at /r)"), cls(**partial), cls("(at /r)", **partial)):
        text = str(exc)
        assert not re.search(r"{\w*}", text), text
        assert text.strip() and exc.to_dict()["Message"] == text
        if names:
            assert text.startswith(next(c.message for c in cls.__mro__ if "message" in c.__dict__
                                        and "{" not in c.__dict__["message"]))


def test_stale_build_fills_its_template_and_falls_back_without_fields():
    """StaleBuild with found/expected names both ABIs; without them it says the generic failure plus the
    detail, not 'ABI {found}'."""
    assert str(errors.StaleBuild(found=7, expected=8)) == (
        "The C extension is stale (ABI 7, expected 8): reinstall blocksnap (pip install .).")
    text = str(errors.StaleBuild("(no ABI known)"))
    assert text == f"{errors.BlocksnapError.message} (no ABI known)"


def test_a_missing_c_extension_says_so_with_its_own_code():
    """Importing blocksnap._native where the compiled core cannot be imported raises NativeMissing
    (Native.Missing, a StaleBuild and an ImportError) whose message names the fix and the import error."""
    code = ("import sys\n"
            "sys.modules['blocksnap._blocksnap_c'] = None  # import of it fails, as with no .so\n"
            "from blocksnap import errors\n"
            "try:\n"
            "    import blocksnap._native\n"
            "except errors.NativeMissing as exc:\n"
            "    assert isinstance(exc, errors.StaleBuild) and isinstance(exc, ImportError)\n"
            "    print(exc.code, exc, sep='\\n')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(errors.__file__))))
    assert proc.returncode == 0, proc.stderr
    code_line, message = proc.stdout.splitlines()
    assert code_line == "Native.Missing"
    assert "{" not in message and "missing" in message and "pip install ." in message
    assert "blocksnap._blocksnap_c" in message  # the ImportError's own words, as the detail


def test_the_translation_table_names_the_class_for_each_failure():
    """errors.translate is the one place an OSError, an LMDB error or a C status becomes an API error: by
    errno, refined by the operation (a full disk during a create is CreateSnapshot.NoSpace, a missing pack
    is damage but running out of descriptors is not), with the errno LMDB hid in its text found back."""
    import errno

    import lmdb

    def oserr(e):
        return OSError(e, os.strerror(e), "/repo/packs/00/x.pack")

    assert type(errors.translate(oserr(errno.ENOSPC))) is errors.RepositoryNoSpace
    assert type(errors.translate(oserr(errno.ENOSPC), op="create")) is errors.NoSpace
    assert type(errors.translate(errors.RepositoryNoSpace(), op="create")) is errors.NoSpace
    assert type(errors.translate(oserr(errno.ENOENT), op="read-pack")) is errors.StoreDamaged
    assert type(errors.translate(oserr(errno.EMFILE), op="read-pack")) is errors.RepositoryError
    assert type(errors.translate(oserr(errno.ENOENT), op="read-image")) is errors.ImageNotFound
    assert type(errors.translate(oserr(errno.EACCES), op="read-image")) is errors.ImageUnreadable
    assert type(errors.translate(oserr(errno.EROFS))) is errors.RepositoryReadOnly
    assert type(errors.translate(lmdb.Error("mdb_txn_commit: No space left on device"))) is errors.RepositoryNoSpace
    assert type(errors.translate(lmdb.MapFullError("mdb_put: MDB_MAP_FULL"))) is errors.RepositoryFull
    assert type(errors.translate(lmdb.CorruptedError("mdb_get: MDB_CORRUPTED"))) is errors.CatalogDamaged
    assert "raise BLOCKSNAP_MAP_SIZE" in str(errors.translate(lmdb.MapFullError("x")))
    assert type(errors.from_native("BS_EDATA")) is errors.DataDamaged
    assert isinstance(errors.from_native("BS_EINVAL"), ValueError)


def test_the_c_core_statuses_come_out_as_the_table_says():
    """A C status that is not an OS error comes out of _native as the class errors.NATIVE_STATUS names."""
    from blocksnap import _native

    codec = _native.Codec(1)
    with pytest.raises(errors.DataDamaged):
        codec.decode(_native.CODEC_ZSTD, b"\x28\xb5\x2f\xfd garbage", 100)
    with pytest.raises(errors.NativeArgument):
        codec.decode(7, b"x", 1)
