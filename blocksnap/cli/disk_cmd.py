"""blocksnap disk add / list / lock / unlock."""
from .output import emit_json, human_bytes, table, waiting_for_gc


def cmd_add(args, client):
    out = client.add_disk(args.image, args.name, on_wait=waiting_for_gc, format=args.format,
                          backing_dirs=args.backing_dir, allow_dirty=args.allow_dirty)
    if args.json:
        emit_json(out)
    else:
        print(out["DiskId"])
    return 0


def cmd_lock(args, client):
    out = (client.lock_disk if args.disk_cmd == "lock" else client.unlock_disk)(args.disk_id)
    if args.json:
        emit_json(out)
    else:
        state = "locked (CreateSnapshot: InstanceLockedForSecurity)" if args.disk_cmd == "lock" else "unlocked"
        print(f"{out['DiskId']} {state}")
    return 0


def cmd_list(args, client):
    given = {k: v for k, v in (("disk_ids", args.disk_ids), ("disk_name", args.disk_name),
                               ("lock_reason", args.lock_reason), ("page_number", args.page_number),
                               ("page_size", args.page_size), ("max_results", args.max_results),
                               ("next_token", args.next_token)) if v is not None}
    out = client.describe_disks(**given)
    if args.json:
        emit_json(out)
        return 0
    rows = [[d["DiskId"], d["DiskName"], d["Type"], d.get("Format", "raw"), human_bytes(d["Size"]),
             ",".join(x["LockReason"] for x in d["OperationLocks"]["OperationLock"]) or "-", d["Path"]]
            for d in out["Disks"]["Disk"]]
    table(rows, ["DiskId", "Name", "Type", "Format", "Size", "Locked", "Path"])
    return 0


def register(sub, common):
    disk = sub.add_parser("disk", help="register and list disk images")
    dsub = disk.add_subparsers(dest="disk_cmd", required=True, metavar="{add,list,lock,unlock}")
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
    p = dsub.add_parser("list", parents=[common], help="list registered disks (DescribeDisks)")
    p.add_argument("--disk-ids", metavar="JSON", help='only these: a JSON array, \'["d-...", ...]\'')
    p.add_argument("--disk-name")
    p.add_argument("--lock-reason", help="security: only the locked disks")
    p.add_argument("--page-number", type=int)
    p.add_argument("--page-size", type=int, help="1-100 (default: every disk on one page)")
    p.add_argument("--max-results", type=int, help="10-500, with --next-token paging")
    p.add_argument("--next-token")
    p.set_defaults(func=cmd_list)
    p = dsub.add_parser("lock", parents=[common],
                        help="lock a disk for security: CreateSnapshot of it fails with InstanceLockedForSecurity")
    p.add_argument("disk_id")
    p.set_defaults(func=cmd_lock)
    p = dsub.add_parser("unlock", parents=[common], help="lift the lock of 'disk lock'")
    p.add_argument("disk_id")
    p.set_defaults(func=cmd_lock)
