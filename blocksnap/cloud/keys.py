"""The api-server's AccessKeys: one JSON file per user that only its owner can read (docs/API.md, "Keys").

The file is ``$BLOCKSNAP_API_KEYS``, else ``$XDG_CONFIG_HOME/blocksnap/api-keys.json``, else
``~/.config/blocksnap/api-keys.json`` (a per-user file like the aliyun CLI's ``~/.aliyun/config.json``, not a
part of any repository: the same keys can serve every repository of the user). Its text::

    {"Version": 1, "Keys": [{"AccessKeyId": "BSAK...", "AccessKeySecret": "...",
                             "CreationTime": "2026-01-02T03:04:05Z", "Status": "Active"}]}

It is made with mode 0600 in a directory made 0700, written whole to a temporary file and renamed over the
old one (under a lock, so two ``api-key create`` never lose a key). A file that others can read or write,
or that is not its user's, is refused (ApiKeysUnusable), as ssh refuses such a private key.
"""
import fcntl
import json
import os
import secrets
import stat
import string
import threading

from .. import errors
from ..store.config import now_iso

FORMAT_VERSION = 1
ENV = "BLOCKSNAP_API_KEYS"
ID_PREFIX = "BSAK"
ID_LENGTH = 24  # as the cloud's AccessKeyIds
SECRET_LENGTH = 30  # as the cloud's AccessKeySecrets
_ALPHABET = string.ascii_letters + string.digits


def default_path():
    """``$BLOCKSNAP_API_KEYS``, else ``$XDG_CONFIG_HOME/blocksnap/api-keys.json`` (``~/.config`` by default)."""
    env = os.environ.get(ENV)
    if env:
        return env
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "blocksnap", "api-keys.json")


def _random(n):
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def _check_private(st, path):
    if stat.S_IMODE(st.st_mode) & 0o077 or st.st_uid != os.geteuid():
        raise errors.ApiKeysUnusable(f"({path} must belong to this user and be readable by it alone: "
                                     f"chmod 600 {path})")


def _read(path):
    """The keys of the file at ``path`` ([] if there is none), checked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise errors.ApiKeysUnusable(f"({path}: {exc.strerror})") from None
    try:
        st = os.fstat(fd)
        _check_private(st, path)
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(16 << 20)
    finally:
        os.close(fd)
    try:
        doc = json.loads(raw.decode("utf-8"))
        keys = doc["Keys"]
        if doc.get("Version") != FORMAT_VERSION or not isinstance(keys, list):
            raise ValueError("not a keys file")
        for k in keys:
            if not (isinstance(k, dict) and isinstance(k.get("AccessKeyId"), str)
                    and isinstance(k.get("AccessKeySecret"), str)):
                raise ValueError("a key without AccessKeyId or AccessKeySecret")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise errors.ApiKeysUnusable(f"({path}: not a blocksnap API keys file: {exc})") from None
    return keys


def create(path=None):
    """Make a new AccessKey pair, add it to the keys file and return ``{"AccessKeyId", "AccessKeySecret"}``.

    Raises:
        ApiKeysUnusable (the file or its directory cannot be written, or the file is not private).
    """
    path = path or default_path()
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise errors.ApiKeysUnusable(f"({folder}: {exc.strerror})") from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        keys = _read(path)
        taken = {k["AccessKeyId"] for k in keys}
        key_id = ID_PREFIX + _random(ID_LENGTH - len(ID_PREFIX))
        while key_id in taken:
            key_id = ID_PREFIX + _random(ID_LENGTH - len(ID_PREFIX))
        pair = {"AccessKeyId": key_id, "AccessKeySecret": _random(SECRET_LENGTH)}
        keys.append(dict(pair, CreationTime=now_iso(), Status="Active"))
        text = json.dumps({"Version": FORMAT_VERSION, "Keys": keys}, indent=2) + "\n"
        tmp = f"{path}.{os.urandom(4).hex()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.fchmod(fd, 0o600)  # whatever the umask
                os.write(fd, text.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass  # never made
            raise errors.ApiKeysUnusable(f"({path}: {exc.strerror})") from None
    finally:
        os.close(lock_fd)
    return pair


class KeyStore:
    """The keys file as the api-server reads it: re-read when it changes (a key made while the server runs
    works at once), at the cost of one stat per request."""

    def __init__(self, path=None):
        self.path = path or default_path()
        self._seen = None
        self._secrets = {}
        self._lock = threading.Lock()  # the server's threads share one store

    def _stamp(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise errors.ApiKeysUnusable(f"({self.path}: {exc.strerror})") from None
        return (st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode, st.st_uid)

    def check(self):
        """Read the file now; returns the number of active keys.

        Raises:
            ApiKeysUnusable.
        """
        self._load()
        return len(self._secrets)

    def _load(self):
        with self._lock:
            stamp = self._stamp()
            if stamp != self._seen:
                keys = _read(self.path)
                self._secrets = {k["AccessKeyId"]: k["AccessKeySecret"] for k in keys
                                 if k.get("Status", "Active") == "Active"}
                self._seen = stamp

    def secret(self, access_key_id):
        """The AccessKeySecret of an active ``access_key_id``, or None.

        Raises:
            ApiKeysUnusable (the file became unreadable or not private).
        """
        self._load()
        return self._secrets.get(access_key_id)
