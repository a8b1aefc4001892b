"""The blocksnap command: argument parsing, the repository, errors as one line."""
import argparse
import os
import sys

import lmdb

from .. import __version__, errors
from ..api import Client
from ..repository import default_repo_path, map_lmdb_error
from . import disk_cmd, repo_cmd, restore_cmd, snapshot_cmd
from .output import emit_json


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--repo", default=argparse.SUPPRESS,
                        help="repository path (default $BLOCKSNAP_REPO, else ~/.local/share/blocksnap/repo)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    parser = argparse.ArgumentParser(prog="blocksnap", parents=[common],
                                     description="Incremental, deduplicated snapshots of VM disk images.")
    parser.add_argument("--version", action="version", version=f"blocksnap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{init,disk,snapshot,restore,verify,gc}")
    for mod in (repo_cmd, disk_cmd, snapshot_cmd, restore_cmd):
        mod.register(sub, common)
    return parser


def _fail(exc, as_json):
    if as_json:
        emit_json({"Error": exc.to_dict()})
    print(f"blocksnap: error: {exc.code}: {exc}", file=sys.stderr)
    return exc.exit_code


def main(argv=None):
    """Run the CLI; returns (and exits with) the process exit code."""
    args = build_parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    explicit = getattr(args, "repo", None)
    repo_path = explicit or os.environ.get("BLOCKSNAP_REPO") or None
    client = None
    try:
        if not getattr(args, "needs_client", True):
            code = args.func(args, repo_path or default_repo_path())
        else:
            client = Client(repo_path)
            code = args.func(args, client)
    except errors.BlocksnapError as exc:
        code = _fail(exc, args.json)
    except lmdb.Error as exc:
        code = _fail(map_lmdb_error(exc), args.json)
    except KeyboardInterrupt:
        print("blocksnap: interrupted", file=sys.stderr)
        code = 130
    except OSError as exc:
        code = _fail(errors.InternalError(f"({exc})"), args.json)
    finally:
        if client is not None:
            client.close()
    sys.stdout.flush()
    return code


def entry():
    """The ``blocksnap`` command: main(), then leave without the interpreter's teardown.

    By now the repository is closed and every file written and closed; what is left is freeing
    objects and modules, 5-10 ms that every command would wait for. If the output cannot be
    flushed (a closed pipe), the normal exit reports it.
    """
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    entry()
