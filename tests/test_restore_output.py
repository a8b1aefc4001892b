"""Restore outputs the OS refuses by name (blocksnap/restore.py, _open_output): a name longer than the file
system takes (ENAMETOOLONG) or a path under a regular file (ENOTDIR) is RestoreSnapshot.Failed with a
one-line reason, from the Python API and from the CLI, and nothing is written anywhere."""
import json
import os

import pytest
from conftest import MiB, files_equal, run_cli

from blocksnap import errors

# name -> (output path relative to tmp_path, the words the message must have)
CASES = {
    "basename of 300 characters": ("a" * 300, "File name too long: a name in the path has 300 bytes"),
    "basename of 130 two-byte characters": ("é" * 130, "File name too long: a name in the path has 260 bytes"),
    "path longer than PATH_MAX": ("d/" * 2100 + "x", "File name too long: the path has"),
    "parent is a regular file": ("afile/out.raw", "Not a directory: {tmp}/afile is not a directory"),
    "grandparent is a regular file": ("afile/sub/out.raw", "Not a directory: {tmp}/afile is not a directory"),
}


@pytest.fixture
def snapshot(client, make_image, tmp_path):
    img = make_image("src.raw", MiB, [(0, b"x" * 4096), (512 << 10, os.urandom(64 << 10))])
    disk = client.add_disk(img)["DiskId"]
    (tmp_path / "afile").write_bytes(b"a regular file")
    return client.create_snapshot(disk)["SnapshotId"], img


def listing(tmp_path):
    return sorted((root, tuple(sorted(dirs)), tuple(sorted(files))) for root, dirs, files in os.walk(tmp_path))


@pytest.mark.parametrize("in_place", [False, True], ids=["new", "in-place"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_an_output_path_the_os_refuses_is_restore_failed(client, snapshot, tmp_path, case, in_place):
    """Client.restore to such a path raises RestoreFailed (RestoreSnapshot.Failed, exit 5) whose one-line
    message says why, leaves every file as it was, and the next restore works."""
    sid, img = snapshot
    rel, says = CASES[case]
    before = listing(tmp_path)
    with pytest.raises(errors.RestoreFailed) as exc:
        client.restore(sid, str(tmp_path / rel), in_place=in_place)
    assert type(exc.value) is errors.RestoreFailed
    assert exc.value.code == "RestoreSnapshot.Failed" and exc.value.exit_code == 5
    text = str(exc.value)
    assert "\n" not in text and len(text) < 400, text
    assert says.format(tmp=tmp_path) in text, text
    assert listing(tmp_path) == before
    assert (tmp_path / "afile").read_bytes() == b"a regular file"
    client.restore(sid, str(tmp_path / "good.raw"))  # the failed restore released what it held
    assert files_equal(tmp_path / "good.raw", img)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_cli_says_it_in_one_line_with_exit_5(repo_path, snapshot, tmp_path, case):
    """`blocksnap restore SID PATH` with such a path exits 5 with one line on stderr (no traceback), and with
    --json the error body names RestoreSnapshot.Failed."""
    sid, _ = snapshot
    rel, says = CASES[case]
    p = run_cli("--repo", repo_path, "restore", sid, str(tmp_path / rel))
    assert p.returncode == 5 and p.stdout == ""
    assert p.stderr.startswith("blocksnap: error: RestoreSnapshot.Failed: The restore failed. ("), p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert says.format(tmp=tmp_path) in p.stderr
    p = run_cli("--repo", repo_path, "--json", "restore", sid, str(tmp_path / rel))
    assert p.returncode == 5
    assert json.loads(p.stdout)["Error"]["Code"] == "RestoreSnapshot.Failed"
