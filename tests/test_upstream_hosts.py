"""Tests for rspamd_tx.upstreams.hosts: every upstream line form and error."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from rspamd_tx.upstreams.hosts import (
    DEFAULT_PROXY_PORT,
    MAX_ENTRIES,
    EntryKind,
    Strategy,
    UpstreamEntry,
    UpstreamList,
    UpstreamSyntaxError,
    parse_entry,
    parse_upstreams,
)

INET, UNIX, SRV = EntryKind.INET, EntryKind.UNIX, EntryKind.SRV

#: (element, expected entry) with the proxy default port.
ELEMENT_TABLE: list[tuple[str, UpstreamEntry]] = [
    ("localhost", UpstreamEntry("localhost", "localhost", 11333, 0, INET)),
    ("localhost:11335", UpstreamEntry("localhost:11335", "localhost", 11335, 0, INET)),
    ("scan.example.com:11333:10", UpstreamEntry("scan.example.com:11333", "scan.example.com", 11333, 10, INET)),
    ("127.0.0.1", UpstreamEntry("127.0.0.1", "127.0.0.1", 11333, 0, INET)),
    ("127.0.0.1:8080", UpstreamEntry("127.0.0.1:8080", "127.0.0.1", 8080, 0, INET)),
    ("10.0.0.2:80:3", UpstreamEntry("10.0.0.2:80", "10.0.0.2", 80, 3, INET)),
    ("[::1]", UpstreamEntry("::1", "::1", 11333, 0, INET)),
    ("[::1]:11334", UpstreamEntry("::1", "::1", 11334, 0, INET)),
    ("[2001:db8::5]:11334:7", UpstreamEntry("2001:db8::5", "2001:db8::5", 11334, 7, INET)),
    ("/run/rspamd/normal.sock", UpstreamEntry("/run/rspamd/normal.sock", "/run/rspamd/normal.sock", None, 0, UNIX)),
    ("./normal.sock", UpstreamEntry("./normal.sock", "./normal.sock", None, 0, UNIX)),
    ("/tmp/a:b", UpstreamEntry("/tmp/a:b", "/tmp/a:b", None, 0, UNIX)),
    ("service=rspamd+example.com", UpstreamEntry("_rspamd._tcp.example.com", "_rspamd._tcp.example.com", None, 0, SRV)),
    ("service=rspamd+example.com:5", UpstreamEntry("_rspamd._tcp.example.com", "_rspamd._tcp.example.com", None, 5, SRV)),
    ("under_score-host:1", UpstreamEntry("under_score-host:1", "under_score-host", 1, 0, INET)),
    ("fqdn.example.:65535", UpstreamEntry("fqdn.example.:65535", "fqdn.example.", 65535, 0, INET)),
]

#: (bad element, words the error message must contain)
ERROR_TABLE: list[tuple[str, str]] = [
    ("host:abc", "port"),
    ("host:", "port"),
    ("host:0", "out of range"),
    ("host:65536", "out of range"),
    ("host:99999999999999", "out of range"),
    ("host:1:x", "priority"),
    ("host:1:4294967296", "out of range"),
    ("host:1:2:3", "too many"),
    (":11333", "empty host"),
    ("bad$name", "invalid host name"),
    ("-leading.example", "invalid host name"),
    ("a..b", "invalid host name"),
    ("1.2.3.999", "invalid IPv4"),
    ("::1", "brackets"),
    ("2001:db8::1", "brackets"),
    ("[::1", "missing ']'"),
    ("[example.com]:1", "not an IPv6"),
    ("[127.0.0.1]:1", "not an IPv6"),
    ("[::1]x", "unexpected"),
    ("[::1]:", "port"),
    ("service=rspamd", "service=NAME+DOMAIN"),
    ("service=+example.com", "SRV service"),
    ("service=rspamd+", "empty host"),
    ("service=rspamd+example.com:x", "priority"),
    ("héllo", "non-ASCII"),
    ("a" * 254, "too long"),
]


class ElementFormTests(unittest.TestCase):
    """Each element form parses to the expected entry."""

    def test_element_table(self) -> None:
        """Every form in the table yields its name, host, port, priority, kind."""
        for element, expected in ELEMENT_TABLE:
            with self.subTest(element=element):
                self.assertEqual(parse_entry(element, DEFAULT_PROXY_PORT), expected)

    def test_default_port_from_caller(self) -> None:
        """An element without a port takes the caller's default port."""
        self.assertEqual(parse_entry("scanner", 11335).port, 11335)

    def test_unix_socket_ignores_default_port(self) -> None:
        """Unix sockets have no port whatever the default."""
        self.assertIsNone(parse_entry("/s", 11335).port)

    def test_numeric_flag(self) -> None:
        """IP literals and unix paths need no resolution; names and SRV do."""
        self.assertEqual(
            [parse_entry(e).numeric for e in ("1.2.3.4", "[::1]", "/s", "host", "service=a+b.c")],
            [True, True, True, False, False],
        )


