"""Tests for :mod:`rspamd_tx.config.ucl`, the UCL parser.

Expected trees in the tables were checked against ``rspamadm configdump``
(Rspamd 3.4); ``tests/test_ucl_differential.py`` compares whole files with it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import TestCase

from rspamd_tx.config import ucl
from rspamd_tx.config.tree import ConfigError, Location, UclObject

SEEDS = Path(__file__).parent / "data" / "seeds"
EXPECTED_SEEDS = Path(__file__).parent / "data" / "ucl" / "seeds"  # rspamadm configdump output
VARS = {"CONFDIR": "/c", "DBDIR": "/d"}


class TableMixin:
    """Helpers to check tables of (text, expected tree)."""

    def assertTable(self, table: list[tuple[str, dict[str, Any]]]) -> None:
        for text, expected in table:
            got = ucl.loads(text, variables=VARS)
            self.assertEqual(got, expected, f"for {text!r}")  # type: ignore[attr-defined]


class SyntaxTests(TableMixin, TestCase):
    """Keys, separators, objects and arrays."""

    def test_separators(self) -> None:
        """``=``, ``:`` and whitespace all separate a key from its value; ``;``, ``,`` and newlines end it."""
        self.assertTable([
            ("a = 1; b: 2; c 3; d = \"x\"", {"a": 1, "b": 2, "c": 3, "d": "x"}),
            ("a = 1\nb = 2\nc {\n d = 3\n}\ne = 4", {"a": 1, "b": 2, "c": {"d": 3}, "e": 4}),
            ("a: { b: 1 }, c: [1,2]", {"a": {"b": 1}, "c": [1, 2]}),
            ("a =\n  5;", {"a": 5}),
            ("{ a = 1; }", {"a": 1}),
            ("", {}),
        ])

    def test_nested_objects(self) -> None:
        """Braces make objects, empty ones included."""
        self.assertTable([
            ("a { b = 1; c { d = 2 } }", {"a": {"b": 1, "c": {"d": 2}}}),
            ("a {}; b = {}", {"a": {}, "b": {}}),
        ])

    def test_named_sections(self) -> None:
        """Keys before a brace nest: ``s "x" { }`` is ``s { x { } }``."""
        self.assertTable([
            ('upstream "local" { default = yes; }', {"upstream": {"local": {"default": True}}}),
            ("a b c { d = 1 }", {"a": {"b": {"c": {"d": 1}}}}),
            ('a "b" [1, 2]', {"a": {"b": [1, 2]}}),
        ])

    def test_repeated_named_sections_make_an_array(self) -> None:
        """Two sections of one name are an implicit array of single-key objects, as configdump shows."""
        self.assertTable([
            ('s "x" { a = 1 } s "y" { b = 2 }', {"s": [{"x": {"a": 1}}, {"y": {"b": 2}}]}),
            ("a { x = 1 } a { y = 2 }", {"a": [{"x": 1}, {"y": 2}]}),
        ])

    def test_repeated_keys_make_implicit_arrays(self) -> None:
        """A key written again at the same priority collects its values in order."""
        self.assertTable([
            ("k = 1; k = 2; k = 3;", {"k": [1, 2, 3]}),
            ('secure_ip = "127.0.0.1";\nsecure_ip = "::1";', {"secure_ip": ["127.0.0.1", "::1"]}),
            ("k = 1; k = [2];", {"k": [1, [2]]}),
        ])

    def test_implicit_array_after_an_explicit_array_keeps_the_array(self) -> None:
        """configdump prints only the first explicit array when a key repeats after it."""
        self.assertTable([("k = [1]; k = 2;", {"k": [1]})])

    def test_arrays(self) -> None:
        """Arrays accept trailing commas, newline separators and nesting."""
        self.assertTable([
            ("a = [1, 2, 3,]; c = []", {"a": [1, 2, 3], "c": []}),
            ('b = [\n"x"\n"y"\n]', {"b": ["x", "y"]}),
            ("b = [1\n2\n3]", {"b": [1, 2, 3]}),
            ("a = [1,,2]", {"a": [1, 2]}),
            ("a = [[1], {b = 2}]", {"a": [[1], {"b": 2}]}),
            ("a = [1 2]", {"a": ["1 2"]}),
        ])

    def test_missing_comma_between_quoted_elements_is_accepted(self) -> None:
        """``["a" "b"]`` on one line is two elements (Rspamd 3.4 rejects it; harmless to accept)."""
        self.assertTable([('a = ["x" "y", {} {}]', {"a": ["x", "y", {}, {}]})])

    def test_keys(self) -> None:
        """Keys may be quoted, start with a digit or ``/`` and hold ``-`` and ``.``."""
        self.assertTable([
            ('"quoted key" = 1; key-with.dots = 2; 9num = 3; /slash = 4',
             {"quoted key": 1, "key-with.dots": 2, "9num": 3, "/slash": 4}),
            ('"a\\tb" = 1', {"a\tb": 1}),
        ])

    def test_comments(self) -> None:
        """``#`` runs to the end of the line; ``/* */`` nests; ``//`` is not a comment."""
        self.assertTable([
            ("# c\na = 1; /* x /* nested */ y */ b = 2 // not\n", {"a": 1, "b": "2 // not"}),
            ("a = 1 # trailing\nb = 2", {"a": 1, "b": 2}),
            ('/* "*/" */ a = 1', {"a": 1}),
            ("a = # comment\n 1", {"a": 1}),
        ])

    def test_top_object_ends_the_document(self) -> None:
        """Text after the closing brace of a braced document is ignored, as libucl does."""
        self.assertTable([("{ a = 1 } b = 2", {"a": 1})])


