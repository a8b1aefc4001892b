"""The api-server: ECS OpenAPI (RPC style, Version 2014-05-26) over HTTP, so that programs written against the
cloud (the official SDK ``alibabacloud-ecs20140526``, the aliyun CLI, hand-signed requests) drive a local
repository unchanged. docs/API.md, "api-server".

A request names its action in the ``x-acs-action`` header or the ``Action`` parameter; parameters come in the
query string or an ``application/x-www-form-urlencoded`` body. It must be signed with an AccessKey from the
keys file (keys.py), either ACS3-HMAC-SHA256 in ``Authorization`` (signature V3, what the SDK sends) or HMAC-SHA1
signature v1 (``Signature``, ``SignatureMethod``, ``SignatureNonce``, ``Timestamp``, ``AccessKeyId``
parameters); signing.py has both algorithms. Its timestamp must be within 15 minutes of the server's clock
(the Client's, so ``BLOCKSNAP_NOW`` moves it) and its nonce unused in that window. Every check happens before
the action runs: a request that fails one does nothing. Answers are JSON: the action's response, or the
cloud's error body ``{"RequestId", "HostId", "Code", "Message"}`` with the error's HTTP status.

:class:`Gateway` is the protocol (checks and dispatch, no sockets); :class:`ApiServer` the threaded HTTP server
around it, which bounds what a client can make it hold: the size of a body, the time a connection may stay
silent, the number of connections served at once. A malformed request gets an error answer; nothing a client
sends ends the server.
"""
import contextlib
import hashlib
import ipaddress
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote_plus

from .. import clock as clocks
from .. import errors
from ..api import request_id
from . import actions, signing

WINDOW = 15 * 60  # seconds a request's timestamp may be off the server's clock, and how long a nonce is kept
MAX_BODY = 1 << 20  # bytes of a request body
MAX_NONCES = 1_000_000  # nonces remembered at once (one window's worth); past it requests are Throttling
MAX_CONNECTIONS = 64  # connections served at once; one more is answered Throttling at once
IDLE_TIMEOUT = 30.0  # seconds a connection may send nothing before it is closed
FORM = "application/x-www-form-urlencoded"

# Parameters of the protocol (signature v1, the common parameters), not of any action.
PROTOCOL_PARAMS = frozenset(("Action", "Version", "Format", "AccessKeyId", "Signature", "SignatureMethod",
                             "SignatureVersion", "SignatureNonce", "SignatureType", "Timestamp", "SecurityToken",
                             "BearerToken"))


def _decode_pairs(text, where):
    """The (name, value) pairs of a query string or form body, percent-decoded as UTF-8.

    Raises:
        MalformedRequest (bytes that are not UTF-8 once decoded, a parameter without a name).
    """
    pairs = []
    for piece in text.split("&"):
        if not piece:
            continue
        name, _, value = piece.partition("=")
        try:
            name, value = unquote_plus(name, errors="strict"), unquote_plus(value, errors="strict")
        except UnicodeDecodeError:
            raise errors.MalformedRequest(f"(the {where} is not percent-encoded UTF-8)") from None
        if not name:
            raise errors.MalformedRequest(f"(the {where} has a value without a name)")
        pairs.append((name, value))
    return pairs


def _iso_time(text, what):
    """Seconds since the epoch of a request's timestamp (``2026-01-02T03:04:05Z``).

    Raises:
        InvalidTimeStampFormat.
    """
    t = clocks.parse_iso(text)
    if t is None:
        raise errors.InvalidTimeStampFormat(f"({what} {text!r}: give UTC as yyyy-MM-ddTHH:mm:ssZ)")
    return t


