"""Tests for rspamd_tx.config.schema: converters, named blocks and the checker."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from rspamd_tx.config.schema import (
    BindLinesType,
    BlockType,
    BoolType,
    Context,
    Diagnostic,
    FloatType,
    HeaderMapType,
    HostRef,
    IntListType,
    IntType,
    KeypairType,
    MapRef,
    NamedBlocksType,
    NetworkListType,
    OptionError,
    OptionType,
    PublicKeyType,
    RepeatedStringType,
    SizeType,
    StringListType,
    StringType,
    TimeType,
    UpstreamHostsType,
    check_section,
    option,
    parse_number,
    schema_from_dataclass,
)
from rspamd_tx.config.tree import Location, UclObject
from rspamd_tx.protocols.keypair import Keypair

PUBKEY = "kbhx7epiyugwfuiqqkdxmz3u45g4s6anc8bc8cpewkxfd9o5sxpy"
PRIVKEY = "oerrtjoniofqbcrd4agatqad9yenntcrrjjc1uyfjtksnswfq3my"
FIXED_PUBKEY = "as8zusgxdk9h5cd9dkogeno6y59mod59bw9iwk6qefbshj6c9z3y"


def ucl(values: dict[str, Any], filename: str = "test.conf", first_line: int = 1) -> UclObject:
    """A UclObject whose keys are on consecutive lines, column 3, of ``filename``."""
    obj = UclObject()
    for offset, (key, value) in enumerate(values.items()):
        obj[key] = value
        obj.locations[key] = Location(filename, first_line + offset, 3)
    return obj


def context() -> Context:
    return Context("test", "key", Location("test.conf", 1, 1), [])


def convert(type_: OptionType, value: Any) -> Any:
    return type_.convert(value, context())


class ParseNumberTests(unittest.TestCase):
    """UCL number syntax for quoted values."""

    def test_forms(self) -> None:
        """Integers, floats, hex and every UCL suffix give UCL's values."""
        table = [
            ("10", (10, False)),
            (" -3 ", (-3, False)),
            ("0x1f", (31, False)),
            ("1.5", (1.5, False)),
            ("2e3", (2000.0, False)),
            ("500ms", (0.5, True)),
            ("10s", (10.0, True)),
            ("5min", (300.0, True)),
            ("2h", (7200.0, True)),
            ("90d", (7776000.0, True)),
            ("1w", (604800.0, True)),
            ("1y", (31536000.0, True)),
            ("10k", (10000, False)),
            ("10m", (10000000, False)),
            ("1g", (1000000000, False)),
            ("10kb", (10240, False)),
            ("50MB", (52428800, False)),
            ("1gb", (1073741824, False)),
            ("1.5k", (1500.0, False)),
        ]
        for text, expected in table:
            self.assertEqual(parse_number(text), expected, text)

    def test_rejects(self) -> None:
        """Non-numbers, unknown suffixes and out-of-range values raise OptionError."""
        for text in [
            "",
            "abc",
            "10 seconds",
            "1..2",
            "10q",
            "s10",
            "0x",
            "nan",
            "inf",
            "1e999",
            "1e308kb",
            "9223372036854775808",
            "0x" + "f" * 20,
            "9" * 5000,
            "9223372036854775807g",
        ]:
            with self.assertRaises(OptionError, msg=text):
                parse_number(text)