class ValueTests(TableMixin, TestCase):
    """Strings, numbers, booleans and variables."""

    def test_double_quoted_strings(self) -> None:
        """JSON escapes are decoded; unknown escapes keep the character."""
        self.assertTable([
            (r'a = "t\tn\nq\"b\\s\/u\u00e9"; b = "\x"', {"a": 't\tn\nq"b\\s/u\u00e9', "b": "x"}),
            (r'a = "\r\b\f"', {"a": "\r\b\f"}),
        ])

    def test_single_quoted_strings(self) -> None:
        """Only ``\\'`` and line continuations are escapes, and variables are not expanded."""
        self.assertTable([
            ("a = 'it\\'s'; b = 'x\\ny'; c = '$CONFDIR'", {"a": "it's", "b": "x\\ny", "c": "$CONFDIR"}),
            ("a = 'x\\\ny'", {"a": "xy"}),
            ("backend = 'redis';", {"backend": "redis"}),
        ])

    def test_heredoc(self) -> None:
        """``<<EOD`` takes the lines up to one that starts with ``EOD``."""
        self.assertTable([
            ("a = <<EOD\nline1\nline2\nEOD;\nb = 1", {"a": "line1\nline2", "b": 1}),
            ("a = <<EOD\n$CONFDIR\nEODX\nEOD\n", {"a": "/c\nEODX"}),
        ])

    def test_atoms(self) -> None:
        """Bare words run to a separator, keep inner spaces and balanced brackets."""
        self.assertTable([
            ("a = hello world; b = x{y}z; c = a[1]b; d = 127.0.0.1:11333; e = 10 ; f = 10s ;",
             {"a": "hello world", "b": "x{y}z", "c": "a[1]b", "d": "127.0.0.1:11333", "e": 10, "f": "10s"}),
            ("a = x\\ y", {"a": "x y"}),
            ("local_addrs = [192.168.0.0/16, fd00::/8];", {"local_addrs": ["192.168.0.0/16", "fd00::/8"]}),
        ])

    def test_numbers_with_multipliers(self) -> None:
        """``k m g`` multiply by 1000 (ints stay ints), ``kb mb gb`` by 1024 (always int)."""
        self.assertTable([
            ("a = 10k; b = 10kb; c = 1.5k; d = 1.5kb; e = 10m; f = 10mb; g = 2g; h = 2gb",
             {"a": 10000, "b": 10240, "c": 1500.0, "d": 1024, "e": 10000000, "f": 10485760,
              "g": 2000000000, "h": 2147483648}),
        ])
        got = ucl.loads("c = 1.5k; a = 10k")
        self.assertIs(type(got["c"]), float)
        self.assertIs(type(got["a"]), int)

    def test_plain_numbers(self) -> None:
        """Decimal, hex, negative, floats and exponents."""
        self.assertTable([
            ("i = 0x1f; j = -5; k = 1e3; l = 1.5e-2; m = 1.; n = 01; o = -0.5",
             {"i": 31, "j": -5, "k": 1000.0, "l": 0.015, "m": 1.0, "n": 1, "o": -0.5}),
            ("a = 1e5x", {"a": 0}),
            ("d = 5 s; e = 10min2", {"d": "5 s", "e": "10min2"}),
        ])

    def test_times(self) -> None:
        """``ms s min h d w y`` give float seconds; a bare ``m`` is a multiplier."""
        self.assertTable([
            ("a = 10ms; b = 10s; c = 5min; d = 2h; e = 1d; f = 1w; g = 1y; h = 1.5s; i = 10m; j = -1s",
             {"a": 0.01, "b": 10.0, "c": 300.0, "d": 7200.0, "e": 86400.0, "f": 604800.0,
              "g": 31536000.0, "h": 1.5, "i": 10000000, "j": -1.0}),
        ])
        self.assertIs(type(ucl.loads("b = 10s")["b"]), float)

    def test_booleans_and_null(self) -> None:
        """``yes no true false on off`` in any case; ``null``, ``nan`` and ``inf``."""
        self.assertTable([
            ("a = yes; b = no; c = true; d = false; e = on; f = off; g = YES; h = null; i = nan1; j = True",
             {"a": True, "b": False, "c": True, "d": False, "e": True, "f": False, "g": True,
              "h": None, "i": "nan1", "j": True}),
        ])
        got = ucl.loads("a = nan; b = inf")
        self.assertTrue(math.isnan(got["a"]))
        self.assertEqual(got["b"], math.inf)

    def test_variables(self) -> None:
        """``$VAR`` and ``${VAR}`` expand; unknown ones and a lone ``$$`` stay as written."""
        self.assertTable([
            ('a = "$CONFDIR/x"; b = "${CONFDIR}x"; c = $DBDIR/y; d = "$NOPE"; e = "$$"; '
             'f = "$$ $CONFDIR"; g = "${NOPE}"',
             {"a": "/c/x", "b": "/cx", "c": "/d/y", "d": "$NOPE", "e": "$$", "f": "$ /c", "g": "${NOPE}"}),
        ])

    def test_variable_names_match_by_prefix_in_order(self) -> None:
        """``$VERSION_MAJOR`` expands ``$VERSION`` when that is defined first, as in Rspamd."""
        got = ucl.loads('a = "$VERSION_MAJOR"; b = "${VERSION_MAJOR}"',
                        variables={"VERSION": "3.4", "VERSION_MAJOR": "3"})
        self.assertEqual(got, {"a": "3.4_MAJOR", "b": "3"})

    def test_keys_are_not_expanded(self) -> None:
        """Variables in keys stay as written."""
        self.assertEqual(ucl.loads('"$CONFDIR" = 1', variables=VARS), {"$CONFDIR": 1})


