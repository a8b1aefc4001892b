"""Block devices (a loop device stands in for an LVM volume): snapshot, restore out and restore onto."""
import os
import random
import shutil
import subprocess

import pytest
from conftest import MiB, files_equal


@pytest.fixture
def loop_device(tmp_path):
    """A loop device over a 16 MiB backing file; skipped where loop devices cannot be made."""
    if os.getuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    backing = tmp_path / "backing.img"
    rng = random.Random(1)
    with open(backing, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(MiB)
        f.write(rng.randbytes(3 * MiB))
        f.seek(9 * MiB)
        f.write(b"log line\n" * 50000)
    proc = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"no loop device here: {proc.stderr.strip()}")
    dev = proc.stdout.strip()
    yield dev, backing
    subprocess.run(["losetup", "-d", dev], check=False)


def test_block_device_snapshot_restores_and_writes_back(client, loop_device, tmp_path):
    """A block device snapshots (zero detection only), restores to a file, and restores onto itself."""
    dev, backing = loop_device
    disk = client.add_disk(dev)
    assert disk["Type"] == "block" and disk["Size"] == 16 * MiB
    sid = client.create_snapshot(disk["DiskId"])["SnapshotId"]
    rec = client.describe_snapshots(snapshot_ids=[sid])["Snapshots"]["Snapshot"][0]
    assert rec["SourceDiskType"] == "block"
    assert rec["LogicalBytes"] < 4 * MiB + 512 * 1024  # the zero regions store nothing
    client.restore(sid, str(tmp_path / "out.raw"))
    assert files_equal(backing, tmp_path / "out.raw")
    with open(dev, "r+b") as f:  # the "guest" scribbles over the whole device
        f.write(random.Random(2).randbytes(16 * MiB))
        f.flush()
        os.fsync(f.fileno())
    client.restore(sid, dev, sync=True)  # an existing device is written in place
    assert files_equal(dev, tmp_path / "out.raw")


def test_restore_onto_a_device_with_an_unaligned_zero_tail(client, make_image, loop_device):
    """An image whose size is not a multiple of the device's block size and whose last chunk is zeros
    restores onto a (larger) device: the unaligned tail that cannot be punched is written as zeros."""
    dev, _ = loop_device
    data = random.Random(3).randbytes(4 * MiB)
    img = make_image("odd.raw", 4 * MiB + 100, [(0, data)])
    sid = client.create_snapshot(client.add_disk(img)["DiskId"])["SnapshotId"]
    with open(dev, "r+b") as f:
        f.write(b"\xff" * (5 * MiB))
        f.flush()
        os.fsync(f.fileno())
    client.restore(sid, dev, sync=True)
    with open(dev, "rb") as f:
        assert f.read(4 * MiB + 100) == data + bytes(100)
        assert f.read(100) == b"\xff" * 100  # nothing past the image is touched


def test_cli_notes_that_writes_to_a_block_device_cannot_be_detected(client, loop_device, repo_path):
    """A create of a block device succeeds and says on stderr, once, that it cannot see writes made to the
    device while it is read; a create of an image file says nothing of the kind."""
    from conftest import run_cli

    dev, backing = loop_device
    disk = client.add_disk(dev)["DiskId"]
    p = run_cli("--repo", repo_path, "snapshot", "create", disk)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("SnapshotId: s-")
    assert p.stderr.count("\n") == 1 and "block device" in p.stderr and "freeze" in p.stderr
    other = client.add_disk(str(backing))["DiskId"]
    p = run_cli("--repo", repo_path, "snapshot", "create", other)
    assert p.returncode == 0 and p.stderr == "", p.stderr
