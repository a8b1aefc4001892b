"""blocksnap init / verify / gc: the repository as a whole."""
import sys

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
            print(f"DAMAGED chunk {d['ChunkId']}: {d['Problem']}")
            for a in d["Affected"]:
                offs = ", ".join(str(o) for o in a["Offsets"][:16])
                more = f" (+{len(a['Offsets']) - 16} more)" if len(a["Offsets"]) > 16 else ""
                print(f"  affects {a['SnapshotId']} at offset {offs}{more}")
        for p in out["Problems"]:
            print("PROBLEM " + ", ".join(f"{k}={v}" for k, v in p.items()))
        state = "OK" if out["Ok"] else "DAMAGED"
        print(f"{state}: {out['Checked']} chunks ({human_bytes(out['CheckedBytes'])}) checked "
              f"in {out['Snapshots']} snapshot(s); {len(out['Damaged'])} damaged")
    return 0 if out["Ok"] else 1


def cmd_gc(args, client):
    def waiting():
        print("gc: waiting for running snapshot creates, restores or verifies to finish", file=sys.stderr)

    out = client.gc(dry_run=args.dry_run, on_wait=waiting)
    if args.json:
        emit_json(out)
    else:
        verb = "would remove" if args.dry_run else "removed"
        print(f"gc {verb}: {len(out['ExpiredSnapshots'])} expired snapshot(s), {out['DeadChunks']} "
              f"unreferenced chunk(s) ({human_bytes(out['DeadBytes'])}), {out['OrphanPacks']} orphan pack(s) "
              f"({human_bytes(out['OrphanBytes'])}), {out['PendingReclaim']} interrupted reclaim(s)")
        for sid in out["ExpiredSnapshots"]:
            print(f"  expired {sid}")
        if not args.dry_run:
            print(f"freed {human_bytes(out['FreedBytes'])} on disk")
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
    p.set_defaults(func=cmd_gc)