class ScalarConverterTests(unittest.TestCase):
    """Time, size, bool, int, float and string conversions."""

    def assertConverts(self, type_: OptionType, table: list[tuple[Any, Any]]) -> None:
        for raw, expected in table:
            result = convert(type_, raw)
            self.assertEqual(result, expected, repr(raw))
            self.assertIs(type(result), type(expected), repr(raw))

    def assertRejects(self, type_: OptionType, values: list[Any]) -> None:
        for raw in values:
            with self.assertRaises(OptionError, msg=repr(raw)):
                convert(type_, raw)

    def test_time_accepts(self) -> None:
        """Times are float seconds from numbers and suffixed strings."""
        self.assertConverts(
            TimeType(),
            [
                (120, 120.0),
                (1.5, 1.5),
                ("10s", 10.0),
                ("500ms", 0.5),
                ("5min", 300.0),
                ("1h", 3600.0),
                ("90d", 7776000.0),
                ("1w", 604800.0),
                ("1y", 31536000.0),
                ("30", 30.0),
            ],
        )

    def test_time_rejects(self) -> None:
        """Booleans, objects, arrays, words, negatives and infinities are not times."""
        self.assertRejects(
            TimeType(),
            [
                True,
                None,
                UclObject(),
                ["1s"],
                "soon",
                -1,
                "-5s",
                float("inf"),
                float("nan"),
                10**400,
                "1e999s",
            ],
        )

    def test_time_without_minimum(self) -> None:
        """With no minimum a negative time is accepted."""
        self.assertEqual(convert(TimeType(minimum=None), -2), -2.0)

    def test_size_accepts(self) -> None:
        """Sizes are int bytes; k/m/g are decimal and kb/mb/gb binary."""
        self.assertConverts(
            SizeType(),
            [
                (1024, 1024),
                ("10k", 10000),
                ("10kb", 10240),
                ("50mb", 52428800),
                ("1gb", 1073741824),
                ("1m", 1000000),
                (2.0, 2),
            ],
        )

    def test_size_rejects(self) -> None:
        """Times, negatives, words and non-scalars are not sizes."""
        self.assertRejects(
            SizeType(), ["10s", -1, "big", False, None, [1], UclObject(), float("nan")]
        )

    def test_bool_accepts(self) -> None:
        """Booleans, 0/1 and yes/no/true/false/on/off words in any case."""
        self.assertConverts(
            BoolType(),
            [
                (True, True),
                (False, False),
                (1, True),
                (0, False),
                ("yes", True),
                ("No", False),
                ("TRUE", True),
                ("false", False),
                ("on", True),
                ("off", False),
            ],
        )

    def test_bool_rejects(self) -> None:
        """Other numbers, words and non-scalars are not booleans."""
        self.assertRejects(BoolType(), [2, -1, 1.0, "y", "enable", "", None, [True], UclObject()])

    def test_int_accepts(self) -> None:
        """Integers, integral floats and quoted integers (with UCL suffixes)."""
        self.assertConverts(
            IntType(), [(5, 5), (-1, -1), (3.0, 3), ("2", 2), ("0x10", 16), ("1k", 1000)]
        )

    def test_int_rejects(self) -> None:
        """Fractions, times, booleans, words and non-scalars are not integers."""
        self.assertRejects(
            IntType(), [1.5, "1.5", "10s", True, "two", None, [1], UclObject(), float("inf")]
        )

    def test_int_bounds(self) -> None:
        """Values outside the bounds are rejected, the bounds themselves accepted."""
        bounded = IntType(0, 32)
        self.assertEqual(convert(bounded, 0), 0)
        self.assertEqual(convert(bounded, 32), 32)
        self.assertRejects(bounded, [-1, 33])

    def test_float_accepts(self) -> None:
        """Numbers and quoted numbers become float."""
        self.assertConverts(FloatType(), [(0.1, 0.1), (1, 1.0), ("0.5", 0.5)])

    def test_float_rejects(self) -> None:
        """Out-of-bounds values, words, booleans and non-finite numbers are rejected."""
        self.assertRejects(
            FloatType(minimum=0.0, maximum=1.0), [-0.1, 1.1, "x", True, None, float("nan")]
        )

    def test_string_accepts(self) -> None:
        """Strings stay; numbers and booleans become their text."""
        self.assertConverts(
            StringType(), [("X-Spam", "X-Spam"), (5, "5"), (1.5, "1.5"), (True, "true")]
        )

    def test_string_rejects(self) -> None:
        """Objects, arrays and null are not strings."""
        self.assertRejects(StringType(), [None, UclObject(), [["a"]]])

    def test_string_choices(self) -> None:
        """A choice is matched case-insensitively and returned in lower case."""
        choice = StringType(choices=("sqlite", "redis"))
        self.assertEqual(convert(choice, "Redis"), "redis")
        self.assertRejects(choice, ["mysql"])
        self.assertEqual(choice.label, "sqlite|redis")


