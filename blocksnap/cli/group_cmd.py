"""blocksnap resource-group create / list / delete, and blocksnap quota: the repository's local registry of
resource groups and its quotas (docs/API.md, "Resource groups" and "Quotas")."""
from .output import emit_json, table


def cmd_group_create(args, client):
    out = client.create_resource_group(args.name, args.display_name)
    if args.json:
        emit_json(out)
    else:
        print(out["ResourceGroup"]["ResourceGroupId"])
    return 0


def cmd_group_list(args, client):
    out = client.list_resource_groups()
    if args.json:
        emit_json(out)
        return 0
    rows = [[g["ResourceGroupId"], g["Name"], g["DisplayName"], g["CreationTime"]]
            for g in out["ResourceGroups"]["ResourceGroup"]]
    table(rows, ["ResourceGroupId", "Name", "DisplayName", "Created"])
    return 0


def cmd_group_delete(args, client):
    out = client.delete_resource_group(args.group_id)
    if args.json:
        emit_json(out)
    else:
        print(f"Deleted resource group {args.group_id}")
    return 0


def cmd_quota(args, client):
    if args.snapshots_per_disk is None and args.concurrent_snapshots is None and not args.reset:
        out = client.quotas()
    else:
        out = client.set_quotas(args.snapshots_per_disk, args.concurrent_snapshots, args.reset or ())
    if args.json:
        emit_json(out)
    else:
        for name, value in out["Quotas"].items():
            print(f"{name}: {'no limit' if value is None else value}")
    return 0


def register(sub, common):
    grp = sub.add_parser("resource-group", help="the repository's resource groups (CreateSnapshot ResourceGroupId)")
    gsub = grp.add_subparsers(dest="group_cmd", required=True, metavar="{create,list,delete}")
    p = gsub.add_parser("create", parents=[common], help="add a resource group; prints its ResourceGroupId")
    p.add_argument("name", help="3-50 letters, digits and hyphens, unique")
    p.add_argument("--display-name", help="1-50 characters (default: the name)")
    p.set_defaults(func=cmd_group_create)
    p = gsub.add_parser("list", parents=[common], help="list the resource groups, the default one first")
    p.set_defaults(func=cmd_group_list)
    p = gsub.add_parser("delete", parents=[common], help="remove an empty resource group")
    p.add_argument("group_id")
    p.set_defaults(func=cmd_group_delete)
    p = sub.add_parser("quota", parents=[common], help="show or set the repository's snapshot quotas")
    p.add_argument("--snapshots-per-disk", type=int, metavar="N",
                   help="manual snapshots one disk may have (default 256: QuotaExceed.Snapshot past it)")
    p.add_argument("--concurrent-snapshots", type=int, metavar="N",
                   help="creates that may run at once in the repository (default: no limit; past it "
                        "QuotaExceed.ConcurrentSnapshotQuota)")
    p.add_argument("--reset", action="append", choices=["SnapshotsPerDisk", "ConcurrentSnapshots"],
                   help="set a quota back to its default")
    p.set_defaults(func=cmd_quota)
