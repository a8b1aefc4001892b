"""blocksnap disk add / list."""
from .output import emit_json, human_bytes, table, waiting_for_gc


def cmd_add(args, client):
    out = client.add_disk(args.image, args.name, on_wait=waiting_for_gc, format=args.format,
                          backing_dirs=args.backing_dir, allow_dirty=args.allow_dirty)
    if args.json:
        emit_json(out)
    else:
        print(out["DiskId"])
    return 0


def cmd_list(args, client):
    out = client.describe_disks()
    if args.json:
        emit_json(out)
        return 0
    rows = [[d["DiskId"], d["DiskName"], d["Type"], d.get("Format", "raw"), human_bytes(d["Size"]), d["Path"]]
            for d in out["Disks"]["Disk"]]
    table(rows, ["DiskId", "Name", "Type", "Format", "Size", "Path"])
    return 0


def register(sub, common):
    disk = sub.add_parser("disk", help="register and list disk images")
    dsub = disk.add_subparsers(dest="disk_cmd", required=True, metavar="{add,list}")
    p = dsub.add_parser("add", parents=[common], help="register an image file or block device")
    p.add_argument("image")
    p.add_argument("--name", help="a name for the disk (default: the file name)")
    p.add_argument("--format", choices=["auto", "raw", "qcow2"], default="auto",
                   help="the image format (default: from the file's header, never its name; 'raw' snapshots the "
                        "file's bytes whatever they hold)")
    p.add_argument("--backing-dir", action="append", default=[], metavar="DIR",
                   help="a directory outside the image's own directory tree that its qcow2 backing files or data "
                        "file may be read from (repeatable; by default only that tree is followed)")
    p.add_argument("--allow-dirty", action="store_true",
                   help="snapshot a qcow2 even when its dirty bit is set or a running QEMU holds it open for "
                        "writing (crash-consistent at best)")
    p.set_defaults(func=cmd_add)
    p = dsub.add_parser("list", parents=[common], help="list registered disks")
    p.set_defaults(func=cmd_list)
