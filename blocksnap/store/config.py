"""The repository's ``config``: what the repository is, written once (docs/FORMAT.md, "config").

A UTF-8 JSON object. From format version 2 it carries ``Checksum``, the XXH3-64 (16 hex digits) of the
compact, key-sorted JSON of every other field, so a damaged config is reported as damage instead of
being read as a different repository. This module owns that encoding and the version rules.
"""
import datetime
import json
import os
import time

from .. import _native, errors
from .backend import fsync_dir

FORMAT_NAME = "blocksnap-repository"
FORMAT_VERSION = 2
OLDEST_VERSION = 1  # opened, read, upgraded with 'blocksnap upgrade'
DEFAULT_CHUNK_SIZE = 256 << 10
MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 4 << 20
SEGMENT_CHUNKS = 256  # chunk ids per map segment


def segments_of_size(size, chunk_size):
    """How many segments the map of an image of ``size`` bytes has."""
    return -(-(-(-size // chunk_size)) // SEGMENT_CHUNKS)


def now_iso(ts=None):
    t = datetime.datetime.fromtimestamp(time.time() if ts is None else ts, datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def valid_chunk_size(chunk_size):
    return (isinstance(chunk_size, int) and not isinstance(chunk_size, bool)
            and MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE and not chunk_size & (chunk_size - 1))


def new_config(chunk_size, repository_id=None, creation_time=None):
    """The config of a new repository (format version 2)."""
    return {
        "Format": FORMAT_NAME,
        "Version": FORMAT_VERSION,
        "RepositoryId": repository_id or os.urandom(16).hex(),
        "ChunkSize": chunk_size,
        "SegmentChunks": SEGMENT_CHUNKS,
        "ChunkId": "xxh3-128",
        "Compression": "zstd:1",
        "CreationTime": creation_time or now_iso(),
    }


def checksum(config):
    body = {k: v for k, v in config.items() if k != "Checksum"}
    return _native.hash64(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hex()


def encode(config):
    """The config file's text, with its Checksum (version 2)."""
    out = dict(config)
    out.pop("Checksum", None)
    out["Checksum"] = checksum(out)
    return json.dumps(out, indent=2, sort_keys=True) + "\n"


def write(path, config):
    """Write ``path`` atomically and durably (beside it, fsync, rename, fsync the directory)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".config.{os.urandom(4).hex()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(encode(config))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fsync_dir(folder)


def load(repo_path):
    """The config of the repository at ``repo_path``, checked.

    Raises:
        RepositoryNotFound (no config, or not a blocksnap config), RepositoryDamaged (ours, but damaged),
        RepositoryVersionUnsupported (a newer format), RepositoryError (unreadable).
    """
    cfg_path = os.path.join(repo_path, "config")
    try:
        with open(cfg_path, "rb") as f:
            raw = f.read(1 << 20)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise errors.RepositoryNotFound(f"({repo_path})") from None
    except OSError as exc:
        raise errors.RepositoryError(f"({cfg_path}: {exc.strerror})") from None
    ours = any(os.path.isdir(os.path.join(repo_path, d)) for d in ("catalog", "packs"))
    try:
        config = json.loads(raw.decode("utf-8"))
        if not isinstance(config, dict) or config.get("Format") != FORMAT_NAME:
            raise ValueError("not a blocksnap config")
        version = config["Version"]
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError("Version is not an integer")
    except (ValueError, KeyError, UnicodeDecodeError):
        if ours:
            raise errors.RepositoryDamaged(f"({repo_path}: its config is unreadable)") from None
        raise errors.RepositoryNotFound(f"({repo_path}: config is not a blocksnap repository config)") from None
    # The checksum first: a damaged digit of Version must read as damage, not as another version.
    if ("Checksum" in config or version >= 2) and config.get("Checksum") != checksum(config):
        raise errors.RepositoryDamaged(f"({repo_path}: its config fails its checksum)")
    if version > FORMAT_VERSION:
        raise errors.RepositoryVersionUnsupported(found=version, supported=FORMAT_VERSION)
    if version < OLDEST_VERSION:
        raise errors.RepositoryDamaged(f"({repo_path}: config names format version {version})")
    if not valid_chunk_size(config.get("ChunkSize")):
        raise errors.RepositoryDamaged(f"({repo_path}: config has an invalid ChunkSize {config.get('ChunkSize')!r})")
    if config.get("SegmentChunks", SEGMENT_CHUNKS) != SEGMENT_CHUNKS or not isinstance(config.get("RepositoryId"), str):
        raise errors.RepositoryDamaged(f"({repo_path}: config has an invalid SegmentChunks or RepositoryId)")
    return config
