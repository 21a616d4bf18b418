"""The benchmark's input messages: deterministic ham of a chosen size.

Every message is generated from a fixed seed, so every run (and every
target within a run) scans the same bytes.  Messages carry no URLs, no
addresses outside ``bench.test`` and nothing that would make a scanner
reach the network.

* :func:`text_ham` -- a plain-text message of about ``size`` bytes (CRLF line
  ends, 72-column paragraphs of ordinary words);
* :func:`attachment_ham` -- a short text part plus a base64
  ``application/octet-stream`` attachment, about ``size`` bytes in all (how a
  1 MB message usually looks).

:func:`write_messages` writes the named sizes to a directory and returns
their paths.
"""

from __future__ import annotations

import base64
import os
import random
import textwrap
from collections.abc import Mapping

__all__ = ["SIZES", "attachment_ham", "text_ham", "write_messages"]

_WORDS = (
    "meeting agenda report project budget review team schedule quarter plan "
    "update notes summary office customer order invoice delivery request "
    "thanks regards please attached discussed tomorrow morning afternoon "
    "friday monday week month year document draft version final changes "
    "comments question answer support service account details number "
    "address contact phone travel lunch coffee room floor building garden "
    "weather holiday family weekend training course lesson library book"
).split()

SIZES: Mapping[str, int] = {"2k": 2 * 1024, "50k": 50 * 1024, "1m": 1024 * 1024}
"""Named message sizes in bytes."""


def _headers(subject: str, extra: str = "") -> str:
    return (
        "Return-Path: <sender@bench.test>\r\n"
        "From: Alex Sender <sender@bench.test>\r\n"
        "To: Robin Reader <rcpt@bench.test>\r\n"
        f"Subject: {subject}\r\n"
        "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
        "Message-ID: <bench-0001@bench.test>\r\n"
        "MIME-Version: 1.0\r\n"
        f"{extra}"
    )


def _paragraphs(rng: random.Random, size: int) -> str:
    """Text of at least ``size`` characters: wrapped sentences in paragraphs."""
    lines: list[str] = []
    length = 0
    while length < size:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(40, 90))]
        sentence_words = []
        for index, word in enumerate(words):
            sentence_words.append(word.capitalize() if index % 12 == 0 else word)
            if index % 12 == 11:
                sentence_words[-1] += "."
        paragraph = textwrap.wrap(" ".join(sentence_words).rstrip(".") + ".", 72)
        paragraph.append("")
        lines += paragraph
        length += sum(len(line) + 2 for line in paragraph)
    return "\r\n".join(lines)


def text_ham(size: int, seed: int = 1) -> bytes:
    """A plain-text ham message of ``size`` bytes (exactly, padded with text)."""
    rng = random.Random(seed)
    head = _headers("Notes from the weekly meeting",
                    "Content-Type: text/plain; charset=utf-8\r\n"
                    "Content-Transfer-Encoding: 7bit\r\n\r\n")
    body = "Hello,\r\n\r\n" + _paragraphs(rng, max(size - len(head), 0))
    message = (head + body).encode("ascii")
    return _fit(message, size)


def attachment_ham(size: int, seed: int = 1) -> bytes:
    """A ham message of ``size`` bytes: a text part and a base64 attachment."""
    rng = random.Random(seed)
    boundary = "bench-boundary-0001"
    head = _headers("Quarterly report",
                    f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n')
    text = (f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            "Hello,\r\n\r\nThe report is attached.\r\n\r\n"
            + _paragraphs(rng, 1024) + "\r\n")
    attachment_head = (f"--{boundary}\r\nContent-Type: application/octet-stream; "
                       'name="report.bin"\r\nContent-Transfer-Encoding: base64\r\n'
                       'Content-Disposition: attachment; filename="report.bin"\r\n\r\n')
    tail = f"\r\n--{boundary}--\r\n"
    room = size - len(head) - len(text) - len(attachment_head) - len(tail)
    raw = rng.randbytes(max(room, 0) * 3 // 4)
    encoded = base64.b64encode(raw).decode("ascii")
    lines = "\r\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    message = (head + text + attachment_head + lines + tail).encode("ascii")
    return _fit(message, size, before=tail.encode("ascii"))


def _fit(message: bytes, size: int, before: bytes = b"") -> bytes:
    """Cut or pad ``message`` (before its ``before`` tail) to ``size`` bytes when it can."""
    core = message[: len(message) - len(before)] if before else message
    if len(message) > size:
        core = core[: max(size - len(before), 0)]
        core = core[: core.rfind(b"\r\n") + 2] if b"\r\n" in core else core
    pad = size - len(core) - len(before)
    if pad >= 2:
        core += b" " * (pad - 2) + b"\r\n"
    return core + before


def write_messages(directory: str, names: list[str] | None = None) -> dict[str, str]:
    """Write the messages named (keys of :data:`SIZES`) to ``directory``; name → path.

    Sizes up to 50 KB are plain text; larger ones carry an attachment.
    """
    paths = {}
    for name in names or list(SIZES):
        size = SIZES[name]
        data = text_ham(size) if size <= 64 * 1024 else attachment_ham(size)
        path = os.path.join(directory, f"ham-{name}.eml")
        with open(path, "wb") as f:
            f.write(data)
        paths[name] = path
    return paths
