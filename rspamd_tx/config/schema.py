"""Typed configuration options: value converters, option schemas and the checker.

A *schema* lists the options of one configuration section (a worker, the
global ``options`` block, an ``upstream`` block, ...).  Each :class:`Option`
has a name, aliases, an :class:`OptionType` that converts the parsed UCL value
into a Python value, a default and a one-line doc.  :func:`check_section`
walks a parsed section against a schema and returns the converted values plus
:class:`Diagnostic` s: unknown options are warnings (with a "did you mean"
hint), values that cannot be converted are errors.  Checking never raises for
bad input: converters signal problems only with :class:`OptionError`, which the
checker turns into an error diagnostic at the option's location.

Converters accept what Rspamd accepts, plus the quoted string forms of numbers,
times, sizes and booleans (``timeout = "10s"``, ``count = "2"``,
``milter = "yes"``), which Rspamd's UCL parser would leave as strings.

Schemas are usually derived from frozen dataclasses whose fields are declared
with :func:`option` (see :func:`schema_from_dataclass`), so one declaration
gives the typed result, the checker and ``confighelp``.
"""

from __future__ import annotations

import dataclasses
import difflib
import grp
import ipaddress
import math
import pwd
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from rspamd_tx.config.bind import parse_bind_line
from rspamd_tx.config.tree import ConfigError, Location, UclObject
from rspamd_tx.protocols.keypair import Keypair, KeypairError, PublicKey
from rspamd_tx.upstreams.hosts import UpstreamSyntaxError, parse_upstreams

__all__ = [
    "BindLinesType",
    "BlockType",
    "BoolType",
    "Context",
    "Diagnostic",
    "FloatType",
    "HeaderMapType",
    "HostRef",
    "IntListType",
    "IntType",
    "KeypairType",
    "MapRef",
    "NamedBlocksType",
    "Network",
    "NetworkEntry",
    "NetworkListType",
    "Option",
    "OptionError",
    "OptionType",
    "PublicKeyType",
    "RepeatedStringType",
    "Schema",
    "SizeType",
    "StringListType",
    "StringType",
    "TimeType",
    "UpstreamHostsType",
    "check_section",
    "option",
    "parse_network_entry",
    "parse_number",
    "schema_from_dataclass",
]

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Diagnostic:
    """One finding of the checker.

    ``str(diagnostic)`` is ``file:line:col: message`` for errors and
    ``file:line:col: warning: message`` for warnings (without the location
    prefix when the location is unknown).
    """

    severity: Severity
    message: str
    location: Location | None

    def __str__(self) -> str:
        text = self.message if self.severity == "error" else f"warning: {self.message}"
        if self.location is None:
            return text
        return f"{self.location}: {text}"


class OptionError(ValueError):
    """A value that an :class:`OptionType` cannot convert; the message says why."""


@dataclass
class Context:
    """What a converter knows about the value it converts.

    ``section`` names the enclosing section and ``key`` the option (for
    messages of nested blocks), ``location`` is where the option was written
    and ``diagnostics`` collects findings of nested blocks.
    """

    section: str
    key: str
    location: Location | None
    diagnostics: list[Diagnostic]

    def warn(self, message: str, location: Location | None = None) -> None:
        """Record a warning, at ``location`` or at the option's location."""
        self.diagnostics.append(Diagnostic("warning", message, location or self.location))


def _describe(value: Any) -> str:
    """Short text naming a bad value for error messages."""
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return text


# ---------------------------------------------------------------------------
# Numbers as UCL reads them

_NUMBER_RE = re.compile(
    r"""^\s*(?P<sign>[+-]?)
        (?:(?P<hex>0[xX][0-9a-fA-F]+)
          |(?P<dec>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?))
        \s*(?P<suffix>[A-Za-z]*)\s*$""",
    re.VERBOSE,
)

_TIME_SUFFIXES: dict[str, float] = {
    "ms": 0.001,
    "s": 1.0,
    "min": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 7 * 86400.0,
    "y": 365 * 86400.0,
}
_DECIMAL_SUFFIXES: dict[str, int] = {"k": 1000, "m": 1000**2, "g": 1000**3}
_BINARY_SUFFIXES: dict[str, int] = {"kb": 1024, "mb": 1024**2, "gb": 1024**3}
_MAX_NUMBER_TEXT = 400
_INT64 = 2**63