class ListConverterTests(unittest.TestCase):
    """String lists, repeated strings, int lists and header maps."""

    def test_string_list_splits(self) -> None:
        """A string is split on commas, semicolons and white space; arrays are flattened."""
        self.assertEqual(convert(StringListType(), "a, b;c d"), ("a", "b", "c", "d"))
        self.assertEqual(convert(StringListType(), ["a,b", "c", 5]), ("a", "b", "c", "5"))
        self.assertEqual(convert(StringListType(), ""), ())

    def test_string_list_rejects_objects(self) -> None:
        """An object inside a string list is an error."""
        with self.assertRaises(OptionError):
            convert(StringListType(), ["a", UclObject()])

    def test_repeated_strings_kept_whole(self) -> None:
        """Repeated strings are not split."""
        self.assertEqual(convert(RepeatedStringType(), "a, b"), ("a, b",))
        self.assertEqual(convert(RepeatedStringType(), ["x y", "z"]), ("x y", "z"))
        with self.assertRaises(OptionError):
            convert(RepeatedStringType(), [None])

    def test_int_list(self) -> None:
        """One int, a list of ints or a separated string give a tuple of ints."""
        self.assertEqual(convert(IntListType(), 3), (3,))
        self.assertEqual(convert(IntListType(), [1, "2"]), (1, 2))
        self.assertEqual(convert(IntListType(), "1, 2 3"), (1, 2, 3))
        with self.assertRaises(OptionError):
            convert(IntListType(), ["x"])

    def test_header_map(self) -> None:
        """An object of scalars becomes a read-only mapping of strings."""
        headers = convert(HeaderMapType(), ucl({"X-A": "1", "X-B": 2}))
        self.assertEqual(dict(headers), {"X-A": "1", "X-B": "2"})
        with self.assertRaises(OptionError):
            convert(HeaderMapType(), "X-A: 1")
        with self.assertRaises(OptionError):
            convert(HeaderMapType(), ucl({"X-A": ["1"]}))


class NetworkListTests(unittest.TestCase):
    """Address and network lists."""

    def test_string_with_separators(self) -> None:
        """Addresses become host networks and CIDR networks keep their length."""
        self.assertEqual(
            convert(NetworkListType(), "127.0.0.1, ::1, 10.0.0.0/8;fd00::/8"),
            (
                ipaddress.ip_network("127.0.0.1/32"),
                ipaddress.ip_network("::1/128"),
                ipaddress.ip_network("10.0.0.0/8"),
                ipaddress.ip_network("fd00::/8"),
            ),
        )

    def test_array_and_empty(self) -> None:
        """Arrays are flattened and an empty string is an empty list."""
        self.assertEqual(
            convert(NetworkListType(), ["192.168.0.0/16", ["[::1]"]]),
            (ipaddress.ip_network("192.168.0.0/16"), ipaddress.ip_network("::1/128")),
        )
        self.assertEqual(convert(NetworkListType(), ""), ())

    def test_host_bits_cleared(self) -> None:
        """A network written with host bits set is masked, as Rspamd's radix tree does."""
        self.assertEqual(
            convert(NetworkListType(), "10.1.2.3/8"), (ipaddress.ip_network("10.0.0.0/8"),)
        )

    def test_host_names_kept(self) -> None:
        """Host names are kept as HostRef to be resolved later."""
        self.assertEqual(
            convert(NetworkListType(), "localhost, mail.example.net"),
            (HostRef("localhost"), HostRef("mail.example.net")),
        )

    def test_maps_kept(self) -> None:
        """Paths and URLs are map references, kept whole."""
        self.assertEqual(
            convert(NetworkListType(), ["/etc/rspamd/local.d/ips.map", "https://example.net/list"]),
            (MapRef("/etc/rspamd/local.d/ips.map"), MapRef("https://example.net/list")),
        )

    def test_rejects(self) -> None:
        """Bad addresses, prefixes, names and non-strings are errors."""
        for bad in [
            "300.1.1.1",
            "10.0.0.0/33",
            "fe80::zz",
            "bad name!",
            "-host",
            12,
            None,
            [UclObject()],
        ]:
            with self.assertRaises(OptionError, msg=repr(bad)):
                convert(NetworkListType(), bad)


