"""Shared fixtures: an isolated environment, repositories and test images."""
import os
import subprocess
import sys

import pytest

from blocksnap.store import catalog as catalogs

MiB = 1 << 20


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No BLOCKSNAP_* variable leaks in; HOME, XDG_DATA_HOME and XDG_CONFIG_HOME point into the test's temp dir."""
    for key in list(os.environ):
        if key.startswith("BLOCKSNAP_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "home" / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / "config"))
    monkeypatch.chdir(tmp_path)
    yield
    for path in catalogs.open_envs():
        if path.startswith(str(tmp_path)):
            catalogs.close_env(path)


@pytest.fixture
def repo_path(tmp_path):
    from blocksnap.api import Client

    path = str(tmp_path / "repo")
    Client.init(path, chunk_size=64 << 10)
    return path


@pytest.fixture
def client(repo_path):
    from blocksnap.api import Client

    with Client(repo_path) as c:
        yield c


def write_image(path, size, extents):
    """A sparse raw image of ``size`` bytes with ``extents``: (offset, bytes) written, the rest holes."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in extents:
            f.seek(off)
            f.write(data)
    return str(path)


@pytest.fixture
def make_image(tmp_path):
    """make_image(name, size, extents) -> path of a new sparse raw image."""

    def make(name, size, extents=()):
        return write_image(tmp_path / name, size, extents)

    return make


def run_cli(*args, env=None, check=False, input=None, timeout=300):
    """Run ``python -m blocksnap ARGS`` in a child process; returns CompletedProcess (text). A child that runs
    longer than ``timeout`` seconds is killed and subprocess.TimeoutExpired raised."""
    import blocksnap

    # The child imports the same blocksnap as this process (source tree or installed package).
    full_env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(blocksnap.__file__)))
    if env:
        full_env.update(env)
    proc = subprocess.run([sys.executable, "-m", "blocksnap", *args], capture_output=True, text=True,
                          env=full_env, input=input, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"blocksnap {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


def child_env(**extra):
    """The environment of a child process that imports the same blocksnap as this one, plus ``extra``."""
    import blocksnap

    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(blocksnap.__file__))))
    env.update(extra)
    return env


def cli(*args, timeout=300, **extra_env):
    """``python -m blocksnap ARGS`` run to completion in a child (``extra_env`` added to its environment);
    returns the CompletedProcess (text). A crash shows as a negative return code."""
    return subprocess.run([sys.executable, "-m", "blocksnap", *args], capture_output=True, text=True,
                          env=child_env(**extra_env), timeout=timeout, check=False)


def files_equal(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            if x != y:
                return False
            if not x:
                return True


def write_random(path, size, offset=0):
    """Write ``size`` random bytes at ``offset`` of ``path`` (created if absent), in place."""
    mode = "r+b" if os.path.exists(path) else "wb"
    with open(path, mode) as f:
        f.seek(offset)
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n
    return str(path)


def allocated(path):
    """Bytes the files under ``path`` occupy on disk (sum of st_blocks * 512, as du counts)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def restores_identical(client, tmp_path, sid, saved):
    """True if snapshot ``sid`` restores to the bytes of the file ``saved``."""
    out = str(tmp_path / f"restore-{sid}.raw")
    client.restore(sid, out)
    try:
        return files_equal(out, saved)
    finally:
        os.unlink(out)


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(name, size) -> path of a tmpfs of ``size`` (like "24m") mounted at tmp_path/name for the
    test, unmounted after it (catalogs opened there are closed first). Skips where mounting is not allowed."""
    mounted = []

    def mount(name, size):
        mnt = tmp_path / name
        mnt.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=False,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
        mounted.append(str(mnt))
        return str(mnt)

    yield mount
    for mnt in mounted:
        for path in catalogs.open_envs():
            if path.startswith(mnt):
                catalogs.close_env(path)
        if subprocess.run(["umount", mnt], check=False).returncode != 0:
            subprocess.run(["umount", "-l", mnt], check=False)

