"""Parsing of Rspamd upstream lists (``hosts = "..."``).

A *line* is an optional rotation prefix (``round-robin:``, ``master-slave:``,
``random:``, ``hash:`` as in Rspamd; ``sequential:``, ``token-bucket:`` and
``p2c:`` as our additions) followed by elements separated by any of ``;``
``,`` space, TAB, CR or LF.  Several lines (an UCL array) form one
list; the last rotation prefix parsed wins.  Element forms:

==============================  ==============================================
``host``                        default port
``host:port``                   ``host:port:priority`` (priority = weight)
``1.2.3.4[:port[:priority]]``   numeric, never re-resolved
``[v6][:port[:priority]]``      brackets are required for IPv6
``/path`` or ``./path``         unix socket; any port is ignored
``service=NAME+DOMAIN[:prio]``  DNS SRV ``_NAME._tcp.DOMAIN``
==============================  ==============================================

The upstream *name* (what the proxy sends as ``Host``) is the element text up
to, not including, a second ``:``; the bare address for bracketed IPv6; the
path for unix sockets; ``_NAME._tcp.DOMAIN`` for SRV.

Unlike Rspamd, which silently drops elements it cannot parse as long as one
element is valid, every malformed element is an error here.

This module is pure: it performs no name resolution and no I/O.  The only
exception it raises is :class:`UpstreamSyntaxError`.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = [
    "DEFAULT_PROXY_PORT",
    "EntryKind",
    "Strategy",
    "UpstreamEntry",
    "UpstreamList",
    "UpstreamSyntaxError",
    "parse_entry",
    "parse_upstreams",
]

#: Default upstream port of the proxy worker (scanner ``normal`` worker).
DEFAULT_PROXY_PORT = 11333

#: Largest priority/weight accepted (an unsigned 32-bit value in Rspamd).
MAX_PRIORITY = 0xFFFFFFFF

#: Longest line accepted, checked before any splitting.
MAX_LINE_LENGTH = 65536

#: Most elements accepted in one list.
MAX_ENTRIES = 1024

_SEPARATORS = ";, \t\r\n"
_SPLIT_RE = re.compile(r"[;, \t\r\n]+")
_HOST_LABEL_RE = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
_DIGITS_RE = re.compile(r"^[0-9]+$")


class UpstreamSyntaxError(ValueError):
    """An upstream line or element cannot be parsed; the message says why."""


class Strategy(enum.Enum):
    """Rotation algorithm of an upstream list; the value is the line prefix."""

    ROUND_ROBIN = "round-robin"
    MASTER_SLAVE = "master-slave"
    RANDOM = "random"
    HASH = "hash"
    SEQUENTIAL = "sequential"
    TOKEN_BUCKET = "token-bucket"
    P2C = "p2c"


class EntryKind(enum.Enum):
    """How an element is addressed."""

    INET = "inet"
    UNIX = "unix"
    SRV = "srv"


@dataclass(frozen=True)
class UpstreamEntry:
    """One parsed element of an upstream list.

    Attributes:
        name: the upstream name (outgoing ``Host`` header, routing key).
        host: host name or IP literal (no brackets) for ``inet``; the socket
            path for ``unix``; the SRV query name for ``srv``.
        port: TCP port for ``inet``; ``None`` for ``unix`` and ``srv`` (SRV
            answers carry their own ports).
        weight_or_priority: the ``:priority`` suffix (0 when absent); a weight
            for round-robin, a priority for master-slave.
        kind: :class:`EntryKind`.
    """

    name: str
    host: str
    port: int | None
    weight_or_priority: int
    kind: EntryKind

    @property
    def numeric(self) -> bool:
        """True when the entry needs no name resolution (IP literal or unix)."""
        if self.kind is EntryKind.UNIX:
            return True
        if self.kind is EntryKind.SRV:
            return False
        return _ip_literal(self.host) is not None


@dataclass(frozen=True)
class UpstreamList:
    """A parsed upstream list: rotation strategy and entries in line order."""

    strategy: Strategy
    entries: tuple[UpstreamEntry, ...]

    def names(self) -> list[str]:
        """Return the entry names in list order."""
        return [entry.name for entry in self.entries]


_PREFIXES: tuple[tuple[str, Strategy], ...] = tuple(
    (strategy.value + ":", strategy) for strategy in Strategy
)


def _ip_literal(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _check_hostname(host: str, element: str) -> None:
    if not host:
        raise UpstreamSyntaxError(f"empty host name in upstream {element!r}")
    if len(host) > 253:
        raise UpstreamSyntaxError(f"host name too long in upstream {element!r}")
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    for label in labels:
        if not _HOST_LABEL_RE.match(label):
            raise UpstreamSyntaxError(
                f"invalid host name {host!r} in upstream {element!r}"
            )


def _parse_number(text: str, what: str, element: str, low: int, high: int) -> int:
    if not _DIGITS_RE.match(text):
        raise UpstreamSyntaxError(f"cannot parse {what} {text!r} in upstream {element!r}")
    if len(text) > 10 or not low <= int(text) <= high:
        raise UpstreamSyntaxError(
            f"{what} {text!r} out of range {low}..{high} in upstream {element!r}"
        )
    return int(text)


def _parse_port_priority(
    rest: str, default_port: int, element: str
) -> tuple[int, int]:
    """Parse ``""``, ``":port"`` or ``":port:priority"``."""
    if rest == "":
        return default_port, 0
    if not rest.startswith(":"):
        raise UpstreamSyntaxError(f"unexpected {rest!r} in upstream {element!r}")
    parts = rest[1:].split(":")
    if len(parts) > 2:
        raise UpstreamSyntaxError(f"too many ':' fields in upstream {element!r}")
    port = _parse_number(parts[0], "port", element, 1, 65535)
    priority = 0
    if len(parts) == 2:
        priority = _parse_number(parts[1], "priority", element, 0, MAX_PRIORITY)
    return port, priority


def _parse_srv(element: str) -> UpstreamEntry:
    body = element[len("service="):]
    service, plus, rest = body.partition("+")
    if not plus:
        raise UpstreamSyntaxError(
            f"SRV upstream {element!r} must look like service=NAME+DOMAIN[:priority]"
        )
    domain, colon, prio_text = rest.partition(":")
    priority = 0
    if colon:
        priority = _parse_number(prio_text, "priority", element, 0, MAX_PRIORITY)
    if not service or not _HOST_LABEL_RE.match(service):
        raise UpstreamSyntaxError(f"invalid SRV service name in upstream {element!r}")
    _check_hostname(domain, element)
    name = f"_{service}._tcp.{domain}"
    return UpstreamEntry(name, name, None, priority, EntryKind.SRV)


def parse_entry(element: str, default_port: int = DEFAULT_PROXY_PORT) -> UpstreamEntry:
    """Parse one upstream element (no separators, no rotation prefix).

    Raises:
        UpstreamSyntaxError: the element is empty or malformed.
    """
    if not element:
        raise UpstreamSyntaxError("empty upstream element")
    if any(ch in _SEPARATORS for ch in element):
        raise UpstreamSyntaxError(f"separator inside upstream element {element!r}")
    if not element.isprintable() or not element.isascii():
        raise UpstreamSyntaxError(f"non-printable or non-ASCII upstream element {element!r}")
    if element.startswith("service="):
        return _parse_srv(element)
    if element[0] in "/.":
        return UpstreamEntry(element, element, None, 0, EntryKind.UNIX)
    if element[0] == "[":
        close = element.find("]")
        if close < 0:
            raise UpstreamSyntaxError(f"missing ']' in upstream {element!r}")
        address = element[1:close]
        literal = _ip_literal(address)
        if not isinstance(literal, ipaddress.IPv6Address):
            raise UpstreamSyntaxError(
                f"{address!r} in brackets is not an IPv6 address in upstream {element!r}"
            )
        port, priority = _parse_port_priority(element[close + 1:], default_port, element)
        return UpstreamEntry(address, address, port, priority, EntryKind.INET)
    first = element.find(":")
    if first < 0:
        host, rest, name = element, "", element
    else:
        host, rest = element[:first], element[first:]
        second = element.find(":", first + 1)
        name = element if second < 0 else element[:second]
    if isinstance(_ip_literal(element), ipaddress.IPv6Address):
        raise UpstreamSyntaxError(
            f"IPv6 address {element!r} must be written in brackets: [{element}]"
        )
    if _ip_literal(host) is None:
        if _DIGITS_RE.match(host.replace(".", "")):
            raise UpstreamSyntaxError(f"invalid IPv4 address {host!r} in upstream {element!r}")
        _check_hostname(host, element)
    port, priority = _parse_port_priority(rest, default_port, element)
    return UpstreamEntry(name, host, port, priority, EntryKind.INET)


def parse_upstreams(
    lines: str | Sequence[str],
    default_port: int = DEFAULT_PROXY_PORT,
    default_strategy: Strategy = Strategy.ROUND_ROBIN,
) -> UpstreamList:
    """Parse one upstream line or an array of lines into an :class:`UpstreamList`.

    Args:
        lines: a line or a sequence of lines (UCL string or array).
        default_port: port for elements without one (the proxy uses 11333).
        default_strategy: rotation used when no line carries a prefix.

    Returns:
        The strategy of the last prefixed line (else ``default_strategy``) and
        every element in order.  With the ``master-slave:`` prefix in force
        when the first element is parsed, that element gets priority 1 if it
        has none, so it is preferred whenever alive.

    Raises:
        UpstreamSyntaxError: a malformed element (an unknown ``word:`` prefix
            is read as ``host:port`` and fails on the port), an empty list, or
            a list over the size bounds.
    """
    if not 1 <= default_port <= 65535:
        raise UpstreamSyntaxError(f"default port {default_port} out of range")
    if isinstance(lines, str):
        line_list: Iterable[str] = (lines,)
    else:
        line_list = lines
    strategy: Strategy | None = None
    entries: list[UpstreamEntry] = []
    for line in line_list:
        if not isinstance(line, str):
            raise UpstreamSyntaxError(f"upstream line must be a string, not {type(line).__name__}")
        if len(line) > MAX_LINE_LENGTH:
            raise UpstreamSyntaxError(f"upstream line longer than {MAX_LINE_LENGTH} characters")
        body = line
        for prefix, prefixed in _PREFIXES:
            if line.startswith(prefix):
                strategy = prefixed
                body = line[len(prefix):]
                break
        for element in _SPLIT_RE.split(body):
            if not element:
                continue
            entry = parse_entry(element, default_port)
            if (
                not entries
                and strategy is Strategy.MASTER_SLAVE
                and entry.weight_or_priority == 0
            ):
                entry = UpstreamEntry(entry.name, entry.host, entry.port, 1, entry.kind)
            entries.append(entry)
            if len(entries) > MAX_ENTRIES:
                raise UpstreamSyntaxError(f"more than {MAX_ENTRIES} upstreams in one list")
    if not entries:
        raise UpstreamSyntaxError("upstream list has no hosts")
    return UpstreamList(strategy or default_strategy, tuple(entries))