class ElementErrorTests(unittest.TestCase):
    """Malformed elements raise UpstreamSyntaxError with a clear message."""

    def test_error_table(self) -> None:
        """Each bad element raises UpstreamSyntaxError naming the problem."""
        for element, words in ERROR_TABLE:
            with self.subTest(element=element):
                with self.assertRaises(UpstreamSyntaxError) as caught:
                    parse_upstreams(element)
                self.assertIn(words, str(caught.exception))

    def test_error_is_value_error(self) -> None:
        """UpstreamSyntaxError is a ValueError."""
        self.assertTrue(issubclass(UpstreamSyntaxError, ValueError))

    def test_empty_element_rejected(self) -> None:
        """parse_entry refuses an empty element."""
        self.assertRaises(UpstreamSyntaxError, parse_entry, "")

    def test_separator_inside_element_rejected(self) -> None:
        """parse_entry refuses text that still holds separators."""
        self.assertRaises(UpstreamSyntaxError, parse_entry, "a,b")


class LineTests(unittest.TestCase):
    """Lines: prefixes, separators, arrays."""

    def test_prefixes(self) -> None:
        """Every rotation prefix selects its strategy and is not part of a name."""
        for strategy in Strategy:
            with self.subTest(strategy=strategy):
                parsed = parse_upstreams(f"{strategy.value}:h1,h2")
                self.assertEqual(parsed.strategy, strategy)
                self.assertEqual(parsed.names(), ["h1", "h2"])

    def test_default_strategy_is_round_robin(self) -> None:
        """Without a prefix the proxy default, round-robin, applies."""
        self.assertEqual(parse_upstreams("a,b").strategy, Strategy.ROUND_ROBIN)

    def test_caller_default_strategy(self) -> None:
        """The caller may choose another default strategy."""
        self.assertEqual(parse_upstreams("a", default_strategy=Strategy.RANDOM).strategy, Strategy.RANDOM)

    def test_all_separators(self) -> None:
        """Elements split on ; , space TAB CR LF, runs of them included."""
        parsed = parse_upstreams("a;b,c d\te\rf\ng ,; \r\n h")
        self.assertEqual(parsed.names(), ["a", "b", "c", "d", "e", "f", "g", "h"])

    def test_leading_and_trailing_separators(self) -> None:
        """Separators at either end produce no empty element."""
        self.assertEqual(parse_upstreams(" ,a, ").names(), ["a"])

    def test_array_last_prefix_wins(self) -> None:
        """With an array of lines, the last prefix parsed wins."""
        parsed = parse_upstreams(["random:a", "b", "hash:c", "d"])
        self.assertEqual(parsed.strategy, Strategy.HASH)
        self.assertEqual(parsed.names(), ["a", "b", "c", "d"])

    def test_sequential_prefix_accepted(self) -> None:
        """sequential: (absent from Rspamd's config) is accepted."""
        self.assertEqual(parse_upstreams("sequential:a,b").strategy, Strategy.SEQUENTIAL)

    def test_master_slave_first_gets_priority(self) -> None:
        """With master-slave:, the first element gets priority 1 when it has none."""
        parsed = parse_upstreams("master-slave:a,b:11333:0,c")
        self.assertEqual([e.weight_or_priority for e in parsed.entries], [1, 0, 0])

    def test_master_slave_explicit_priority_kept(self) -> None:
        """An explicit priority of the first master-slave element is kept."""
        parsed = parse_upstreams("master-slave:a:11333:5,b")
        self.assertEqual(parsed.entries[0].weight_or_priority, 5)

    def test_round_robin_first_has_no_priority(self) -> None:
        """The priority heuristic applies to master-slave only."""
        self.assertEqual(parse_upstreams("a,b").entries[0].weight_or_priority, 0)

    def test_mixed_forms_in_one_line(self) -> None:
        """Different forms may be mixed on one line."""
        parsed = parse_upstreams("hash:[::1]:1:2, /s, 1.2.3.4, service=x+y.z")
        self.assertEqual([e.kind for e in parsed.entries], [INET, UNIX, INET, SRV])
        self.assertEqual(parsed.names(), ["::1", "/s", "1.2.3.4", "_x._tcp.y.z"])

    def test_result_type(self) -> None:
        """The result is an immutable UpstreamList of entries."""
        parsed = parse_upstreams("a")
        self.assertIsInstance(parsed, UpstreamList)
        self.assertIsInstance(parsed.entries, tuple)

    def test_empty_line_rejected(self) -> None:
        """A list with no element is an error."""
        for lines in ("", " ,;", "round-robin:", [], ["", "\n"]):
            with self.subTest(lines=lines):
                self.assertRaises(UpstreamSyntaxError, parse_upstreams, lines)

    def test_non_string_line_rejected(self) -> None:
        """A non-string array element is an error, not a TypeError."""
        self.assertRaises(UpstreamSyntaxError, parse_upstreams, ["a", 5])

    def test_too_many_entries_rejected(self) -> None:
        """More than MAX_ENTRIES elements are refused."""
        self.assertRaises(UpstreamSyntaxError, parse_upstreams, ",".join(["h"] * (MAX_ENTRIES + 1)))

    def test_overlong_line_rejected(self) -> None:
        """A line over the length bound is refused before splitting."""
        self.assertRaises(UpstreamSyntaxError, parse_upstreams, "a," * 40000)

    def test_bad_default_port_rejected(self) -> None:
        """The caller's default port must be a TCP port."""
        self.assertRaises(UpstreamSyntaxError, parse_upstreams, "a", 0)

    def test_unknown_prefix_is_host_port(self) -> None:
        """An unknown word: prefix is read as host:port and fails on the port."""
        with self.assertRaises(UpstreamSyntaxError) as caught:
            parse_upstreams("weighted:a")
        self.assertIn("port", str(caught.exception))


class FuzzTests(unittest.TestCase):
    """Random input raises nothing but UpstreamSyntaxError."""

    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet=st.sampled_from(list("ab1:[]/.,; \t\r\n+=service-_fe80%") + ["é", "\x00"]), max_size=60))
    def test_fuzz_structured(self, text: str) -> None:
        """Text built from the syntax characters parses or raises the declared error."""
        try:
            parsed = parse_upstreams(text)
        except UpstreamSyntaxError:
            return
        self.assertTrue(parsed.entries)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.text(max_size=30), max_size=4))
    def test_fuzz_arrays(self, lines: list[str]) -> None:
        """Arrays of arbitrary text parse or raise the declared error."""
        try:
            parsed = parse_upstreams(lines)
        except UpstreamSyntaxError:
            return
        for entry in parsed.entries:
            self.assertTrue(entry.name)
