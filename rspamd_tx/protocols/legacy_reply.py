"""Convert a scanner's ``/checkv2`` JSON reply into legacy RSPAMC/SPAMC text.

Rspamd answers legacy requests (and its proxy converts backend replies for
legacy clients) with two fixed text formats (http-protocol.md §9.2).  This
module reproduces them byte for byte from the parsed JSON reply:

RSPAMC (Exim ``variant=rspamd``)::

    Metric: default; False; 4.50 / 15.00 / 0.0\\r\\n
    Action: greylist\\r\\n
    [Subject: <rewritten subject>\\r\\n]
    Symbol: ARC_NA(0.00)\\r\\n                 (one per symbol, reply order)
    [Message: <text>\\r\\n]                    (one per string in "messages")
    Message-ID: t1@example.com\\r\\n

SPAMC::

    Spam: False ; 4.50 / 15.00\\r\\n
    \\r\\n
    SYM_A,SYM_B\\r\\n                           (absent when there are no symbols)

Rules taken from Rspamd: scores print with ``%.2f``; the True/False word comes
from an ``is_spam`` key, which ``/checkv2`` replies never carry, so it is
``False`` for them (clients use the numbers and the ``Action:`` line); a
missing or non-numeric number prints as ``0.00``; a present but non-string
``action``/``subject``/``message-id`` prints as ``(NULL)``; only object-valued
entries of ``symbols`` produce symbol lines.

The status line (``RSPAMD/1.3 0 EX_OK``, ``SPAMD/1.1 0 EX_OK`` plus
``Content-length``) is added by :func:`rspamd_tx.protocols.http_codec.encode_legacy_reply`;
:func:`legacy_reply` does both steps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from rspamd_tx.protocols.http_codec import LegacyVariant, encode_legacy_reply

__all__ = [
    "LegacyReplyError",
    "legacy_reply",
    "parse_reply",
    "rspamc_body",
    "spamc_body",
]

_NULL = "(NULL)"


class LegacyReplyError(ValueError):
    """The scanner reply is not a JSON object and cannot be converted."""


def parse_reply(reply: bytes | str | Mapping[str, Any]) -> Mapping[str, Any]:
    """Return the reply as a mapping, decoding JSON text if needed.

    Raises:
        LegacyReplyError: the text is not valid JSON or not a JSON object.
    """
    if isinstance(reply, Mapping):
        return reply
    try:
        decoded = json.loads(reply)
    except (ValueError, RecursionError) as exc:
        raise LegacyReplyError(f"reply is not JSON: {exc}") from None
    if not isinstance(decoded, dict):
        raise LegacyReplyError("reply is not a JSON object")
    return decoded


def _number(value: Any) -> float:
    """UCL ``todouble``: integers and floats convert, anything else is 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    try:
        return float(value)
    except OverflowError:
        return math.copysign(math.inf, value)


def _text(value: Any) -> str:
    """UCL ``tostring`` as printed by Rspamd: non-strings become ``(NULL)``."""
    return value if isinstance(value, str) else _NULL


def _spam_word(reply: Mapping[str, Any]) -> str:
    return "True" if reply.get("is_spam") is True else "False"


def _symbol_entries(reply: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    symbols = reply.get("symbols")
    if not isinstance(symbols, Mapping):
        return []
    return [(str(name), entry) for name, entry in symbols.items() if isinstance(entry, Mapping)]


def _messages(reply: Mapping[str, Any]) -> list[str]:
    messages = reply.get("messages")
    if isinstance(messages, str):
        return [messages]
    if isinstance(messages, Mapping):
        values: list[Any] = list(messages.values())
    elif isinstance(messages, list):
        values = messages
    else:
        return []
    return [value for value in values if isinstance(value, str)]


def rspamc_body(reply: Mapping[str, Any]) -> bytes:
    """RSPAMC reply text (without status line) for a parsed scan reply."""
    score = _number(reply.get("score"))
    required = _number(reply.get("required_score"))
    lines = [f"Metric: default; {_spam_word(reply)}; {score:.2f} / {required:.2f} / 0.0"]
    if "action" in reply:
        lines.append("Action: " + _text(reply["action"]))
    if "subject" in reply:
        lines.append("Subject: " + _text(reply["subject"]))
    for name, entry in _symbol_entries(reply):
        lines.append(f"Symbol: {name}({_number(entry.get('score')):.2f})")
    for message in _messages(reply):
        lines.append("Message: " + message)
    if "message-id" in reply:
        lines.append("Message-ID: " + _text(reply["message-id"]))
    return "".join(line + "\r\n" for line in lines).encode("utf-8", "surrogatepass")


def spamc_body(reply: Mapping[str, Any]) -> bytes:
    """SPAMC reply text (without status line) for a parsed scan reply."""
    score = _number(reply.get("score"))
    required = _number(reply.get("required_score"))
    text = f"Spam: {_spam_word(reply)} ; {score:.2f} / {required:.2f}\r\n\r\n"
    names = [name for name, _ in _symbol_entries(reply)]
    if names:
        text += ",".join(names) + "\r\n"
    return text.encode("utf-8", "surrogatepass")


def legacy_reply(variant: LegacyVariant, reply: bytes | str | Mapping[str, Any]) -> bytes:
    """Complete legacy reply bytes (status line(s) and text) for ``variant``.

    Raises:
        LegacyReplyError: ``reply`` is text that is not a JSON object.
    """
    parsed = parse_reply(reply)
    body = spamc_body(parsed) if variant is LegacyVariant.SPAMC else rspamc_body(parsed)
    return encode_legacy_reply(variant, body)
