"""End-to-end: a snapshot of a small image restores byte-identically."""
from conftest import files_equal


def test_snapshot_restores_identical_bytes(client, make_image):
    """A full snapshot of a sparse image restores to the same bytes."""
    img = make_image("a.raw", 4 << 20, [(0, b"x" * 100000), (3 << 20, b"tail")])
    disk = client.add_disk(img)["DiskId"]
    sid = client.create_snapshot(disk)["SnapshotId"]
    client.restore(sid, "out.raw")
    assert files_equal(img, "out.raw")