class KeyConverterTests(unittest.TestCase):
    """Public keys, keypairs and upstream lists."""

    def test_public_key(self) -> None:
        """A valid base32 public key is kept as the string."""
        self.assertEqual(convert(PublicKeyType(), PUBKEY), PUBKEY)

    def test_public_key_rejects(self) -> None:
        """Short, non-base32 and non-string keys are errors."""
        for bad in [PUBKEY[:-5], PUBKEY + "yyyy", PUBKEY.upper(), "", 5, None]:
            with self.assertRaises(OptionError, msg=repr(bad)):
                convert(PublicKeyType(), bad)

    def test_keypair(self) -> None:
        """A keypair object, wrapped or not, becomes a Keypair."""
        plain = convert(KeypairType(), ucl({"pubkey": FIXED_PUBKEY, "privkey": PRIVKEY}))
        wrapped = convert(
            KeypairType(), ucl({"keypair": ucl({"public": FIXED_PUBKEY, "secret": PRIVKEY})})
        )
        self.assertIsInstance(plain, Keypair)
        self.assertEqual(plain.public_key, wrapped.public_key)

    def test_keypair_rejects(self) -> None:
        """A string, a missing secret or a bad encoding is an error."""
        for bad in [
            PUBKEY,
            ucl({"pubkey": FIXED_PUBKEY}),
            ucl({"pubkey": FIXED_PUBKEY, "privkey": PRIVKEY, "encoding": "rot13"}),
            ucl({"pubkey": FIXED_PUBKEY, "privkey": PRIVKEY, "type": "sign"}),
        ]:
            with self.assertRaises(OptionError, msg=repr(bad)):
                convert(KeypairType(), bad)

    def test_repeatable_keypairs(self) -> None:
        """A repeatable keypair option gives a tuple, one per object."""
        pair = ucl({"pubkey": FIXED_PUBKEY, "privkey": PRIVKEY})
        self.assertEqual(len(convert(KeypairType(repeatable=True), [pair, pair])), 2)
        self.assertEqual(len(convert(KeypairType(repeatable=True), pair)), 1)

    def test_upstream_hosts_kept(self) -> None:
        """Upstream lines are kept as written, one string per line."""
        hosts = UpstreamHostsType(11333)
        line = "round-robin:host1:11333:10,host2:11333:10"
        self.assertEqual(convert(hosts, line), (line,))
        self.assertEqual(convert(hosts, ["a", "master-slave:b:1"]), ("a", "master-slave:b:1"))

    def test_upstream_hosts_rejects(self) -> None:
        """Malformed lines, empty lists and objects are errors."""
        for bad in ["host:notaport", "", [], UclObject(), "[::1"]:
            with self.assertRaises(OptionError, msg=repr(bad)):
                convert(UpstreamHostsType(11333), bad)


@dataclass(frozen=True)
class Inner:
    """A nested block for the tests."""

    name: str = option(StringType(), "", "block name")
    size: int = option(IntType(minimum=0), 1, "a size")
    enabled: bool = option(BoolType(), True, "switch")
    disabled: bool = option(BoolType(), False, "switch")


INNER = schema_from_dataclass(Inner, "inner", "Inner block")


@dataclass(frozen=True)
class Outer:
    """A section for the tests."""

    timeout: float = option(TimeType(), 5.0, "a timeout")
    compression: bool = option(BoolType(), False, "compress", aliases=("compress",))
    hosts: tuple[str, ...] = option(StringListType(), (), "hosts", required=True)
    block: Inner = option(BlockType(INNER), Inner(), "a block")
    items: tuple[Inner, ...] = option(
        NamedBlocksType(INNER, "item"), (), "named blocks", name="item"
    )


