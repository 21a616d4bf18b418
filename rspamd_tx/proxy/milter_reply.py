"""Turn a scan result into the milter replies Rspamd's proxy sends (milter.md §6).

Pure: a parsed result, the counts of the headers the MTA sent, the
connection's sticky flags and the proxy's reply settings in; a list of
:mod:`~rspamd_tx.protocols.milter_events` responses out, ending with exactly
one final disposition (``a``, ``d``, ``t`` or ``y``).

* :func:`parse_reply` reads a :class:`~rspamd_tx.proxy.scanning.ScanReply` as
  Rspamd does: only an ``application/json`` reply (no parameters) is a result;
  ``Message-Offset: N`` splits it into N bytes of JSON and a replacement body.
* :func:`result_replies` is ``rspamd_milter_send_task_results``: the
  ``milter`` block (``remove_headers``, ``add_headers``, ``change_from``,
  ``add_rcpt``, ``del_rcpt``, ``reject``, ``no_action``, ``spam_header``),
  ``dkim-signature``, the replacement body and the action's disposition.
* :func:`failure_replies` answers a scan that failed, per the failure policy.

Deviations from Rspamd, both deliberate: with ``milter.spam_header`` and a
``dkim-signature`` the DKIM ``i`` packets go *before* the early ``a`` (Rspamd
queues them after it, where the MTA would misread them); with
``extended_spam_headers`` two ``h`` packets (``X-Spamd-Result``,
``X-Rspamd-Server``) precede a final ``a``, as rmilter added them.
Quarantine follows Rspamd 3.9+: ``q`` with ``quarantine_message`` only when
the result has no ``smtp_message``.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from rspamd_tx.config.workers import STANDARD_ACTIONS, ProxyOptions
from rspamd_tx.protocols.milter_events import (
    Accept,
    AddHeader,
    AddRecipient,
    ChangeFrom,
    ChangeHeader,
    DeleteRecipient,
    Discard,
    InsertHeader,
    Quarantine,
    ReplaceBody,
    ReplyCode,
    Response,
    Tempfail,
)
from rspamd_tx.proxy.failure_policy import synthetic_result
from rspamd_tx.proxy.scanning import FailureAction, ScanFailure, ScanReply

__all__ = [
    "ACTION_HEADER",
    "DKIM_HEADER",
    "REJECT_CODE",
    "STANDARD_ACTIONS",
    "TEMPFAIL_CODE",
    "ConnectionFlags",
    "ParsedReply",
    "ReceivedHeaders",
    "ReplySettings",
    "failure_replies",
    "parse_reply",
    "result_replies",
]

#: SMTP reply and enhanced status code of a rejection.
REJECT_CODE = (b"554", b"5.7.1")
#: SMTP reply and enhanced status code of a soft rejection.
TEMPFAIL_CODE = (b"451", b"4.7.1")
#: Header added with the action's name when the no-action flag is set.
ACTION_HEADER = b"X-Rspamd-Action"
#: Header inserted for each ``dkim-signature`` of the result.
DKIM_HEADER = b"DKIM-Signature"

_RESULT_HEADER = b"X-Spamd-Result"
_SERVER_HEADER = b"X-Rspamd-Server"
_U32_MAX = 0xFFFFFFFF


@dataclass(frozen=True)
class ReplySettings:
    """The proxy options that shape milter replies.

    Attributes:
        spam_header: header set to ``Yes`` by ``add header``.
        reject_message: text of ``554 5.7.1`` without ``smtp_message``.
        tempfail_message: text of ``451 4.7.1`` without ``smtp_message``.
        quarantine_message: reason of ``q``.
        actions: the registered action names; any other action is answered ``t``.
        extended_spam_headers: add ``X-Spamd-Result`` and ``X-Rspamd-Server``
            to accepted messages.
        server_name: the value of ``X-Rspamd-Server``.
    """

    spam_header: str = "X-Spam"
    reject_message: str = "Spam message rejected"
    tempfail_message: str = "Try again later"
    quarantine_message: str = "Spam message quarantined"
    actions: frozenset[str] = STANDARD_ACTIONS
    extended_spam_headers: bool = False
    server_name: str = "localhost"

    @classmethod
    def from_options(
        cls,
        options: ProxyOptions,
        *,
        actions: Collection[str] = STANDARD_ACTIONS,
        server_name: str = "localhost",
    ) -> ReplySettings:
        """The settings of a proxy worker's options."""
        return cls(
            spam_header=options.spam_header,
            reject_message=options.reject_message,
            tempfail_message=options.tempfail_message,
            quarantine_message=options.quarantine_message,
            actions=frozenset(actions),
            extended_spam_headers=options.extended_spam_headers,
            server_name=server_name,
        )