class Nonces:
    """The signature nonces seen within the timestamp window, per AccessKeyId."""

    def __init__(self, limit=MAX_NONCES):
        self.limit = limit
        self._until = {}  # (access key id, nonce) -> time it may be forgotten
        self._lock = threading.Lock()

    def use(self, key_id, nonce, timestamp, now):
        """Record a nonce; it is kept until its request's timestamp can no longer pass the window.

        Raises:
            SignatureNonceUsed (seen within the window), Throttling (too many nonces to remember).
        """
        with self._lock:
            if len(self._until) >= self.limit:
                self._until = {k: t for k, t in self._until.items() if t > now}
            if (key_id, nonce) in self._until and self._until[(key_id, nonce)] > now:
                raise errors.SignatureNonceUsed(f"({nonce!r})")
            if len(self._until) >= self.limit:
                raise errors.Throttling("(too many signed requests within 15 minutes)")
            self._until[(key_id, nonce)] = max(timestamp, now) + WINDOW


class Gateway:
    """The protocol: checks a request and runs its action on a Client.

    Args:
        client: the repository's :class:`blocksnap.api.Client` (its clock and region are the server's).
        keys: a :class:`blocksnap.cloud.keys.KeyStore`.
    """

    def __init__(self, client, keys):
        self.client = client
        self.keys = keys
        self.nonces = Nonces()

    def handle(self, method, target, headers, body):
        """Answer one request; returns ``(action name or None, response dict)``.

        Args:
            method: the HTTP method; target: the request target (path and query); headers: lower-case name
            -> list of values (str); body: bytes.
        Raises:
            BlocksnapError: the error to answer with (nothing was done).
        """
        if method not in ("GET", "POST"):
            raise errors.UnsupportedHTTPMethod(f"({method})")
        path, _, query = target.partition("?")
        if unquote_plus(path) != "/":
            raise errors.InvalidActionNotFound(f"(RPC requests go to /, not {path!r})")
        query_pairs = _decode_pairs(query, "query string")
        pairs = list(query_pairs)
        if body:
            kind = headers.get("content-type", [""])[0].split(";")[0].strip().lower()
            if kind != FORM:
                raise errors.MalformedRequest(f"(a body must be {FORM}, not {kind or 'untyped'})")
            try:
                text = body.decode("ascii")
            except UnicodeDecodeError:
                raise errors.MalformedRequest("(the form body is not percent-encoded)") from None
            pairs += _decode_pairs(text, "form body")
        params = {}
        for name, value in pairs:
            if name in params:
                raise errors.MalformedRequest(f"(the parameter {name!r} is given twice)")
            params[name] = value
        if "authorization" in headers:
            key_id, timestamp, nonce, action, version = self._check_acs3(method, path, query_pairs, headers, body,
                                                                        params)
        else:
            key_id, timestamp, nonce, action, version = self._check_v1(method, params)
        if version != actions.VERSION:
            raise errors.InvalidVersion(f"({version!r}: this API is Version {actions.VERSION})")
        fmt = params.get("Format", "JSON")
        if fmt.upper() != "JSON":
            raise errors.InvalidParameter(f"(Format {fmt!r}: this server answers JSON only)")
        spec = actions.get(action)
        now = self.client.clock()
        if abs(now - timestamp) > WINDOW:
            raise errors.InvalidTimeStampExpired(f"(the request's time is {abs(now - timestamp):.0f} s off the "
                                                 "server's clock; 15 minutes are allowed)")
        if not nonce:
            raise errors.MissingParameter("(an empty nonce)", name="SignatureNonce")
        self.nonces.use(key_id, nonce, timestamp, now)
        return spec.name, self.client.call(spec.name, {k: v for k, v in params.items() if k not in PROTOCOL_PARAMS})

    def _secret(self, key_id):
        secret = self.keys.secret(key_id)
        if secret is None:
            raise errors.InvalidAccessKeyIdNotFound(f"({key_id!r})")
        return secret

    def _check_acs3(self, method, path, query_pairs, headers, body, params):
        """The ACS3-HMAC-SHA256 checks; returns (key id, timestamp, nonce, action, version)."""
        if len(headers["authorization"]) != 1:
            raise errors.SignatureError("(one Authorization header)")
        parsed = signing.parse_authorization(headers["authorization"][0])
        if parsed is None or not {"Credential", "SignedHeaders", "Signature"} <= parsed[1].keys():
            raise errors.SignatureError("(Authorization must be ACS3-HMAC-SHA256 Credential=...,SignedHeaders=...,"
                                        "Signature=...)")
        algorithm, fields = parsed
        if algorithm != signing.ACS3:
            raise errors.SignatureError(f"(the signature algorithm {algorithm!r} is not supported here: use "
                                        f"{signing.ACS3} or signature v1, HMAC-SHA1)")
        if "x-acs-security-token" in headers or "x-acs-bearer-token" in headers:
            raise errors.SignatureError("(STS and bearer tokens are not issued here: sign with an AccessKey)")
        signed = fields["SignedHeaders"].split(";") if fields["SignedHeaders"] else []
        missing = [n for n in signed if n not in headers]
        if missing or len(set(signed)) != len(signed):
            raise errors.SignatureError(f"(SignedHeaders names headers the request does not have: {missing})")
        unsigned = sorted(n for n in headers if (n.startswith("x-acs-") or n in ("host", "content-type"))
                          and n not in signed)
        if unsigned:
            raise errors.SignatureError(f"(these headers must be signed: {', '.join(unsigned)})")
        for name in ("x-acs-date", "x-acs-signature-nonce"):
            if name not in headers:
                raise errors.MissingParameter(f"(the header {name})", name=name)
        payload_hash = hashlib.sha256(body).hexdigest()
        for value in headers.get("x-acs-content-sha256", []):
            if value.strip().lower() != payload_hash:
                raise errors.SignatureDoesNotMatch("(x-acs-content-sha256 is not the SHA-256 of the body)")
        secret = self._secret(fields["Credential"])
        uri = signing.percent_encode(unquote_plus(path)).replace("%2F", "/")
        canonical = signing.acs3_canonical_request(method, uri, query_pairs, headers, signed, payload_hash)
        string_to_sign = signing.acs3_string_to_sign(canonical)
        if not signing.same(signing.acs3_signature(secret, string_to_sign), fields["Signature"].lower()):
            raise errors.SignatureDoesNotMatch(f"(server StringToSign is {string_to_sign!r})")
        timestamp = _iso_time(headers["x-acs-date"][0].strip(), "x-acs-date")
        nonce = headers["x-acs-signature-nonce"][0].strip()
        action = self._one(headers, "x-acs-action", params, "Action")
        version = self._one(headers, "x-acs-version", params, "Version")
        return fields["Credential"], timestamp, nonce, action, version

    @staticmethod
    def _one(headers, header, params, param):
        """The action (or version) of an ACS3 request: its header, or its parameter; both must agree."""
        values = [v.strip() for v in headers.get(header, [])]
        if param in params:
            values.append(params[param])
        if not values:
            raise errors.MissingParameter(f"(the header {header} or the parameter {param})", name=param)
        if len(set(values)) != 1:
            raise errors.MalformedRequest(f"({header} and {param} disagree: {values})")
        return values[0]

    def _check_v1(self, method, params):
        """The signature v1 checks; returns (key id, timestamp, nonce, action, version)."""
        if "AccessKeyId" not in params:
            raise errors.MissingAccessKeyId()
        for name in ("Signature", "SignatureMethod", "SignatureNonce", "Timestamp", "Action", "Version"):
            if name not in params:
                raise errors.MissingParameter(name=name)
        if params["SignatureMethod"] != signing.V1_METHOD:
            raise errors.SignatureError(f"(SignatureMethod {params['SignatureMethod']!r}: use {signing.V1_METHOD})")
        if params.get("SignatureVersion", signing.V1_VERSION) != signing.V1_VERSION:
            raise errors.SignatureError(f"(SignatureVersion {params['SignatureVersion']!r}: use {signing.V1_VERSION})")
        if "SecurityToken" in params or "SignatureType" in params or "BearerToken" in params:
            raise errors.SignatureError("(STS and bearer tokens are not issued here: sign with an AccessKey)")
        secret = self._secret(params["AccessKeyId"])
        string_to_sign = signing.v1_string_to_sign(method, [(k, v) for k, v in params.items() if k != "Signature"])
        if not signing.same(signing.v1_signature(secret, string_to_sign), params["Signature"]):
            raise errors.SignatureDoesNotMatch(f"(server string to sign is: {string_to_sign})")
        timestamp = _iso_time(params["Timestamp"], "Timestamp")
        return params["AccessKeyId"], timestamp, params["SignatureNonce"], params["Action"], params["Version"]


