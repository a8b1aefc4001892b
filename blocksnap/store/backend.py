"""Store backends: where packs and objects live. A local directory today; an object store later.

The store is everything a repository needs to be rebuilt: pack files (chunk and map-segment records,
each pack ending in its own record index) and small objects (one per disk and per accomplished
snapshot). Every object is written once under a name that is a unique id and never changed in place;
it is replaced only whole (written beside, then renamed over) by ``repair``, and removed whole. That is
what an S3-like object store offers too, so a second backend can implement this interface unchanged
(docs/FORMAT.md, "Store"). The one local-only operation is :meth:`LocalBackend.punch_pack`, which
gives the space of dead records back without rewriting the pack; object stores repack instead (gc's
``--max-unused``).

The interface is small on purpose, like QEMU's ``BlockDriver``: packs by id (create, open, read a range,
make durable, list, size, remove, punch) and objects by kind and name (put, get, list, delete).
"""
import errno
import os
import stat

OBJECT_KINDS = ("snapshots", "disks", "groups")


def fsync_dir(path):
    """Make the names in a directory durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBackend:
    """Packs and objects in a local directory tree::

        ROOT/packs/XX/<16 hex>.pack     XX: the first two hex digits of the pack id
        ROOT/snapshots/<SnapshotId>
        ROOT/disks/<DiskId>
        ROOT/groups/<ResourceGroupId>    (made with the first resource group: older repositories lack it)
    """

    def __init__(self, root):
        self.root = root
        self.packs_dir = os.path.join(root, "packs")

    # --- packs ---------------------------------------------------------------------------------------
    def pack_path(self, pack_id):
        h = pack_id.hex()
        return os.path.join(self.packs_dir, h[:2], h + ".pack")

    def create_pack(self, pack_id):
        """A new, empty pack file open for writing (O_EXCL: pack ids are never reused)."""
        path = self.pack_path(pack_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    def open_pack(self, pack_id):
        """A read-only descriptor of a pack (OSError if it is missing)."""
        return os.open(self.pack_path(pack_id), os.O_RDONLY | os.O_CLOEXEC)

    def read_pack(self, pack_id, offset, length):
        """``length`` bytes of a pack from ``offset`` (fewer at its end)."""
        fd = self.open_pack(pack_id)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def pack_size(self, pack_id):
        return os.stat(self.pack_path(pack_id)).st_size

    def pack_usage(self, pack_id):
        """Bytes the pack occupies on disk (st_blocks), 0 if it is gone."""
        try:
            return os.stat(self.pack_path(pack_id)).st_blocks * 512
        except FileNotFoundError:
            return 0

    def sync_pack(self, pack_id, fd):
        """Make a pack written through ``fd`` durable (file, then its name and its folder's), close ``fd``."""
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        sub = os.path.dirname(self.pack_path(pack_id))
        fsync_dir(sub)
        fsync_dir(os.path.dirname(sub))

    def append_pack(self, pack_id, data):
        """Append ``data`` to an existing pack and make it durable (the upgrade from format 1 only)."""
        fd = os.open(self.pack_path(pack_id), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def truncate_pack(self, pack_id, size):
        """Cut a pack back to ``size`` bytes (the upgrade, redoing an interrupted append)."""
        os.truncate(self.pack_path(pack_id), size)

    def list_packs(self):
        """Ids of every pack file present."""
        out = []
        try:
            subs = os.listdir(self.packs_dir)
        except FileNotFoundError:
            return out
        for sub in subs:
            d = os.path.join(self.packs_dir, sub)
            try:
                names = os.listdir(d)
            except (NotADirectoryError, FileNotFoundError):
                continue
            for name in names:
                if name.endswith(".pack") and len(name) == 21 and name[:2] == sub:
                    try:
                        out.append(bytes.fromhex(name[:16]))
                    except ValueError:
                        continue
        return out

    def remove_pack(self, pack_id):
        """Unlink a pack; a missing one counts as removed."""
        try:
            os.unlink(self.pack_path(pack_id))
        except FileNotFoundError:
            pass

    def punch_pack(self, pack_id, offset, length, block=4096):
        """Give the whole blocks inside ``[offset, offset+length)`` back to the file system; returns the
        bytes punched (0 where the file system cannot punch, or the pack is gone)."""
        from .. import _native

        start = -(-offset // block) * block
        end = ((offset + length) // block) * block
        if end <= start:
            return 0
        try:
            fd = os.open(self.pack_path(pack_id), os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        try:
            _native.punch_hole(fd, start, end - start)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                return 0  # the bytes stay until the pack goes
            raise
        finally:
            os.close(fd)
        return end - start

    def punchable(self, pack_id, ranges, block=4096):
        """For each ``(offset, length)``, the bytes that punching it would still give back: its whole blocks
        that hold data (a range punched before holds none). Where holes cannot be seen, all of them."""
        try:
            fd = self.open_pack(pack_id)
        except FileNotFoundError:
            return [0] * len(ranges)
        out = []
        try:
            for offset, length in ranges:
                start = -(-offset // block) * block
                end = ((offset + length) // block) * block
                got, pos = 0, start
                while pos < end:
                    try:
                        data = os.lseek(fd, pos, os.SEEK_DATA)
                        hole = os.lseek(fd, data, os.SEEK_HOLE)
                    except OSError as exc:
                        if exc.errno == errno.ENXIO:
                            break
                        data, hole = pos, end  # no SEEK_DATA here: count it all
                    if data >= end:
                        break
                    got += min(hole, end) - data
                    pos = hole
                out.append(got)
        finally:
            os.close(fd)
        return out

    def remove_empty_dirs(self):
        """Remove the ``packs/XX`` folders that hold nothing; returns how many."""
        removed = 0
        try:
            subs = os.listdir(self.packs_dir)
        except FileNotFoundError:
            return 0
        for sub in subs:
            d = os.path.join(self.packs_dir, sub)
            try:
                os.rmdir(d)  # only succeeds when empty
                removed += 1
            except OSError:
                continue
        if removed:
            fsync_dir(self.packs_dir)
        return removed

    def usage(self):
        """Bytes every pack occupies on disk (st_blocks), as ``du`` counts them."""
        return sum(self.pack_usage(p) for p in self.list_packs())

    # --- objects -------------------------------------------------------------------------------------
    def _object_path(self, kind, name):
        if kind not in OBJECT_KINDS or not name or "/" in name or name.startswith("."):
            raise ValueError(f"not an object name: {kind}/{name}")
        return os.path.join(self.root, kind, name)

    def put_object(self, kind, name, data):
        """Write an object durably and atomically: beside its name, fsynced, renamed over it."""
        path = self._object_path(kind, name)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{name}.{os.urandom(4).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        fsync_dir(folder)

    def get_object(self, kind, name, max_len=1 << 30):
        """An object's bytes, or None if there is none of that name."""
        try:
            fd = os.open(self._object_path(kind, name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EISDIR, "not a regular file", self._object_path(kind, name))
            out = bytearray()
            while len(out) <= max_len:
                piece = os.read(fd, 1 << 20)
                if not piece:
                    break
                out += piece
            return bytes(out)
        finally:
            os.close(fd)

    def list_objects(self, kind):
        """Names of every object of a kind (leftover temporary files are not objects)."""
        try:
            names = os.listdir(os.path.join(self.root, kind))
        except FileNotFoundError:
            return []
        return sorted(n for n in names if not n.startswith("."))

    def delete_object(self, kind, name):
        """Remove an object durably; a missing one counts as removed."""
        path = self._object_path(kind, name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        fsync_dir(os.path.dirname(path))

    def clear_temporaries(self, kind):
        """Remove the ``.*.tmp`` files a killed :meth:`put_object` left (writers only)."""
        folder = os.path.join(self.root, kind)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return
        for n in names:
            if n.startswith(".") and n.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(folder, n))
                except FileNotFoundError:
                    pass