def _validate_outer(values: Any) -> list[str]:
    return ["timeout must be below 100"] if values["timeout"] >= 100 else []


OUTER = schema_from_dataclass(Outer, "outer", "Outer section", validate=_validate_outer)


class CheckSectionTests(unittest.TestCase):
    """The generic checker."""

    def check(self, values: dict[str, Any]) -> tuple[Outer, list[Diagnostic]]:
        result, diagnostics = check_section(
            OUTER, ucl(values), "outer", location=Location("o.conf", 9, 1)
        )
        return OUTER.build(result), diagnostics

    def test_defaults(self) -> None:
        """Options not given keep their defaults."""
        result, diagnostics = self.check({"hosts": "a"})
        self.assertEqual(result, Outer(hosts=("a",)))
        self.assertEqual(diagnostics, [])

    def test_unknown_option_warns_with_location(self) -> None:
        """An unknown key is a warning at its own location with a suggestion."""
        _, diagnostics = self.check({"hosts": "a", "timout": 3})
        self.assertEqual(
            diagnostics,
            [
                Diagnostic(
                    "warning",
                    "outer: unknown option 'timout'; did you mean 'timeout'?",
                    Location("test.conf", 2, 3),
                )
            ],
        )
        self.assertEqual(
            str(diagnostics[0]),
            "test.conf:2:3: warning: outer: unknown option 'timout'; did you mean 'timeout'?",
        )

    def test_unknown_option_without_close_match(self) -> None:
        """No suggestion is made when nothing is close."""
        _, diagnostics = self.check({"hosts": "a", "zzzzzz": 1})
        self.assertEqual(diagnostics[0].message, "outer: unknown option 'zzzzzz'")

    def test_bad_value_is_error_and_keeps_default(self) -> None:
        """An unconvertible value is an error at its location; the default stays."""
        result, diagnostics = self.check({"hosts": "a", "timeout": "soon"})
        self.assertEqual(result.timeout, 5.0)
        self.assertEqual(len(diagnostics), 1)
        self.assertEqual(diagnostics[0].severity, "error")
        self.assertEqual(diagnostics[0].location, Location("test.conf", 2, 3))
        self.assertTrue(str(diagnostics[0]).startswith("test.conf:2:3: outer: option 'timeout': "))

    def test_alias(self) -> None:
        """An alias sets the option."""
        result, diagnostics = self.check({"hosts": "a", "compress": True})
        self.assertTrue(result.compression)
        self.assertEqual(diagnostics, [])

    def test_alias_and_name_together_warn(self) -> None:
        """Both spellings of one option give a warning; the later one wins."""
        result, diagnostics = self.check({"hosts": "a", "compression": True, "compress": False})
        self.assertFalse(result.compression)
        self.assertEqual([d.severity for d in diagnostics], ["warning"])

    def test_repeated_scalar_uses_first(self) -> None:
        """A scalar option written twice uses the first value, with a warning."""
        result, diagnostics = self.check({"hosts": "a", "timeout": [1, 2]})
        self.assertEqual(result.timeout, 1.0)
        self.assertEqual([d.severity for d in diagnostics], ["warning"])

    def test_empty_array_for_scalar(self) -> None:
        """An empty array for a scalar option is an error."""
        _, diagnostics = self.check({"hosts": "a", "timeout": []})
        self.assertEqual([d.severity for d in diagnostics], ["error"])

    def test_required_missing(self) -> None:
        """A missing required option is an error at the section's location."""
        _, diagnostics = self.check({})
        self.assertEqual(
            diagnostics,
            [Diagnostic("error", "outer: option 'hosts' is required", Location("o.conf", 9, 1))],
        )

    def test_validate_hook(self) -> None:
        """Cross-option checks become errors."""
        _, diagnostics = self.check({"hosts": "a", "timeout": 200})
        self.assertEqual([d.message for d in diagnostics], ["outer: timeout must be below 100"])

    def test_not_an_object(self) -> None:
        """A section that is not an object is one error, and defaults are returned."""
        values, diagnostics = check_section(OUTER, "text", "outer")  # type: ignore[arg-type]
        self.assertEqual(values["timeout"], 5.0)
        self.assertEqual([d.severity for d in diagnostics], ["error"])

    def test_nested_block(self) -> None:
        """A block is checked with its own schema; its findings carry its locations."""
        inner = ucl({"size": 4, "colour": "red"}, "inner.conf", 20)
        result, diagnostics = self.check({"hosts": "a", "block": inner})
        self.assertEqual(result.block.size, 4)
        self.assertEqual(
            diagnostics,
            [
                Diagnostic(
                    "warning",
                    "outer: block: unknown option 'colour'",
                    Location("inner.conf", 21, 3),
                )
            ],
        )

    def test_nested_block_not_object(self) -> None:
        """A scalar where a block belongs is an error."""
        _, diagnostics = self.check({"hosts": "a", "block": 5})
        self.assertEqual([d.severity for d in diagnostics], ["error"])