class LocationTests(TestCase):
    """Where keys were written."""

    def test_key_locations(self) -> None:
        """Each key records its file, line and column (1-based)."""
        tree = ucl.loads("a = 1;\n  b {\n    c = 2\n  }\n", filename="x.conf")
        self.assertEqual(tree.location("a"), Location("x.conf", 1, 1))
        self.assertEqual(tree.location("b"), Location("x.conf", 2, 3))
        self.assertEqual(tree["b"].location("c"), Location("x.conf", 3, 5))

    def test_result_types(self) -> None:
        """Objects are :class:`UclObject` and arrays plain lists."""
        tree = ucl.loads("a { b = [1] } c = 1; c = 2")
        self.assertIs(type(tree), UclObject)
        self.assertIs(type(tree["a"]), UclObject)
        self.assertIs(type(tree["a"]["b"]), list)
        self.assertIs(type(tree["c"]), list)

    def test_included_keys_name_their_file(self) -> None:
        """Keys read from an included file carry that file's path."""
        base = Path(self.mktemp())
        base.mkdir()
        (base / "inc.conf").write_text("x = 1\n")
        tree = ucl.loads(f'.include "{base}/inc.conf"\n')
        self.assertEqual(tree.location("x"), Location(str((base / "inc.conf").resolve()), 1, 1))