@dataclass
class ConnectionFlags:
    """Flags that live on a milter connection and persist across its messages.

    ``discard_on_reject`` and ``quarantine_on_reject`` start from the proxy
    options and are switched by a result's ``milter.reject``; ``no_action``
    is set by ``milter.no_action`` and never reset automatically.
    """

    discard_on_reject: bool = False
    quarantine_on_reject: bool = False
    no_action: bool = False


@dataclass(frozen=True)
class ReceivedHeaders:
    """What the MTA sent of the current message's headers.

    Attributes:
        occurrences: lower-cased header name → number of occurrences.
        count: headers received.
    """

    occurrences: Mapping[bytes, int] = field(default_factory=dict)
    count: int = 0


@dataclass(frozen=True)
class ParsedReply:
    """A scanner reply read as Rspamd's milter does.

    ``result`` is the JSON object, or ``None`` when the reply is not a usable
    result; ``body`` the replacement body after ``Message-Offset``, if any;
    ``error`` says why ``result`` is ``None``.
    """

    result: dict[str, Any] | None
    body: bytes | None = None
    error: str = ""


def parse_reply(reply: ScanReply) -> ParsedReply:
    """Split a scanner reply into its JSON result and replacement body.

    Only ``Content-Type: application/json`` exactly (case-insensitive, no
    parameters) is a result.  With ``Message-Offset: N`` and ``N`` below the
    body length the first ``N`` bytes are the JSON and the rest is the new
    body.  Never raises.
    """
    content_type = reply.content_type().strip().lower()
    if content_type != b"application/json":
        return ParsedReply(None, error=f"reply content type is {content_type.decode('latin-1')!r}")
    body = reply.body
    new_body: bytes | None = None
    offset_text = next(
        (value for name, value in reply.headers if name.lower() == b"message-offset"), None
    )
    if offset_text is not None:
        try:
            offset = int(offset_text.strip())
        except ValueError:
            offset = -1
        if 0 <= offset < len(body):
            body, new_body = body[:offset], body[offset:]
    try:
        parsed = json.loads(body, object_pairs_hook=_json_object)
    except (ValueError, RecursionError) as exc:
        return ParsedReply(None, error=f"cannot parse the result: {exc}")
    if not isinstance(parsed, dict):
        return ParsedReply(None, error="the result is not an object")
    return ParsedReply(parsed, new_body)


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object: a plain dict, or a :class:`_JsonObject` when a key repeats."""
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    return _JsonObject(pairs)


class _JsonObject(dict[str, Any]):
    """A JSON object that also keeps every ``(key, value)`` pair, duplicates included.

    As a dict it keeps the first value of a repeated key, as UCL's lookup does;
    :meth:`grouped` gives the values of each key in the order UCL iterates an
    object with implicit arrays.
    """

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__()
        self.pairs = pairs
        for key, value in pairs:
            self.setdefault(key, value)

    def grouped(self) -> list[tuple[str, list[Any]]]:
        """``(key, [values...])`` by first appearance of each key."""
        groups: dict[str, list[Any]] = {}
        for key, value in self.pairs:
            groups.setdefault(key, []).append(value)
        return list(groups.items())


def _grouped(obj: dict[str, Any]) -> list[tuple[str, list[Any]]]:
    if isinstance(obj, _JsonObject):
        return obj.grouped()
    return [(key, [value]) for key, value in obj.items()]


def _c(text: str) -> bytes:
    """``text`` as the C string Rspamd would send: UTF-8, cut at a NUL."""
    return text.encode("utf-8", "surrogateescape").split(b"\0", 1)[0]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _index(value: int) -> int:
    """A header index as the u32 on the wire (Rspamd casts a C int)."""
    return value & _U32_MAX


class _Builder:
    """Collects the replies of one result while tracking the header counter."""

    def __init__(self, headers: ReceivedHeaders) -> None:
        self.headers = headers
        self.counter = headers.count
        self.out: list[Response] = []

    def remove(self, name: str, which: int) -> None:
        """``rspamd_milter_remove_header_safe``: ``m`` packets with empty values."""
        wire = _c(name)
        seen = self.headers.occurrences.get(wire.lower(), 0)
        if seen == 0:
            return
        if which > 0:
            if seen >= which:
                self._delete(which, wire)
        elif which == 0:
            for index in range(seen, 0, -1):
                self._delete(index, wire)
        elif -which <= seen:
            self._delete(seen + which + 1, wire)

    def _delete(self, index: int, name: bytes) -> None:
        self.out.append(ChangeHeader(index, name, b""))
        self.counter = max(self.counter - 1, 0)

    def add_object(self, name: str, spec: Any) -> None:
        """One object-form header ``{value, order|index}``."""
        if not isinstance(spec, dict):
            return
        value = spec.get("value")
        if not isinstance(value, str):
            return
        order = spec.get("order", spec.get("index"))
        wire_name, wire_value = _c(name), _c(value)
        if isinstance(order, bool) or not isinstance(order, (int, float)):
            self.out.append(AddHeader(wire_name, wire_value))
        else:
            index = int(order)
            if index >= 0:
                self.out.append(InsertHeader(_index(index), wire_name, wire_value))
            elif index == -1:
                self.out.append(AddHeader(wire_name, wire_value))
            elif -index <= self.counter:
                self.out.append(InsertHeader(_index(self.counter + index + 2), wire_name, wire_value))
            else:
                self.out.append(InsertHeader(0, wire_name, wire_value))
        self.counter += 1


def _milter_block(
    block: Any, action: str, flags: ConnectionFlags, settings: ReplySettings, build: _Builder
) -> bool:
    """Apply the result's ``milter`` object; True if ``spam_header`` decided the reply."""
    if not isinstance(block, dict):
        return False
    removals = block.get("remove_headers")
    if isinstance(removals, dict):
        for name, which in removals.items():
            for one in which if isinstance(which, list) else [which]:
                if _is_int(one):
                    build.remove(name, one)
    additions = block.get("add_headers")
    if isinstance(additions, dict):
        for name, values in _grouped(additions):
            spec = values[0]
            if isinstance(spec, str):
                # a repeated key (UCL implicit array) adds each string value
                build.out.extend(AddHeader(_c(name), _c(v)) for v in values if isinstance(v, str))
            elif isinstance(spec, list):
                for item in spec:
                    build.add_object(name, item)
            else:
                build.add_object(name, spec)
    change_from = block.get("change_from")
    if isinstance(change_from, str):
        build.out.append(ChangeFrom(_c(change_from)))
    for key, kind in (("add_rcpt", AddRecipient), ("del_rcpt", DeleteRecipient)):
        addresses = block.get(key)
        if isinstance(addresses, list):
            build.out.extend(kind(_c(a)) for a in addresses if isinstance(a, str))
    reject = block.get("reject")
    if isinstance(reject, str):
        flags.discard_on_reject = reject == "discard"
        flags.quarantine_on_reject = reject == "quarantine"
    no_action = block.get("no_action")
    if isinstance(no_action, bool):
        flags.no_action = no_action
    if action != "add header":
        return False
    spam_header = block.get("spam_header")
    if isinstance(spam_header, str):
        pairs = [(settings.spam_header, spam_header)]
    elif isinstance(spam_header, dict):
        pairs = [(k, v) for k, v in spam_header.items()]
    else:
        return False
    for name, value in pairs:
        build.remove(name, 0)
        build.out.append(ChangeHeader(1, _c(name), _c(_text(value))))
    return True


