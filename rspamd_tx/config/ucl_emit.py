"""Write a configuration tree back as UCL.

:func:`dumps` is the inverse of :func:`rspamd_tx.config.ucl.loads`: for every
tree it accepts, ``loads(dumps(tree)) == tree``, with the same value types
(ints stay ints, floats stay floats).  The output uses Rspamd's config
style: ``key = value;`` lines and ``key { ... }`` blocks, indented by four
spaces, keys always double-quoted.

Strings holding ``$`` are written single-quoted, where libucl expands no
variables, so they read back unchanged even when variables are defined.
The one exception, a string holding ``$`` and also a backslash right before
a quote, a line break or its end, has no such form; it is written
double-quoted and reads back unchanged only without variables (as
``loads`` without ``variables``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["dumps"]

_INDENT = "    "
_INT64_MIN = -(2**63) + 1  # libucl reads the magnitude first: -2**63 overflows
_INT64_MAX = 2**63 - 1
_DBL_MIN = 2.2250738585072014e-308
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def _double_quoted(text: str) -> str:
    out = ['"']
    for ch in text:
        escaped = _ESCAPES.get(ch)
        if escaped is not None:
            out.append(escaped)
        elif ch < " " or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _single_quotable(text: str) -> bool:
    """Whether libucl reads ``'text'`` (with ``'`` escaped) back as ``text``."""
    for index, ch in enumerate(text):
        if ch == "\\":
            following = text[index + 1:index + 2]
            if following in ("", "'", "\n", "\r"):
                return False
    return True


def _string(text: str) -> str:
    if "$" in text and _single_quotable(text):
        return "'" + text.replace("'", "\\'") + "'"
    return _double_quoted(text)


def _key(key: Any) -> str:
    if not isinstance(key, str):
        raise ValueError(f"UCL keys must be strings, not {type(key).__name__}")
    if not key:
        raise ValueError("UCL has no empty keys")
    return _double_quoted(key)


def _float(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if value == math.inf:
        return "inf"
    if value == -math.inf:
        raise ValueError("UCL cannot express -inf")
    if value != 0.0 and abs(value) < _DBL_MIN:
        raise ValueError(f"UCL cannot express the subnormal float {value!r}")
    text = repr(value)
    if "." not in text and "e" not in text:
        text += ".0"
    return text


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError(f"UCL integers are 64-bit: {value}")
        return str(value)
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, str):
        return _string(value)
    raise ValueError(f"UCL cannot express a {type(value).__name__}")


def _value(value: Any, depth: int, out: list[str]) -> None:
    """Append ``value`` (without a trailing separator) to ``out``."""
    if isinstance(value, Mapping):
        if not value:
            out.append("{}")
            return
        out.append("{\n")
        _members(value, depth + 1, out)
        out.append(_INDENT * depth + "}")
    elif isinstance(value, (list, tuple)):
        if not value:
            out.append("[]")
            return
        out.append("[\n")
        for item in value:
            out.append(_INDENT * (depth + 1))
            _value(item, depth + 1, out)
            out.append(",\n")
        out.append(_INDENT * depth + "]")
    else:
        out.append(_scalar(value))


def _members(obj: Mapping[str, Any], depth: int, out: list[str]) -> None:
    for key, value in obj.items():
        out.append(_INDENT * depth + _key(key))
        if isinstance(value, Mapping):
            out.append(" ")
            _value(value, depth, out)
            out.append("\n")
        else:
            out.append(" = ")
            _value(value, depth, out)
            out.append(";\n")


def dumps(tree: Mapping[str, Any]) -> str:
    """Return UCL text for ``tree`` (an object of plain values).

    :raises ValueError: for values UCL cannot express: non-string or empty
        keys, integers outside ±(2**63 - 1), ``-inf``, subnormal floats and other
        Python types.
    """
    if not isinstance(tree, Mapping):
        raise ValueError("the top level of a configuration must be an object")
    out: list[str] = []
    _members(tree, 0, out)
    return "".join(out)