class ErrorTests(TestCase):
    """Every syntax error is a :class:`ConfigError` with its location."""

    ERRORS = [
        ('a = "abc', 1, 5, "no quote at the end of json string"),
        ("a = 'abc", 1, 5, "no quote at the end of single quoted string"),
        ('a = "x\ny"', 1, 7, "unexpected newline"),
        ('a = "\x01"', 1, 6, "unexpected control character"),
        ("a { b = 1", 1, 3, "unmatched open brace"),
        ("a = [1, 2", 1, 5, "unmatched open bracket"),
        ("a = 1 }", 1, 7, "object closed with } is not opened with {"),
        ("a = 1; ]", 1, 8, "key must begin with a letter"),
        ("= 1", 1, 1, "key must begin with a letter"),
        ("a{ b = 1 }", 1, 2, "invalid character in a key"),
        ("a", 1, 1, "unfinished key"),
        ("a =", 1, 1, "unfinished key"),
        ('"" = 1', 1, 1, "empty keys are not allowed"),
        ("a := 1", 1, 4, "unexpected '=' character"),
        ('a = "x" "y"', 1, 9, "delimiter is missing"),
        ("x = 1\n/* unterminated", 2, 1, "unfinished multiline comment"),
        ("a = <<EOD\nxx\n", 1, 5, "unterminated multiline value"),
        ('a = "\\u12"', 1, 10, "invalid utf escape"),
        ("a = 99999999999999999999", 1, 5, "numeric value out of range"),
        ("a = 1e999", 1, 5, "numeric value out of range"),
        ("a = { b = [1 }", 1, 14, "unexpected terminating symbol detected"),
        ("[1,2]", 1, 1, "the top level of a configuration must be an object"),
        ('x = 1;\n.foo "x"', 2, 1, "unknown macro: 'foo'"),
        (".include", 1, 1, "unfinished macro"),
        ('. "x"', 1, 1, "invalid macro name"),
        (".include(try=true", 1, 9, "unterminated macro arguments"),
        ('.include(a = "x" "y") "z"', 1, 9, "macro arguments parsing error"),
        ('.priority "x"', 1, 1, "Invalid priority value in macro: x"),
        ('.load "x"', 1, 1, "the 'load' macro is not supported"),
        ('.include "/nonexistent/x.conf"', 1, 1, "cannot open file /nonexistent/x.conf"),
        ('.include(sign=true) "/x"', 1, 1, "signed includes are not supported"),
    ]

    def test_error_locations(self) -> None:
        """Each broken input fails with its message at its line and column."""
        for text, line, column, message in self.ERRORS:
            with self.assertRaises(ConfigError, msg=repr(text)) as caught:
                ucl.loads(text, filename="t.conf")
            error = caught.exception
            self.assertIn(message, error.message, repr(text))
            self.assertEqual((error.location.filename, error.location.line, error.location.column),
                             ("t.conf", line, column), repr(text))

    def test_error_string_has_location(self) -> None:
        """``str(error)`` is ``file:line:col: message``."""
        with self.assertRaises(ConfigError) as caught:
            ucl.loads("a {", filename="t.conf")
        self.assertEqual(str(caught.exception), "t.conf:1:3: unmatched open brace")

    def test_missing_file(self) -> None:
        """:func:`ucl.load` of a missing file is a ConfigError."""
        self.assertRaises(ConfigError, ucl.load, "/nonexistent/rspamd.conf")

    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet=st.sampled_from(list('ab1 =:;,{}[]"\'\\\n#/*.<EOD$-xkms(){}u')), max_size=60))
    def test_fuzz_only_config_errors(self, text: str) -> None:
        """Random text either parses or raises ConfigError, nothing else."""
        try:
            result = ucl.loads(text)
        except ConfigError as exc:
            self.assertIsInstance(exc.location, Location)
        else:
            self.assertIsInstance(result, UclObject)

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=80))
    def test_fuzz_any_text(self, text: str) -> None:
        """Arbitrary unicode text either parses or raises ConfigError."""
        try:
            ucl.loads(text)
        except ConfigError:
            pass

    def test_deep_nesting(self) -> None:
        """Absurd nesting is a ConfigError, not a RecursionError."""
        self.assertRaises(ConfigError, ucl.loads, "a " + "{ a " * 5000)


