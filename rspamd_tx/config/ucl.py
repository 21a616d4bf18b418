"""A UCL parser that reads Rspamd configuration files exactly as libucl does.

The result of :func:`loads` and :func:`load` is a tree of plain values (see
:mod:`rspamd_tx.config.tree`) equal to what ``rspamadm configdump -j`` prints
for the same input:

* ``key = value;``, ``key value;``, ``key: value``, ``key { ... }`` and
  ``key [ ... ]``; several keys before a brace nest objects, so
  ``upstream "scan" { ... }`` is ``upstream { scan { ... } }``;
* a key written twice at the same priority becomes an implicit array (so two
  ``upstream "x" { ... }`` sections give a list of two single-key objects);
  as in configdump, when the first of the repeated values is itself an
  explicit array, only that array is kept;
* strings: ``"double"`` (JSON escapes, ``\\uXXXX``), ``'single'`` (only
  ``\\'`` and line continuations are escapes, no variable expansion), bare
  atoms (``hello world`` up to ``;``, ``,``, a newline, ``]``, ``}`` or a
  comment), heredocs ``<<EOD`` ... ``EOD``;
* numbers: integers (decimal or ``0x`` hex), floats, ``k``/``m``/``g``
  (x1000, int stays int), ``kb``/``mb``/``gb`` (x1024, always int), times
  ``ms s min h d w y`` (float seconds); ``yes no true false on off``,
  ``null``, ``nan``, ``inf``;
* comments ``#`` to the end of the line and nested ``/* ... */``;
* variables ``$VAR`` and ``${VAR}`` in double-quoted strings, atoms,
  heredocs and macro arguments; unknown variables are left as written;
  ``$FILENAME`` and ``$CURDIR`` name the file being read;
* macros ``.include``, ``.try_include`` and ``.priority``; ``.include``
  takes ``(try=..., priority=N, duplicate=append|merge|rewrite|error,
  glob=..., prefix=..., key=..., target=object|array)``, with ``,`` or ``;``
  between parameters.

Priorities follow libucl: every value remembers the priority of the chunk
it was read from (0 unless an include or ``.priority`` says otherwise).  When
a key is written again, with ``duplicate=append`` (the default) a higher
priority replaces the old value, a lower one is dropped and an equal one
makes an implicit array; ``merge`` merges objects and arrays into the old
ones; ``rewrite`` always replaces; ``error`` fails.  The order of the
includes does not matter.

Departures from libucl, all on input libucl rejects or mangles:

* two quoted strings or containers in an array without a comma between them
  on one line are read as two elements (libucl: "delimiter is missing");
* ``.try_include`` of a missing file is skipped (libucl fails without an
  error message); a macro cut off by the end of the text is an error
  (libucl ignores it); a key with nothing after its separator at the end of
  the text is an error (libucl yields ``null``);
* a top-level array, signed includes (``.includes``, ``sign=true``), URL
  includes, include search paths, ``.load`` and ``.inherit`` are errors;
* when several keys before a brace nest objects (``a b { ... }``) and the
  innermost value is not a container, only that one key is put in the
  nested object.

Every problem, including a missing file, is reported as
:class:`~rspamd_tx.config.tree.ConfigError` with the location where it was
found (none when the file given to :func:`load` cannot be read); no other
exception escapes.
"""

from __future__ import annotations

import bisect
import glob as _glob
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from rspamd_tx.config.tree import ConfigError, Location, UclObject

__all__ = ["MAX_INCLUDE_DEPTH", "expand_variables", "load", "loads"]

#: How deep includes may nest (libucl's limit).
MAX_INCLUDE_DEPTH = 16

_APPEND = "append"
_MERGE = "merge"
_REWRITE = "rewrite"
_ERROR = "error"

_WS = " \t"
_WS_UNSAFE = " \t\n\x0b\x0c\r"
_VALUE_END = "\x00\n\r#,;]}"
_KEY_START = frozenset("/0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz")
_KEY_SEP = " \t:="
_JSON_ESCAPES = '"/\\bfnrtu'
_HEX = "0123456789abcdefABCDEF"

_KEY_RE = re.compile(r"[-./0-9A-Za-z_\u0080-\U0010ffff]*")
_ATOM_PLAIN_RE = re.compile(r"[^{}\[\]$\\\x00\n\r#,;/]+")
_JSON_PLAIN_RE = re.compile(r'[^"\\\x00-\x1e]+')
_WS_UNSAFE_RE = re.compile(r"[ \t\n\x0b\x0c\r]*")
_STRTOD_RE = re.compile(r"[ \t\n\x0b\x0c\r]*([-+]?)((?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")
_STRTOI_RE = re.compile(r"[ \t\n\x0b\x0c\r]*([-+]?)(\d+)")
_STRTOX_RE = re.compile(r"[ \t\n\x0b\x0c\r]*([-+]?)(?:0[xX](?=[0-9a-fA-F]))?([0-9a-fA-F]+)")
_STRTOL_RE = re.compile(r"[ \t\n\x0b\x0c\r]*[-+]?\d+")

_BOOLEANS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
_NUM_MULT = {"k": 1000, "m": 1000 * 1000, "g": 1000 * 1000 * 1000}
_BYTE_MULT = {"k": 1024, "m": 1024 * 1024, "g": 1024 * 1024 * 1024}
_TIME_MULT = {"s": 1.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, "y": 31536000.0}
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_DBL_MIN = 2.2250738585072014e-308

