"""blocksnap restore."""
from .output import emit_json, human_bytes, progress_for, waiting_for_gc


def cmd_restore(args, client):
    bar = progress_for(args, "restore")
    try:
        out = client.restore(args.snapshot_id, args.output, in_place=args.in_place, progress=bar,
                             sync=args.sync, on_wait=waiting_for_gc, format=args.format, compress=args.compress)
    finally:
        bar.close()
    if args.json:
        emit_json(out)
    else:
        print(f"Restored {args.snapshot_id} to {args.output}: {human_bytes(out['Size'])} image, "
              f"{human_bytes(out['RestoredBytes'])} of data written")
    return 0


def register(sub, common):
    p = sub.add_parser("restore", parents=[common], help="write a snapshot to a sparse raw image, a device or a new qcow2 file")
    p.add_argument("snapshot_id")
    p.add_argument("output", help="a new file, an existing block device, or an existing file with --in-place")
    p.add_argument("--in-place", action="store_true",
                   help="write into an existing file without truncating it (zero chunks are punched)")
    p.add_argument("--format", choices=["raw", "qcow2"], default="raw",
                   help="the output's format (default raw); qcow2 writes a new sparse qcow2 v3 file")
    p.add_argument("--compress", action="store_true",
                   help="with --format qcow2: zstd-compressed clusters where that shrinks them")
    p.add_argument("--sync", action="store_true",
                   help="fsync the output before exiting (default: leave write-back to the kernel, as cp does)")
    p.set_defaults(func=cmd_restore)
