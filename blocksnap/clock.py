"""The time blocksnap takes as now: the system clock, or the test clock of ``BLOCKSNAP_NOW``.

A clock is a callable returning seconds since the epoch (a float), like :func:`time.time`.
``Client(clock=...)`` takes one; the CLI builds it from ``BLOCKSNAP_NOW`` (docs/API.md, "The clock"):

- ``2026-01-02T03:04:05Z`` (ISO 8601, UTC, as the API writes times) or ``1767323045`` (seconds since the
  epoch, a fraction allowed): a clock frozen at that instant;
- ``+900`` or ``-86400``: the system clock moved by that many seconds (a fraction allowed), so a server
  started with it still ages, and requests signed by the real clock look early or late to it.
"""
import datetime
import os
import re
import time

from . import errors

ENV = "BLOCKSNAP_NOW"
_NUMBER = re.compile(r"^[0-9]+(\.[0-9]+)?$")
_OFFSET = re.compile(r"^[+-][0-9]+(\.[0-9]+)?$")
_ISO = re.compile(r"^([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]{1,9})?Z$")

system = time.time


def parse_iso(text):
    """Seconds since the epoch of an ISO 8601 UTC time as the API writes it (``2026-01-02T03:04:05Z``, a
    fraction of a second allowed); None if ``text`` is not one."""
    m = _ISO.match(text) if isinstance(text, str) else None
    if m is None:
        return None
    try:
        t = datetime.datetime(*(int(g) for g in m.groups()[:6]), tzinfo=datetime.timezone.utc)
    except ValueError:  # a 13th month, a 61st second
        return None
    return t.timestamp() + (float(m[7]) if m[7] else 0.0)


def parse(text):
    """The clock that ``text`` (a BLOCKSNAP_NOW value) describes.

    Raises:
        InvalidParameter if ``text`` is none of the forms above.
    """
    text = text.strip()
    if _OFFSET.match(text):
        offset = float(text)
        return lambda: time.time() + offset
    if _NUMBER.match(text):
        frozen = float(text)
    else:
        frozen = parse_iso(text)
        if frozen is None:
            raise errors.InvalidParameter(f"({ENV}={text!r} is not a time: give 2026-01-02T03:04:05Z, seconds "
                                          "since the epoch, or an offset such as +900)")
    return lambda: frozen


def from_env(environ=None):
    """The clock of ``$BLOCKSNAP_NOW`` if it is set (and not empty), else the system clock.

    Raises:
        InvalidParameter (see :func:`parse`).
    """
    text = (os.environ if environ is None else environ).get(ENV)
    return parse(text) if text else system
