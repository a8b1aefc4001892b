"""The blocksnap command: argument parsing, the repository, errors as one line."""
import argparse
import json
import os
import sys
import traceback

from .. import __version__, clock, errors, interrupts
from ..api import Client
from ..repository import default_repo_path
from . import api_cmd, disk_cmd, forget_cmd, group_cmd, repo_cmd, restore_cmd, server_cmd, snapshot_cmd
from .output import emit_json


class _UsageError(Exception):
    """A command line argparse refused; reported as InvalidParameter like any other bad input."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def build_parser():
    common = _Parser(add_help=False)
    common.add_argument("--repo", default=argparse.SUPPRESS,
                        help="repository path (default $BLOCKSNAP_REPO, else ~/.local/share/blocksnap/repo)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    parser = _Parser(prog="blocksnap", parents=[common],
                                     description="Incremental, deduplicated snapshots of VM disk images.")
    parser.add_argument("--version", action="version", version=f"blocksnap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{init,disk,snapshot,restore,forget,verify,gc,repair,upgrade,resource-group,quota,"
                                        "api,api-key,api-server}")
    for mod in (repo_cmd, disk_cmd, snapshot_cmd, restore_cmd, forget_cmd, group_cmd, api_cmd, server_cmd):
        mod.register(sub, common)
    return parser


def _api_form(argv):
    """``(repo, words)`` if ``argv`` is ``[--repo DIR] [--json] api WORDS...`` (the API's own form, whose
    ``--Param`` words argparse must not see), else None."""
    i, repo = 0, None
    while i < len(argv):
        word = argv[i]
        if word == "--json":
            i += 1
        elif word == "--repo" and i + 1 < len(argv):
            repo, i = argv[i + 1], i + 2
        elif word.startswith("--repo="):
            repo, i = word[len("--repo="):], i + 1
        else:
            break
    if i < len(argv) and argv[i] == "api":
        return repo, argv[i + 1:]
    return None


def _fail(exc, as_json):
    if as_json:
        emit_json({"Error": exc.to_dict()})
    print(f"blocksnap: error: {exc.code}: {exc}", file=sys.stderr)
    return exc.exit_code


def _stdout_gone():
    """stdout is a closed pipe (``blocksnap ... | head``): send what is left nowhere, quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + 13  # as if killed by SIGPIPE, like other commands in a pipeline


def main(argv=None):
    """Run the CLI; returns (and exits with) the process exit code."""
    arg_list = sys.argv[1:] if argv is None else list(argv)
    api_form = _api_form(arg_list)
    if api_form is not None:
        args = argparse.Namespace(json=False, command="api")
    else:
        try:
            args = build_parser().parse_args(arg_list)
        except _UsageError as exc:
            return _fail(errors.InvalidParameter(f"({exc})"), "--json" in arg_list)
    args.json = getattr(args, "json", False)
    explicit = getattr(args, "repo", None)
    repo_path = explicit or os.environ.get("BLOCKSNAP_REPO") or None
    client = None
    interrupts.install()
    from .. import _native

    # LMDB aborts the process on some damaged pages (its assertion line comes first): end as damage instead.
    _native.abort_exit("blocksnap: error: Repository.CatalogDamaged: LMDB stopped on a damaged page of the catalog; "
                       "'blocksnap verify' names what it affects and 'blocksnap repair' rebuilds it from the store.")
    try:
        if api_form is not None:
            code = api_cmd.run(api_form[1], repo=api_form[0])  # prints its own errors, as JSON
        elif not getattr(args, "needs_client", True):
            code = args.func(args, repo_path or default_repo_path())
        else:
            now = clock.from_env()  # BLOCKSNAP_NOW: the test clock (docs/API.md, "The clock")
            try:
                client = Client(repo_path, maintenance=getattr(args, "maintenance", False), clock=now)
            except (errors.CatalogDamaged, errors.CatalogMissing, errors.CatalogStale) as exc:
                if args.command != "verify":
                    raise
                client = Client(repo_path, maintenance=True, clock=now)  # verify reports what the lost catalog affects
                client.catalog_problem = exc
            code = args.func(args, client)
    except errors.BlocksnapError as exc:
        code = _fail(exc, args.json)
    except KeyboardInterrupt:
        print("blocksnap: interrupted by SIGINT", file=sys.stderr)
        code = 130
    except interrupts.Terminated as exc:
        print(f"blocksnap: {exc}", file=sys.stderr)
        code = 128 + exc.signum
    except BrokenPipeError:
        code = _stdout_gone()
    except Exception as exc:  # a bug: one line and the failure exit code, the traceback on request
        if os.environ.get("BLOCKSNAP_DEBUG"):
            traceback.print_exc()
        detail = f"({type(exc).__name__}: {exc}; set BLOCKSNAP_DEBUG=1 for the traceback)"
        try:
            if api_form is not None:
                internal = errors.InternalError(detail)
                print(json.dumps(api_cmd.error_body(internal), ensure_ascii=False), file=sys.stderr)
                code = internal.exit_code
            else:
                code = _fail(errors.InternalError(detail), args.json)
        except BrokenPipeError:
            code = _stdout_gone()
    finally:
        if client is not None:
            client.close()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = _stdout_gone()
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
    except BrokenPipeError:
        code = _stdout_gone()
    except (OSError, ValueError):
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    entry()