_MACROS = frozenset({"include", "try_include", "includes", "priority", "load", "inherit"})


class _Object(UclObject):
    """An object while it is being parsed: also remembers each key's priority."""

    __slots__ = ("priorities",)

    def __init__(self) -> None:
        super().__init__()
        self.priorities: dict[str, int] = {}


class _Implicit(list[Any]):
    """An implicit array made by writing a key more than once."""


class _Frame:
    """Where keys go: ``target`` gets new keys; ``lookups`` are searched for old ones."""

    __slots__ = ("target", "lookups")

    def __init__(self, target: _Object, lookups: list[_Object] | None = None) -> None:
        self.target = target
        self.lookups = lookups if lookups is not None else [target]


class _Context:
    """State shared by a document and everything it includes."""

    __slots__ = ("variables", "depth", "current_file", "allow_macros")

    def __init__(self, variables: list[tuple[str, str]], allow_macros: bool = True) -> None:
        self.variables = variables
        self.depth = 0
        self.current_file: str | None = None
        self.allow_macros = allow_macros


def _lookup_var_prefix(variables: list[tuple[str, str]], text: str, pos: int) -> tuple[str, str] | None:
    for name, value in variables:
        if text.startswith(name, pos):
            return name, value
    return None


def expand_variables(text: str, variables: list[tuple[str, str]]) -> str:
    """Expand ``$VAR`` and ``${VAR}`` in ``text`` the way libucl does.

    ``variables`` is searched in order and ``$NAME`` takes the first variable
    whose name starts the text after ``$``.  Unknown variables stay as
    written; ``$$`` becomes ``$`` only if some variable was expanded.
    """
    if "$" not in text:
        return text
    end = len(text)
    found_any = False
    p = 0
    names = {name: value for name, value in variables}
    while p < end:
        if text[p] == "$" and p + 1 != end:
            q = p + 1
            if text[q] == "{":
                close = text.find("}", q + 1)
                if close < 0:
                    p = q
                    continue
                if text[q + 1:close] in names:
                    found_any = True
                    p = close + 1
                else:
                    p = q + 1
            elif text[q] != "$":
                match = _lookup_var_prefix(variables, text, q)
                if match is not None:
                    found_any = True
                    p = q + len(match[0])
                else:
                    p = q
            else:
                p = q + 1
        else:
            p += 1
    if not found_any:
        return text
    out: list[str] = []
    p = 0
    while p < end:
        ch = text[p]
        if ch == "$" and p + 1 != end:
            nxt = text[p + 1]
            if nxt == "$":
                out.append("$")
                p += 2
            elif nxt == "{":
                start = p + 2
                for name, value in variables:
                    if text.startswith(name, start) and text.startswith("}", start + len(name)):
                        out.append(value)
                        p = start + len(name) + 1
                        break
                else:
                    out.append("${")
                    p += 2
            else:
                match = _lookup_var_prefix(variables, text, p + 1)
                if match is not None:
                    out.append(match[1])
                    p += 1 + len(match[0])
                else:
                    out.append("$")
                    p += 1
        else:
            out.append(ch)
            p += 1
    return "".join(out)


