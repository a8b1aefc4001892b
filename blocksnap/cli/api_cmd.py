"""blocksnap api ACTION --Param value ...: the cloud API's own form on the command line, as the aliyun CLI
takes it (``aliyun ecs CreateSnapshot --DiskId d-... --Tag.1.Key env --Tag.1.Value prod``).

Parameters are the API's names, values their text as on the wire: flat repeat lists (``--Tag.1.Key k``),
JSON text for list parameters (``--SnapshotIds '["s-1","s-2"]'``), ``true``/``false``. A required
``RegionId`` the command line leaves out is the repository's region (the aliyun CLI fills it from its
profile). Success: the response JSON on stdout, exit 0. Failure: ``{"Code", "Message", "HttpStatusCode",
"RequestId"}`` as JSON on stderr and the error's exit code. The action table (blocksnap/cloud/actions.py)
is what this module parses against and what its help lists.
"""
import json
import os
import sys

from .. import clock, errors
from ..api import Client, request_id
from ..cloud import actions

USAGE = "usage: blocksnap api ACTION [--Param VALUE ...] [--repo DIR]"


class Request:
    """A parsed ``blocksnap api`` command line."""

    __slots__ = ("action", "help", "params", "repo")

    def __init__(self):
        self.action = None
        self.help = False
        self.params = {}
        self.repo = None


def parse_args(argv):
    """The Request of ``argv`` (the words after ``api``).

    ``--Name VALUE`` and ``--Name=VALUE`` give a parameter (the next word is its value, whatever it looks
    like); ``--repo DIR``, ``--json`` (output is always JSON) and ``--help`` are the command's own options.

    Raises:
        InvalidParameter for a word that is none of these, a parameter given twice or without a value.
    """
    req = Request()
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word in ("--help", "-h"):
            req.help = True
            continue
        if word == "--json":
            continue
        if not word.startswith("--"):
            if req.action is not None:
                raise errors.InvalidParameter(f"(unexpected {word!r}: parameters are given as --Name VALUE; "
                                              "see 'blocksnap api --help')")
            req.action = word
            continue
        name, sep, value = word[2:].partition("=")
        if name != "repo" and not name[:1].isupper():
            raise errors.InvalidParameter(f"(unknown option --{name}: API parameters start with a capital "
                                          "letter, as in --DiskId; see 'blocksnap api --help')")
        if not sep:
            if i >= len(words):
                raise errors.InvalidParameter(f"(--{name} needs a value)")
            value = words[i]
            i += 1
        if name == "repo":
            req.repo = value
            continue
        if name in req.params:
            raise errors.InvalidParameter(f"(--{name} is given twice)")
        req.params[name] = value
    return req


def _param_usage(p):
    if p.type == actions.REPEAT_LIST:
        if p.fields:
            return ", ".join(f"--{p.name}.N.{f}" for f in p.fields)
        return f"--{p.name}.N"
    return f"--{p.name}"


def actions_help():
    """The text of ``blocksnap api --help``."""
    width = max(len(name) for name in actions.ACTIONS)
    lines = [USAGE, "",
             "The cloud API's own form (Alibaba Cloud ECS OpenAPI, Version " + actions.VERSION + "), as the aliyun",
             "CLI takes it. Parameters are the API's names; values are text: --Tag.1.Key k --Tag.1.Value v, JSON",
             "text for lists (--SnapshotIds '[\"s-...\"]'), true/false. A required RegionId left out is the",
             "repository's region. Success: the response JSON on stdout, exit 0. Failure: {\"Code\", \"Message\",",
             "\"HttpStatusCode\", \"RequestId\"} on stderr and a non-zero exit code.", "", "actions:"]
    for action in actions.ACTIONS.values():
        lines.append(f"  {action.name:<{width}}  {action.help}")
    lines += ["", "'blocksnap api ACTION --help' lists the parameters of one action."]
    return "\n".join(lines)


def action_help(action):
    """The text of ``blocksnap api ACTION --help``."""
    required = " ".join(f"{_param_usage(p)} VALUE" for p in action.params if p.required)
    lines = [f"usage: blocksnap api {action.name} {required + ' ' if required else ''}[--Param VALUE ...]", "",
             action.help, "", "parameters:"]
    rows = []
    for p in action.params:
        flags = "required" if p.required else ""
        local = "" if p.local == actions.SUPPORTED else f" [{p.local}]"
        rows.append((_param_usage(p), p.type, flags, p.help + local))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        lines.append(f"  {r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip())
    lines += ["", f"[{actions.NO_EFFECT}]: accepted, nothing to do on a local repository.",
              f"[{actions.LATER}]: refused (InvalidParameter) until it is built."]
    return "\n".join(lines)


def error_body(exc):
    """The failure JSON of ``blocksnap api``: ``{"Code", "Message", "HttpStatusCode", "RequestId"}``."""
    return {"Code": exc.code, "Message": str(exc), "HttpStatusCode": exc.http_status,
            "RequestId": exc.request_id or request_id()}


def _print_json(obj, stream):
    json.dump(obj, stream, indent=2, ensure_ascii=False)
    stream.write("\n")


def run(argv, repo=None):
    """Run ``blocksnap api`` with ``argv`` (the words after ``api``); ``repo`` is a ``--repo`` given before
    ``api``. Returns the exit code.

    Errors (BlocksnapError) are printed as their JSON body on stderr; others propagate to the caller.
    """
    try:
        req = parse_args(argv)
        if req.help:
            print(actions_help() if req.action is None else action_help(actions.get(req.action)))
            return 0
        if req.action is None:
            raise errors.InvalidParameter("(give an action, as in 'blocksnap api DescribeRegions'; see "
                                          "'blocksnap api --help')")
        action = actions.get(req.action)
        path = req.repo or repo or os.environ.get("BLOCKSNAP_REPO") or None
        with Client(path, clock=clock.from_env()) as client:
            params = dict(req.params)
            region = action.by_name.get("RegionId")
            if region is not None and region.required and "RegionId" not in params:
                params["RegionId"] = client.region
            out = client.call(action.name, params)
    except errors.BlocksnapError as exc:
        _print_json(error_body(exc), sys.stderr)
        return exc.exit_code
    _print_json(out, sys.stdout)
    return 0


def register(sub, common):
    """``api`` in ``blocksnap --help``; main() hands its command lines to :func:`run` before argparse sees them
    (its --Param words are the API's, not options argparse knows)."""
    sub.add_parser("api", add_help=False, help="the cloud API's own form: blocksnap api ACTION --Param VALUE "
                                               "(see 'blocksnap api --help')")
