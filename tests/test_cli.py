"""The command's contract beyond each command's output: one-line typed errors for every kind of bad
command line, JSON error bodies with --json, exit codes that mean what docs/API.md says, a closed pipe,
and which repository a command may create."""
import json
import os
import subprocess
import sys

import pytest
from conftest import MiB, run_cli

import blocksnap
from blocksnap import errors


def one_line_error(proc, code):
    assert proc.stderr.startswith(f"blocksnap: error: {code}: "), proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("argv", [
    ["snapshot", "create"],                      # a required argument missing
    ["snapshot", "frobnicate"],                  # an unknown subcommand
    ["restore", "s-aaaaaaaaaaaaaaaaaaaa"],       # OUTPUT missing
    ["gc", "--bogus"],                           # an unknown option
    ["init", "--chunk-size"],                    # an option without its value
])
@pytest.mark.parametrize("as_json", [False, True])
def test_a_bad_command_line_is_one_typed_line(argv, as_json, repo_path):
    """argparse's own usage dump would be several lines in another format and no JSON: it is turned into
    InvalidParameter (exit 2) like any other bad input, with a JSON error body under --json."""
    p = run_cli("--repo", repo_path, *(["--json"] if as_json else []), *argv)
    assert p.returncode == errors.InvalidParameter.exit_code == 2
    one_line_error(p, "InvalidParameter")
    if as_json:
        assert json.loads(p.stdout)["Error"]["Code"] == "InvalidParameter"
    else:
        assert p.stdout == ""


def test_help_and_version_still_exit_zero():
    assert run_cli("--version").returncode == 0
    p = run_cli("snapshot", "create", "--help")
    assert p.returncode == 0 and "--category" in p.stdout


def test_a_closed_pipe_ends_quietly(repo_path, make_image):
    """`blocksnap --json snapshot list | head -c1`: no traceback, the exit status of a command killed by
    SIGPIPE, as other commands in a pipeline show it."""
    img = make_image("a.raw", MiB, [(0, os.urandom(MiB))])
    disk = run_cli("--repo", repo_path, "--json", "disk", "add", img, check=True)
    disk_id = json.loads(disk.stdout)["DiskId"]
    for _ in range(3):
        run_cli("--repo", repo_path, "snapshot", "create", disk_id, "--snapshot-name", "n" * 100, check=True)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(blocksnap.__file__)))
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "blocksnap", "--repo", repo_path, "--json", "snapshot",
                                 "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        proc.stdout.read(1)
        proc.stdout.close()  # the reader goes away
        err = proc.stderr.read().decode()
        proc.wait(timeout=60)
        assert "Traceback" not in err and "Exception ignored" not in err, err
        assert proc.returncode in (0, 141), (proc.returncode, err)


def test_an_unexpected_failure_is_one_line_with_the_failure_exit_code(repo_path, tmp_path):
    """A bug must not exit 1, which means 'damage found': it is InternalError (exit 5), one line, and the
    traceback is there on request."""
    # A stand-in bug: make describe_disks blow up inside a child process through sitecustomize.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import blocksnap.api\n"
        "def broken(self):\n"
        "    raise TypeError('a stand-in bug')\n"
        "blocksnap.api.Client.describe_disks = broken\n")
    pp = os.pathsep.join([str(site), os.path.dirname(os.path.dirname(blocksnap.__file__))])
    p = run_cli("--repo", repo_path, "disk", "list", env={"PYTHONPATH": pp})
    assert p.returncode == errors.InternalError.exit_code == 5
    one_line_error(p, "InternalError")
    assert "TypeError: a stand-in bug" in p.stderr and "BLOCKSNAP_DEBUG" in p.stderr
    p = run_cli("--repo", repo_path, "disk", "list", env={"PYTHONPATH": pp, "BLOCKSNAP_DEBUG": "1"})
    assert p.returncode == 5 and "Traceback" in p.stderr


