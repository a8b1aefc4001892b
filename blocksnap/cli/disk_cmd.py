"""blocksnap disk add / list."""
from .output import emit_json, human_bytes, table, waiting_for_gc


def cmd_add(args, client):
    out = client.add_disk(args.image, args.name, on_wait=waiting_for_gc)
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
    rows = [[d["DiskId"], d["DiskName"], d["Type"], human_bytes(d["Size"]), d["Path"]] for d in out["Disks"]["Disk"]]
    table(rows, ["DiskId", "Name", "Type", "Size", "Path"])
    return 0


def register(sub, common):
    disk = sub.add_parser("disk", help="register and list disk images")
    dsub = disk.add_subparsers(dest="disk_cmd", required=True, metavar="{add,list}")
    p = dsub.add_parser("add", parents=[common], help="register an image file or block device")
    p.add_argument("image")
    p.add_argument("--name", help="a name for the disk (default: the file name)")
    p.set_defaults(func=cmd_add)
    p = dsub.add_parser("list", parents=[common], help="list registered disks")
    p.set_defaults(func=cmd_list)
