"""blocksnap snapshot create / list / delete."""
import sys

from .output import emit_json, human_bytes, progress_for, table, waiting_for_gc


def _tag(text):
    key, sep, value = text.partition("=")
    return {"Key": key, "Value": value if sep else ""}


def _filter_tag(text):
    key, sep, value = text.partition("=")
    return {"Key": key, "Value": value if sep else None}


def _bool(text):
    if text.lower() not in ("true", "false"):
        raise ValueError(text)
    return text.lower() == "true"


def cmd_create(args, client):
    bar = progress_for(args, "snapshot")
    try:
        out = client.create_snapshot(args.disk_id, snapshot_name=args.snapshot_name, description=args.description,
                                     retention_days=args.retention_days, tags=args.tag,
                                     client_token=args.client_token, category=args.category, progress=bar,
                                     on_wait=waiting_for_gc, resource_group_id=args.resource_group_id,
                                     instant_access=args.instant_access,
                                     instant_access_retention_days=args.instant_access_retention_days,
                                     storage_location_arn=args.storage_location_arn)
    finally:
        bar.close()
    if args.json:
        emit_json(out)
    else:
        print(f"SnapshotId: {out['SnapshotId']}")
        print(f"RequestId: {out['RequestId']}")
    [rec] = client.describe_snapshots(snapshot_ids=[out["SnapshotId"]], sizes=False)["Snapshots"]["Snapshot"]
    if rec.get("SourceDiskType") == "block":
        print("blocksnap: note: the disk is a block device; writes made to it while it was read cannot be "
              "detected, so the snapshot is point-in-time only if nothing wrote to it (freeze or snapshot "
              "it first)", file=sys.stderr)
    return 0


def cmd_list(args, client):
    out = client.describe_snapshots(disk_id=args.disk_id, snapshot_ids=args.snapshot_ids, status=args.status,
                                    snapshot_name=args.snapshot_name, snapshot_type=args.snapshot_type,
                                    category=args.category, tags=args.tag, resource_group_id=args.resource_group_id,
                                    page_number=args.page_number, page_size=args.page_size,
                                    max_results=args.max_results, next_token=args.next_token)
    if args.json:
        emit_json(out)
        return 0
    rows = []
    for s in out["Snapshots"]["Snapshot"]:
        rows.append([s["SnapshotId"], s.get("SnapshotName") or "-", s["SourceDiskId"], s["Status"], s["Progress"],
                     s["CreationTime"], human_bytes(s["SourceDiskSize"]), human_bytes(s.get("LogicalBytes")),
                     human_bytes(s.get("AddedBytes")), human_bytes(s.get("ExclusiveBytes"))])
    table(rows, ["SnapshotId", "Name", "DiskId", "Status", "Progress", "Created", "Size", "Logical", "Added",
                 "FreedIfDeleted"])
    if out["NextToken"]:
        print(f"more: --max-results {out['PageSize']} --next-token {out['NextToken']}", file=sys.stderr)
    return 0


def cmd_delete(args, client):
    out = client.delete_snapshot(args.snapshot_id)
    if args.json:
        emit_json(out)
    else:
        print(f"Deleted {args.snapshot_id}: {out['FreedChunks']} chunk(s) no longer referenced, "
              f"{human_bytes(out['ReclaimedBytes'])} given back now")
        for p in out.get("Problems", []):
            print(f"PROBLEM {p.get('ChunkId') or p.get('Segment')}: {p['Problem']} (run 'blocksnap verify')",
                  file=sys.stderr)
    return 0


def register(sub, common):
    snap = sub.add_parser("snapshot", help="create, list and delete snapshots")
    ssub = snap.add_subparsers(dest="snapshot_cmd", required=True, metavar="{create,list,delete}")
    p = ssub.add_parser("create", parents=[common], help="snapshot a disk (CreateSnapshot)")
    p.add_argument("disk_id")
    p.add_argument("--snapshot-name")
    p.add_argument("--description")
    p.add_argument("--retention-days", type=str, help="delete automatically (at gc) after 1-65536 days")
    p.add_argument("--tag", action="append", type=_tag, metavar="KEY=VALUE", help="up to 20 tags")
    p.add_argument("--client-token", help="idempotency token (ASCII, at most 64 characters)")
    p.add_argument("--category", help="Standard or Flash (accepted and recorded, as CreateSnapshot does)")
    p.add_argument("--resource-group-id", help="the snapshot's resource group (blocksnap resource-group list)")
    p.add_argument("--instant-access", type=_bool, metavar="true|false",
                   help="the cloud's deprecated switch, recorded (every local snapshot is available at once)")
    p.add_argument("--instant-access-retention-days", help="1-65535, with --instant-access true")
    p.add_argument("--storage-location-arn", help="refused: the repository knows no storage location")
    p.set_defaults(func=cmd_create)
    p = ssub.add_parser("list", parents=[common], help="list snapshots (DescribeSnapshots)")
    p.add_argument("--disk-id")
    p.add_argument("--snapshot-ids", metavar="JSON", help='only these: a JSON array, \'["s-...", ...]\'')
    p.add_argument("--snapshot-name")
    p.add_argument("--status", help="progressing, accomplished, failed or all")
    p.add_argument("--snapshot-type", help="auto, user or all")
    p.add_argument("--category")
    p.add_argument("--tag", action="append", type=_filter_tag, metavar="KEY[=VALUE]",
                   help="only snapshots with this tag (without =VALUE: any value); repeatable, all must match")
    p.add_argument("--resource-group-id")
    p.add_argument("--page-number", type=int)
    p.add_argument("--page-size", type=int, help="1-100 (default: every snapshot on one page)")
    p.add_argument("--max-results", type=int, help="1-100, with --next-token paging")
    p.add_argument("--next-token")
    p.set_defaults(func=cmd_list)
    p = ssub.add_parser("delete", parents=[common], help="delete a snapshot (DeleteSnapshot)")
    p.add_argument("snapshot_id")
    p.set_defaults(func=cmd_delete)