def test_category_from_the_command_line(repo_path, make_image):
    img = make_image("a.raw", MiB, [(0, b"x" * 4096)])
    disk_id = json.loads(run_cli("--repo", repo_path, "--json", "disk", "add", img, check=True).stdout)["DiskId"]
    sid = json.loads(run_cli("--repo", repo_path, "--json", "snapshot", "create", disk_id, "--category", "Flash",
                             check=True).stdout)["SnapshotId"]
    plain = json.loads(run_cli("--repo", repo_path, "--json", "snapshot", "create", disk_id,
                               check=True).stdout)["SnapshotId"]
    listed = json.loads(run_cli("--repo", repo_path, "--json", "snapshot", "list", check=True).stdout)
    categories = {s["SnapshotId"]: s["Category"] for s in listed["Snapshots"]["Snapshot"]}
    assert categories == {sid: "Flash", plain: "Standard"}  # every snapshot shows one, Standard by default
    p = run_cli("--repo", repo_path, "snapshot", "create", disk_id, "--category", "Premium")
    assert p.returncode == 2
    one_line_error(p, "InvalidSnapshotCategory.Malformed")


def test_only_the_per_user_default_repository_is_made_on_first_use(tmp_path):
    """$BLOCKSNAP_REPO (or --repo, or an explicit Client path) naming no repository is Repository.NotFound:
    a typo or an unmounted backup disk must not quietly get a new, empty repository."""
    from blocksnap.api import Client

    missing = tmp_path / "typo"
    p = run_cli("disk", "list", env={"BLOCKSNAP_REPO": str(missing)})
    assert p.returncode == errors.RepositoryNotFound.exit_code
    one_line_error(p, "Repository.NotFound")
    os.environ["BLOCKSNAP_REPO"] = str(missing)
    try:
        with pytest.raises(errors.RepositoryNotFound):
            Client()
    finally:
        del os.environ["BLOCKSNAP_REPO"]
    assert not missing.exists()
    with Client() as c:  # the per-user default (HOME is the test's) is made on first use
        assert c.describe_disks()["TotalCount"] == 0


