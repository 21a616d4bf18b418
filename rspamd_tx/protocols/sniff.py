"""Guess the protocol of a connection from its first bytes.

Both listeners use this to explain a wrong port in their logs ("milter sent to
the HTTP port", "TLS to a plain-text port") and the milter listener uses it for
Rspamd's HTTP health-check hack (milter.md §1).  The guess is cheap and looks
at no more than :data:`SNIFF_LIMIT` bytes:

* TLS: a handshake record header ``16 03 0x``.
* Milter: a frame header whose 4-byte big-endian length is between 1 and
  131073 (the largest legal frame) followed by a known milter command letter.
  The length's first byte is therefore always ``00``, which no text protocol
  starts with.
* Legacy: ``CHECK``/``SYMBOLS`` followed by a space (Rspamd's legacy verbs),
  or another spamd verb (``PROCESS``, ``REPORT``, ``REPORT_IFSPAM``, ``SKIP``,
  ``PING``, ``TELL``, ``HEADERS``) followed by a ``SPAMC/``/``RSPAMC/`` token.
  Rspamd only serves the first two; the others are recognised so that the
  error can say what the client spoke.
* HTTP: an upper-case method, spaces, and a target starting with ``/``,
  ``*`` or ``http``.
* Anything else is unknown.
"""

from __future__ import annotations

import enum

__all__ = ["SNIFF_LIMIT", "Kind", "classify"]

SNIFF_LIMIT = 64
"""Most bytes :func:`classify` needs before it answers."""

MILTER_COMMANDS = frozenset(b"ABCDEHKLMNOQRTU")
MAX_MILTER_FRAME = 131072 + 1

_LEGACY_VERBS = frozenset({b"CHECK", b"SYMBOLS"})
_OTHER_SPAMD_VERBS = frozenset(
    {b"PROCESS", b"REPORT", b"REPORT_IFSPAM", b"SKIP", b"PING", b"TELL", b"HEADERS"}
)
_LEGACY_TOKENS = (b"SPAMC/", b"RSPAMC/")
_MAX_METHOD = 16
_METHOD_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_-")


class Kind(enum.Enum):
    """What the first bytes of a connection look like."""

    HTTP = "http"
    LEGACY = "legacy"
    MILTER = "milter"
    TLS = "tls"
    UNKNOWN = "unknown"


def _prefix_state(data: bytes, candidates: tuple[bytes, ...]) -> bool | None:
    """True if ``data`` starts with a candidate, None if it may still, else False."""
    for candidate in candidates:
        if data.startswith(candidate):
            return True
    for candidate in candidates:
        if candidate.startswith(data):
            return None
    return False


def _classify_text(data: bytes) -> Kind | None:
    end = 0
    while end < len(data) and data[end] in _METHOD_CHARS:
        end += 1
        if end > _MAX_METHOD:
            return Kind.UNKNOWN
    if end == len(data):
        return None
    if end == 0 or data[end] != 0x20:
        return Kind.UNKNOWN
    method = data[:end]
    start = end
    while start < len(data) and data[start] == 0x20:
        start += 1
    if start == len(data):
        return None
    rest = data[start:]
    if method in _LEGACY_VERBS:
        return Kind.LEGACY
    if method in _OTHER_SPAMD_VERBS:
        legacy = _prefix_state(rest, _LEGACY_TOKENS)
        if legacy is None:
            return None
        if legacy:
            return Kind.LEGACY
    if rest[:1] in (b"/", b"*"):
        return Kind.HTTP
    absolute = _prefix_state(rest, (b"http://", b"https://"))
    if absolute is None:
        return None
    return Kind.HTTP if absolute else Kind.UNKNOWN


def classify(first_bytes: bytes) -> Kind | None:
    """Classify the first bytes received on a connection.

    Returns ``None`` when more bytes are needed to decide (never once
    :data:`SNIFF_LIMIT` bytes are available), else the :class:`Kind`.  Never
    raises for any input.
    """
    data = bytes(first_bytes[:SNIFF_LIMIT])
    if not data:
        return None
    first = data[0]
    if first == 0x16:
        if len(data) < 3:
            return None
        return Kind.TLS if data[1] == 0x03 and data[2] <= 0x04 else Kind.UNKNOWN
    if first == 0x00:
        if len(data) < 5:
            return None
        length = int.from_bytes(data[:4], "big")
        if 1 <= length <= MAX_MILTER_FRAME and data[4] in MILTER_COMMANDS:
            return Kind.MILTER
        return Kind.UNKNOWN
    kind = _classify_text(data)
    if kind is None and len(data) >= SNIFF_LIMIT:
        return Kind.UNKNOWN
    return kind
