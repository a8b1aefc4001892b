"""blocksnap forget: remove the snapshots a keep policy does not keep (restic's forget, borg's prune)."""
from .output import emit_json, table


def cmd_forget(args, client):
    out = client.forget(disk_id=args.disk_id, keep_last=args.keep_last, keep_hourly=args.keep_hourly,
                        keep_daily=args.keep_daily, keep_weekly=args.keep_weekly, keep_monthly=args.keep_monthly,
                        keep_yearly=args.keep_yearly, keep_tags=args.keep_tag, dry_run=args.dry_run)
    if args.json:
        emit_json(out)
        return 0
    rows = [[k["SnapshotId"], k["SourceDiskId"], k["CreationTime"], "keep", ", ".join(k["Reasons"])]
            for k in out["Keep"]]
    rows += [[r["SnapshotId"], r["SourceDiskId"], r["CreationTime"], "would remove" if args.dry_run else "removed",
              ""] for r in out["Remove"]]
    rows.sort(key=lambda r: (r[1], r[2]), reverse=True)
    table(rows, ["SnapshotId", "DiskId", "CreationTime", "Action", "Kept by"])
    if args.dry_run:
        print(f"{len(out['Remove'])} snapshot(s) would be removed, {len(out['Keep'])} kept (dry run)")
    else:
        print(f"{out['Removed']} snapshot(s) removed, {len(out['Keep'])} kept")
    return 0


def _count(text):
    n = int(text)
    if n < 0:
        raise ValueError(text)
    return n


def register(sub, common):
    p = sub.add_parser("forget", parents=[common],
                       help="remove the snapshots a keep policy does not keep (as restic forget, borg prune)")
    p.add_argument("--disk-id", help="only this disk's snapshots (default: every disk, each on its own)")
    for rule, what in (("last", "the N newest snapshots"), ("hourly", "the newest snapshot of each of N hours"),
                       ("daily", "... of N days"), ("weekly", "... of N ISO weeks"), ("monthly", "... of N months"),
                       ("yearly", "... of N years")):
        p.add_argument(f"--keep-{rule}", type=_count, default=0, metavar="N", help=f"keep {what} (UTC)")
    p.add_argument("--keep-tag", action="append", default=[], metavar="KEY[=VALUE]",
                   help="keep every snapshot with this tag (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="show what would be removed; remove nothing")
    p.set_defaults(func=cmd_forget)
