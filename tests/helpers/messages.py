"""Test messages shared by the suites that scan with a real Rspamd."""

from __future__ import annotations

#: A minimal message carrying the GTUBE test string: Rspamd's action is reject.
GTUBE_MESSAGE = (
    b"From: sender@example.com\r\nTo: rcpt@example.net\r\nSubject: test\r\n\r\n"
    b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\r\n"
)