def parse_number(text: str) -> tuple[int | float, bool]:
    """Read a number written the way UCL reads unquoted numbers.

    Returns ``(value, is_time)``.  Accepted forms: decimal, ``0x`` hex,
    floats with ``.``/exponent, and the UCL suffixes (case-insensitive):
    ``ms s min h d w y`` (times, giving a float in seconds), ``k m g``
    (multiples of 1000) and ``kb mb gb`` (multiples of 1024).  Note that, as
    in UCL, ``10m`` is ten million: minutes are ``min``.

    Raises :class:`OptionError` if ``text`` is not such a number or its value
    is out of range (integers must fit in 64 bits, floats be finite), as
    UCL's ``strtoimax``/``strtod`` would report.
    """
    match = _NUMBER_RE.match(text) if len(text) <= _MAX_NUMBER_TEXT else None
    if match is None:
        raise OptionError(f"{_describe(text)} is not a number")
    suffix = match.group("suffix").lower()
    negative = match.group("sign") == "-"
    value: int | float
    if match.group("hex") is not None:
        value = int(match.group("hex"), 16)
    else:
        dec = match.group("dec")
        value = float(dec) if any(c in dec for c in ".eE") else int(dec)
    if negative:
        value = -value
    _in_range(value, text)
    is_time = False
    if not suffix:
        result = value
    elif suffix in _TIME_SUFFIXES:
        result, is_time = float(value) * _TIME_SUFFIXES[suffix], True
    elif suffix in _BINARY_SUFFIXES:
        result = int(_in_range(value * _BINARY_SUFFIXES[suffix], text))
    elif suffix in _DECIMAL_SUFFIXES:
        result = value * _DECIMAL_SUFFIXES[suffix]
    else:
        raise OptionError(f"{_describe(text)} has an unknown suffix {match.group('suffix')!r}")
    return _in_range(result, text), is_time


def _in_range(value: int | float, original: Any) -> int | float:
    """``value`` if it is a 64-bit integer or a finite float; else :class:`OptionError`."""
    if isinstance(value, int):
        if not -_INT64 <= value < _INT64:
            raise OptionError(f"{_describe(original)} is out of range")
    elif not math.isfinite(value):
        raise OptionError(f"{_describe(original)} is not a finite number")
    return value


# ---------------------------------------------------------------------------
# Option types


class OptionType(ABC):
    """Converts one parsed UCL value into a typed Python value.

    ``label`` names the type in ``confighelp``.  ``repeatable`` types take
    arrays (and keys written several times) as a whole; for the others an
    array of scalars means the key was repeated, and the first value is used
    as Rspamd does, with a warning.
    """

    label: str = "value"
    repeatable: bool = False

    @abstractmethod
    def convert(self, value: Any, ctx: Context) -> Any:
        """Convert ``value``; raise :class:`OptionError` if it is unusable."""

    def format_default(self, value: Any) -> str:
        """Text of a default value for ``confighelp`` (empty: the default is not shown)."""
        if value is None:
            return "unset"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, tuple):
            return "[" + ", ".join(self.format_default(v) for v in value) + "]" if value else "[]"
        if isinstance(value, str):
            return f'"{value}"'
        return str(value)

    def children(self) -> Schema | None:
        """The schema of a nested block, for ``confighelp``."""
        return None


