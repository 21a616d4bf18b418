"""What a proxy front end (HTTP, legacy or milter) asks of the scan layer, and what it gets back.

The front ends build a :class:`ScanRequest` (the Rspamd request headers and the message) and hand it
to an :class:`IScanner`. The scanner answers with a :class:`ScanReply` (the scanner's HTTP reply,
relayed byte-exact) or fails with a :class:`ScanFailure` naming one of the failure classes that the
configurable failure policy maps to an action.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


class FailureClass(enum.Enum):
    """Why a scan produced no verdict; the keys of the failure policy table."""

    NO_UPSTREAM = "no_upstream"
    TIMEOUT = "timeout"
    BAD_REPLY = "bad_reply"
    OVERSIZE = "oversize"


class FailureAction(enum.Enum):
    """What the front end does for a failed scan (milter: the reply; HTTP: Rspamd's 5xx or a verdict)."""

    TEMPFAIL = "tempfail"
    ACCEPT = "accept"
    REJECT = "reject"
    DISCARD = "discard"


@dataclass
class ScanFailure(Exception):
    """A scan that produced no usable reply.

    ``status`` and ``reason`` are what Rspamd's proxy answers an HTTP client in this case
    (e.g. ``404 Backend not found``, ``408 IO timeout``, ``500 IO write error: ...``);
    ``tried`` names the upstreams attempted, in order.
    """

    kind: FailureClass
    status: int
    reason: str
    tried: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.status} {self.reason}"


@dataclass(frozen=True)
class ScanRequest:
    """One message to scan.

    ``headers`` are the Rspamd protocol request headers in order, with their original case and
    duplicates (several ``Rcpt``). ``body`` is the message. ``route`` is the client's ``Host``
    header (HTTP mode) used to pick a named upstream block; ``None`` selects the default block.
    ``hash_key`` feeds ``hash:`` balancing (the client IP). ``method`` and ``target`` are what the
    client asked (``POST``/``GET``, ``/checkv2``...); legacy and milter requests use ``/checkv2``.
    ``client_address`` is the client's address as text (``1.2.3.4:port``, ``[::1]:port``, a unix
    path); an upstream scanner sends it as ``IP`` when the request has no ``IP`` header.
    """

    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    method: bytes = b"POST"
    target: bytes = b"/checkv2"
    route: bytes | None = None
    hash_key: bytes | None = None
    log_tag: str = ""
    client_address: str | None = None


@dataclass(frozen=True)
class ScanReply:
    """A scanner's HTTP reply, relayed as it came.

    ``headers`` exclude the hop-by-hop ones the proxy regenerates (``Content-Length``,
    ``Connection``, ``Date``, ``Server``, ``Key``); ``body`` is decompressed.
    ``upstream`` is the upstream that answered and ``tried`` every upstream attempted.
    """

    status: int
    reason: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    upstream: str
    tried: tuple[str, ...] = ()
    _parsed: list[Any] = field(default_factory=list, compare=False, repr=False)

    def content_type(self) -> bytes:
        """The reply's Content-Type (empty when absent)."""
        for name, value in self.headers:
            if name.lower() == b"content-type":
                return value
        return b""

    def result(self) -> dict[str, Any]:
        """The scan result as a dict (JSON or msgpack body), parsed once.

        Raises ``ValueError`` when the body is neither.
        """
        if not self._parsed:
            if b"msgpack" in self.content_type().lower():
                import msgpack

                parsed = msgpack.unpackb(self.body, raw=False)
            else:
                parsed = json.loads(self.body)
            if not isinstance(parsed, dict):
                raise ValueError("scan result is not an object")
            self._parsed.append(parsed)
        result: dict[str, Any] = self._parsed[0]
        return result

    def verdict_text(self) -> tuple[str, str]:
        """The result's ``action`` and ``score`` as a log line shows them (``str`` of
        each), ``"-"`` for one that is missing or a body that does not parse.

        A JSON ``/checkv2`` reply shaped like Rspamd's (``score`` and ``action``
        before the first nested value) is read without parsing the symbols and
        the rest: only those leading members are parsed.  Anything else goes
        through :meth:`result`.  (So a reply that names ``action`` again after
        its symbols, or that is broken after them, shows its leading values.)
        """
        if not self._parsed and b"msgpack" not in self.content_type().lower():
            members = _leading_members(self.body)
            if members is not None and "action" in members and "score" in members:
                return str(members["action"]), str(members["score"])
        try:
            parsed = self.result()
        except (ValueError, TypeError):
            return "-", "-"
        return str(parsed.get("action", "-")), str(parsed.get("score", "-"))


def _leading_members(body: bytes) -> dict[str, Any] | None:
    """The members of the JSON object ``body`` that come before its first nested
    object or array, parsed on their own; ``None`` when they cannot be.

    The object is cut at the last comma before the first ``{`` or ``[`` after
    its opening brace and closed there.  A cut that falls inside a string
    leaves that string unterminated, so the piece then fails to parse instead
    of giving wrong members.
    """
    if body[:1] != b"{":
        return None
    cut = body.find(b"{", 1)
    bracket = body.find(b"[")
    if cut < 0 or 0 <= bracket < cut:
        cut = bracket
    if cut < 0:
        return None
    comma = body.rfind(b",", 0, cut)
    if comma < 0:
        return None
    try:
        text = body[:comma].decode("utf-8") + "}"
        members, end = _DECODER.raw_decode(text)
    except ValueError:
        return None
    return members if isinstance(members, dict) and end == len(text) else None


_DECODER = json.JSONDecoder()


class IScanner(Interface):
    """Something that scans messages: a balanced layer of upstream scanners, or self-scan."""

    name = Attribute("A short name for logs and metrics.")

    def scan(request: ScanRequest) -> Deferred[ScanReply]:
        """Scan one message.

        Fires with the :class:`ScanReply` of the first upstream that answered with any HTTP
        status, or fails with :class:`ScanFailure` once every attempt allowed by the retry and
        timeout settings has failed. Cancelling the Deferred abandons the scan.
        """