def test_a_fifo_is_refused_at_once(tmp_path, repo_path):
    """A FIFO is no image: refused at once (it used to wait for a writer forever)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(blocksnap.__file__)))
    p = subprocess.run([sys.executable, "-m", "blocksnap", "--repo", repo_path, "disk", "add", str(fifo)],
                       capture_output=True, text=True, env=env, timeout=30)
    assert p.returncode == errors.ImageUnsupported.exit_code
    one_line_error(p, errors.ImageUnsupported.code)


def test_an_image_replaced_while_it_is_read_fails_the_snapshot(client, make_image, tmp_path):
    """`mv new.raw disk.raw` during a create: the open file is unchanged, but the path now names another
    image. The snapshot would be of neither what the path names now nor at the end: it fails."""
    img = make_image("disk.raw", 8 * MiB, [(0, os.urandom(8 * MiB))])
    other = make_image("new.raw", 8 * MiB, [(0, os.urandom(8 * MiB))])
    disk = client.add_disk(img)["DiskId"]

    def replace(done, total):
        if os.path.exists(other):
            os.rename(other, img)

    with pytest.raises(errors.ImageChanged):
        client.create_snapshot(disk, progress=replace)
    assert client.create_snapshot(disk)["SnapshotId"].startswith("s-")  # and the next one works


@pytest.mark.parametrize("in_place", [False, True])
def test_restore_onto_a_directory_says_what_it_is(repo_path, make_image, tmp_path, in_place):
    """A directory (or a FIFO) as the restore target is RestoreSnapshot.Failed naming what it is, not the
    advice to pass --in-place, which would not help."""
    img = make_image("a.raw", MiB, [(0, b"x" * 4096)])
    disk_id = json.loads(run_cli("--repo", repo_path, "--json", "disk", "add", img, check=True).stdout)["DiskId"]
    sid = json.loads(run_cli("--repo", repo_path, "--json", "snapshot", "create", disk_id,
                             check=True).stdout)["SnapshotId"]
    target = tmp_path / "adir"
    target.mkdir()
    p = run_cli("--repo", repo_path, "restore", sid, str(target), *(["--in-place"] if in_place else []))
    assert p.returncode == errors.RestoreFailed.exit_code
    one_line_error(p, errors.RestoreFailed.code)
    assert "is a directory" in p.stderr and list(target.iterdir()) == []


@pytest.mark.parametrize("kind", ["dangling symlink", "trailing slash"])
def test_a_restore_target_that_cannot_be_named_is_refused_before_any_work(repo_path, make_image, tmp_path, kind):
    img = make_image("a.raw", MiB, [(0, b"x" * 4096)])
    disk_id = json.loads(run_cli("--repo", repo_path, "--json", "disk", "add", img, check=True).stdout)["DiskId"]
    sid = json.loads(run_cli("--repo", repo_path, "--json", "snapshot", "create", disk_id,
                             check=True).stdout)["SnapshotId"]
    if kind == "dangling symlink":
        target = tmp_path / "dl"
        target.symlink_to(tmp_path / "nowhere" / "x")
        arg, says = str(target), "does not exist"
    else:
        arg, says = str(tmp_path / "newout") + "/", "names a directory"
    p = run_cli("--repo", repo_path, "restore", sid, arg)
    assert p.returncode == errors.RestoreFailed.exit_code
    one_line_error(p, errors.RestoreFailed.code)
    assert says in p.stderr


def test_the_human_commands_take_every_create_parameter_filters_locks_groups_and_quotas(repo_path, tmp_path):
    """`snapshot create` maps its options onto CreateSnapshot (retention, tags, resource group, instant access);
    `snapshot list` onto DescribeSnapshots' filters and pages; `disk lock`/`unlock`, `resource-group` and
    `quota` do what they say, each failure one typed line."""
    img = str(tmp_path / "d.raw")
    with open(img, "wb") as f:
        f.write(os.urandom(64 << 10))

    def run(*args):
        return json.loads(run_cli("--repo", repo_path, "--json", *args, check=True).stdout)

    disk = run("disk", "add", img)["DiskId"]
    group = run("resource-group", "create", "nightly", "--display-name", "Nightly")["ResourceGroup"]["ResourceGroupId"]
    sid = run("snapshot", "create", disk, "--retention-days", "7", "--tag", "env=prod", "--tag", "tier=gold",
              "--resource-group-id", group, "--instant-access", "true", "--instant-access-retention-days", "3",
              "--snapshot-name", "first")["SnapshotId"]
    other = run("snapshot", "create", disk, "--tag", "env=dev")["SnapshotId"]
    [snap] = run("snapshot", "list", "--tag", "env=prod")["Snapshots"]["Snapshot"]
    assert (snap["SnapshotId"], snap["RetentionDays"], snap["ResourceGroupId"], snap["InstantAccess"],
            snap["InstantAccessRetentionDays"]) == (sid, 7, group, True, 3)
    assert [s["SnapshotId"] for s in run("snapshot", "list", "--tag", "env")["Snapshots"]["Snapshot"]] == [sid, other]
    page = run("snapshot", "list", "--max-results", "1")
    assert [s["SnapshotId"] for s in page["Snapshots"]["Snapshot"]] == [sid] and page["NextToken"]
    assert [s["SnapshotId"] for s in run("snapshot", "list", "--max-results", "1", "--next-token",
                                         page["NextToken"])["Snapshots"]["Snapshot"]] == [other]
    assert [g["Name"] for g in run("resource-group", "list")["ResourceGroups"]["ResourceGroup"]] == ["default",
                                                                                                     "nightly"]
    run("disk", "lock", disk)
    p = run_cli("--repo", repo_path, "snapshot", "create", disk)
    assert p.returncode == errors.EXIT_CONFLICT
    one_line_error(p, "InstanceLockedForSecurity")
    assert [d["DiskId"] for d in run("disk", "list", "--lock-reason", "security")["Disks"]["Disk"]] == [disk]
    run("disk", "unlock", disk)
    assert run("quota", "--snapshots-per-disk", "2")["Quotas"] == {"SnapshotsPerDisk": 2, "ConcurrentSnapshots": None}
    p = run_cli("--repo", repo_path, "snapshot", "create", disk)
    one_line_error(p, "QuotaExceed.Snapshot")
    assert run("quota", "--reset", "SnapshotsPerDisk")["Quotas"]["SnapshotsPerDisk"] == 256
    run("snapshot", "create", disk)
    p = run_cli("--repo", repo_path, "resource-group", "delete", group)
    one_line_error(p, "DeleteConflict.ResourceGroup.Resource")