def _text(value: Any) -> str:
    """A JSON scalar as UCL's ``tostring`` shows it."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return json.dumps(value)


def _dkim(result: Mapping[str, Any], build: _Builder) -> None:
    signatures = result.get("dkim-signature")
    if isinstance(signatures, str):
        build.out.append(InsertHeader(1, DKIM_HEADER, _c(signatures)))
    elif isinstance(signatures, list):
        for index, signature in enumerate(signatures, start=1):
            build.out.append(InsertHeader(index, DKIM_HEADER, _c(_text(signature))))


def _smtp_message(result: Mapping[str, Any]) -> str | None:
    messages = result.get("messages")
    if isinstance(messages, dict) and "smtp_message" in messages:
        return _text(messages["smtp_message"])
    return None


def _disposition(
    action: str,
    result: Mapping[str, Any],
    flags: ConnectionFlags,
    settings: ReplySettings,
    build: _Builder,
) -> None:
    message = _smtp_message(result)
    if action == "reject":
        if flags.discard_on_reject:
            build.out.append(Discard())
        elif flags.quarantine_on_reject:
            _quarantine(message, settings, build)
        else:
            text = message if message is not None else settings.reject_message
            build.out.append(ReplyCode(*REJECT_CODE, _c(text)))
    elif action == "soft reject":
        text = message if message is not None else settings.tempfail_message
        build.out.append(ReplyCode(*TEMPFAIL_CODE, _c(text)))
    elif action == "rewrite subject":
        subject = result.get("subject")
        if subject is not None:
            build.out.append(ChangeHeader(1, b"Subject", _c(_text(subject))))
        build.out.append(Accept())
    elif action == "add header":
        build.remove(settings.spam_header, 0)
        build.out.append(ChangeHeader(1, _c(settings.spam_header), b"Yes"))
        build.out.append(Accept())
    elif action == "quarantine":
        _quarantine(message, settings, build)
    elif action == "discard":
        build.out.append(Discard())
    else:
        build.out.append(Accept())


def _quarantine(message: str | None, settings: ReplySettings, build: _Builder) -> None:
    if message is None:
        build.out.append(Quarantine(_c(settings.quarantine_message)))
    build.out.append(Accept())


def _extended_headers(result: Mapping[str, Any], settings: ReplySettings) -> list[Response]:
    """rmilter's ``X-Spamd-Result`` and ``X-Rspamd-Server``."""
    action = _text(result.get("action", ""))
    score = _number(result.get("score"))
    required = _number(result.get("required_score"))
    spam = "True" if action in ("reject", "add header", "rewrite subject") else "False"
    parts = [f"default: {spam} [{score:.2f} / {required:.2f}]"]
    symbols = result.get("symbols")
    if isinstance(symbols, dict):
        for name in sorted(symbols):
            symbol = symbols[name]
            if not isinstance(symbol, dict):
                continue
            options = symbol.get("options")
            listed = ", ".join(_text(o) for o in options) if isinstance(options, list) else ""
            parts.append(f"{name}({_number(symbol.get('score')):.2f})[{listed}]")
    return [
        AddHeader(_RESULT_HEADER, _c(";\n\t".join(parts))),
        AddHeader(_SERVER_HEADER, _c(settings.server_name)),
    ]


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def result_replies(
    parsed: ParsedReply,
    *,
    headers: ReceivedHeaders,
    flags: ConnectionFlags,
    settings: ReplySettings,
) -> list[Response]:
    """The replies to one end-of-message for a scanner reply.

    ``flags`` is updated in place (``milter.reject``, ``milter.no_action``).
    A reply without a result, without ``action`` or with an action not in
    ``settings.actions`` is answered with a single ``t``.
    """
    result = parsed.result
    if result is None or "action" not in result:
        return [Tempfail()]
    action = _text(result["action"])
    if action not in settings.actions:
        return [Tempfail()]
    build = _Builder(headers)
    decided = _milter_block(result.get("milter"), action, flags, settings, build)
    _dkim(result, build)
    if decided:
        build.out.append(Accept())
    else:
        if parsed.body is not None:
            build.out.append(ReplaceBody(parsed.body))
        if flags.no_action:
            build.out.append(AddHeader(ACTION_HEADER, _c(action)))
            build.out.append(Accept())
        else:
            _disposition(action, result, flags, settings, build)
    replies = build.out
    if settings.extended_spam_headers and isinstance(replies[-1], Accept):
        replies[-1:-1] = _extended_headers(result, settings)
    return replies


def failure_replies(
    action: FailureAction, failure: ScanFailure, settings: ReplySettings
) -> list[Response]:
    """The replies for a scan that failed, given the failure policy's ``action``.

    ``tempfail`` → ``t`` (what Rspamd intends); ``accept`` → ``a``;
    ``discard`` → ``d``; ``reject`` → ``554 5.7.1`` with the text of the
    policy's synthetic verdict (``Message not scanned: <reason>``).
    """
    if action is FailureAction.TEMPFAIL:
        return [Tempfail()]
    if action is FailureAction.ACCEPT:
        return [Accept()]
    if action is FailureAction.DISCARD:
        return [Discard()]
    message = _smtp_message(synthetic_result(action, failure))
    text = message if message is not None else settings.reject_message
    return [ReplyCode(*REJECT_CODE, _c(text))]
