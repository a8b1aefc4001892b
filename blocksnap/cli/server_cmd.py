"""blocksnap api-key create / api-server: the cloud's own protocol (ECS OpenAPI) over a local repository."""
import json
import sys

from .. import interrupts
from ..api import validate_region
from .output import emit_json


def cmd_key_create(args, repo_path):
    from ..cloud import keys  # secrets (OpenSSL) only for these commands: it costs every command's start-up

    pair = keys.create(args.keys_file)
    emit_json(pair)
    print(f"blocksnap: the key is kept in {args.keys_file or keys.default_path()} (mode 0600)", file=sys.stderr)
    return 0


def _log(line):
    print(f"blocksnap api-server: {line}", file=sys.stderr, flush=True)


def cmd_server(args, client):
    from ..cloud import keys
    from ..cloud.server import ApiServer, parse_bind  # http.server only for this command

    if args.region:
        client.region = validate_region(args.region)
    store = keys.KeyStore(args.keys_file)
    count = store.check()
    server = ApiServer(client, store, parse_bind(args.bind), allow_remote=args.allow_remote,
                       log=None if args.quiet else _log)
    print(json.dumps({"Endpoint": server.endpoint, "RegionId": client.region, "KeysFile": store.path,
                      "Keys": count}), flush=True)
    if not count:
        _log(f"no API keys in {store.path} yet: every request is refused until 'blocksnap api-key create'")
    try:
        server.serve_forever()
    except (KeyboardInterrupt, interrupts.Terminated) as exc:
        _log(f"stopping ({interrupts.describe(exc)}): answering the requests under way")
    finally:
        server.server_close()
    server.wait_idle()  # a second signal ends the process at once
    return 0


def register(sub, common):
    p = sub.add_parser("api-key", help="API keys for the api-server")
    ksub = p.add_subparsers(dest="api_key_cmd", required=True, metavar="{create}")
    c = ksub.add_parser("create", parents=[common], help="make an AccessKey pair; prints {AccessKeyId, "
                                                        "AccessKeySecret}")
    c.add_argument("--keys-file", help="the keys file (default $BLOCKSNAP_API_KEYS, else "
                                       "~/.config/blocksnap/api-keys.json)")
    c.set_defaults(func=cmd_key_create, needs_client=False)
    p = sub.add_parser("api-server", parents=[common],
                       help="answer ECS OpenAPI requests (RPC, Version 2014-05-26) for this repository")
    p.add_argument("--bind", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="address to serve (default 127.0.0.1:8080; port 0: any free port)")
    p.add_argument("--allow-remote", action="store_true", help="serve an address that is not loopback")
    p.add_argument("--keys-file", help="the keys file (default $BLOCKSNAP_API_KEYS, else "
                                       "~/.config/blocksnap/api-keys.json)")
    p.add_argument("--region", help="the RegionId of the repository (default $BLOCKSNAP_REGION, else local)")
    p.add_argument("--quiet", action="store_true", help="no line per request on stderr")
    p.set_defaults(func=cmd_server)
