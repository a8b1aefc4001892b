"""The cloud API's request signatures, computed the way the cloud checks them (docs/API.md, "Signatures").

ACS3-HMAC-SHA256: Alibaba Cloud's "Request syntax and signature method V3", what the official SDK
(alibabacloud-tea-openapi, ``Utils.get_authorization``) sends in ``Authorization``::

    CanonicalRequest = Method "\\n" CanonicalURI "\\n" CanonicalQueryString "\\n"
                       CanonicalHeaders "\\n" SignedHeaders "\\n" HashedRequestPayload
    StringToSign     = "ACS3-HMAC-SHA256\\n" + hex(SHA-256(CanonicalRequest))
    Signature        = hex(HMAC-SHA256(AccessKeySecret, StringToSign))

  CanonicalQueryString: every query parameter in the order of the names, name and value percent-encoded
  (below), ``name=value`` joined by ``&``. CanonicalHeaders: each signed header as ``name:value\\n``, names lower-case and
  sorted, values trimmed (several values of one header sorted and joined by ``,``). SignedHeaders: those
  names joined by ``;``. HashedRequestPayload: hex(SHA-256(body)), which ``x-acs-content-sha256`` carries.

HMAC-SHA1 signature v1 (the RPC "signature method" of the ECS API reference, ``SignatureVersion=1.0``)::

    StringToSign = Method "&" enc("/") "&" enc(CanonicalizedQueryString)
    Signature    = base64(HMAC-SHA1(AccessKeySecret + "&", StringToSign))

  CanonicalizedQueryString: every parameter of the request (query and form body) but ``Signature`` in the
  order of the names, name and value percent-encoded, ``name=value`` joined by ``&``.

Percent-encoding (both): UTF-8, every byte but the unreserved ``A-Z a-z 0-9 - _ . ~`` as ``%XY`` (so a space
is ``%20``, never ``+``; ``*`` is ``%2A``). This module only computes: server.py decides what a request must
carry and which errors a mismatch gets.
"""
import base64
import hashlib
import hmac
from urllib.parse import quote

ACS3 = "ACS3-HMAC-SHA256"
V1_METHOD = "HMAC-SHA1"
V1_VERSION = "1.0"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def percent_encode(text):
    """RFC 3986 percent-encoding of ``text`` (UTF-8; unreserved characters kept)."""
    return quote(text, safe="-_.~", encoding="utf-8")


def canonical_query(pairs):
    """``name=value`` of each (name, value) pair, both percent-encoded, in the order of the names (as given,
    before encoding: ``Tag.1`` before ``Tag.10``), joined by ``&``."""
    return "&".join(f"{percent_encode(k)}={percent_encode(v)}" for k, v in sorted(pairs))


def canonical_headers(headers, names):
    """``(CanonicalHeaders, SignedHeaders)`` of the header ``names`` (lower-case) from ``headers``
    (lower-case name -> list of values)."""
    names = sorted(names)
    lines = "".join(f"{n}:{','.join(sorted(v.strip() for v in headers[n]))}\n" for n in names)
    return lines, ";".join(names)


def acs3_canonical_request(method, uri, query_pairs, headers, signed_names, payload_hash):
    """The CanonicalRequest of ACS3-HMAC-SHA256 (see the module docstring)."""
    header_lines, signed = canonical_headers(headers, signed_names)
    return "\n".join((method, uri, canonical_query(query_pairs), header_lines, signed, payload_hash))


def acs3_string_to_sign(canonical_request):
    return f"{ACS3}\n{hashlib.sha256(canonical_request.encode('utf-8')).hexdigest()}"


def acs3_signature(secret, string_to_sign):
    """hex(HMAC-SHA256(secret, string_to_sign))."""
    return hmac.new(secret.encode("utf-8"), string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def acs3_authorization(access_key_id, secret, method, uri, query_pairs, headers, payload_hash):
    """The ``Authorization`` value for a request, every header of ``headers`` signed (how the SDK does it;
    tests and scripts use it to build requests)."""
    names = list(headers)
    canonical = acs3_canonical_request(method, uri, query_pairs, headers, names, payload_hash)
    signature = acs3_signature(secret, acs3_string_to_sign(canonical))
    return f"{ACS3} Credential={access_key_id},SignedHeaders={';'.join(sorted(names))},Signature={signature}"


def parse_authorization(value):
    """``(algorithm, fields)`` of an ``Authorization`` value ``ALGO Credential=..,SignedHeaders=..,Signature=..``;
    ``fields`` maps each ``key=value`` item to its value. None if the value has no such shape."""
    algorithm, sep, rest = value.strip().partition(" ")
    if not sep:
        return None
    fields = {}
    for item in rest.split(","):
        key, eq, val = item.strip().partition("=")
        if not eq or not key or key in fields:
            return None
        fields[key] = val.strip()
    return algorithm, fields


def v1_string_to_sign(method, pairs):
    """The StringToSign of signature v1 for the (name, value) pairs of a request (``Signature`` left out)."""
    query = "&".join(f"{percent_encode(k)}={percent_encode(v)}" for k, v in sorted(pairs))
    return f"{method}&{percent_encode('/')}&{percent_encode(query)}"


def v1_signature(secret, string_to_sign):
    """base64(HMAC-SHA1(secret + "&", string_to_sign))."""
    digest = hmac.new(f"{secret}&".encode(), string_to_sign.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def same(a, b):
    """Constant-time comparison of two signatures (str)."""
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))