def _unescape(raw: str, escape: Callable[[str, int], tuple[str, int]]) -> str:
    """Copy ``raw`` with every backslash sequence replaced by ``escape``'s reading.

    ``escape(raw, i)`` is called with ``raw[i]`` a backslash followed by at
    least one character and returns the replacement and the index after the
    sequence; a backslash that ends ``raw`` is kept as it is.
    """
    out: list[str] = []
    i = 0
    n = len(raw)
    while i < n:
        ch = raw[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        if i + 1 >= n:
            out.append("\\")
            break
        replacement, i = escape(raw, i)
        out.append(replacement)
    return "".join(out)


def _json_escape(raw: str, i: int) -> tuple[str, int]:
    """One JSON escape as libucl reads it (an unknown one keeps its character)."""
    esc = raw[i + 1]
    if esc == "u":
        value = 0
        for d in raw[i + 2:i + 6]:
            if d not in _HEX:
                break
            value = value * 16 + int(d, 16)
        return (chr(value) if value < 0x10000 and not 0xD800 <= value <= 0xDFFF
                else "?"), i + 6
    return {"n": "\n", "r": "\r", "b": "\b", "t": "\t", "f": "\f"}.get(esc, esc), i + 2


def _squoted_escape(raw: str, i: int) -> tuple[str, int]:
    """One single-quote escape: ``\\'`` or a backslash-newline continuation;
    any other backslash stays."""
    esc = raw[i + 1]
    if esc == "'":
        return "'", i + 2
    if esc == "\n":
        return "", i + 2
    if esc == "\r":
        return "", i + (3 if raw.startswith("\n", i + 2) else 2)
    return "\\" + esc, i + 2


def _unescape_json(raw: str) -> str:
    """Undo JSON escapes as libucl does (unknown escapes keep the character)."""
    return _unescape(raw, _json_escape)


def _unescape_squoted(raw: str) -> str:
    """Undo single-quote escapes: ``\\'`` and backslash-newline continuations."""
    return _unescape(raw, _squoted_escape)


def _finish(value: Any) -> Any:
    """Turn the parse-time tree into plain :class:`UclObject` / ``list`` values."""
    if isinstance(value, _Object):
        result = UclObject()
        for key, item in value.items():
            result[key] = _finish(item)
        result.locations.update(value.locations)
        return result
    if isinstance(value, _Implicit) and type(value[0]) is list:
        return _finish(value[0])
    if isinstance(value, list):
        return [_finish(item) for item in value]
    return value


class _Chunk:
    """One text being parsed (a document or an included file)."""

    def __init__(self, text: str, filename: str, context: _Context,
                 priority: int = 0, strategy: str = _APPEND) -> None:
        self.text = text
        self.end = len(text)
        self.pos = 0
        self.filename = filename
        self.context = context
        self.priority = priority & 0xF
        self.strategy = strategy
        self._line_starts: list[int] | None = None

    # -- locations and errors -------------------------------------------------

    def location(self, pos: int | None = None) -> Location:
        """The 1-based line and column of ``pos`` (default: the current position)."""
        if pos is None:
            pos = self.pos
        if self._line_starts is None:
            starts = [0]
            find = self.text.find
            i = find("\n")
            while i >= 0:
                starts.append(i + 1)
                i = find("\n", i + 1)
            self._line_starts = starts
        index = bisect.bisect_right(self._line_starts, pos) - 1
        return Location(self.filename, index + 1, pos - self._line_starts[index] + 1)

    def error(self, message: str, pos: int | None = None) -> ConfigError:
        return ConfigError(message, self.location(pos))

    # -- low level scanning ----------------------------------------------------

    def _is_comment(self, p: int) -> bool:
        text = self.text
        if p >= self.end:
            return False
        ch = text[p]
        return ch == "#" or (ch == "/" and p + 1 < self.end and text[p + 1] == "*")

    def _skip_comments(self) -> None:
        """Skip consecutive comments starting at the current position."""
        text = self.text
        end = self.end
        while self.pos < end:
            p = self.pos
            ch = text[p]
            if ch == "#":
                nl = text.find("\n", p)
                self.pos = end if nl < 0 else nl + 1
            elif ch == "/" and p + 1 < end and text[p + 1] == "*":
                start = p
                p += 2
                nested = 1
                quoted = False
                while p < end:
                    c = text[p]
                    if c == '"' and text[p - 1] != "\\":
                        quoted = not quoted
                    if not quoted:
                        if c == "*":
                            p += 1
                            if p < end and text[p] == "/":
                                nested -= 1
                                if nested == 0:
                                    p += 1
                                    break
                            p += 1
                            continue
                        if c == "/" and p + 1 < end and text[p + 1] == "*":
                            nested += 1
                            p += 2
                            continue
                    p += 1
                if nested != 0:
                    raise self.error("unfinished multiline comment", start)
                self.pos = p
            else:
                return

    def _skip_ws_unsafe(self) -> None:
        match = _WS_UNSAFE_RE.match(self.text, self.pos)
        assert match is not None
        self.pos = match.end()

    def _skip_blank(self) -> None:
        """Skip any mix of whitespace (newlines included) and comments."""
        while True:
            self._skip_ws_unsafe()
            if self._is_comment(self.pos):
                self._skip_comments()
            else:
                return

    def _lex_json_string(self) -> tuple[str, bool]:
        """Scan a double-quoted string whose opening quote was consumed.

        Returns the raw contents and whether they hold escapes; leaves the
        position after the closing quote.
        """
        text = self.text
        end = self.end
        start = p = self.pos
        escaped = False
        while p < end:
            match = _JSON_PLAIN_RE.match(text, p)
            if match is not None:
                p = match.end()
                if p >= end:
                    break
            ch = text[p]
            if ch == '"':
                self.pos = p + 1
                return text[start:p], escaped
            if ch == "\\":
                escaped = True
                p += 1
                if p >= end:
                    raise self.error("unfinished escape character", p)
                c = text[p]
                if c in _JSON_ESCAPES:
                    if c == "u":
                        p += 1
                        for _ in range(4):
                            if p >= end:
                                break
                            if text[p] not in _HEX:
                                raise self.error("invalid utf escape", p)
                            p += 1
                        if p >= end:
                            raise self.error("unfinished escape character", p)
                    else:
                        p += 1
                continue
            if ch == "\n":
                raise self.error("unexpected newline", p)
            raise self.error("unexpected control character", p)
        raise self.error("no quote at the end of json string", start - 1)

    def _lex_squoted_string(self) -> tuple[str, bool]:
        text = self.text
        end = self.end
        start = p = self.pos
        escaped = False
        while p < end:
            ch = text[p]
            if ch == "\\":
                if p + 1 >= end:
                    raise self.error("unfinished escape character", p)
                escaped = True
                p += 2
                continue
            if ch == "'":
                self.pos = p + 1
                return text[start:p], escaped
            p += 1
        raise self.error("no quote at the end of single quoted string", start - 1)

    def _expand(self, text: str) -> str:
        return expand_variables(text, self.context.variables)

    # -- documents ---------------------------------------------------------------

    def parse_document(self) -> _Object:
        """Parse a whole document (its top object, braced or not)."""
        top = _Object()
        self._skip_comments()
        self._skip_ws_unsafe()
        if self.pos < self.end and self.text[self.pos] == "[":
            raise self.error("the top level of a configuration must be an object")
        if self.pos < self.end and self.text[self.pos] == "{":
            self.pos += 1
            self._object_body(_Frame(top), "}")
            return top
        self._object_body(_Frame(top), None)
        return top

    def parse_included(self, frame: _Frame) -> None:
        """Parse an included file's keys into ``frame``."""
        self._skip_comments()
        self._skip_ws_unsafe()
        if self.pos < self.end and self.text[self.pos] == "[":
            raise self.error("an included file must hold an object")
        if self.pos < self.end and self.text[self.pos] == "{":
            self.pos += 1
            self._object_body(frame, "}")
        self._object_body(frame, None)

    # -- objects and arrays -------------------------------------------------------

    def _object_body(self, frame: _Frame, closer: str | None) -> None:
        """Parse keys until the closing brace (consumed) or the end of the text."""
        text = self.text
        open_pos = self.pos - 1
        while True:
            self._skip_blank()
            if self.pos >= self.end:
                if closer is not None:
                    raise self.error("unmatched open brace", open_pos)
                return
            ch = text[self.pos]
            if ch == "}":
                if closer is None:
                    raise self.error("object closed with } is not opened with {")
                self.pos += 1
                return
            if ch == ".":
                self._macro(frame)
                continue
            closed = self._key_value(frame)
            self._after_value(closed, "}" if closer is not None else None, lenient=False)
            if closer is None and self.pos < self.end and text[self.pos] == "}":
                raise self.error("object closed with } is not opened with {")

    def _array_body(self, target: list[Any]) -> None:
        """Parse array elements until the closing bracket (consumed)."""
        open_pos = self.pos - 1
        while True:
            self._skip_value_prefix()
            if self.pos >= self.end:
                raise self.error("unmatched open bracket", open_pos)
            if self.text[self.pos] == "]":
                self.pos += 1
                return
            value, closed = self._value(None)
            target.append(value)
            self._after_value(closed, "]", lenient=True)

    def _after_value(self, separated: bool, closer: str | None, lenient: bool) -> None:
        """Consume separators after a value; stop before a closer or the next item."""
        text = self.text
        end = self.end
        while self.pos < end:
            ch = text[self.pos]
            if ch in _WS:
                self.pos += 1
            elif self._is_comment(self.pos):
                self._skip_comments()
                separated = True
            elif ch in _VALUE_END:
                if ch == "}" or ch == "]":
                    if closer is not None and ch != closer:
                        raise self.error("unexpected terminating symbol detected")
                    return
                separated = True
                self.pos += 1
            else:
                if not separated and not lenient:
                    raise self.error("delimiter is missing")
                return

    # -- keys ---------------------------------------------------------------------

    def _parse_key(self) -> tuple[str, int, bool, bool]:
        """Parse a key and its separator.

        Returns ``(key, key_position, has_separator, nests)`` where ``nests``
        tells that more keys follow before a brace (``a b { ... }``).
        """
        text = self.text
        end = self.end
        start = self.pos
        ch = text[start]
        if ch == '"':
            self.pos += 1
            raw, escaped = self._lex_json_string()
            key = _unescape_json(raw) if escaped else raw
        elif ch in _KEY_START or ch >= "\x80":
            match = _KEY_RE.match(text, start + 1)
            assert match is not None
            self.pos = match.end()
            if self.pos >= end:
                raise self.error("unfinished key", start)
            if text[self.pos] not in _KEY_SEP:
                raise self.error("invalid character in a key")
            key = text[start:self.pos]
        else:
            raise self.error("key must begin with a letter")
        got_eq = got_colon = False
        while self.pos < end:
            c = text[self.pos]
            if c in _WS:
                self.pos += 1
            elif c == "=" or c == ":":
                if got_eq or got_colon:
                    raise self.error(f"unexpected '{c}' character")
                got_eq = c == "="
                got_colon = c == ":"
                self.pos += 1
            elif self._is_comment(self.pos):
                self._skip_comments()
            else:
                break
        if self.pos >= end:
            raise self.error("unfinished key", start)
        if not key:
            raise self.error("empty keys are not allowed", start)
        separated = got_eq or got_colon
        nests = False
        if not separated:
            t = self.pos
            while t < end and text[t] in _WS:
                t += 1
            if t < end and text[t] not in "{[":
                while t < end:
                    c = text[t]
                    if c in ",;\n\r":
                        break
                    if c == "{" or c == "[":
                        nests = True
                        break
                    t += 1
        return key, start, separated, nests

    def _find(self, frame: _Frame, key: str) -> _Object | None:
        for obj in frame.lookups:
            if key in obj:
                return obj
        return None

    def _key_value(self, frame: _Frame) -> bool:
        """Parse ``key [sep] value`` into ``frame``; return whether a container closed it."""
        key, key_pos, _separated, nests = self._parse_key()
        owner = self._find(frame, key)
        prio = self.priority
        action = "new"
        reuse: Any = None
        if owner is not None:
            old = owner[key]
            old_prio = owner.priorities.get(key, 0)
            strategy = self.strategy
            if strategy == _ERROR:
                raise self.error(f"duplicate element for key '{key}' found", key_pos)
            if strategy == _REWRITE:
                action = "replace"
            else:
                head = old[0] if isinstance(old, _Implicit) else old
                if strategy == _MERGE and isinstance(head, (_Object, list)):
                    action = "merge"
                    reuse = old
                elif old_prio == prio:
                    action = "append"
                elif old_prio > prio:
                    action = "drop"
                else:
                    action = "replace"
        if nests:
            value, closed = self._nested(reuse)
        else:
            value, closed = self._value(reuse)
        if action == "drop":
            return closed
        if action == "merge":
            if value is reuse or (isinstance(reuse, _Implicit) and value is reuse[0]):
                return closed
            assert owner is not None
            owner[key] = value
            return closed
        location = self.location(key_pos)
        if action == "new":
            target = frame.target
            target[key] = value
            target.priorities[key] = prio
            target.locations[key] = location
        elif action == "append":
            assert owner is not None
            old = owner[key]
            if isinstance(old, _Implicit):
                old.append(value)
            else:
                owner[key] = _Implicit([old, value])
            owner.locations[key] = location
        else:
            assert owner is not None
            owner[key] = value
            owner.priorities[key] = prio
            owner.locations[key] = location
        return closed

    def _merge_object(self, reuse: Any) -> tuple[_Object, list[_Object]] | None:
        """The object (and lookup list) to merge into, or ``None`` for a fresh one."""
        if reuse is None:
            return None
        if isinstance(reuse, _Implicit):
            head = reuse[0]
            if isinstance(head, _Object):
                return head, [item for item in reuse if isinstance(item, _Object)]
            raise self.error("cannot merge an object with an array")
        if isinstance(reuse, _Object):
            return reuse, [reuse]
        raise self.error("cannot merge an object with an array")

    def _merge_array(self, reuse: Any) -> list[Any] | None:
        if reuse is None:
            return None
        head = reuse[0] if isinstance(reuse, _Implicit) else reuse
        if isinstance(head, list) and not isinstance(head, _Implicit):
            return head
        raise self.error("cannot merge an object with an array")

    def _nested(self, reuse: Any) -> tuple[Any, bool]:
        """A key followed by more keys before a brace: one nested key/value."""
        merged = self._merge_object(reuse)
        if merged is None:
            obj = _Object()
            frame = _Frame(obj)
        else:
            obj, lookups = merged
            frame = _Frame(obj, lookups)
        self._skip_blank()
        if self.pos >= self.end:
            raise self.error("unfinished key")
        if self.text[self.pos] == ".":
            raise self.error("a macro cannot follow a key")
        closed = self._key_value(frame)
        return (obj if merged is None else reuse), closed

    # -- values ---------------------------------------------------------------------

    def _skip_value_prefix(self) -> None:
        text = self.text
        if self.pos < self.end and (text[self.pos] in _WS_UNSAFE or self._is_comment(self.pos)):
            self._skip_ws_unsafe()
            self._skip_comments()

    def _value(self, reuse: Any) -> tuple[Any, bool]:
        """Parse one value; return it and whether it ended with a closing bracket."""
        self._skip_value_prefix()
        text = self.text
        if self.pos >= self.end:
            raise self.error("value is missing")
        start = self.pos
        ch = text[start]
        if ch == '"':
            self.pos += 1
            raw, escaped = self._lex_json_string()
            value = _unescape_json(raw) if escaped else raw
            if "$" in raw:
                value = self._expand(value)
            return value, False
        if ch == "'":
            self.pos += 1
            raw, escaped = self._lex_squoted_string()
            return (_unescape_squoted(raw) if escaped else raw), False
        if ch == "{":
            self.pos += 1
            merged = self._merge_object(reuse)
            if merged is None:
                obj = _Object()
                self._object_body(_Frame(obj), "}")
                return obj, True
            self._object_body(_Frame(merged[0], merged[1]), "}")
            return reuse, True
        if ch == "[":
            self.pos += 1
            existing = self._merge_array(reuse)
            if existing is None:
                items: list[Any] = []
                self._array_body(items)
                return items, True
            self._array_body(existing)
            return reuse, True
        if ch == "<" and self.end - start > 3 and text.startswith("<<", start):
            heredoc = self._heredoc()
            if heredoc is not None:
                return heredoc, False
        if ch == "-" or "0" <= ch <= "9":
            number = self._number()
            if number is not None:
                return number, False
        return self._atom(), False

    def _heredoc(self) -> str | None:
        """Parse ``<<TERM\\n ... \\nTERM``; ``None`` if this is not a heredoc."""
        text = self.text
        end = self.end
        p = self.pos + 2
        while p < end and "A" <= text[p] <= "Z":
            p += 1
        if p == end:
            raise self.error("unterminated multiline value")
        if text[p] != "\n":
            return None
        term = text[self.pos + 2:p]
        content_start = p + 1
        q = content_start
        newline = False
        while q < end:
            if newline:
                if end - q < len(term):
                    break
                if text.startswith(term, q):
                    tend = q + len(term)
                    if tend < end and text[tend] in "\n;,":
                        length = q - content_start
                        if length == 0:
                            break
                        self.pos = tend
                        value = text[content_start:q - 1]
                        if "$" in value:
                            value = self._expand(value)
                        return value
            newline = text[q] == "\n"
            q += 1
        raise self.error("unterminated multiline value")

    def _atom(self) -> Any:
        """Parse a bare word: a string, ``null``, ``nan``, ``inf`` or a boolean."""
        text = self.text
        end = self.end
        start = p = self.pos
        fig_open = fig_close = sq_open = sq_close = 0
        escaped = has_var = False
        while p < end:
            match = _ATOM_PLAIN_RE.match(text, p)
            if match is not None:
                p = match.end()
                if p >= end:
                    break
            ch = text[p]
            if ch == "{":
                fig_open += 1
            elif ch == "}":
                fig_close += 1
                if fig_close <= fig_open:
                    p += 1
                    continue
            elif ch == "[":
                sq_open += 1
            elif ch == "]":
                sq_close += 1
                if sq_close <= sq_open:
                    p += 1
                    continue
            elif ch == "$":
                has_var = True
            elif ch == "\\":
                escaped = True
                p += 2 if p + 1 < end else 1
                continue
            if ch in _VALUE_END or (ch == "/" and p + 1 < end and text[p + 1] == "*"):
                break
            p += 1
        self.pos = min(p, end)
        stop = self.pos
        while stop > start and text[stop - 1] in _WS:
            stop -= 1
        if stop <= start:
            raise self.error("string value must not be empty", start)
        word = text[start:stop]
        if word == "null":
            return None
        if word == "nan":
            return math.nan
        if word == "inf":
            return math.inf
        if 2 <= len(word) <= 5:
            boolean = _BOOLEANS.get(word.lower())
            if boolean is not None:
                return boolean
        if escaped:
            word = _unescape_json(word)
        if has_var:
            word = self._expand(word)
        return word

    def _number(self) -> int | float | None:
        """Parse a number with an optional suffix; ``None`` if the atom is not one."""
        text = self.text
        end = self.end
        start = self.pos
        p = c = start
        negative = False
        if text[p] == "-":
            negative = True
            p += 1
            c = p
        is_hex = False
        allow_double = True
        need_double = False
        got_dot = got_exp = False
        valid = False
        while p < end:
            ch = text[p]
            if is_hex and ch in _HEX:
                p += 1
            elif "0" <= ch <= "9":
                valid = True
                p += 1
            elif not is_hex and ch in "xX":
                is_hex = True
                allow_double = False
                c = p + 1
                p += 1
            elif allow_double:
                if p == c:
                    return None
                if ch == ".":
                    if got_dot:
                        return None
                    got_dot = need_double = True
                    p += 1
                elif ch in "eE":
                    if got_exp:
                        return None
                    got_exp = need_double = True
                    p += 1
                    if p >= end:
                        return None
                    if not ("0" <= text[p] <= "9" or text[p] in "+-"):
                        return None
                    p += 1
                else:
                    break
            else:
                break
        if not valid:
            return None
        ivalue = 0
        dvalue = 0.0
        if need_double:
            match = _STRTOD_RE.match(text, c)
            if match is None:
                q = c
            else:
                dvalue = float(match.group(2))
                if match.group(1) == "-":
                    dvalue = -dvalue
                mantissa = re.split("[eE]", match.group(2))[0]
                if math.isinf(dvalue) or 0.0 < abs(dvalue) < _DBL_MIN or (
                        dvalue == 0.0 and re.search("[1-9]", mantissa) is not None):
                    raise self.error("numeric value out of range", start)
                q = match.end()
        else:
            match = (_STRTOX_RE if is_hex else _STRTOI_RE).match(text, c)
            if match is None:
                q = c
            else:
                ivalue = int(match.group(2), 16 if is_hex else 10)
                if match.group(1) == "-":
                    ivalue = -ivalue
                q = match.end()
        if not need_double and not _INT64_MIN <= ivalue <= _INT64_MAX:
            raise self.error("numeric value out of range", start)
        is_time = False

        def atom_end(i: int) -> bool:
            return i >= end or text[i] in _VALUE_END

        if q >= end or text[q] in _VALUE_END:
            p = q
        elif q != start:
            p = q
            ch = text[p]
            low = ch.lower()
            if low in "mgk":
                if end - p >= 2:
                    nxt = text[p + 1]
                    if nxt in "sS":
                        if not need_double:
                            need_double = True
                            dvalue = float(ivalue)
                        is_time = True
                        if low == "m":
                            dvalue /= 1000.0
                        else:
                            dvalue *= _NUM_MULT[low]
                        p += 2
                        if not atom_end(p):
                            return None
                    elif nxt in "bB":
                        if need_double:
                            need_double = False
                            ivalue = int(dvalue)
                        ivalue *= _BYTE_MULT[low]
                        p += 2
                        if not atom_end(p):
                            return None
                    elif atom_end(p + 1):
                        if need_double:
                            dvalue *= _NUM_MULT[low]
                        else:
                            ivalue *= _NUM_MULT[low]
                        p += 1
                    elif end - p >= 3 and text[p:p + 3].lower() == "min":
                        if not need_double:
                            need_double = True
                            dvalue = float(ivalue)
                        is_time = True
                        dvalue *= 60.0
                        p += 3
                        if not atom_end(p):
                            return None
                    else:
                        return None
                else:
                    if need_double:
                        dvalue *= _NUM_MULT[low]
                    else:
                        ivalue *= _NUM_MULT[low]
                    p += 1
            elif low in _TIME_MULT:
                if not atom_end(p + 1):
                    return None
                if not need_double:
                    need_double = True
                    dvalue = float(ivalue)
                is_time = True
                dvalue *= _TIME_MULT[low]
                p += 1
            elif ch in _WS:
                while p < end and text[p] in _WS:
                    p += 1
                if not atom_end(p):
                    return None
            else:
                return None
        else:
            return None
        self.pos = p
        if allow_double and (need_double or is_time):
            return -dvalue if negative else dvalue
        result = -ivalue if negative else ivalue
        if result > _INT64_MAX or result < _INT64_MIN:
            raise self.error("numeric value out of range", start)
        return result

    # -- macros -----------------------------------------------------------------------

    def _macro(self, frame: _Frame) -> None:
        text = self.text
        end = self.end
        macro_pos = self.pos
        self.pos += 1
        start = self.pos
        while self.pos < end and text[self.pos] not in _WS_UNSAFE and text[self.pos] != "(":
            self.pos += 1
        if self.pos >= end:
            raise self.error("unfinished macro", macro_pos)
        name = text[start:self.pos]
        if not name:
            raise self.error("invalid macro name", macro_pos)
        if name not in _MACROS:
            raise self.error(f"unknown macro: '{name}'", macro_pos)
        self._skip_ws_unsafe()
        if self._is_comment(self.pos):
            self._skip_comments()
        args: Any = None
        if self.pos < end and text[self.pos] == "(":
            args = self._macro_arguments()
            self._skip_ws_unsafe()
            if self._is_comment(self.pos):
                self._skip_comments()
        value = self._macro_value(macro_pos)
        value = self._expand(value)
        if name in ("include", "try_include"):
            self._include(frame, value, args, name == "try_include", macro_pos)
        elif name == "priority":
            self._priority(value, args, macro_pos)
        else:
            raise self.error(f"the '{name}' macro is not supported", macro_pos)

    def _macro_arguments(self) -> Any:
        text = self.text
        end = self.end
        open_pos = self.pos
        p = self.pos + 1
        depth = 1
        quoted = False
        while p < end:
            ch = text[p]
            if quoted:
                if ch == '"' and text[p - 1] != "\\":
                    quoted = False
            elif ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    break
            elif ch == '"':
                quoted = True
            p += 1
        if p >= end:
            raise self.error("unterminated macro arguments", open_pos)
        body = text[open_pos + 1:p]
        self.pos = p + 1
        context = _Context([], allow_macros=False)
        chunk = _Chunk(body, self.filename, context)
        try:
            return chunk.parse_document()
        except ConfigError as exc:
            raise self.error(f"macro arguments parsing error: {exc.message}", open_pos) from None

    def _macro_value(self, macro_pos: int) -> str:
        text = self.text
        end = self.end
        if self.pos >= end:
            raise self.error("macro value is missing", macro_pos)
        ch = text[self.pos]
        if ch == '"':
            self.pos += 1
            value, _escaped = self._lex_json_string()
        elif ch == "{":
            self.pos += 1
            self._skip_ws_unsafe()
            close = text.find("}", self.pos)
            if close < 0:
                raise self.error("unterminated macro body", macro_pos)
            value = text[self.pos:close]
            self.pos = close + 1
        else:
            p = self.pos
            while p < end and text[p] not in _VALUE_END:
                p += 1
            value = text[self.pos:p]
            self.pos = p
        while self.pos < end and (text[self.pos] in _WS_UNSAFE or text[self.pos] == ";"):
            self.pos += 1
        return value

    def _priority(self, value: str, args: Any, macro_pos: int) -> None:
        priority: int | None = None
        if isinstance(args, _Object):
            for key, item in args.items():
                if key and type(item) is int and "priority".startswith(key):
                    priority = item
        if value:
            if _STRTOL_RE.fullmatch(value) is None:
                raise self.error(f"Invalid priority value in macro: {value}", macro_pos)
            priority = int(value)
        if priority is None:
            raise self.error("Unable to parse priority macro", macro_pos)
        self.priority = priority & 0xF

    def _include(self, frame: _Frame, path: str, args: Any, default_try: bool, macro_pos: int) -> None:
        if not self.context.allow_macros:
            raise self.error("includes are not allowed here", macro_pos)
        must_exist = not default_try
        allow_glob = False
        use_prefix = False
        prefix: str | None = None
        target = "object"
        priority = 0
        strategy = _APPEND
        if isinstance(args, _Object):
            for key, item in args.items():
                if not key:
                    continue
                for val in item if isinstance(item, _Implicit) else [item]:
                    if isinstance(val, bool):
                        if "try".startswith(key):
                            must_exist = not val
                        elif "sign".startswith(key):
                            if val:
                                raise self.error("signed includes are not supported", macro_pos)
                        elif "glob".startswith(key):
                            allow_glob = val
                        elif "prefix".startswith(key):
                            use_prefix = val
                    elif isinstance(val, str):
                        if "key".startswith(key):
                            prefix = val
                        elif "target".startswith(key):
                            target = val
                        elif "duplicate".startswith(key):
                            if val in (_APPEND, _MERGE, _REWRITE, _ERROR):
                                strategy = val
                    elif isinstance(val, list):
                        if "path".startswith(key):
                            raise self.error("include search paths are not supported", macro_pos)
                    elif type(val) is int:
                        if "priority".startswith(key):
                            priority = val
        if allow_glob and ("*" in path or "?" in path):
            matches = sorted(_glob.glob(path))
            if not matches and must_exist:
                raise self.error(f"cannot match any files for pattern {path}", macro_pos)
            for match in matches:
                self._include_file(frame, match, must_exist, use_prefix, prefix, target,
                                   priority, strategy, macro_pos)
            return
        self._include_file(frame, path, must_exist, use_prefix, prefix, target,
                           priority, strategy, macro_pos)

    def _include_file(self, frame: _Frame, path: str, must_exist: bool, use_prefix: bool,
                      prefix: str | None, target: str, priority: int, strategy: str,
                      macro_pos: int) -> None:
        context = self.context
        try:
            real = os.path.realpath(path, strict=True)
        except (OSError, ValueError) as exc:
            if not must_exist and not isinstance(exc, PermissionError):
                return
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise self.error(f"cannot open file {path}: {reason}", macro_pos) from None
        if context.current_file is not None and real == context.current_file:
            raise self.error(f"trying to include the file {real} from itself", macro_pos)
        if context.depth + 1 > MAX_INCLUDE_DEPTH:
            raise self.error(f"maximum include nesting limit is reached: {context.depth + 1}", macro_pos)
        try:
            with open(real, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            if not must_exist:
                return
            raise self.error(f"cannot read file {real}: {exc.strerror or exc}", macro_pos) from None
        text = data.decode("utf-8", errors="surrogateescape")
        if use_prefix and prefix is None:
            prefix = os.path.basename(real)
            root, ext = os.path.splitext(prefix)
            if ext in (".conf", ".ucl"):
                prefix = root
        into = frame
        if prefix is not None:
            into = self._prefix_frame(frame, prefix, target, priority, macro_pos)
        saved_vars = context.variables
        saved_file = context.current_file
        base = [(n, v) for n, v in saved_vars if n not in ("FILENAME", "CURDIR")]
        context.variables = base + [("FILENAME", real), ("CURDIR", os.path.dirname(real))]
        context.current_file = real
        context.depth += 1
        try:
            chunk = _Chunk(text, real, context, priority, strategy)
            chunk.parse_included(into)
        finally:
            context.depth -= 1
            context.variables = saved_vars
            context.current_file = saved_file

    def _prefix_frame(self, frame: _Frame, prefix: str, target: str, priority: int,
                      macro_pos: int) -> _Frame:
        """The object an include with ``key=`` / ``prefix=true`` puts its keys in."""
        container = frame.target
        old = container.get(prefix)
        nest = _Object()
        if target.lower() == "array":
            if old is None:
                container[prefix] = [nest]
                container.priorities[prefix] = priority & 0xF
                container.locations[prefix] = self.location(macro_pos)
            elif isinstance(old, list):
                old.append(nest)
            else:
                container[prefix] = [old, nest]
            return _Frame(nest)
        if old is None:
            container[prefix] = nest
            container.priorities[prefix] = priority & 0xF
            container.locations[prefix] = self.location(macro_pos)
            return _Frame(nest)
        if isinstance(old, _Object):
            return _Frame(old)
        raise self.error(f"Conflicting type for key: {prefix}, asked {target}", macro_pos)


def _variable_list(variables: Mapping[str, str] | None) -> list[tuple[str, str]]:
    if not variables:
        return []
    return [(str(name), str(value)) for name, value in variables.items()]


def _parse(text: str, filename: str, variables: list[tuple[str, str]], current_file: str | None) -> UclObject:
    context = _Context(variables)
    context.current_file = current_file
    chunk = _Chunk(text, filename, context)
    try:
        top = chunk.parse_document()
    except RecursionError:
        raise ConfigError("objects are nested too deep", chunk.location()) from None
    return _finish(top)  # type: ignore[no-any-return]


def loads(text: str, *, filename: str = "<string>",
          variables: Mapping[str, str] | None = None) -> UclObject:
    """Parse UCL ``text`` into a tree.

    ``variables`` are expanded as ``$NAME`` / ``${NAME}`` (in the mapping's
    order, which matters when one name starts another).  ``FILENAME`` and
    ``CURDIR`` are not defined unless given.  Relative include paths are
    resolved against the working directory, as libucl does.

    :raises ConfigError: on any syntax error or failed include.
    """
    return _parse(text, filename, _variable_list(variables), None)


def load(path: str, *, variables: Mapping[str, str] | None = None) -> UclObject:
    """Read and parse the UCL file at ``path``.

    Besides ``variables``, ``$FILENAME`` is the file's real path and
    ``$CURDIR`` its directory (and both follow the included files).

    :raises ConfigError: if the file cannot be read or does not parse.
    """
    try:
        real = os.path.realpath(path, strict=True)
        with open(real, "rb") as handle:
            data = handle.read()
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot open file {path}: {reason}") from None
    text = data.decode("utf-8", errors="surrogateescape")
    names = [(n, v) for n, v in _variable_list(variables) if n not in ("FILENAME", "CURDIR")]
    names += [("FILENAME", real), ("CURDIR", os.path.dirname(real))]
    return _parse(text, str(path), names, real)