class NamedBlocksTests(unittest.TestCase):
    """Named blocks in every shape Rspamd accepts."""

    def items(self, value: Any) -> tuple[tuple[Inner, ...], list[Diagnostic]]:
        values, diagnostics = check_section(OUTER, ucl({"hosts": "a", "item": value}), "outer")
        return OUTER.build(values).items, diagnostics

    def test_object_of_blocks(self) -> None:
        """``item { a { } b { } }`` gives both, named by key."""
        items, diagnostics = self.items(ucl({"a": ucl({"size": 2}), "b": ucl({})}))
        self.assertEqual(items, (Inner("a", 2), Inner("b", 1)))
        self.assertEqual(diagnostics, [])

    def test_list_of_blocks(self) -> None:
        """Sibling ``item "a" { } item "b" { }`` (an implicit array) gives both."""
        items, _ = self.items([ucl({"a": ucl({})}), ucl({"b": ucl({"size": 3})})])
        self.assertEqual(items, (Inner("a"), Inner("b", 3)))

    def test_anonymous_block_with_name(self) -> None:
        """``item { name = "x"; ... }`` is one block named x."""
        items, _ = self.items(ucl({"name": "x", "size": 7}))
        self.assertEqual(items, (Inner("x", 7),))

    def test_disabled_blocks_skipped(self) -> None:
        """``enabled = false`` or ``disabled = true`` skips a block."""
        items, _ = self.items(
            ucl(
                {
                    "a": ucl({"enabled": False}),
                    "b": ucl({"disabled": True}),
                    "c": ucl({}),
                    "d": ucl({"enabled": "no"}),
                    "e": ucl({"disabled": "off"}),
                }
            )
        )
        self.assertEqual([item.name for item in items], ["c", "e"])

    def test_unreadable_switch_is_checked(self) -> None:
        """A block whose enabled value is not a boolean is kept and the value reported."""
        items, diagnostics = self.items(ucl({"a": ucl({"enabled": "maybe"})}))
        self.assertEqual([item.name for item in items], ["a"])
        self.assertEqual([d.severity for d in diagnostics], ["error"])

    def test_scalar_block_disabled_with_warning(self) -> None:
        """A non-object in place of a block disables it, with a warning at its key."""
        items, diagnostics = self.items(ucl({"a": "off"}, "blocks.conf", 5))
        self.assertEqual(items, ())
        self.assertEqual(diagnostics[0].severity, "warning")
        self.assertEqual(diagnostics[0].location, Location("blocks.conf", 5, 3))

    def test_null_block_is_error(self) -> None:
        """A null block is an error, as in Rspamd."""
        _, diagnostics = self.items(ucl({"a": None}))
        self.assertEqual([d.severity for d in diagnostics], ["error"])

    def test_bad_shape_is_error(self) -> None:
        """A string where blocks belong is an error."""
        _, diagnostics = self.items("a")
        self.assertEqual([d.severity for d in diagnostics], ["error"])

    def test_errors_inside_block_name_it(self) -> None:
        """Findings inside a named block name the block."""
        _, diagnostics = self.items(ucl({"a": ucl({"size": -1})}))
        self.assertEqual(len(diagnostics), 1)
        self.assertIn('item "a"', diagnostics[0].message)


