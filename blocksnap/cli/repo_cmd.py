"""blocksnap init / verify / gc / repair / upgrade: the repository as a whole."""
import sys

from .. import errors
from ..api import Client
from ..repository import DEFAULT_CHUNK_SIZE
from .output import emit_json, human_bytes, progress_for, waiting_for_gc


def _size(text):
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("ib").rstrip("b") if text[-1:].lower() in "bi" else text.strip().lower()
    if t and t[-1] in units:
        return int(t[:-1]) * units[t[-1]]
    return int(t)


def cmd_init(args, repo_path):
    cfg = Client.init(repo_path, args.chunk_size)
    if args.json:
        emit_json(cfg)
    else:
        print(f"Initialized blocksnap repository {cfg['Path']} (chunk size {human_bytes(cfg['ChunkSize'])})")
    return 0


def cmd_verify(args, client):
    bar = progress_for(args, "verify")
    out = client.verify(args.snapshot_id, progress=bar, on_wait=waiting_for_gc)
    bar.close()
    if args.json:
        emit_json(out)
    else:
        for d in out["Damaged"]:
            print(f"DAMAGED {d['What']}: {d['Problem']}")
            for a in d["Affected"]:
                if not a["Offsets"]:
                    print(f"  affects {a['SnapshotId']}")
                    continue
                offs = ", ".join(str(o) for o in a["Offsets"][:16])
                more = f" (+{len(a['Offsets']) - 16} more)" if len(a["Offsets"]) > 16 else ""
                print(f"  affects {a['SnapshotId']} at offset {offs}{more}")
        for p in out["Problems"]:
            print(f"PROBLEM {p.get('What', '')}: {p.get('Problem', '')}")
        state = "OK" if out["Ok"] else "DAMAGED"
        print(f"{state}: {out['Checked']} chunks ({human_bytes(out['CheckedBytes'])}) checked "
              f"in {out['Snapshots']} snapshot(s); {len(out['Damaged'])} damaged, {len(out['Problems'])} problem(s)")
        if out["AffectedSnapshots"]:
            print("affected snapshots: " + " ".join(out["AffectedSnapshots"]))
    return 0 if out["Ok"] else 1


def cmd_gc(args, client):
    def waiting():
        print("gc: waiting for running snapshot creates to finish", file=sys.stderr)

    def readers():
        print("gc: waiting for restores or verifies that started earlier to finish", file=sys.stderr)

    out = client.gc(dry_run=args.dry_run, on_wait=waiting, on_readers=readers, max_unused=args.max_unused)
    if args.json:
        emit_json(out)
    else:
        verb = "would remove" if args.dry_run else "removed"
        print(f"gc {verb}: {len(out['ExpiredSnapshots'])} expired snapshot(s), {len(out['FailedRecords'])} old "
              f"failed record(s), {out['DeadChunks']} unreferenced chunk(s) ({human_bytes(out['DeadBytes'])}), "
              f"{out['UnnamedRecords']} unindexed record(s) ({human_bytes(out['UnnamedBytes'])}), "
              f"{out['OrphanPacks']} orphan pack(s) ({human_bytes(out['OrphanBytes'])}), "
              f"{out['PendingReclaim']} interrupted reclaim(s)")
        if args.max_unused is not None:
            print(f"  repack: {out['RepackPacks']} pack(s), {human_bytes(out['RepackBytes'])} of live records")
        if out["DiskObjectsRemoved"]:
            print(f"  removed {out['DiskObjectsRemoved']} disk object(s) that an interrupted 'disk add' left")
        for sid in out["ExpiredSnapshots"]:
            print(f"  expired {sid}")
        for p in out["Problems"]:
            print(f"PROBLEM {p}")
        if not args.dry_run:
            print(f"freed {human_bytes(out['FreedBytes'])} on disk")
    return 0


def _fraction(text):
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise errors.InvalidParameter(f"(--max-unused takes a percentage like 10% or a fraction like 0.1, got {t!r})")
    if not 0 <= value <= 1:
        raise errors.InvalidParameter(f"(--max-unused must be from 0% to 100%, got {t!r})")
    return value


def cmd_repair(args, client):
    out = client.repair(on_wait=waiting_for_gc)
    if args.json:
        emit_json(out)
    else:
        print(f"Rebuilt the catalog from the store: {out['Snapshots']} snapshot(s), {out['Disks']} disk(s), "
              f"{out['Chunks']} chunk(s), {out['Segments']} map segment(s) from {out['Packs']} pack(s); "
              f"{out['FailedRecords']} failed record(s) kept; {out['ObjectsRewritten']} object(s) and "
              f"{out['SegmentsRewritten']} segment(s) written anew from the old catalog")
        for lost in out["Lost"]:
            print(f"LOST {lost['SnapshotId']}: {lost['Problem']}")
        for part in out["Incomplete"]:
            print(f"INCOMPLETE {part['SnapshotId']}: {part['Problem']}")
        for p in out["Problems"]:
            print(f"PROBLEM {p['What']}: {p['Problem']}")
    return 1 if out["Lost"] or out["Incomplete"] else 0


def cmd_upgrade(args, client):
    out = client.upgrade()
    if args.json:
        emit_json(out)
    elif out["From"] == out["To"]:
        print(f"The repository is in format version {out['To']} already.")
    else:
        print(f"Upgraded the repository from format version {out['From']} to {out['To']}: {out['Snapshots']} "
              f"snapshot(s), {out['Disks']} disk(s), {out['Packs']} pack(s) given trailers")
    return 0


def register(sub, common):
    p = sub.add_parser("init", parents=[common], help="create a repository")
    p.add_argument("--chunk-size", type=_size, default=DEFAULT_CHUNK_SIZE,
                   help="chunk size in bytes, a power of two from 4K to 4M (default 256K)")
    p.set_defaults(func=cmd_init, needs_client=False)
    p = sub.add_parser("verify", parents=[common], help="re-read and check stored chunks")
    p.add_argument("snapshot_id", nargs="?", help="only this snapshot's chunks")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("gc", parents=[common], help="expire old snapshots and reclaim unreferenced space")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--max-unused", type=_fraction, metavar="PERCENT",
                   help="also repack packs with more than this share unused (e.g. 10%%): copy their live records "
                        "into new packs and remove them whole")
    p.set_defaults(func=cmd_gc)
    p = sub.add_parser("repair", parents=[common], help="rebuild the catalog from the store")
    p.set_defaults(func=cmd_repair, maintenance=True)
    p = sub.add_parser("upgrade", parents=[common], help="upgrade a repository to the current format version")
    p.set_defaults(func=cmd_upgrade, maintenance=True)