class _Gone(Exception):
    """The client stopped sending in the middle of its request: no answer, the connection is closed."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects
    server_version = "blocksnap-api"
    sys_version = ""

    def setup(self):
        self.timeout = self.server.idle_timeout
        super().setup()

    def do_GET(self):
        self._answer()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _host(self):
        host = self.headers.get("host", "") if self.headers else ""
        return host if host and host.isprintable() and len(host) <= 255 else self.server.endpoint

    def _answer(self):
        with self.server.requests_busy():
            self._answer_one()

    def _answer_one(self):
        started = time.monotonic()
        action, status, rid = None, 200, None
        try:
            try:
                body = self._read_body()
            except OSError as exc:  # the idle timeout, or the client gone
                self.close_connection = True
                raise _Gone() from exc
            headers = {}
            for name, value in self.headers.items():
                try:  # http.server reads header bytes as Latin-1; signatures are over their UTF-8 text
                    value = value.encode("latin-1").decode("utf-8")
                except UnicodeError:
                    raise errors.MalformedRequest(f"(the header {name!r} is not UTF-8)") from None
                headers.setdefault(name.lower(), []).append(value)
            action, out = self.server.gateway.handle(self.command, self.path, headers, body)
            rid = out.get("RequestId")
        except _Gone:
            self.server.log(f"{self.client_address[0]} {self.command}: the client stopped sending its body")
            return
        except errors.BlocksnapError as exc:
            status, rid = exc.http_status, exc.request_id or request_id()
            out = {"RequestId": rid, "HostId": self._host(), "Code": exc.code, "Message": str(exc)}
        except Exception as exc:  # a bug: answered as the cloud answers one, logged, the server goes on
            internal = errors.InternalError(f"({type(exc).__name__}: {exc})")
            status, rid = 500, request_id()
            out = {"RequestId": rid, "HostId": self._host(), "Code": internal.code, "Message": str(internal)}
            self.server.log(f"internal error answering {self.command} {self.path[:200]!r}: {exc!r}")
        self._send(status, out, rid)
        self.server.log(f"{self.client_address[0]} {self.command} {action or '-'} {status} "
                        f"{out.get('Code', 'OK')} {rid} {(time.monotonic() - started) * 1000:.0f}ms")

    def _read_body(self):
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            self.close_connection = True
            raise errors.MalformedRequest("(chunked bodies are not accepted: send Content-Length)")
        lengths = self.headers.get_all("content-length") or []
        if not lengths:
            return b""
        if len(set(lengths)) != 1 or not lengths[0].strip().isdigit():
            self.close_connection = True  # where the next request starts is unknown
            raise errors.MalformedRequest(f"(Content-Length {lengths!r})")
        n = int(lengths[0])
        if n > self.server.max_body:
            self.close_connection = True  # the body is not read
            raise errors.RequestTooLarge(f"({n} bytes; at most {self.server.max_body})")
        body = self.rfile.read(n)
        if len(body) != n:
            self.close_connection = True
            raise errors.MalformedRequest(f"(the body ended after {len(body)} of {n} bytes)")
        return body

    def _send(self, status, out, rid):
        data = json.dumps(out, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json;charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if rid:
            self.send_header("x-acs-request-id", rid)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """A request http.server could not parse (a bad request line, too long a header, too many headers):
        the cloud's error body with that status, and the connection closed."""
        self.close_connection = True
        self.request_version = "HTTP/1.1"  # unparsed, it is still "HTTP/0.9", which gets no status line
        exc = errors.MalformedRequest(f"({code} {message or ''})".replace(" )", ")"))
        rid = request_id()
        out = {"RequestId": rid, "HostId": self.server.endpoint, "Code": exc.code, "Message": str(exc)}
        data = json.dumps(out).encode("utf-8")
        try:
            self.send_response(code, message)
            self.send_header("Content-Type", "application/json;charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            if getattr(self, "command", None) != "HEAD":
                self.wfile.write(data)
        except OSError:
            pass  # the client is gone: nothing to tell it
        self.server.log(f"{self.client_address[0]} malformed request: {code} {message}")

    def log_message(self, format, *args):
        pass  # _answer logs one line per request


def parse_bind(text):
    """``(host, port)`` of ``HOST:PORT`` or ``[IPv6]:PORT``.

    Raises:
        InvalidParameter.
    """
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise errors.InvalidParameter(f"(--bind {text!r}: give HOST:PORT, as in 127.0.0.1:8080)")
    return host, int(port)


def _resolve(host, port):
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise errors.InvalidParameter(f"(--bind {host!r}: {exc})") from None
    return infos[0][0], infos[0][4][0], {ipaddress.ip_address(i[4][0].split("%")[0]) for i in infos}


class ApiServer(ThreadingHTTPServer):
    """The threaded HTTP server of a :class:`Gateway`.

    Args:
        client: the repository's Client; keys: a KeyStore; address: ``(host, port)`` (port 0: any free one).
        allow_remote: serve an address that is not loopback (default: only 127.0.0.0/8 and ::1).
        log: a callable taking one line per request (default: none).
    Raises:
        InvalidParameter (an address that is not loopback without ``allow_remote``, or that cannot be bound).
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, client, keys, address, allow_remote=False, log=None, max_body=MAX_BODY,
                 idle_timeout=IDLE_TIMEOUT, max_connections=MAX_CONNECTIONS):
        family, ip, ips = _resolve(*address)
        if not allow_remote and not all(a.is_loopback for a in ips):
            raise errors.InvalidParameter(f"({address[0]} is not a loopback address: the api-server serves "
                                          "127.0.0.1 or ::1 unless --allow-remote is given)")
        self.address_family = family
        self.allow_remote = allow_remote
        self.gateway = Gateway(client, keys)
        self.max_body = max_body
        self.idle_timeout = idle_timeout
        self._log = log
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._busy = 0  # requests being answered
        self._idle = threading.Condition()
        try:
            super().__init__((ip, address[1]), _Handler)
        except OSError as exc:
            raise errors.InvalidParameter(f"(cannot serve {address[0]}:{address[1]}: {exc.strerror})") from None
        host, port = self.server_address[:2]
        self.endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        client.endpoint = self.endpoint

    def log(self, line):
        if self._log is not None:
            self._log(line)

    def verify_request(self, request, client_address):
        if self.allow_remote:
            return True
        try:
            return ipaddress.ip_address(client_address[0].split("%")[0]).is_loopback
        except ValueError:
            return False

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    @contextlib.contextmanager
    def requests_busy(self):
        """Count a request as being answered while the block runs (see :meth:`wait_idle`)."""
        with self._idle:
            self._busy += 1
        try:
            yield
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def _refuse(self, request):
        """Too many connections: Throttling at once, without reading the request."""
        exc = errors.Throttling(f"(more than {self.max_connections} connections at once)")
        data = json.dumps({"RequestId": request_id(), "HostId": self.endpoint, "Code": exc.code,
                           "Message": str(exc)}).encode("utf-8")
        head = (f"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json;charset=utf-8\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode("ascii")
        try:
            request.settimeout(1.0)
            request.sendall(head + data)
        except OSError:
            pass  # the client is gone
        self.shutdown_request(request)

    def handle_error(self, request, client_address):
        """An exception that escaped a handler (a client gone mid-answer): one line, the server goes on."""
        self.log(f"{client_address[0]} connection error: {sys.exc_info()[1]!r}")

    def wait_idle(self):
        """Wait until no request is being answered (after shutdown(), before the process ends: a create that
        runs finishes; connections that only wait for a next request are dropped)."""
        with self._idle:
            while self._busy:
                self._idle.wait(0.5)

    def serve_in_thread(self):
        """Serve from a daemon thread (tests); returns it. Stop with ``shutdown()`` and ``server_close()``."""
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                  name="blocksnap-api-server", daemon=True)
        thread.start()
        return thread