def _number(value: Any, expected: str) -> tuple[int | float, bool]:
    """A number (and whether it was written as a time) from a UCL scalar.

    Raises :class:`OptionError` with ``expected, got <value>`` for anything
    that is not an in-range number or a string :func:`parse_number` reads.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise OptionError(f"{expected}, got {_describe(value)}")
    try:
        if isinstance(value, str):
            return parse_number(value)
        return _in_range(value, value), False
    except OptionError:
        raise OptionError(f"{expected}, got {_describe(value)}") from None


class TimeType(OptionType):
    """A duration in seconds (float).

    A number, or a string with a UCL time suffix: ``"500ms"``, ``"10s"``,
    ``"5min"``, ``"1h"``, ``"90d"``.
    """

    label = "time"
    _EXPECTED = "expected a time (seconds, or a string like '10s', '500ms', '5min', '1h', '2d')"

    def __init__(self, minimum: float | None = 0.0) -> None:
        self.minimum = minimum

    def convert(self, value: Any, ctx: Context) -> float:
        seconds = float(_number(value, self._EXPECTED)[0])
        if self.minimum is not None and seconds < self.minimum:
            raise OptionError(
                f"time must not be less than {self.minimum:g} s, got {_describe(value)}"
            )
        return seconds

    def format_default(self, value: Any) -> str:
        return "unset" if value is None else f"{value:g}s"


class SizeType(OptionType):
    """A size in bytes (int).

    A number, or a string with a UCL suffix: ``"10k"`` (10000), ``"10kb"``
    (10240), ``"50mb"``, ``"1gb"``.
    """

    label = "size"
    _EXPECTED = "expected a size (bytes, or a string like '64k', '10kb', '50mb')"

    def convert(self, value: Any, ctx: Context) -> int:
        number, is_time = _number(value, self._EXPECTED)
        if is_time:
            raise OptionError(f"expected a size, got the time {_describe(value)}")
        if number < 0:
            raise OptionError(f"size must not be negative, got {_describe(value)}")
        return int(number)


class BoolType(OptionType):
    """A boolean: ``true/false``, ``yes/no``, ``on/off`` (also quoted) or ``1/0``."""

    label = "bool"
    _WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}

    def convert(self, value: Any, ctx: Context) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in self._WORDS:
            return self._WORDS[value.strip().lower()]
        raise OptionError(
            f"expected a boolean (yes/no, true/false, on/off), got {_describe(value)}"
        )


class IntType(OptionType):
    """An integer, optionally bounded; quoted integers (``"2"``, ``"1k"``) are read too."""

    label = "int"

    def __init__(self, minimum: int | None = None, maximum: int | None = None) -> None:
        self.minimum = minimum
        self.maximum = maximum

    def convert(self, value: Any, ctx: Context) -> int:
        number, is_time = _number(value, "expected an integer")
        if is_time:
            raise OptionError(f"expected an integer, got the time {_describe(value)}")
        if isinstance(number, float):
            if not number.is_integer():
                raise OptionError(f"expected an integer, got {_describe(value)}")
            number = int(number)
        if self.minimum is not None and number < self.minimum:
            raise OptionError(f"must be at least {self.minimum}, got {number}")
        if self.maximum is not None and number > self.maximum:
            raise OptionError(f"must be at most {self.maximum}, got {number}")
        return number


class FloatType(OptionType):
    """A real number, optionally bounded."""

    label = "float"

    def __init__(self, minimum: float | None = None, maximum: float | None = None) -> None:
        self.minimum = minimum
        self.maximum = maximum

    def convert(self, value: Any, ctx: Context) -> float:
        number = float(_number(value, "expected a number")[0])
        if self.minimum is not None and number < self.minimum:
            raise OptionError(f"must be at least {self.minimum:g}, got {number:g}")
        if self.maximum is not None and number > self.maximum:
            raise OptionError(f"must be at most {self.maximum:g}, got {number:g}")
        return number


class StringType(OptionType):
    """A string; numbers and booleans are turned into their text as Rspamd does.

    With ``choices`` the value must be one of them (compared
    case-insensitively) and the lower-case choice is returned.
    """

    label = "string"

    def __init__(self, choices: Sequence[str] | None = None) -> None:
        self.choices = tuple(choices) if choices is not None else None
        if self.choices is not None:
            self.label = "|".join(self.choices)

    def convert(self, value: Any, ctx: Context) -> str:
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (str, int, float)):
            text = str(value)
        else:
            raise OptionError(f"expected a string, got {_describe(value)}")
        if self.choices is not None:
            lowered = text.strip().lower()
            if lowered not in self.choices:
                raise OptionError(
                    f"expected one of {', '.join(self.choices)}; got {_describe(value)}"
                )
            return lowered
        return text


def _scalar_text(value: Any, what: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise OptionError(f"expected {what}, got {_describe(value)}")


def _flatten(value: Any) -> Iterator[Any]:
    if isinstance(value, list):
        for item in value:
            yield from _flatten(item)
    else:
        yield value


class StringListType(OptionType):
    """A list of strings: an array, or one string split on ``,`` ``;`` and white space."""

    label = "list of strings"
    repeatable = True

    def __init__(self, separators: str = ",; \t\r\n") -> None:
        self._split = re.compile("[" + re.escape(separators) + "]+")

    def convert(self, value: Any, ctx: Context) -> tuple[str, ...]:
        items: list[str] = []
        for element in _flatten(value):
            text = _scalar_text(element, "a string or an array of strings")
            items.extend(part for part in self._split.split(text) if part)
        return tuple(items)


class RepeatedStringType(OptionType):
    """One or several strings, kept whole (e.g. Lua chunks of repeated ``script`` keys)."""

    label = "strings"
    repeatable = True

    def convert(self, value: Any, ctx: Context) -> tuple[str, ...]:
        return tuple(_scalar_text(element, "a string") for element in _flatten(value))


class IntListType(OptionType):
    """One integer or a list of integers (also a comma-separated string)."""

    label = "list of ints"
    repeatable = True

    def convert(self, value: Any, ctx: Context) -> tuple[int, ...]:
        as_int = IntType()
        out: list[int] = []
        for element in _flatten(value):
            if isinstance(element, str):
                out.extend(
                    as_int.convert(part, ctx) for part in re.split(r"[,;\s]+", element) if part
                )
            else:
                out.append(as_int.convert(element, ctx))
        return tuple(out)


@dataclass(frozen=True)
class HostRef:
    """A host name in an address list, to be resolved later (Rspamd resolves it at load)."""

    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class MapRef:
    """A reference to an Rspamd map (file path or URL) inside an address list."""

    url: str

    def __str__(self) -> str:
        return self.url


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
NetworkEntry = Network | HostRef | MapRef

_MAP_PREFIXES = ("/", "./", "../", "file://", "http://", "https://", "fd:", "sign+", "key=")
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}\.?$)"
    r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}))*\.?$"
)


def parse_network_entry(text: str) -> NetworkEntry:
    """Read one element of an address list.

    An IP address becomes a host network (``/32`` or ``/128``), ``addr/len``
    a network (host bits are cleared, as Rspamd's radix tree does), a path or
    URL a :class:`MapRef` and a host name a :class:`HostRef`.  Raises
    :class:`OptionError` for anything else.
    """
    if text.startswith(_MAP_PREFIXES):
        return MapRef(text)
    candidate = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return ipaddress.ip_network(candidate, strict=False)
    except ValueError:
        pass
    if "/" in candidate or ":" in candidate:
        raise OptionError(f"{text!r} is not a valid address or network")
    if _HOSTNAME_RE.match(candidate) is None or all(
        label.isdigit() for label in candidate.rstrip(".").split(".")
    ):
        raise OptionError(f"{text!r} is not a valid address, network or host name")
    return HostRef(candidate)


class NetworkListType(OptionType):
    """Addresses and networks.

    ``"127.0.0.1, ::1, 10.0.0.0/8"`` strings (split on ``,`` ``;`` and white
    space), arrays, host names (:class:`HostRef`) and map paths or URLs
    (:class:`MapRef`).
    """

    label = "address list"
    repeatable = True
    _SPLIT = re.compile(r"[,; \t\r\n]+")

    def convert(self, value: Any, ctx: Context) -> tuple[NetworkEntry, ...]:
        out: list[NetworkEntry] = []
        for element in _flatten(value):
            if not isinstance(element, str):
                raise OptionError(f"expected addresses or networks, got {_describe(element)}")
            if element.strip().startswith(_MAP_PREFIXES):
                out.append(MapRef(element.strip()))
                continue
            out.extend(parse_network_entry(part) for part in self._SPLIT.split(element) if part)
        return tuple(out)


class UpstreamHostsType(OptionType):
    """Upstream lines (``"round-robin:host1:11333:10,host2"``), one string or an array of lines.

    The lines are returned unchanged as a tuple of strings after a syntax
    check with :func:`rspamd_tx.upstreams.hosts.parse_upstreams`.
    """

    label = "upstream list"
    repeatable = True

    def __init__(self, default_port: int) -> None:
        self.default_port = default_port

    def convert(self, value: Any, ctx: Context) -> tuple[str, ...]:
        lines = tuple(
            _scalar_text(element, "an upstream list string") for element in _flatten(value)
        )
        try:
            parse_upstreams(lines, self.default_port)
        except UpstreamSyntaxError as exc:
            raise OptionError(str(exc)) from None
        return lines


def _no_resolve(host: str) -> list[str]:
    return ["0.0.0.0"]


def _any_user(name: str) -> pwd.struct_passwd:
    return pwd.struct_passwd((name, "", 0, 0, "", "", ""))


def _any_group(name: str) -> grp.struct_group:
    return grp.struct_group((name, "", 0, []))


class BindLinesType(OptionType):
    """Listen specifications in ``bind_socket`` syntax, kept as written.

    Repeatable (``bind_socket``): one string or several, giving a tuple;
    otherwise one string.  Each line's syntax is checked with
    :func:`rspamd_tx.config.bind.parse_bind_line`; host names, users and
    groups are not looked up here but when the listener binds.
    """

    def __init__(self, repeatable: bool = True) -> None:
        self.repeatable = repeatable
        self.label = "bind lines" if repeatable else "bind line"

    def convert(self, value: Any, ctx: Context) -> tuple[str, ...] | str:
        if not self.repeatable and isinstance(value, list):
            raise OptionError(f"expected one bind line, got {_describe(value)}")
        lines = tuple(_scalar_text(element, "a bind line") for element in _flatten(value))
        for line in lines:
            try:
                parse_bind_line(line, resolve=_no_resolve, users=_any_user, groups=_any_group)
            except ConfigError as exc:
                raise OptionError(exc.message) from None
        return lines if self.repeatable else lines[0]


class PublicKeyType(OptionType):
    """A curve25519 public key in Rspamd base32 (52 characters), kept as the string."""

    label = "public key"

    def convert(self, value: Any, ctx: Context) -> str:
        if not isinstance(value, str):
            raise OptionError(f"expected a base32 public key, got {_describe(value)}")
        try:
            PublicKey.parse(value)
        except KeypairError as exc:
            raise OptionError(exc.message) from None
        return value


class KeypairType(OptionType):
    """A keypair object as ``rspamadm keypair`` prints it (``pubkey``, ``privkey``...).

    With ``repeatable`` several keypairs (an array or a repeated key) give a
    tuple of :class:`~rspamd_tx.protocols.keypair.Keypair`.
    """

    label = "keypair"

    def __init__(self, repeatable: bool = False) -> None:
        self.repeatable = repeatable
        if repeatable:
            self.label = "keypairs"

    def _one(self, value: Any) -> Keypair:
        if not isinstance(value, Mapping):
            raise OptionError(f"expected a keypair object, got {_describe(value)}")
        try:
            return Keypair.from_ucl(value)
        except KeypairError as exc:
            raise OptionError(exc.message) from None

    def convert(self, value: Any, ctx: Context) -> Keypair | tuple[Keypair, ...]:
        if not self.repeatable:
            return self._one(value)
        return tuple(self._one(element) for element in _flatten(value))


class HeaderMapType(OptionType):
    """An object of header names to string values."""

    label = "object of strings"

    def convert(self, value: Any, ctx: Context) -> Mapping[str, str]:
        if not isinstance(value, Mapping):
            raise OptionError(f"expected an object of header values, got {_describe(value)}")
        return MappingProxyType(
            {
                str(name): _scalar_text(item, f"a string for {name!r}")
                for name, item in value.items()
            }
        )


# ---------------------------------------------------------------------------
# Options and schemas


@dataclass(frozen=True)
class Option:
    """One configuration option: its name, aliases, type, default and doc.

    ``attr`` is the attribute of the typed result that receives the value
    (the option name when empty).
    """

    name: str
    type: OptionType
    default: Any
    doc: str
    aliases: tuple[str, ...] = ()
    required: bool = False
    attr: str = ""

    @property
    def attribute(self) -> str:
        """The attribute name of the typed result."""
        return self.attr or self.name


@dataclass(frozen=True)
class Schema:
    """The options of one section.

    ``factory`` (if any) builds the typed result from the converted values;
    ``validate`` (if any) runs cross-option checks, returning error messages.
    A schema that is not ``strict`` describes only some keys of a section
    owned by someone else (a module's): other keys are ignored silently.
    """

    name: str
    doc: str
    options: tuple[Option, ...]
    factory: Callable[..., Any] | None = None
    validate: Callable[[Mapping[str, Any]], list[str]] | None = None
    strict: bool = True
    _index: Mapping[str, Option] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[str, Option] = {}
        for opt in self.options:
            for name in (opt.name, *opt.aliases):
                if name in index:
                    raise ValueError(f"schema {self.name}: option name {name!r} declared twice")
                index[name] = opt
        object.__setattr__(self, "_index", MappingProxyType(index))

    def lookup(self, key: str) -> Option | None:
        """The option called ``key`` (by name or alias), or ``None``."""
        return self._index.get(key)

    def names(self) -> list[str]:
        """Every accepted key: names and aliases."""
        return list(self._index)

    def defaults(self) -> dict[str, Any]:
        """Default value of every option, by name."""
        return {opt.name: opt.default for opt in self.options}

    def build(self, values: Mapping[str, Any]) -> Any:
        """The typed result for ``values`` (the values themselves without a factory)."""
        if self.factory is None:
            return values
        return self.factory(
            **{self._index[name].attribute: value for name, value in values.items()}
        )

    def merged(self, other: Schema, name: str, doc: str) -> Schema:
        """A schema with the options of both (used for common + worker options)."""
        return Schema(name, doc, self.options + other.options)


_OPTION_KEY = "rspamd_tx.option"


def option(
    type_: OptionType,
    default: Any,
    doc: str,
    *,
    aliases: Sequence[str] = (),
    required: bool = False,
    name: str = "",
) -> Any:
    """Declare a dataclass field as a configuration option (see :func:`schema_from_dataclass`).

    The option's configuration key is ``name``, or the field name when empty.
    """
    return field(
        default=default,
        metadata={_OPTION_KEY: (type_, doc, tuple(aliases), required, name)},
    )


def schema_from_dataclass(
    cls: type,
    name: str,
    doc: str,
    validate: Callable[[Mapping[str, Any]], list[str]] | None = None,
    strict: bool = True,
) -> Schema:
    """Build the :class:`Schema` of a dataclass whose fields use :func:`option`.

    Fields without option metadata are not options; they must have defaults.
    """
    options: list[Option] = []
    for fld in dataclasses.fields(cls):
        meta = fld.metadata.get(_OPTION_KEY)
        if meta is None:
            continue
        type_, opt_doc, aliases, required, key = meta
        options.append(
            Option(key or fld.name, type_, fld.default, opt_doc, aliases, required, fld.name)
        )
    return Schema(name, doc, tuple(options), factory=cls, validate=validate, strict=strict)


class BlockType(OptionType):
    """A nested object checked against its own schema; the value is the schema's result."""

    label = "block"

    def __init__(self, schema: Schema) -> None:
        self.schema = schema

    def convert(self, value: Any, ctx: Context) -> Any:
        if not isinstance(value, Mapping):
            raise OptionError(f"expected a block {{ ... }}, got {_describe(value)}")
        values, diagnostics = check_section(
            self.schema, _as_ucl(value), f"{ctx.section}: {ctx.key}", location=ctx.location
        )
        ctx.diagnostics.extend(diagnostics)
        return self.schema.build(values)

    def format_default(self, value: Any) -> str:
        return ""

    def children(self) -> Schema | None:
        return self.schema


class NamedBlocksType(OptionType):
    """Named blocks such as ``upstream "scan" { ... }`` or ``mirror { a { ... } b { ... } }``.

    Accepted shapes (as Rspamd's proxy accepts them): one object whose keys
    name the blocks; a single anonymous block carrying a ``name`` key; or an
    array of those (sibling blocks written one after another, all of which
    are used).  The schema must have ``name`` and may have ``enabled`` and
    ``disabled`` options: a block with ``enabled = false`` or
    ``disabled = true`` is skipped.  A non-object value in place of a block
    disables it (as in Rspamd) with a warning.  The result is a tuple of the
    schema's results.
    """

    label = "named blocks"
    repeatable = True

    def __init__(self, schema: Schema, kind: str) -> None:
        self.schema = schema
        self.kind = kind

    def _blocks(self, value: Any, ctx: Context) -> Iterator[tuple[str, Any, Location | None]]:
        for element in _flatten(value):
            if not isinstance(element, Mapping):
                raise OptionError(f"expected {self.kind} blocks, got {_describe(element)}")
            if "name" in element:
                yield str(element["name"]), element, ctx.location
                continue
            locations = getattr(element, "locations", {})
            for key, body in element.items():
                yield key, body, locations.get(key, ctx.location)

    def convert(self, value: Any, ctx: Context) -> tuple[Any, ...]:
        out: list[Any] = []
        for name, body, location in self._blocks(value, ctx):
            where = f'{self.kind} "{name}"'
            if body is None:
                raise OptionError(f"{where} must be a block {{ ... }}, got null")
            if not isinstance(body, Mapping):
                ctx.warn(
                    f"{ctx.section}: {where} is set to {_describe(body)}, not a block;"
                    " it is disabled",
                    location,
                )
                continue
            if _switched_off(body):
                continue
            section = _as_ucl(body)
            values, diagnostics = check_section(
                self.schema, section, f"{ctx.section}: {where}", location=location
            )
            ctx.diagnostics.extend(diagnostics)
            if "name" not in section:
                values = {**values, "name": name}
            out.append(self.schema.build(values))
        return tuple(out)

    def format_default(self, value: Any) -> str:
        return "none"

    def children(self) -> Schema | None:
        return self.schema


def _switched_off(body: Mapping[str, Any]) -> bool:
    """Whether a block says ``enabled = false`` or ``disabled = true`` (unreadable values: no)."""
    for key, off_when in (("enabled", False), ("disabled", True)):
        if key in body:
            try:
                if BoolType().convert(body[key], Context("", key, None, [])) is off_when:
                    return True
            except OptionError:
                continue
    return False


def _as_ucl(value: Mapping[str, Any]) -> UclObject:
    if isinstance(value, UclObject):
        return value
    return UclObject(value)


# ---------------------------------------------------------------------------
# The checker


def _did_you_mean(key: str, schema: Schema) -> str:
    matches = difflib.get_close_matches(key, schema.names(), n=1, cutoff=0.6)
    return f"; did you mean '{matches[0]}'?" if matches else ""


def check_section(
    schema: Schema,
    section: UclObject,
    where: str,
    *,
    location: Location | None = None,
) -> tuple[Mapping[str, Any], list[Diagnostic]]:
    """Check ``section`` against ``schema``.

    Args:
        schema: the options allowed in the section.
        section: the parsed section; key locations come from ``section.locations``.
        where: how messages name the section, e.g. ``worker "rspamd_proxy"``.
        location: where the section itself starts, used for findings that
            concern no single key (a missing required option).

    Returns:
        ``(values, diagnostics)``: the converted value of every option of the
        schema by option name (defaults for options not given or not
        convertible) and the findings in key order.  Unknown keys are
        warnings (ignored if the schema is not ``strict``); unconvertible
        values, missing required options and ``schema.validate`` failures
        are errors (``validate`` runs only when the section had no other
        error).  Never raises for bad input.
    """
    diagnostics: list[Diagnostic] = []
    values: dict[str, Any] = schema.defaults()
    if not isinstance(section, Mapping):
        diagnostics.append(
            Diagnostic(
                "error", f"{where}: expected a block {{ ... }}, got {_describe(section)}", location
            )
        )
        return MappingProxyType(values), diagnostics
    locations: Mapping[str, Location] = getattr(section, "locations", {})
    seen: dict[str, str] = {}
    for key, raw in section.items():
        key_location = locations.get(key, location)
        opt = schema.lookup(key)
        if opt is None:
            if not schema.strict:
                continue
            diagnostics.append(
                Diagnostic(
                    "warning",
                    f"{where}: unknown option '{key}'{_did_you_mean(key, schema)}",
                    key_location,
                )
            )
            continue
        if opt.name in seen:
            diagnostics.append(
                Diagnostic(
                    "warning",
                    f"{where}: '{key}' and '{seen[opt.name]}' are the same option; "
                    f"using '{key}'",
                    key_location,
                )
            )
        seen[opt.name] = key
        value = raw
        if isinstance(raw, list) and not opt.type.repeatable:
            if not raw:
                diagnostics.append(
                    Diagnostic(
                        "error", f"{where}: option '{key}': got an empty array", key_location
                    )
                )
                continue
            if len(raw) > 1:
                diagnostics.append(
                    Diagnostic(
                        "warning",
                        f"{where}: option '{key}' is given {len(raw)} times; using the first value",
                        key_location,
                    )
                )
            value = raw[0]
        ctx = Context(where, key, key_location, diagnostics)
        try:
            values[opt.name] = opt.type.convert(value, ctx)
        except OptionError as exc:
            diagnostics.append(Diagnostic("error", f"{where}: option '{key}': {exc}", key_location))
    for opt in schema.options:
        if opt.required and opt.name not in seen:
            diagnostics.append(
                Diagnostic("error", f"{where}: option '{opt.name}' is required", location)
            )
    clean = not any(d.severity == "error" for d in diagnostics)
    if schema.validate is not None and clean:
        for message in schema.validate(values):
            diagnostics.append(Diagnostic("error", f"{where}: {message}", location))
    return MappingProxyType(values), diagnostics