NUMBER_LIKE = st.from_regex(
    r"\A[+-]?(0x[0-9a-f]{1,30}|\d{1,400}(\.\d{0,5})?(e[+-]?\d{1,4})?) ?(ms|s|min|[hdwy]|[kmg]b?)?\Z"
)
HUGE = st.integers(min_value=-(10**400), max_value=10**400)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | HUGE
    | st.floats()
    | st.text(max_size=20)
    | NUMBER_LIKE,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4).map(UclObject),
    max_leaves=12,
)


class ConverterFuzzTests(unittest.TestCase):
    """Converters raise nothing but OptionError, whatever the input."""

    @settings(max_examples=300, deadline=None)
    @given(JSON_VALUES)
    def test_converters_only_raise_option_error(self, value: Any) -> None:
        """Every converter either converts or raises OptionError."""
        for type_ in [
            TimeType(),
            SizeType(),
            BoolType(),
            IntType(),
            FloatType(),
            StringType(),
            StringType(choices=("a",)),
            StringListType(),
            RepeatedStringType(),
            IntListType(),
            NetworkListType(),
            UpstreamHostsType(11333),
            PublicKeyType(),
            KeypairType(),
            KeypairType(repeatable=True),
            HeaderMapType(),
            BlockType(INNER),
            NamedBlocksType(INNER, "item"),
            BindLinesType(),
            BindLinesType(repeatable=False),
        ]:
            try:
                type_.convert(value, context())
            except OptionError:
                pass

    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=6).map(UclObject))
    def test_check_section_never_raises(self, section: UclObject) -> None:
        """check_section returns values and diagnostics for any section."""
        values, diagnostics = check_section(OUTER, section, "outer")
        self.assertEqual(set(values), {opt.name for opt in OUTER.options})
        for diagnostic in diagnostics:
            self.assertIn(diagnostic.severity, ("error", "warning"))


class BindLinesTests(unittest.TestCase):
    """bind_socket lines are checked for syntax and kept as written."""

    def test_accepts(self) -> None:
        """Every bind form is accepted and kept unchanged."""
        lines = [
            "127.0.0.1:11332",
            "[::1]:11332",
            "*:11335",
            "*v4:11335",
            "localhost:11333",
            "localhost",
            "/run/rspamd.sock mode=0666 owner=nobody",
            "systemd:0",
            "systemd:proxy",
        ]
        self.assertEqual(convert(BindLinesType(), lines), tuple(lines))
        self.assertEqual(convert(BindLinesType(), "*:11332"), ("*:11332",))

    def test_rejects(self) -> None:
        """Bad ports, modes, brackets, bare IPv6, empty lines and objects are errors."""
        for bad in [
            "host:99999",
            "/tmp/s mode=abc",
            "[::1",
            "::1:11332",
            "",
            "*x:1",
            UclObject(),
            [None],
        ]:
            with self.assertRaises(OptionError, msg=repr(bad)):
                convert(BindLinesType(), bad)

    def test_single_line(self) -> None:
        """The single-line variant gives one string and refuses arrays."""
        self.assertEqual(
            convert(BindLinesType(repeatable=False), "127.0.0.1:9108"), "127.0.0.1:9108"
        )
        with self.assertRaises(OptionError):
            convert(BindLinesType(repeatable=False), ["a:1", "b:2"])


LENIENT = schema_from_dataclass(Inner, "lenient", "Lenient block", strict=False)


class LenientSchemaTests(unittest.TestCase):
    """Schemas that describe only part of someone else's section."""

    def test_unknown_keys_ignored(self) -> None:
        """A non-strict schema ignores unknown keys and still checks known ones."""
        values, diagnostics = check_section(LENIENT, ucl({"other": 1, "size": -1}), "lenient")
        self.assertEqual(values["size"], 1)
        self.assertEqual([d.severity for d in diagnostics], ["error"])