class IncludeTests(TestCase):
    """The ``.include`` family of macros and priorities."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()

    def write(self, name: str, text: str) -> str:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return str(path)

    def parse(self, text: str) -> UclObject:
        return ucl.loads(text, variables={"D": str(self.dir)})

    def test_plain_include(self) -> None:
        """An include puts the file's keys where the macro is."""
        self.write("a.inc", "x = 1; y { z = 2 }")
        self.assertEqual(self.parse('s { .include "$D/a.inc" }'), {"s": {"x": 1, "y": {"z": 2}}})

    def test_include_parameters_separated_by_semicolons(self) -> None:
        """``(try=true; priority=1,duplicate=merge)`` parses like Rspamd's own files write it."""
        self.write("a.inc", "x = 2")
        tree = self.parse('x = 1;\n.include(try=true; priority=1,duplicate=merge) "$D/a.inc"')
        self.assertEqual(tree, {"x": 2})

    def test_missing_try_include_is_skipped(self) -> None:
        """``try=true`` and ``.try_include`` skip a missing file."""
        tree = self.parse('a = 1\n.include(try=true) "$D/none.inc"\n.try_include "$D/none2.inc"\n')
        self.assertEqual(tree, {"a": 1})

    def test_missing_include_fails(self) -> None:
        """Without ``try`` a missing file is an error."""
        self.assertRaises(ConfigError, self.parse, '.include "$D/none.inc"')

    def test_error_in_included_file_names_it(self) -> None:
        """A syntax error inside an included file points into that file."""
        path = self.write("bad.inc", "ok = 1\nbad = {\n")
        with self.assertRaises(ConfigError) as caught:
            self.parse('.include "$D/bad.inc"')
        self.assertEqual(caught.exception.location.filename, str(Path(path).resolve()))
        self.assertEqual(caught.exception.location.line, 2)

    def test_higher_priority_wins_regardless_of_order(self) -> None:
        """A priority-10 value replaces priority 0 whether it comes first or last."""
        self.write("hi.inc", "x = 10; s { a = 10 }")
        self.write("lo.inc", "x = 0; s { b = 0 }")
        first = self.parse('.include(priority=10) "$D/hi.inc"\n.include "$D/lo.inc"')
        last = self.parse('.include "$D/lo.inc"\n.include(priority=10) "$D/hi.inc"')
        self.assertEqual(first, {"x": 10, "s": {"a": 10}})
        self.assertEqual(last, {"x": 10, "s": {"a": 10}})

    def test_same_priority_appends(self) -> None:
        """Equal priorities make an implicit array."""
        self.write("a.inc", "x = 2")
        self.assertEqual(self.parse('x = 1\n.include "$D/a.inc"'), {"x": [1, 2]})

    def test_merge_merges_objects(self) -> None:
        """``duplicate=merge`` merges objects key by key and replaces scalars by priority."""
        self.write("local.inc", 'upstream "local" { hosts = "h2"; x = 1 } upstream "scan" { hosts = "s" }')
        tree = self.parse('upstream "local" { default = yes; hosts = "h1" }\n'
                          '.include(priority=1,duplicate=merge) "$D/local.inc"')
        self.assertEqual(tree, {"upstream": {"local": {"default": True, "hosts": "h2", "x": 1},
                                             "scan": {"hosts": "s"}}})

    def test_merge_appends_to_arrays(self) -> None:
        """``duplicate=merge`` appends array elements."""
        self.write("local.inc", "a = [3]")
        self.assertEqual(self.parse('a = [1, 2]\n.include(priority=1,duplicate=merge) "$D/local.inc"'),
                         {"a": [1, 2, 3]})

    def test_merge_same_priority_scalar_appends(self) -> None:
        """Under ``merge`` equal-priority scalars still form an implicit array."""
        self.write("local.inc", "a = 2")
        self.assertEqual(self.parse('a = 1\n.include(duplicate=merge) "$D/local.inc"'), {"a": [1, 2]})

    def test_merge_into_implicit_array(self) -> None:
        """Merging into repeated sections finds keys in any of them."""
        self.write("local.inc", 'upstream "scan" { hosts = "new" }')
        tree = self.parse('upstream "local" { a = 1 } upstream "scan" { hosts = "old" }\n'
                          '.include(priority=1,duplicate=merge) "$D/local.inc"')
        self.assertEqual(tree, {"upstream": [{"local": {"a": 1}}, {"scan": {"hosts": "new"}}]})

    def test_merge_object_with_array_fails(self) -> None:
        """Merging an array into an object is an error."""
        self.write("local.inc", "a = [1]")
        self.assertRaises(ConfigError, self.parse,
                          'a { b = 1 }\n.include(priority=1,duplicate=merge) "$D/local.inc"')

    def test_override_replaces_whole_sections(self) -> None:
        """``priority=10`` replaces a section instead of merging it."""
        self.write("override.inc", 'upstream "scan" { hosts = "s" }')
        tree = self.parse('upstream "local" { hosts = "l" }\n.include(priority=10) "$D/override.inc"')
        self.assertEqual(tree, {"upstream": {"scan": {"hosts": "s"}}})

    def test_rewrite_replaces_regardless_of_priority(self) -> None:
        """``duplicate=rewrite`` replaces even a higher-priority value."""
        self.write("a.inc", "x = 2")
        tree = self.parse('.priority 5\nx = 1\n.include(duplicate=rewrite) "$D/a.inc"')
        self.assertEqual(tree, {"x": 2})

    def test_duplicate_error(self) -> None:
        """``duplicate=error`` fails on a key that exists."""
        self.write("a.inc", "x = 2")
        self.assertRaises(ConfigError, self.parse, 'x = 1\n.include(duplicate=error) "$D/a.inc"')

    def test_priority_macro(self) -> None:
        """``.priority N`` sets the priority of what follows in the same file."""
        self.assertEqual(self.parse("x = 1\n.priority 2\nx = 2\n.priority 1\nx = 3\n"), {"x": 2})

    def test_priority_wraps_at_sixteen(self) -> None:
        """Priorities are four bits wide: 16 is 0."""
        self.write("a.inc", "x = 2")
        self.assertEqual(self.parse('x = 1\n.include(priority=16) "$D/a.inc"'), {"x": [1, 2]})

    def test_glob_include(self) -> None:
        """``glob=true`` includes every match in sorted order."""
        self.write("d/b.conf", "x = 2")
        self.write("d/a.conf", "x = 1")
        self.assertEqual(self.parse('.include(glob=true) "$D/d/*.conf"'), {"x": [1, 2]})
        self.assertEqual(self.parse('.include(glob=true,try=true) "$D/none/*.conf"'), {})
        self.assertRaises(ConfigError, self.parse, '.include(glob=true) "$D/none/*.conf"')

    def test_glob_needs_the_parameter(self) -> None:
        """Without ``glob=true`` a pattern is a literal (missing) file name."""
        self.write("d/a.conf", "x = 1")
        self.assertRaises(ConfigError, self.parse, '.include "$D/d/*.conf"')

    def test_prefix_and_key(self) -> None:
        """``prefix=true`` nests under the file's base name, ``key=`` under a given key."""
        self.write("mod.conf", "x = 1")
        self.assertEqual(self.parse('.include(prefix=true) "$D/mod.conf"'), {"mod": {"x": 1}})
        self.assertEqual(self.parse('.include(key="k", target="array") "$D/mod.conf"'), {"k": [{"x": 1}]})

    def test_filename_and_curdir(self) -> None:
        """``$FILENAME`` and ``$CURDIR`` follow the file being read."""
        inner = self.write("sub/inner.inc", 'f = "$FILENAME"; d = "$CURDIR"')
        outer = self.write("outer.conf", 'f = "$FILENAME"\n.include "$CURDIR/sub/inner.inc"\ng = "$FILENAME"')
        tree = ucl.load(outer)
        real_inner = str(Path(inner).resolve())
        real_outer = str(Path(outer).resolve())
        self.assertEqual(tree, {"f": [real_outer, real_inner], "d": os.path.dirname(real_inner),
                                "g": real_outer})

    def test_self_include_fails(self) -> None:
        """A file including itself is an error."""
        path = self.write("self.conf", '.include "$FILENAME"')
        self.assertRaises(ConfigError, ucl.load, path)

    def test_include_depth_limit(self) -> None:
        """Includes nest at most 16 deep."""
        self.write("loop_a.conf", '.include "$CURDIR/loop_b.conf"')
        self.write("loop_b.conf", '.include "$CURDIR/loop_a.conf"')
        with self.assertRaises(ConfigError) as caught:
            self.parse('.include "$D/loop_a.conf"')
        self.assertIn("maximum include nesting limit", caught.exception.message)

    def test_included_file_may_be_braced(self) -> None:
        """An included file wrapped in braces contributes its keys."""
        self.write("a.inc", "{ x = 1 }")
        self.assertEqual(self.parse('s { .include "$D/a.inc" }'), {"s": {"x": 1}})


class SeedTests(TestCase):
    """The seed snippets of ``tests/data/seeds``."""

    def test_seeds_match_configdump(self) -> None:
        """Every seed parses to the tree ``rspamadm configdump -j`` printed for it."""
        seeds = sorted(SEEDS.iterdir())
        self.assertTrue(seeds)
        for seed in seeds:
            expected = json.loads((EXPECTED_SEEDS / f"{seed.name}.json").read_text())
            self.assertEqual(ucl.load(str(seed)), expected, seed.name)
